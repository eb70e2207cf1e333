"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import math

import torch

from hpcml.config import OptimConfig


def _fast_kwargs(cls: type[torch.optim.Optimizer], device: torch.device) -> dict:
    """Fused kernels where this torch supports them for the device, else foreach (multi-tensor)."""
    if device.type == "cuda" or cls in (torch.optim.Adam, torch.optim.AdamW):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(params, cfg: OptimConfig, *, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer `cfg` names; its lr must be resolved (`training.run.resolve_defaults`)."""
    if cfg.lr is None:
        raise ValueError("optim.lr is null: resolve the model's recipe first (training.run.resolve_defaults)")
    if cfg.name in ("sgd", "gd"):
        momentum = cfg.momentum or 0.0
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=momentum,
            nesterov=cfg.nesterov and momentum > 0,
            weight_decay=cfg.weight_decay,
            **_fast_kwargs(torch.optim.SGD, device),
        )
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **_fast_kwargs(cls, device))


def build_schedule(opt: torch.optim.Optimizer, cfg: OptimConfig, *, total_steps: int):
    """A per-step schedule (stepped after every optimizer step), or None for a constant lr."""
    if cfg.schedule == "constant":
        return None
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, one_cycle(max(1, total_steps), cfg.warmup_fraction))


def one_cycle(total: int, warmup_fraction: float, *, div: float = 25.0, final_div: float = 1e4):
    """The one-cycle factor of the peak lr at each step: a cosine warm-up from 1/div to 1 over
    `warmup_fraction` of the steps, then a cosine anneal to 1/(div * final_div) (torch's OneCycleLR
    without momentum cycling). Written out because OneCycleLR divides by zero when the warm-up is
    exactly one step (e.g. 4 steps at 25%), which short runs on small data hit."""
    w_end, a_end = warmup_fraction * total - 1, total - 1  # OneCycleLR's phase ends (steps)
    lo, end = 1.0 / div, 1.0 / (div * final_div)

    def factor(step: int) -> float:
        if step <= w_end and w_end > 0:
            return lo + (1 - lo) * (1 - math.cos(math.pi * step / w_end)) / 2
        span = a_end - w_end
        t = 1.0 if span <= 0 else min(1.0, max(0.0, (step - w_end) / span))
        return end + (1 - end) * (1 + math.cos(math.pi * t)) / 2

    return factor
