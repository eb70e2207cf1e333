"""FLOPs of a model's training step and forward, counted by torch's FlopCounterMode (matmuls and
convolutions, forward and backward). Works on the `meta` device: counting allocates nothing."""

from __future__ import annotations

from typing import Any

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


def model_cost(
    name: str, *, input_shape: tuple[int, ...], num_outputs: int, **kwargs: Any
) -> tuple[int, int]:
    """(parameters, multiply-adds of one forward at batch 1) of registered model `name` with `kwargs`,
    built on the `meta` device (nothing allocated). MACs are FlopCounterMode's FLOPs / 2: it counts
    convolutions and matmuls; BatchNorm, activations, pooling and residual sums are not counted."""
    from hpcml.models.registry import create_model

    with torch.device("meta"):
        module = create_model(name, input_shape=tuple(input_shape), num_outputs=num_outputs, **kwargs).eval()
        macs = forward_flops(module, torch.zeros(1, *input_shape)) // 2
    return sum(p.numel() for p in module.parameters()), macs


def builtin_costs(
    input_shape: tuple[int, ...], num_outputs: int, kwargs: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Built-in name -> {"params", "macs"} (model_cost, each given the `kwargs` it takes), or
    {"error"} where it cannot take this shape or these values."""
    import inspect

    from hpcml.errors import UsageError
    from hpcml.models.registry import MODEL_NAMES, _load_builtin

    out: dict[str, dict[str, Any]] = {}
    for name in MODEL_NAMES:
        takes = inspect.signature(_load_builtin(name)).parameters
        try:
            params, macs = model_cost(
                name, input_shape=input_shape, num_outputs=num_outputs,
                **{k: v for k, v in kwargs.items() if k in takes},
            )  # fmt: skip
        except UsageError as err:
            out[name] = {"error": str(err)}
        else:
            out[name] = {"params": params, "macs": macs}
    return out
