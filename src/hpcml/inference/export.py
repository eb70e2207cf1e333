"""ONNX export of a model dir's module with its input normalization folded in.

`torch.onnx.export(..., dynamo=True)` traces `(x - shift) / scale -> module` with a dynamic batch
axis, so the ONNX model takes raw features of shape (batch, *input_shape) and returns the logits
(a regression model: standardized outputs, which OnnxModel rescales like Model). int8 layers are a
torch runtime form (models/int8.py) and are not exported: export the float or pruned model dir.

Runs of Conv1d layers are exported as the equivalent Conv2d over a (C, 1, L) input: onnxruntime's
CPU provider runs 2-D convolutions in its blocked (NCHWc) layout, 1-D ones not. Measured on the
default cnn1d at batch 1024, 1 thread: 13.2 ms as Conv1d, 4.7 ms as Conv2d (torch eager: 6.6 ms);
the same outputs (the export is checked against eager).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings

import torch
from torch import nn

from hpcml.errors import UsageError
from hpcml.inference.onnx_runtime import require_onnx
from hpcml.models.int8 import Int8Linear
from hpcml.models.io import Model

__all__ = ["Folded", "to_onnx"]

OPSET = 18


class Folded(nn.Module):
    """(x - shift) / scale, then the model: what Model.logits computes, as one module."""

    def __init__(self, model: Model):
        super().__init__()
        norm = model.normalizer
        self.module = model.module
        self.register_buffer("shift", torch.from_numpy(norm.shift).float().reshape(1, *norm.shift.shape))
        self.register_buffer("scale", torch.from_numpy(norm.scale).float().reshape(1, *norm.scale.shape))
        self.normalize = norm.method != "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            x = (x - self.shift) / self.scale
        return self.module(x)


def _conv2d(conv: nn.Conv1d) -> nn.Conv2d:
    """The Conv2d with a (1, k) kernel that computes `conv` on a (C, 1, L) input."""
    c2 = nn.Conv2d(
        conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]), stride=(1, conv.stride[0]),
        padding=(0, conv.padding[0]), dilation=(1, conv.dilation[0]), groups=conv.groups,
        bias=conv.bias is not None, padding_mode=conv.padding_mode,
    )  # fmt: skip
    with torch.no_grad():
        c2.weight.copy_(conv.weight[:, :, None, :])
        if conv.bias is not None:
            c2.bias.copy_(conv.bias)
    return c2


class _As2d(nn.Sequential):
    """A run of Conv1d and elementwise layers, computed in 2-D: one unsqueeze in, one squeeze out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.unsqueeze(2)).squeeze(2)


_POINTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity)


def _convertible(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv1d) and not isinstance(m.padding, str)) or isinstance(m, _POINTWISE)


def _conv2d_form(module: nn.Module) -> nn.Module:
    """A copy of `module` where each run of Conv1d (+ activations) inside an nn.Sequential, or a lone
    Conv1d elsewhere, is computed as Conv2d: same values, a layout onnxruntime runs much faster."""
    module = copy.deepcopy(module)
    seqs = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Sequential)]
    for name, seq in reversed(seqs):  # inner chains first: their paths hold until the outer is rebuilt
        out, run = [], []
        for child in [*seq.children(), None]:
            if child is not None and _convertible(child):
                run.append(child)
                continue
            if any(isinstance(m, nn.Conv1d) for m in run):
                out.append(_As2d(*[_conv2d(m) if isinstance(m, nn.Conv1d) else m for m in run]))
            else:
                out += run
            run = []
            if child is not None:
                out.append(child)
        if len(out) == len(seq) or type(seq) is not nn.Sequential and not name:
            continue  # unchanged (or a Sequential subclass at the root, whose forward may differ)
        parent, _, attr = name.rpartition(".")
        if not name:
            module = nn.Sequential(*out)
        else:
            setattr(module.get_submodule(parent) if parent else module, attr, nn.Sequential(*out))
    return module


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress to stdout and logs warnings: keep them off the user's --json."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with warnings.catch_warnings():  # the exporter's own deprecations, not the user's concern
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def to_onnx(model: Model) -> bytes:
    """The serialized ONNX model (opset 18) of `model`, normalization folded in, batch axis dynamic."""
    require_onnx("onnx", "onnxscript")
    if any(isinstance(m, Int8Linear) for m in model.module.modules()):
        raise UsageError(
            "this model dir has int8 layers, a torch runtime form; export the float or pruned model dir "
            "to ONNX instead"
        )
    folded = Folded(model).eval().cpu()
    folded.module = _conv2d_form(folded.module)
    example = torch.zeros(2, *model.input_shape)
    batch = torch.export.Dim("batch", min=1)
    with _quiet(), torch.inference_mode(False), torch.no_grad():
        try:
            program = torch.onnx.export(
                folded, (example,), dynamo=True, input_names=["x"], output_names=["logits"],
                dynamic_shapes={"x": {0: batch}}, opset_version=OPSET, verbose=False,
            )  # fmt: skip
        except Exception as err:  # the exporter's errors are long; the first line names the op
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UsageError(f"ONNX export failed: {first}") from None
    return program.model_proto.SerializeToString()
