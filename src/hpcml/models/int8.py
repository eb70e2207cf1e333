"""int8 Linear layers as plain tensors: int8 weights + one float32 scale per output row.

A quantized model dir stores `weight` (int8, [out, in]), `weight_scale` (float32, [out]) and `bias`
in safetensors like any other tensor, and model.json lists the layers (`quantization.layers`); the
loader builds the float architecture, swaps those layers for `Int8Linear` (on the meta device first,
so the weights' header is checked against the int8 shapes and dtypes) and loads the state. No pickle,
no packed kernel state: the forward quantizes each input row to int8 (dynamic, symmetric) and
multiplies with `torch._int_mm`, int8 x int8 -> int32, then rescales.
"""

from __future__ import annotations

import torch
from torch import nn

from hpcml.errors import HpcmlError

__all__ = ["Int8Linear", "SCHEME", "quantize_weight", "swap_int8"]

SCHEME = "int8-dynamic"


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output row): symmetric, w ~= q * scale[:, None]."""
    scale = (w.detach().float().abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(w.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 and x quantized per row at run time (dynamic activations)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear, q: torch.Tensor | None = None, scale: torch.Tensor | None = None):
        """From a float Linear; `q`, `scale` as another quantizer (torchao) computed them."""
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        if q is None or scale is None:
            q, scale = quantize_weight(linear.weight)
        m.weight.copy_(q)
        m.weight_scale.copy_(scale.reshape(-1))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).float()
        x_scale = (x.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
        xq = torch.round(x / x_scale).to(torch.int8)  # |x / x_scale| <= 127 by construction
        out = torch._int_mm(xq, self.weight.t()).float() * (x_scale * self.weight_scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def swap_int8(module: nn.Module, layers: list[str], *, where: object = "model") -> nn.Module:
    """Replace each named nn.Linear of `module` by an (empty) Int8Linear of its shape, in place."""
    named = dict(module.named_modules())
    for name in layers:
        linear = named.get(name)
        if not isinstance(linear, nn.Linear):
            what = "no such layer" if linear is None else f"a {type(linear).__name__}, not a Linear"
            raise HpcmlError(f"{where}: quantization.layers: {name!r} is {what}")
        with torch.device(linear.weight.device):  # meta when only the header is being checked
            q = Int8Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
        parent, _, attr = name.rpartition(".")
        setattr(named[parent] if parent else module, attr, q)
    return module
