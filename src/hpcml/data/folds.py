"""Cross-validation folds: one fold of the training split becomes the evaluation split.

The dataset's own test split is left out entirely, so it stays untouched for a final evaluation of
the configuration a sweep picks. Folds are stratified by class (each fold gets about the same share of
every class) and seeded, so every job of a sweep sees the same partition; a float target (regression)
gets plain shuffled folds.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from hpcml.data.sources import Dataset
from hpcml.errors import UsageError

__all__ = ["apply_folds", "fold_assignment"]


def fold_assignment(y: np.ndarray, *, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each row: classes shuffled separately and dealt out round-robin."""
    rng = np.random.default_rng(seed)
    if np.issubdtype(y.dtype, np.integer):
        order = np.concatenate([rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)])
    else:
        order = rng.permutation(len(y))
    assign = np.empty(len(y), np.int64)
    assign[order] = np.arange(len(y)) % folds
    return assign


def apply_folds(ds: Dataset, *, folds: int, fold: int, seed: int) -> Dataset:
    """A copy of `ds` whose test split is fold `fold` of its training split and whose training split
    is the other folds (rows keep their original order)."""
    if folds < 2 or not 0 <= fold < folds:
        raise UsageError(f"need folds >= 2 and 0 <= fold < folds (got folds={folds}, fold={fold})")
    if getattr(ds, "stream", None) is not None:
        raise UsageError(
            f"{ds.name}: cross-validation folds need the training split in memory, but this store is "
            "streamed from disk (larger than data.memory_budget); raise the budget or use a sample"
        )
    n = len(ds.x_train)
    if n < folds:
        raise UsageError(f"data.folds={folds} is more than the {n} training rows of {ds.name}")
    held_out = fold_assignment(ds.y_train, folds=folds, seed=seed) == fold
    return dataclasses.replace(
        ds,
        x_train=ds.x_train[~held_out],
        y_train=ds.y_train[~held_out],
        x_test=ds.x_train[held_out],
        y_test=ds.y_train[held_out],
        source={
            **ds.source,
            "cv": {"folds": folds, "fold": fold, "seed": seed, "held_out": int(held_out.sum())},
        },
    )
