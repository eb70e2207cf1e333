"""Matching a table's columns to a model: by the feature names it was trained on, or else every
numeric column but the target. Parallel predict (jobs/predict.py) and the HTTP service both use it,
so a row means the same thing to each."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hpcml.errors import UsageError

__all__ = ["schema_columns", "choose_columns", "table_matrix"]


def schema_columns(schema: Any) -> list[tuple[str, int]]:
    """(name, values per row) of each column of an Arrow schema: 1 for a number, C*H*W for an image
    tensor column, 0 for anything else."""
    from hpcml.data.clean import is_tensor, numeric

    def width(t: Any) -> int:
        return math.prod(t.shape) if is_tensor(t) else int(numeric(t))

    return [(f.name, width(f.type)) for f in schema]


def choose_columns(columns: list[tuple[str, int]], model: Any, name: str) -> list[str]:
    """The model's feature columns, by name if it recorded them, else all numeric but the target
    (`columns` as schema_columns gives them)."""
    names = [c for c, _ in columns]
    wanted = model.meta.get("features")
    if wanted:
        missing = [c for c in wanted if c not in names]
        if missing:
            raise UsageError(
                f"{name}: missing column(s) {', '.join(map(repr, missing))} that the model was trained "
                f"on; the input has: {', '.join(names)}"
            )
        return list(wanted)
    target = model.meta.get("target")
    numeric = [c for c, ok in columns if ok and c != target]
    need = math.prod(model.input_shape)
    if sum(w for c, w in columns if c in numeric) != need:
        skipped = [c for c, ok in columns if not ok or c == target]
        raise UsageError(
            f"{name}: {len(numeric)} numeric feature column(s) but the model takes {need} inputs "
            f"(input shape {list(model.input_shape)})"
            + (f"; not used: {', '.join(skipped)}" if skipped else "")
        )
    return numeric


def table_matrix(table: Any, feats: list[str], name: str) -> np.ndarray:
    """The rows of `feats` as float32 (n, features), or an image tensor column's own values
    (n, C, H, W), e.g. uint8."""
    import pyarrow as pa

    from hpcml.data.clean import is_tensor, tensor_values

    if len(feats) == 1 and is_tensor(table.schema.field(feats[0]).type):
        x, ok = tensor_values(table.column(feats[0]))
        if not ok.all():
            i = int(np.argmax(~ok))
            n_bad = int((~ok).sum())
            raise UsageError(f"{name}: row {i + 1}, column {feats[0]!r} is missing ({n_bad} such row(s))")
        return x

    x = np.empty((table.num_rows, len(feats)), np.float32)
    for j, col in enumerate(feats):
        x[:, j] = table.column(col).cast(pa.float64()).to_numpy(zero_copy_only=False)
    bad = ~np.isfinite(x)
    if bad.any():  # a guessed value would be a silent wrong answer: name the first bad cell instead
        i = int(np.argmax(bad.any(axis=1)))
        raise UsageError(
            f"{name}: row {i + 1}, column {feats[int(np.argmax(bad[i]))]!r} is missing or not finite "
            f"({int(bad.any(axis=1).sum())} such row(s)); clean the input before predicting"
        )
    return x
