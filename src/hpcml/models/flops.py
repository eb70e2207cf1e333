"""FLOPs of a model's training step and forward, counted by torch's FlopCounterMode (matmuls and
convolutions, forward and backward). Works on the `meta` device: counting allocates nothing."""

from __future__ import annotations

import torch
from torch import nn


def train_step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn=None) -> int:
    """FLOPs of one forward + backward pass on the batch (x, y), counted by FlopCounterMode.

    The gradients it leaves are cleared, so counting does not disturb a later training step.
    """
    from torch.utils.flop_counter import FlopCounterMode

    loss_fn = loss_fn or nn.functional.cross_entropy
    with FlopCounterMode(display=False) as counter:
        loss_fn(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def forward_flops(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())
