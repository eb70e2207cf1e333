"""hpcml: train and run ML models as fast as the hardware allows, and prove it.

    import hpcml
    run = hpcml.train({"data": {"name": "digits"}, "model": {"name": "cnn2d"}, "epochs": 20})
    print(run.report["test_accuracy"], run.dir)
    model = hpcml.load_model(run.dir / "model")
    hpcml.predict(model, x)

Submodules are imported on first use, so `import hpcml` stays fast (no torch until needed).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from hpcml._version import __version__
from hpcml.errors import HpcmlError, UsageError

__all__ = [
    "__version__",
    "HpcmlError",
    "UsageError",
    "train",
    "evaluate",
    "predict",
    "Predictor",
    "sweep",
    "load_model",
    "Run",
    "Model",
    "TrainConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "load_config",
    "benchmark",
    "Callback",
    "compress",
    "export",
]

_LAZY = {
    "train": "hpcml.api",
    "Run": "hpcml.training.summary",
    "evaluate": "hpcml.api",
    "predict": "hpcml.api",
    "Predictor": "hpcml.inference.predictor",
    "sweep": "hpcml.jobs.sweep",
    "load_model": "hpcml.models.io",
    "Model": "hpcml.models.io",
    "TrainConfig": "hpcml.config",
    "DataConfig": "hpcml.config",
    "ModelConfig": "hpcml.config",
    "OptimConfig": "hpcml.config",
    "load_config": "hpcml.config",
    "benchmark": "hpcml.bench",
    "Callback": "hpcml.training.callbacks",
    "compress": "hpcml.inference.compress",
    "export": "hpcml.inference.compress",
}

if TYPE_CHECKING:
    from hpcml.api import evaluate, predict, train
    from hpcml.bench import benchmark
    from hpcml.config import DataConfig, ModelConfig, OptimConfig, TrainConfig, load_config
    from hpcml.inference.compress import compress, export
    from hpcml.inference.predictor import Predictor
    from hpcml.jobs.sweep import sweep
    from hpcml.models.io import Model, load_model
    from hpcml.training.callbacks import Callback
    from hpcml.training.summary import Run


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hpcml' has no attribute {name!r}")
