"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import torch

from hpcml.config import OptimConfig


def _fast_kwargs(cls: type[torch.optim.Optimizer], device: torch.device) -> dict:
    """Fused kernels where this torch supports them for the device, else foreach (multi-tensor)."""
    if device.type == "cuda" or cls in (torch.optim.Adam, torch.optim.AdamW):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(params, cfg: OptimConfig, *, device: torch.device) -> torch.optim.Optimizer:
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
    return torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=cfg.lr,
        total_steps=max(2, total_steps),
        pct_start=max(cfg.warmup_fraction, 1e-3),
        cycle_momentum=False,
    )
