"""Feature normalization, fitted on the training split only and stored with the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Normalizer:
    """x -> (x - shift) / scale. Per feature for tables; one scalar for sequences and images."""

    method: str  # standard | minmax | none
    shift: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, *, method: str, per_feature: bool) -> Normalizer:
        shape = x.shape[1:] if per_feature else (1,) * (x.ndim - 1)
        axes = 0 if per_feature else None
        if method == "standard":
            shift, scale = x.mean(axis=axes), x.std(axis=axes)
        elif method == "minmax":
            shift = x.min(axis=axes)
            scale = x.max(axis=axes) - shift
        else:
            return cls("none", np.zeros(shape, np.float32), np.ones(shape, np.float32))
        scale = np.where(scale > 1e-12, scale, 1.0)  # constant features pass through unscaled
        return cls(
            method, np.reshape(shift, shape).astype(np.float32), np.reshape(scale, shape).astype(np.float32)
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.method == "none":
            return x.astype(np.float32, copy=False)
        return ((x - self.shift) / self.scale).astype(np.float32, copy=False)

    def to_json(self) -> dict:
        return {"method": self.method, "shift": self.shift.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> Normalizer:
        return cls(d["method"], np.asarray(d["shift"], np.float32), np.asarray(d["scale"], np.float32))
