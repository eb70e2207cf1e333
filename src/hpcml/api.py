"""Public functions besides `train`: load, evaluate and predict with a model dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcml.config import DataConfig
from hpcml.data.sources import BUILTINS, load_dataset
from hpcml.errors import UsageError
from hpcml.models.io import Model, load_model
from hpcml.training.precision import available_cores


def _model(model: Model | str | Path, trust_code: bool) -> Model:
    return model if isinstance(model, Model) else load_model(model, trust_code=trust_code)


def evaluate(
    model: Model | str | Path,
    data: DataConfig | dict | str = "mnist1d",
    *,
    target: str | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Metrics of a model (or model dir) on `data`: the test split of a built-in dataset, or every
    row of a user's file / store (cleaned as at training: rows with missing values are dropped).

    Classification gives test_accuracy and test_loss (cross-entropy); regression test_loss (MSE),
    test_rmse and test_r2. `target` defaults to the column the model was trained on.
    `trust_code=True` allows a model dir whose architecture is a `module:function` spec to import it.
    """
    m = _model(model, trust_code)
    if isinstance(data, str):
        data = DataConfig(name=data)
    elif isinstance(data, dict):
        data = DataConfig.model_validate(data)
    torch.set_num_threads(available_cores())
    if data.name in BUILTINS:
        if data.name == "digits" and data.layout == "auto" and len(m.input_shape) == 1:
            data = data.model_copy(update={"layout": "flat"})
        ds = load_dataset(data)
        x, y, classes, name = ds.x_test, ds.y_test, ds.classes, ds.name
    else:
        from hpcml.data.user import read_user_table

        data = data.model_copy(
            update={
                "target": target or data.target or m.meta.get("target"),
                "columns": data.columns or m.meta.get("features"),
                "task": m.task,
            }
        )
        x, y, classes, report = read_user_table(data, data.name)
        name = report.get("source", data.name)
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
            y = _align_labels(y, classes, m.classes, name)
        yt = torch.from_numpy(y)
        metrics = {
            "test_accuracy": float((logits.argmax(1) == yt).float().mean()),
            "test_loss": float(torch.nn.functional.cross_entropy(logits, yt)),
        }
    return {**metrics, "rows": len(y), "data": name, "model": m.meta["architecture"], "task": m.task}


def _align_labels(y: np.ndarray, classes: list[str], model_classes: list[str], name: str) -> np.ndarray:
    """Map the data's label ids onto the model's class list by class name."""
    unknown = sorted(set(classes) - set(model_classes))
    if unknown:
        raise UsageError(
            f"{name}: labels the model never saw: {', '.join(map(str, unknown[:5]))} "
            f"(model classes: {', '.join(model_classes[:10])})"
        )
    return np.asarray([model_classes.index(c) for c in classes], np.int64)[y]


def predict(
    model: Model | str | Path,
    x: Any,
    *,
    probabilities: bool = False,
    workers: int = 1,
    backend: str = "local",
    address: str | None = None,
    batch_size: int = 65536,
    output: str | Path | None = None,
    trust_code: bool = False,
) -> np.ndarray:
    """Predicted class indices for each row of `x` (or class probabilities with `probabilities=True`).

    `x` is an array, or a path/URL to CSV, Parquet, NumPy or an hpcml store (columns matched to the
    model). `workers > 1` splits the rows over that many processes of `backend` ('local' or 'ray' at
    `address`), each loading the model once; the rows come back in input order, identical to
    `workers=1`. `output` also writes them to a .parquet or .csv file (see hpcml.parallel.predict).
    `trust_code=True` allows a model dir whose architecture is a `module:function` spec to import it
    (in every worker; the module must be importable there: PYTHONPATH or installed).
    """
    if isinstance(x, str | Path) or workers != 1 or backend != "local" or output is not None:
        from hpcml.parallel.predict import predict_parallel

        return predict_parallel(
            model, x, workers=workers, backend=backend, address=address, batch_size=batch_size,
            probabilities=probabilities, output=output, trust_code=trust_code,
        )  # fmt: skip
    m = _model(model, trust_code)
    return m.predict_proba(x, batch_size=batch_size) if probabilities else m.predict(x, batch_size=batch_size)
