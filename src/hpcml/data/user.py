"""A user's own data as a training Dataset: read + clean (files.py, store.py, clean.py), optional
de-duplication and constant-column removal, then a seeded split (stratified for classification).

Every count (rows read, dropped, imputed, duplicates, constant columns) goes into `Dataset.report`,
which training writes to report.json's `data` section and prints: cleaning is never silent.
"""

from __future__ import annotations

import warnings

import numpy as np

from hpcml.config import DataConfig
from hpcml.data.sources import Dataset, StreamSource
from hpcml.errors import UsageError

__all__ = ["DataWarning", "load_user_dataset", "read_user_table"]


class DataWarning(UserWarning):
    """Data that trains but not as the user likely meant (e.g. a class with no training rows)."""


def read_user_table(cfg: DataConfig, path: str) -> tuple[np.ndarray, np.ndarray, list[str] | None, dict]:
    """Read and clean one file/store/folder as `cfg` says; resolve the task."""
    from hpcml.data.store import read_data

    x, y, classes, report = read_data(
        path, target=cfg.target, features=cfg.columns, missing=cfg.missing, image_size=cfg.image_size
    )
    name = report.get("source", path)
    if cfg.task == "regression" and classes is not None:
        try:  # integer labels, or numeric-looking class names: train on their values
            y = np.asarray([float(classes[i]) for i in y], np.float32)
        except ValueError:
            raise UsageError(
                f"{name}: task=regression but target {report.get('target')!r} holds text labels "
                f"(e.g. {classes[0]!r})"
            ) from None
        classes = None
    elif cfg.task == "classification" and classes is None:
        raise UsageError(
            f"{name}: task=classification but target {report.get('target')!r} holds non-integral numbers; "
            "use task=regression (or auto)"
        )
    report["task"] = "regression" if classes is None else "classification"
    return x, y, classes, report


def _dedupe_and_constants(cfg: DataConfig, x: np.ndarray, y: np.ndarray, report: dict):
    if cfg.drop_duplicates and report.get("duplicate_rows", 0):
        from hpcml.data.clean import repeated_rows

        keep = ~repeated_rows(x, y)  # the first occurrence of every row, in file order
        report["duplicates_dropped"] = int(len(x) - keep.sum())
        x, y = x[keep], y[keep]
    const = report.get("constant_columns") or []
    if cfg.drop_constant and const and x.ndim == 2:
        names = report["feature_names"]
        keep_cols = [j for j, n in enumerate(names) if n not in const]
        if not keep_cols:
            raise UsageError(
                f"{report.get('source')}: every feature column is constant; nothing to learn from"
            )
        x = np.ascontiguousarray(x[:, keep_cols])
        report["feature_names"] = [names[j] for j in keep_cols]
        report["constant_columns_dropped"] = list(const)
    return x, y


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _one_class(y: np.ndarray, classes: list[str], report: dict, name: str) -> None:
    """Refuse a classification target with a single class: it would train to accuracy 1.0."""
    present = np.unique(y)
    if len(present) == 1:
        raise UsageError(
            f"{name}: target column {report.get('target')!r} has only one class "
            f"({classes[int(present[0])]!r}) in its {_rows(len(y))} after cleaning; a classifier "
            "needs at least 2 classes to learn anything. Is it the right target column?"
        )


def _unseen_classes(y: np.ndarray, y_train: np.ndarray, classes: list[str], report: dict, name: str):
    """Warn about classes in the data with no row in the training split: the model cannot learn them."""
    counts = np.bincount(y, minlength=len(classes))
    gone = np.flatnonzero((counts > 0) & (np.bincount(y_train, minlength=len(classes)) == 0))
    if not len(gone):
        return
    report["classes_missing_from_train"] = [classes[i] for i in gone]
    shown = ", ".join(f"{classes[i]!r} ({_rows(int(counts[i]))})" for i in gone[:10])
    warnings.warn(
        f"{name}: class(es) {shown}{', ...' if len(gone) > 10 else ''} of target "
        f"{report.get('target')!r} have no rows in the training split (they all went to test or "
        "validation), so the model can never predict them; add rows of them or remove them",
        DataWarning,
        stacklevel=3,
    )


def _split(x, y, *, n_b: int, seed: int, stratify: bool, what: str, name: str):
    """(x_a, y_a, x_b, y_b) with `n_b` of the rows in b (at least 1 on each side): seeded, stratified
    when every class has at least 2 rows (else plain shuffled, and the report says so)."""
    n, test = len(x), what == "test"
    if n < 2:
        have = f"{_rows(n)} {'after cleaning' if test else 'left after the test split'}"
        need = "2 rows (1 to train on, 1 to test)" if test else "3 rows in all (train, validation, test)"
        fix = "pass test_data (--test-data)" if test else "set val_fraction to 0"
        raise UsageError(
            f"{name}: {have} {'is' if n == 1 else 'are'} too few for a {what} split: it needs at least "
            f"{need}; add rows or {fix}"
        )
    n_b = max(n_b, 1)  # the fraction of a tiny table rounds to 0 rows: still hold out one
    if n_b >= n:
        raise UsageError(
            f"{name}: a {what} split of {_rows(n_b)} leaves none of the {_rows(n)} "
            f"{'' if test else 'left after the test split '}to train on; lower "
            f"{'test_fraction' if test else 'test_fraction + val_fraction'}"
        )
    from sklearn.model_selection import train_test_split

    strat = y if stratify and np.bincount(y).min(initial=2) >= 2 and n_b >= len(np.unique(y)) else None
    idx_a, idx_b = train_test_split(np.arange(n), test_size=n_b, random_state=seed, stratify=strat)
    return x[idx_a], y[idx_a], x[idx_b], y[idx_b], strat is not None


