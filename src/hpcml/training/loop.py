"""The training step and the epoch around it. Nothing else lives here.

No host-device sync inside the step: loss and correct counts are accumulated as device tensors and
read once per epoch by the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class EpochStats:
    """Running sums kept on the device; `.read()` is the one sync per epoch."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.count = 0  # host-side: batch sizes are known without a sync

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = y.shape[0]
        self.loss += loss.detach().float() * n
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.count += n

    def read(self) -> tuple[float, float]:
        # note: a host-device sync, once per epoch
        vals = torch.stack([self.loss, self.correct.to(self.loss.dtype)]).tolist()
        n = max(self.count, 1)
        return vals[0] / n, vals[1] / n


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast,
    schedule=None,
    scaler: torch.amp.GradScaler | None = None,
    stats: EpochStats,
    on_step: Callable[[int], None] | None = None,
) -> int:
    """One pass over `batches`, one optimizer step per batch. Returns the number of steps taken."""
    model.train()
    steps = 0
    for x, y in batches:
        with autocast:
            logits = model(x)
            loss = loss_fn(logits, y)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule is not None:
            schedule.step()
        stats.add(loss, logits, y)
        steps += 1
        if on_step is not None:
            on_step(y.shape[0])
    return steps


def full_batch_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast,
    schedule=None,
    stats: EpochStats,
    chunk: int = 16384,
) -> int:
    """Gradient descent on the whole training set: one optimizer step with the exact full-batch
    gradient, computed in chunks so memory stays bounded on large data."""
    model.train()
    n = x.shape[0]
    for i in range(0, n, chunk):
        xb, yb = x[i : i + chunk], y[i : i + chunk]
        with autocast:
            logits = model(xb)
            loss = loss_fn(logits, yb)
        (loss * (yb.shape[0] / n)).backward()  # mean over the whole set, not per chunk
        stats.add(loss, logits, yb)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if schedule is not None:
        schedule.step()
    return 1


@torch.inference_mode()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, autocast,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> EpochStats:
    model.eval()
    stats = EpochStats(x.device)
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with autocast:
            logits = model(xb)
        stats.add(loss_fn(logits.float(), yb), logits, yb)
    return stats
