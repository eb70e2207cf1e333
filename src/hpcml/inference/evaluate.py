"""Metrics of a model on data: the test split of a built-in dataset, or every row of a user's file /
store (cleaned as at training). `hpcml.evaluate`, `hpcml evaluate` and compress/export reports all
measure through here, with the model's one forward path (`Model.logits` / `Model.predict`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hpcml.config import DataConfig
from hpcml.data.sources import BUILTINS, load_dataset
from hpcml.errors import UsageError

__all__ = ["align_labels", "eval_rows", "evaluate_model"]


def eval_rows(
    m: Any, data: DataConfig, *, target: str | None = None
) -> tuple[np.ndarray, np.ndarray, list, str]:
    """(x, y, classes, name) of the rows to measure `m` on."""
    if data.name in BUILTINS:
        if data.name == "digits" and data.layout == "auto" and len(m.input_shape) == 1:
            data = data.model_copy(update={"layout": "flat"})
        ds = load_dataset(data)
        return ds.x_test, ds.y_test, ds.classes, ds.name
    from hpcml.data.user import read_user_table

    data = data.model_copy(
        update={
            "target": target or data.target or m.meta.get("target"),
            "columns": data.columns or m.meta.get("features"),
            "task": m.task,
        }
    )
    x, y, classes, report = read_user_table(data, data.name)
    return x, y, classes, report.get("source", data.name)


def evaluate_model(m: Any, data: DataConfig, *, target: str | None = None) -> dict[str, Any]:
    """Classification: test_accuracy and test_loss (cross-entropy); regression: test_loss (MSE),
    test_rmse and test_r2. `m` is a Model (or anything with its interface: OnnxModel)."""
    x, y, classes, name = eval_rows(m, data, target=target)
    if m.task == "regression":
        pred = m.predict(x).astype(np.float64)
        y = y.astype(np.float64)
        mse = float(np.mean((pred - y) ** 2))
        sst = float(np.sum((y - y.mean()) ** 2))
        metrics = {
            "test_loss": mse,
            "test_rmse": mse**0.5,
            "test_r2": 1 - mse * len(y) / sst if sst else None,
        }
    else:
        logits = m.logits(x)  # first: a shape mismatch is the clearer error
        if list(classes) != list(m.classes):
            y = align_labels(y, classes, m.classes, name)
        yt = torch.from_numpy(y)
        metrics = {
            "test_accuracy": float((logits.argmax(1) == yt).float().mean()),
            "test_loss": float(torch.nn.functional.cross_entropy(logits, yt)),
        }
    return {**metrics, "rows": len(y), "data": name, "model": m.meta["architecture"], "task": m.task}


def align_labels(y: np.ndarray, classes: list[str], model_classes: list[str], name: str) -> np.ndarray:
    """Map the data's label ids onto the model's class list by class name."""
    unknown = sorted(set(classes) - set(model_classes))
    if unknown:
        raise UsageError(
            f"{name}: labels the model never saw: {', '.join(map(str, unknown[:5]))} "
            f"(model classes: {', '.join(model_classes[:10])})"
        )
    return np.asarray([model_classes.index(c) for c in classes], np.int64)[y]