def _streamed(cfg: DataConfig, path: str) -> Dataset | None:
    """A Dataset that streams `path` when it is a store too large for the memory budget, else None."""
    from hpcml.data.files import redact_url
    from hpcml.data.store import is_store, read_manifest
    from hpcml.data.stream import default_memory_budget, fits_in_memory, parse_size, split_shards

    if not is_store(path):
        return None
    m = read_manifest(path)
    budget = parse_size(cfg.memory_budget) if cfg.memory_budget else default_memory_budget()
    if fits_in_memory(m, budget, features=cfg.columns):
        return None
    name = redact_url(path)
    target = cfg.target or m["target"]
    if m.get("classes") is None or cfg.task == "regression":
        raise UsageError(f"{name}: streaming supports classification stores for now; raise --memory-budget")
    if len(m["classes"]) == 1 and target == m["target"]:
        raise UsageError(
            f"{name}: target column {target!r} has only one class ({m['classes'][0]!r}); a classifier "
            "needs at least 2 classes to learn anything. Is it the right target column?"
        )
    if cfg.val_fraction or cfg.test_data or cfg.drop_duplicates or cfg.drop_constant or cfg.folds:
        raise UsageError(
            f"{name}: val_fraction, test_data, drop_duplicates, drop_constant and folds need the data in "
            "memory; raise --memory-budget"
        )
    train, test = split_shards(m, test_fraction=cfg.test_fraction, seed=cfg.data_seed)
    features = cfg.columns or [c["name"] for c in m["schema"] if c["name"] != target]
    shape = m.get("feature_shape") if cfg.columns is None and m.get("feature_shape") else [len(features)]
    kind = {1: "tabular", 2: "sequence", 3: "image"}.get(len(shape), "tabular")
    empty = np.empty((0, *shape), np.float32)
    rows = lambda idx: sum(m["shards"][i]["rows"] for i in idx)  # noqa: E731
    return Dataset(
        name=name,
        kind=kind,
        x_train=empty,
        y_train=np.empty(0, np.int64),
        x_test=empty,
        y_test=np.empty(0, np.int64),
        classes=list(m["classes"]),
        source={"path": name, "format": "hpcml-store", "target": target},
        report={
            "source": name,
            "format": "hpcml-store",
            "streamed": True,
            "rows_read": m["total_rows"],
            "memory_budget_bytes": budget,
            "split": {"train_shards": train, "test_shards": test},
        },  # fmt: skip
        features=features if kind == "tabular" else None,
        target=target,
        stream=StreamSource(
            store=path,
            train=train,
            test=test,
            train_rows=rows(train),
            test_rows=rows(test),
            target=target,
            features=cfg.columns,
            memory_budget=budget,
        ),  # fmt: skip
    )


def load_user_dataset(cfg: DataConfig) -> Dataset:
    """The Dataset of a user's file, folder or store (in memory; see stream.py for larger stores)."""
    from hpcml.data.files import redact_url

    path = cfg.name
    streamed = _streamed(cfg, path)
    if streamed is not None:
        return streamed
    x, y, classes, report = read_user_table(cfg, path)
    x, y = _dedupe_and_constants(cfg, x, y, report)
    classify = classes is not None
    name = redact_url(path)
    if classify:
        _one_class(y, classes, report, name)
    if cfg.test_data:
        x_tr, y_tr = x, y
        x_te, y_te, te_classes, te_report = read_user_table(
            cfg.model_copy(update={"drop_constant": False}), cfg.test_data
        )
        if report.get("constant_columns_dropped"):
            keep = [te_report["feature_names"].index(f) for f in report["feature_names"]]
            x_te = np.ascontiguousarray(x_te[:, keep])
        if x_te.shape[1:] != x_tr.shape[1:]:
            raise UsageError(
                f"{redact_url(cfg.test_data)}: rows have shape {x_te.shape[1:]}, "
                f"the training data {x_tr.shape[1:]}"
            )
        if classify:
            unknown = sorted(set(te_classes or []) - set(classes))
            if unknown:
                raise UsageError(
                    f"{redact_url(cfg.test_data)}: labels not in the training data: {', '.join(unknown[:5])}"
                )
            y_te = np.asarray([classes.index(c) for c in te_classes], np.int64)[y_te]
        report["test_source"] = te_report.get("source")
        stratified = None
    else:
        x_tr, y_tr, x_te, y_te, stratified = _split(
            x,
            y,
            n_b=round(len(x) * cfg.test_fraction),
            seed=cfg.data_seed,
            stratify=classify,
            what="test",
            name=name,
        )
    x_val = y_val = None
    if cfg.val_fraction > 0:  # a share of all rows, like test_fraction: 0.7 / 0.1 / 0.2
        x_tr, y_tr, x_val, y_val, _ = _split(
            x_tr, y_tr, n_b=round(len(x) * cfg.val_fraction), seed=cfg.data_seed + 1, stratify=classify,
            what="validation", name=name,
        )  # fmt: skip
    if classify:
        _unseen_classes(y, y_tr, classes, report, name)
    report.update(
        split={
            "train": len(x_tr), "val": 0 if x_val is None else len(x_val), "test": len(x_te),
            "seed": cfg.data_seed, "stratified": stratified,
        }
    )  # fmt: skip
    kind = report.get("kind", "tabular")
    return Dataset(
        name=name,
        kind=kind,
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        classes=list(classes) if classify else [],
        source={"path": name, "format": report.get("format"), "target": report.get("target")},
        task="classification" if classify else "regression",
        x_val=x_val,
        y_val=y_val,
        report=report,
        features=report.get("feature_names") if kind == "tabular" else None,
        target=report.get("target"),
    )
