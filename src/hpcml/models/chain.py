"""A model as a chain of weighted layers, and that chain resized to new widths.

Structured pruning removes whole neurons (Linear outputs) or channels (Conv outputs) and shrinks what
depends on them: a BatchNorm after the layer, the next layer's inputs (through a Flatten, one block of
columns per channel). That is only safe when the order the layers run in is known, so `links` reads
plain chains: an nn.Sequential (nested ones too) or a built-in whose layers are registered in forward
order. Anything else (a residual block, a layer hpcml does not know) is refused, naming the layer.

`resize` rebuilds the layers of a chain at new widths (new, uninitialized tensors on the layers'
device, `meta` included): the loader uses it for a pruned user model (model.json `pruned_widths`),
the pruner (inference/prune.py) before copying the kept rows in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hpcml.errors import HpcmlError, UsageError

__all__ = ["Link", "links", "resize"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHTED = (nn.Linear, *_CONVS)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.Hardswish,
    nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_ORDERED = ("MLP", "CNN1d", "CNN2d")  # built-ins whose children are registered in forward order


@dataclass
class Link:
    """A weighted layer and what runs after it, up to the next weighted layer."""

    name: str
    layer: nn.Module
    norms: list[tuple[str, nn.Module]] = field(default_factory=list)  # BatchNorms over its outputs
    per_unit: int = 1  # inputs of the next layer per output of this one (a Flatten after a conv)


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if not any(True for _ in child.children()):
            out.append((full, child))
        elif isinstance(child, nn.Sequential):
            out += _leaves(child, full + ".")
        else:
            raise UsageError(
                f"cannot prune layer {full!r} ({type(child).__name__}) safely: hpcml prunes chains of "
                "nn.Sequential (Linear/Conv/BatchNorm), whose order it can read"
            )
    return out


def links(module: nn.Module) -> list[Link]:
    """The weighted layers of `module` in forward order, each with its norms; the last is the output."""
    if not isinstance(module, nn.Sequential) and type(module).__name__ not in _ORDERED:
        raise UsageError(
            f"cannot prune {type(module).__name__} safely: hpcml prunes an nn.Sequential chain of "
            "Linear/Conv/BatchNorm layers (or a built-in model), whose layer order it can read"
        )
    chain: list[Link] = []
    flat = False
    for name, leaf in _leaves(module):
        if isinstance(leaf, _WEIGHTED):
            if isinstance(leaf, _CONVS) and leaf.groups != 1:
                raise UsageError(f"cannot prune layer {name!r}: a grouped convolution (groups={leaf.groups})")
            if chain:
                _connect(chain[-1], name, leaf, flat)
            chain.append(Link(name, leaf))
            flat = False
        elif isinstance(leaf, _NORMS):
            if chain and leaf.num_features != _outputs(chain[-1].layer):
                raise UsageError(f"cannot prune layer {name!r}: its features do not match the layer before")
            if chain:
                chain[-1].norms.append((name, leaf))
        elif isinstance(leaf, nn.Flatten):
            flat = True
        elif not isinstance(leaf, _ELEMENTWISE) or any(True for _ in leaf.parameters()):
            raise UsageError(
                f"cannot prune through layer {name!r} ({type(leaf).__name__}): hpcml knows how Linear, "
                "Conv, BatchNorm, activations, dropout, pooling and Flatten depend on their inputs"
            )
    if not chain:
        raise UsageError(f"{type(module).__name__} has no Linear or Conv layer to prune")
    return chain


def _outputs(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _inputs(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _connect(prev: Link, name: str, layer: nn.Module, flat: bool) -> None:
    """How many of `layer`'s inputs each output of `prev` feeds (checked, so slicing is exact)."""
    n_out, n_in = _outputs(prev.layer), _inputs(layer)
    if n_in % n_out or (n_in != n_out and not (flat and isinstance(layer, nn.Linear))):
        raise UsageError(
            f"cannot prune layer {prev.name!r}: layer {name!r} takes {n_in} inputs from its {n_out} outputs"
        )
    prev.per_unit = n_in // n_out


def _rebuilt(layer: nn.Module, n_in: int, n_out: int) -> nn.Module:
    like = layer.weight
    with torch.device(like.device):
        if isinstance(layer, nn.Linear):
            new = nn.Linear(n_in, n_out, bias=layer.bias is not None, dtype=like.dtype)
        else:
            new = type(layer)(
                n_in, n_out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, bias=layer.bias is not None, padding_mode=layer.padding_mode,
                dtype=like.dtype,
            )  # fmt: skip
    return new


def _rebuilt_norm(bn: nn.Module, n: int) -> nn.Module:
    device = next(bn.buffers(), torch.empty(0)).device
    with torch.device(device):
        return type(bn)(n, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                        track_running_stats=bn.track_running_stats)  # fmt: skip


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    new.train(module.get_submodule(name).training)
    parent, _, attr = name.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, attr, new)


def resize(module: nn.Module, widths: dict[str, int], *, where: object = "model") -> list[Link]:
    """Rebuild `module`'s chain in place so each layer named in `widths` has that many outputs (and
    everything after it fits); returns the old chain (its layers keep their old tensors)."""
    chain = links(module)
    known = {link.name for link in chain[:-1]}
    for name, n in widths.items():
        if name not in known:
            raise HpcmlError(f"{where}: pruned_widths: {name!r} is not a prunable layer of the model")
        if not isinstance(n, int) or n < 1 or n > _outputs(module.get_submodule(name)):
            raise HpcmlError(f"{where}: pruned_widths: {name!r}: {n} is not between 1 and the layer's width")
    n_in = _inputs(chain[0].layer)
    for i, link in enumerate(chain):
        n_out = widths.get(link.name, _outputs(link.layer))
        _replace(module, link.name, _rebuilt(link.layer, n_in, n_out))
        for bn_name, bn in link.norms:
            _replace(module, bn_name, _rebuilt_norm(bn, n_out))
        n_in = n_out * link.per_unit if i + 1 < len(chain) else n_in
    return chain
