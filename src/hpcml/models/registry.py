"""Name -> architecture. Only names listed here can be built, so a model.json never imports code."""

from __future__ import annotations

import importlib
from typing import Any

# name -> "module:callable"; imported lazily so the registry is cheap to consult (config validation).
_MODELS: dict[str, str] = {
    "mlp": "hpcml.models.mlp:MLP",
    "cnn1d": "hpcml.models.cnn:CNN1d",
    "cnn2d": "hpcml.models.cnn:CNN2d",
}
MODEL_NAMES = tuple(_MODELS)


def list_models() -> list[str]:
    return list(MODEL_NAMES)


def default_model_for(kind: str) -> str:
    """The model `--model auto` picks for a dataset kind (sequence, image, tabular)."""
    return {"sequence": "cnn1d", "image": "cnn2d"}.get(kind, "mlp")


def create_model(name: str, *, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any):
    """Build a registered model; `num_classes=1` means a single regression output."""
    from hpcml.errors import UsageError

    if name not in _MODELS:
        raise UsageError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")
    module, attr = _MODELS[name].split(":")
    cls = getattr(importlib.import_module(module), attr)
    try:
        return cls(input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)
    except TypeError as err:  # unknown or missing keyword argument
        raise UsageError(f"model {name}: {err}") from None
    except ValueError as err:  # e.g. an input shape the architecture cannot take
        raise UsageError(f"model {name}: {err}") from None
