"""The training step and the epoch around it. Nothing else lives here.

No host-device sync inside the step: loss and correct counts are accumulated as device tensors and
read once per epoch by the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn


class EpochStats:
    """Running sums kept on the device; `.read()` is the one sync per epoch.

    Classification sums the loss and the correct count. Regression (`y_scale=(mean, std)`: the model
    is trained on standardized targets) sums, in the target's own units, the squared error, y and y^2,
    from which read() gives the MSE and R^2. All are sums, so ranks combine them with one all-reduce.
    """

    def __init__(self, device: torch.device, *, y_scale: tuple[float, float] | None = None):
        self.y_scale = y_scale
        # classification: [loss sum, correct count]; regression: [squared error, y, y^2] sums
        self.sums = torch.zeros(3 if y_scale else 2, dtype=torch.float64, device=device)
        # classification adds into these two 0-d views, one in-place op each (a step at batch 100 is
        # ~1 ms on a CPU, and each small op costs a few microseconds)
        self._loss_sum, self._correct = self.sums[0], self.sums[1]
        self.count = 0  # host-side: batch sizes are known without a sync

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        n = y.shape[0]
        if self.y_scale is None:
            self._loss_sum.add_(loss.detach(), alpha=n)
            self._correct.add_(torch.eq(logits.detach().argmax(1), y).sum())
        else:
            mean, std = self.y_scale
            pred = logits.detach()[:, 0].double() * std + mean
            target = y.double() * std + mean
            self.sums += torch.stack([((pred - target) ** 2).sum(), target.sum(), (target**2).sum()])
        self.count += n

    def totals(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[float]:
        """The sums and the count so far, summed over ranks (a sync; at epoch ends and checkpoints)."""
        t = torch.cat(
            [self.sums, torch.tensor([float(self.count)], dtype=torch.float64, device=self.sums.device)]
        )
        return (reduce(t) if reduce is not None else t).tolist()

    def load(self, totals: list[float]) -> None:
        """Carry the sums of a half-done epoch over from a checkpoint (on one rank only)."""
        self.sums.copy_(torch.tensor(totals[:-1], dtype=torch.float64))
        self.count = int(totals[-1])

    def read(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, float]:
        """(mean loss, accuracy), or for regression (MSE, R^2); `reduce` sums across ranks."""
        *sums, count = self.totals(reduce)  # note: a host-device sync, once per epoch
        count = max(count, 1.0)
        if self.y_scale is None:
            return sums[0] / count, sums[1] / count
        sse, sy, syy = sums
        sst = syy - sy * sy / count
        return sse / count, (1.0 - sse / sst) if sst > 0 else float("nan")


def train_epoch(
    model: nn.Module,
    steps: Iterable[list],
    *,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    autocast,
    schedule=None,
    scaler: torch.amp.GradScaler | None = None,
    stats: EpochStats,
    on_step: Callable[[int, list], None] | None = None,
) -> int:
    """One pass over `steps` (each a list of `Micro` batches), one optimizer step per item.

    With several micro-batches (gradient accumulation) the gradient all-reduce of a DDP model runs
    only on the last one (`no_sync` on the others). `on_step(n, micro)` follows the n-th step.
    Returns the number of optimizer steps taken.
    """
    model.train()
    n_steps = 0
    no_sync = getattr(model, "no_sync", None)
    for micro in steps:
        last = len(micro) - 1
        for j, mb in enumerate(micro):
            with no_sync() if (no_sync is not None and j < last) else contextlib.nullcontext():
                with autocast:
                    logits = model(mb.x)
                    loss = loss_fn(logits, mb.y)
                scaled = loss if mb.weight == 1.0 else loss * mb.weight
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            if mb.count:
                stats.add(loss, logits, mb.y)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if schedule is not None:
            schedule.step()
        n_steps += 1
        if on_step is not None:
            on_step(n_steps, micro)
    return n_steps


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    autocast,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    y_scale: tuple[float, float] | None = None,
    stats: EpochStats | None = None,
) -> EpochStats:
    """Sums of loss and accuracy (R² terms for regression) over x, y; added to `stats` when given, so
    a split evaluated in chunks (streamed) accumulates in one place."""
    model.eval()
    stats = stats if stats is not None else EpochStats(x.device, y_scale=y_scale)
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with autocast:
            logits = model(xb)
        stats.add(loss_fn(logits.float(), yb), logits, yb)
    return stats
