"""model.json as a typed schema, checked field by field and against itself before anything is built.

A model dir may come from anyone, so every number in model.json that sizes an allocation is bounded
here (input shape, outputs) and every list that must match another (classes and outputs, features and
inputs, normalization stats and inputs) is compared. Errors name the file and the field. The weights'
header is compared with the architecture afterwards, in models/weights.py. The architecture is a
built-in name, an installed plugin name or a `module:function` spec; a spec is only checked for its
syntax here (load_model imports it only with trust_code=True).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, field_validator

from hpcml.errors import HpcmlError
from hpcml.models.registry import name_problem

FORMAT = "hpcml.model/1"
MAX_META_BYTES = 4 << 20  # the largest real model.json (per-feature stats of wide tables) is far smaller
MAX_INPUT_DIMS = 4
MAX_INPUT_VALUES = 1 << 26  # values per input row (e.g. 3 x 4096 x 4096 pixels)
MAX_OUTPUTS = 1 << 20
MAX_LIST_KWARG = 256  # per-layer widths: far more layers than any built-in has


def _whole(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class Preprocessing(BaseModel):
    """Normalizer.to_json(): x -> (x - shift) / scale, per input value or one scalar."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["standard", "minmax", "none"]
    shift: list[Any]
    scale: list[Any]


class TargetScale(BaseModel):
    """A regression model outputs standardized targets; predictions are out * std + mean."""

    model_config = ConfigDict(extra="forbid")
    mean: float = Field(allow_inf_nan=False)
    std: float = Field(gt=0, allow_inf_nan=False)


