"""Run a model dir with ONNX Runtime: `load_onnx(model_dir)` -> an `OnnxModel` that predicts like
`Model` (same classes, input checks and target scale) through an onnxruntime session.

The ONNX graph comes from inference/export.to_onnx, so normalization is folded in: the session takes
raw features. The model dir is loaded and checked by models.io.load_model first (schema, sha256,
header, trust), then exported in memory; nothing is written. Needs the `onnx` extra:
`pip install 'hpcml[onnx]'` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcml.errors import UsageError
from hpcml.models.io import Model, load_model

__all__ = ["INSTALL", "OnnxModel", "load_onnx", "require_onnx", "session"]

INSTALL = "pip install 'hpcml[onnx]'"


def require_onnx(*modules: str) -> None:
    """Import each module or fail with the one line that says how to install it."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UsageError(f"ONNX support needs {name}, which is not installed: {INSTALL}") from None


def session(onnx_bytes: bytes, *, threads: int = 1) -> Any:
    """An onnxruntime CPU session with an explicit thread count (no oversubscription)."""
    require_onnx("onnxruntime")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: its warnings are not the user's concern
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


class OnnxModel(Model):
    """`Model`'s interface (predict, predict_proba, logits) on an onnxruntime session."""

    def __init__(self, model: Model, onnx_bytes: bytes, *, threads: int = 1):
        super().__init__(model.module, model.meta)
        self.onnx_bytes = onnx_bytes
        self.session = session(onnx_bytes, threads=threads)
        self._input = self.session.get_inputs()[0].name

    def __repr__(self) -> str:
        return "Onnx" + super().__repr__()

    def logits(self, x, *, batch_size: int | None = None) -> torch.Tensor:
        xs = self._rows(x)  # raw features: the graph normalizes
        batch_size = self.rows_per_forward(batch_size)
        out = [
            self.session.run(None, {self._input: xs[i : i + batch_size]})[0]
            for i in range(0, len(xs), batch_size)
        ]
        if not out:
            return torch.empty(0, self.meta.get("num_outputs", len(self.classes)))
        return torch.from_numpy(np.concatenate(out)).float()


def load_onnx(model_dir: str | Path, *, threads: int = 1, trust_code: bool = False) -> OnnxModel:
    """The model dir, checked by load_model, exported to ONNX in memory and run by onnxruntime."""
    from hpcml.inference.export import to_onnx

    require_onnx("onnxruntime", "onnx", "onnxscript")
    model = load_model(model_dir, trust_code=trust_code)
    return OnnxModel(model, to_onnx(model), threads=threads)
