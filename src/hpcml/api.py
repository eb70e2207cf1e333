"""Public functions besides `train`: load, evaluate and predict with a model dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcml.config import DataConfig
from hpcml.data.sources import load_dataset
from hpcml.models.io import Model, load_model
from hpcml.training.precision import available_cores


def _model(model: Model | str | Path) -> Model:
    return model if isinstance(model, Model) else load_model(model)


def evaluate(model: Model | str | Path, data: DataConfig | dict | str = "mnist1d") -> dict[str, Any]:
    """Accuracy and loss of a model (or model dir) on the test split of `data`."""
    m = _model(model)
    if isinstance(data, str):
        data = DataConfig(name=data)
    elif isinstance(data, dict):
        data = DataConfig.model_validate(data)
    if data.name == "digits" and data.layout == "auto" and len(m.input_shape) == 1:
        data = data.model_copy(update={"layout": "flat"})
    ds = load_dataset(data)
    torch.set_num_threads(available_cores())
    logits = m.logits(ds.x_test)
    y = torch.from_numpy(ds.y_test)
    if logits.shape[1] != ds.num_classes:
        from hpcml.errors import UsageError

        raise UsageError(
            f"model has {logits.shape[1]} outputs but dataset {ds.name} has {ds.num_classes} classes"
        )
    return {
        "test_accuracy": float((logits.argmax(1) == y).float().mean()),
        "test_loss": float(torch.nn.functional.cross_entropy(logits, y)),
        "rows": len(y),
        "data": ds.name,
        "model": m.meta["architecture"],
    }


def predict(model: Model | str | Path, x: Any, *, probabilities: bool = False) -> np.ndarray:
    """Predicted class indices for each row of `x` (or class probabilities with `probabilities=True`)."""
    m = _model(model)
    return m.predict_proba(x) if probabilities else m.predict(x)