class ModelMeta(BaseModel):
    """model.json of a plain (or decrypted) model dir. Extra top-level keys (data source, version)
    are kept: they describe the model and size nothing."""

    model_config = ConfigDict(extra="allow")
    format: Literal["hpcml.model/1"] = FORMAT
    architecture: StrictStr
    kwargs: dict[str, Any] = Field(default_factory=dict)
    input_shape: list[StrictInt] = Field(min_length=1, max_length=MAX_INPUT_DIMS)
    num_outputs: StrictInt = Field(gt=0, le=MAX_OUTPUTS)
    classes: list[StrictStr] = Field(default_factory=list)
    task: Literal["classification", "regression"] = "classification"
    features: list[StrictStr] | None = None
    target: StrictStr | None = None
    target_scale: TargetScale | None = None
    preprocessing: Preprocessing
    quantization: Quantization | None = None
    pruned_widths: dict[StrictStr, StrictInt] | None = Field(None, max_length=4096)  # user chains
    weights_sha256: str = Field(pattern="^[0-9a-f]{64}$")

    @field_validator("input_shape")
    @classmethod
    def _positive(cls, shape: list[int]) -> list[int]:
        if any(d <= 0 for d in shape):
            raise ValueError(f"every size must be > 0, got {shape}")
        return shape

    @field_validator("classes", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return [] if v is None else v  # regression models store null

    @field_validator("kwargs")
    @classmethod
    def _json_scalars(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        for k, v in kwargs.items():
            if isinstance(v, list) and len(v) <= MAX_LIST_KWARG and all(_whole(i) for i in v):
                continue  # per-layer widths of a pruned model
            if not (v is None or isinstance(v, bool | int | float | str)):
                raise ValueError(
                    f"{k}: must be a number, string, true/false, null or a list of at most "
                    f"{MAX_LIST_KWARG} whole numbers, got {type(v).__name__}"
                )
        return kwargs


class Quantization(BaseModel):
    """Which Linear layers hold int8 weights (+ one float32 scale per output row): models/int8.py."""

    model_config = ConfigDict(extra="forbid")
    scheme: Literal["int8-dynamic"]
    layers: list[StrictStr] = Field(min_length=1, max_length=4096)


class SealedDoc(BaseModel):
    """model.json of an encrypted model dir: only the envelope is readable without the key."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["hpcml.model/1"]
    encryption: dict[StrictStr, StrictStr]
    sealed_meta: StrictStr = Field(max_length=MAX_META_BYTES)
    weights_sha256: str = Field(pattern="^[0-9a-f]{64}$")
    hmac: StrictStr


def _describe(err: ValidationError) -> str:
    """The first error as `field.sub[0]: what is wrong`."""
    e = err.errors()[0]
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
    if e["type"] == "missing":
        return f"missing field {loc!r}"
    msg = e["msg"].removeprefix("Value error, ")
    shown = repr(e.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"{loc or 'document'}: {msg} (got {shown})" if "got " not in msg else f"{loc}: {msg}"


def validate_sealed(doc: Any, where: Any) -> SealedDoc:
    try:
        return SealedDoc.model_validate(doc)
    except ValidationError as err:
        raise HpcmlError(f"{where}: {_describe(err)}") from None


def validate_meta(meta: Any, where: Any) -> ModelMeta:
    """The typed model.json, or an HpcmlError naming `where` and the field that is wrong."""
    if not isinstance(meta, dict):
        raise HpcmlError(f"{where}: expected a JSON object, got {type(meta).__name__}")
    try:
        spec = ModelMeta.model_validate(meta)
    except ValidationError as err:
        raise HpcmlError(f"{where}: {_describe(err)}") from None
    problem = _inconsistency(spec)
    if problem:
        raise HpcmlError(f"{where}: {problem}")
    return spec


def _inconsistency(m: ModelMeta) -> str | None:
    """The first field that contradicts another one (or a limit), described; None if all agree."""
    problem = name_problem(m.architecture)  # syntax and installed names only: nothing is imported
    if problem:
        return f"architecture: {problem}"
    values = math.prod(m.input_shape)
    if values > MAX_INPUT_VALUES:
        return (
            f"input_shape: {m.input_shape} is {values:,} values per row, more than the "
            f"{MAX_INPUT_VALUES:,} hpcml loads"
        )
    if m.task == "regression":
        if m.num_outputs != 1:
            return f"num_outputs: {m.num_outputs}, but a regression model has 1 output"
        if m.target_scale is None:
            return "target_scale: missing; a regression model needs the target's mean and std"
    elif len(m.classes) != m.num_outputs:
        return f"classes: {len(m.classes)} names but the model has {m.num_outputs} outputs (num_outputs)"
    elif len(set(m.classes)) != len(m.classes):
        return "classes: the same name appears twice"
    if m.features is not None and len(m.features) != values:
        return f"features: {len(m.features)} names but the model takes {values} inputs (input_shape)"
    return _stats_problem(m.preprocessing, m.input_shape)


def _stats_problem(p: Preprocessing, input_shape: list[int]) -> str | None:
    """shift/scale have the input's shape (per value: tables) or are one scalar with the input's
    number of dims (sequences, images), as Normalizer.fit writes them; finite, scale nonzero."""
    scalar = [1] * len(input_shape)
    for name in ("shift", "scale"):
        field = f"preprocessing.{name}"
        try:
            arr = np.asarray(getattr(p, name), dtype=np.float64)
        except (ValueError, TypeError):
            return f"{field}: not a (nested) list of numbers of one shape"
        shape = list(arr.shape)
        if shape != input_shape and not (len(input_shape) > 1 and shape == scalar):
            if len(input_shape) == 1:
                n = arr.size if arr.ndim == 1 else shape
                return f"{field}: {n} value(s) but the model takes {input_shape[0]} features"
            return (
                f"{field}: shape {shape}, but the model's input is {input_shape}: expected that shape "
                f"(per value) or {scalar} (one scalar)"
            )
        if not np.isfinite(arr).all():
            return f"{field}: not every value is finite"
        if name == "scale" and (arr == 0).any():
            return f"{field}: a scale of 0 divides by zero"
    return None
