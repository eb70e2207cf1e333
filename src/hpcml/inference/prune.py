"""Structured pruning: whole neurons and channels removed, so the result is a smaller dense model.

Each hidden Linear/Conv layer keeps the `1 - fraction` of its outputs with the largest weight norm
(L2 over the output's row or filter); its bias, the BatchNorms after it and the next layer's inputs
(through a Flatten, each channel's block of columns) keep the same ones. The output layer keeps all
its outputs. A built-in model comes back as the same architecture with per-layer `widths` kwargs
(`create_model` builds it dense); a user chain comes back with `pruned_widths` {layer: outputs}, which
the loader applies through models/chain.resize. No masks anywhere.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hpcml.errors import UsageError
from hpcml.models.chain import links, resize
from hpcml.models.registry import MODEL_NAMES, create_model

__all__ = ["Pruned", "check_prunable", "prune_module", "count_params"]

_WIDTH_KWARGS = {"mlp": ("hidden", "depth"), "cnn1d": ("channels",), "cnn2d": ("channels",)}
_RESIDUAL = ("mobilenet_v2", "mobilenet_v3_small", "resnet18", "resnet34")


@dataclass(frozen=True)
class Pruned:
    module: nn.Module
    kwargs: dict[str, Any]  # the architecture's kwargs (built-ins: with `widths`)
    pruned_widths: dict[str, int] | None  # user models: layer -> outputs kept
    layers: list[dict[str, Any]]  # per layer: name, before, after


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _keep(link, fraction: float) -> torch.Tensor:
    w = link.layer.weight.detach()
    n = w.shape[0]
    k = round(n * (1 - fraction))
    if k < 1:
        raise UsageError(
            f"--prune {fraction} would remove all {n} outputs of layer {link.name!r} (the whole layer); "
            "use a smaller fraction"
        )
    return torch.sort(torch.topk(w.flatten(1).norm(dim=1), k).indices).values


def _columns(keep: torch.Tensor, per_unit: int) -> torch.Tensor:
    """Inputs of the next layer fed by the kept outputs (a block of `per_unit` each after a Flatten)."""
    return (keep[:, None] * per_unit + torch.arange(per_unit)).reshape(-1)


@torch.no_grad()
def _copy_kept(module: nn.Module, old_chain, keeps: dict[str, torch.Tensor]) -> None:
    cols = None
    for link in old_chain:
        new = module.get_submodule(link.name)
        rows = keeps.get(link.name)
        w = link.layer.weight
        w = w if rows is None else w[rows]
        w = w if cols is None else w[:, cols]
        new.weight.copy_(w)
        if link.layer.bias is not None:
            new.bias.copy_(link.layer.bias if rows is None else link.layer.bias[rows])
        for bn_name, bn in link.norms:
            new_bn = module.get_submodule(bn_name)
            for key, t in bn.state_dict().items():
                dst = new_bn.state_dict()[key]
                dst.copy_(t if t.ndim == 0 or rows is None else t[rows])
        cols = None if rows is None else _columns(rows, link.per_unit)


def check_prunable(architecture: str) -> None:
    """Refuse, before anything is computed, a built-in whose layers this pruner cannot shrink."""
    if architecture not in MODEL_NAMES or architecture in _WIDTH_KWARGS:
        return  # a prunable built-in; a user model is checked layer by layer (models/chain.links)
    why = (
        "its residual blocks are not a plain chain of layers (skip connections tie the channels of the "
        "blocks they join)"
        if architecture in _RESIDUAL
        else "it takes no per-layer widths to be rebuilt at"
    )
    instead = "; train a narrower one instead (--model-kw width=0.5)" if "mobilenet" in architecture else ""
    raise UsageError(
        f"--prune: {architecture} cannot be pruned: {why}; hpcml prunes {', '.join(_WIDTH_KWARGS)} and "
        f"nn.Sequential chains{instead}"
    )


def prune_module(
    module: nn.Module, *, fraction: float, architecture: str, kwargs: dict[str, Any], input_shape, num_outputs
) -> Pruned:
    """A pruned copy of `module` (left unchanged); see the module docstring."""
    if not 0 < fraction < 1:
        raise UsageError(f"--prune must be a fraction between 0 and 1 (exclusive), got {fraction}")
    check_prunable(architecture)
    chain = links(module)
    if len(chain) < 2:
        raise UsageError("nothing to prune: the model has only its output layer")
    keeps = {link.name: _keep(link, fraction) for link in chain[:-1]}
    work = copy.deepcopy(module)
    old_chain = links(work)
    resize(work, {name: len(k) for name, k in keeps.items()})
    _copy_kept(work, old_chain, keeps)
    report = [
        {"layer": link.name, "before": link.layer.weight.shape[0], "after": len(keeps[link.name])}
        for link in chain[:-1]
    ]
    if architecture not in MODEL_NAMES:
        return Pruned(work, dict(kwargs), {n: len(k) for n, k in keeps.items()}, report)
    widths = [len(keeps[link.name]) for link in chain[:-1]]
    new_kwargs = {k: v for k, v in kwargs.items() if k not in _WIDTH_KWARGS[architecture]}
    new_kwargs["widths"] = widths
    dense = create_model(architecture, input_shape=input_shape, num_outputs=num_outputs, **new_kwargs)
    dense.load_state_dict(work.state_dict())  # the built-in at its new widths: same tensors, no masks
    return Pruned(dense.eval(), new_kwargs, None, report)
