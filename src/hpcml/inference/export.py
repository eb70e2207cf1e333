"""ONNX export of a model dir's module with its input normalization folded in.

`torch.onnx.export(..., dynamo=True)` traces `(x - shift) / scale -> module` with a dynamic batch
axis, so the ONNX model takes raw features of shape (batch, *input_shape) and returns the logits
(a regression model: standardized outputs, which OnnxModel rescales like Model). int8 layers are a
torch runtime form (models/int8.py) and are not exported: export the float or pruned model dir.
"""

from __future__ import annotations

import contextlib
import io
import logging

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


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress to stdout and logs warnings: keep them off the user's --json."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
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
