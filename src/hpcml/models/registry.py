"""Name -> architecture. Only names listed here can be built, so a model.json never imports code."""

from __future__ import annotations

import importlib
import typing
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
    _check_kwargs(name, cls, kwargs)
    try:
        return cls(input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)
    except TypeError as err:  # unknown or missing keyword argument
        raise UsageError(f"model {name}: {err}") from None
    except ValueError as err:  # e.g. an input shape the architecture cannot take
        raise UsageError(f"model {name}: {err}") from None


def _check_kwargs(name: str, cls: type, kwargs: dict[str, Any]) -> None:
    """kwargs of the types the architecture declares: a width of 1e9 (a float) or true is an error
    here, not a confusing one inside torch. Unknown names are left to the constructor's TypeError."""
    from hpcml.errors import UsageError

    hints = typing.get_type_hints(cls.__init__)
    for key, value in kwargs.items():
        want = hints.get(key)
        if want is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif want is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif want is bool:
            ok = isinstance(value, bool)
        else:
            continue
        if not ok:
            raise UsageError(f"model {name}: kwargs.{key} must be {_TYPE_WORDS[want]}, got {value!r}")


_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false"}
