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
        if x.dtype == np.uint8 and not per_feature and method in ("standard", "minmax"):
            return cls.from_byte_counts(np.bincount(x.reshape(-1), minlength=256), method, shape)
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

    @classmethod
    def from_byte_counts(cls, counts: np.ndarray, method: str, shape: tuple[int, ...]) -> Normalizer:
        """One scalar for uint8 pixels, exactly and without a float copy of the images: from the
        count of each of the 256 byte values."""
        counts = np.asarray(counts, np.float64)
        values = np.arange(256, dtype=np.float64)
        if method == "standard":
            mean = (counts * values).sum() / counts.sum()
            shift, scale = mean, np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum())
        else:  # minmax
            present = np.flatnonzero(counts)
            shift, scale = float(present[0]), float(present[-1] - present[0])
        scale = scale if scale > 1e-12 else 1.0
        return cls(method, np.full(shape, shift, np.float32), np.full(shape, scale, np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.method == "none":
            return x.astype(np.float32, copy=False)
        return ((x - self.shift) / self.scale).astype(np.float32, copy=False)

    def to_json(self) -> dict:
        return {"method": self.method, "shift": self.shift.tolist(), "scale": self.scale.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> Normalizer:
        return cls(d["method"], np.asarray(d["shift"], np.float32), np.asarray(d["scale"], np.float32))
