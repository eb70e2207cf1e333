"""Datasets: the built-ins, generated or shipped offline (nothing is downloaded at run time), and the
dispatch to a user's own files (user.py)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hpcml._files import atomic_file
from hpcml.config import DataConfig
from hpcml.errors import UsageError

BUILTINS = ("mnist1d", "digits", "synthetic", "shapes")


@dataclass(frozen=True)
class StreamSource:
    """A store too large for the memory budget: which shards train and test, read from disk per epoch
    (data/stream.py). Chosen once, when the Dataset is opened."""

    store: str  # path or URL of the store
    train: list[int]  # shard indices
    test: list[int]
    train_rows: int
    test_rows: int
    target: str
    features: list[str] | None  # None: every column but the target
    memory_budget: int | None = None  # bytes: bounds the shuffle buffer too


@dataclass
class Dataset:
    """Train/test arrays (float32 features, int64 labels) plus what a model needs to know about them."""

    name: str
    kind: str  # "sequence" | "image" | "tabular": picks the default model and the normalization axes
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]  # empty for regression
    source: dict = field(default_factory=dict)
    task: str = "classification"  # or "regression" (y float32)
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    report: dict = field(default_factory=dict)  # cleaning counts, split sizes (user data)
    features: list[str] | None = None  # column names of a tabular file, recorded in the model
    target: str | None = None
    # a store streamed from disk (data/stream.py); the x/y arrays are then empty (0 rows, right shape)
    stream: StreamSource | None = None

    @property
    def train_rows(self) -> int:
        return self.stream.train_rows if self.stream else len(self.x_train)

    @property
    def test_rows(self) -> int:
        return self.stream.test_rows if self.stream else len(self.x_test)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_outputs(self) -> int:
        return 1 if self.task == "regression" else len(self.classes)


def list_datasets() -> list[str]:
    return list(BUILTINS)


def cache_dir() -> Path:
    """Where generated datasets are cached: $HPCML_CACHE_DIR, else ~/.cache/hpcml (XDG respected)."""
    if os.environ.get("HPCML_CACHE_DIR"):
        return Path(os.environ["HPCML_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hpcml"


def load_dataset(cfg: DataConfig) -> Dataset:
    ds = _load_source(cfg)
    if cfg.folds is not None:  # cross-validation: a fold of the training split is evaluated on
        from hpcml.data.folds import apply_folds

        ds = apply_folds(ds, folds=cfg.folds, fold=cfg.fold, seed=cfg.data_seed)
    return ds


def _load_source(cfg: DataConfig) -> Dataset:
    if cfg.name == "mnist1d":
        return _mnist1d()
    if cfg.name == "digits":
        return _digits(cfg.layout)
    if cfg.name == "synthetic":
        return _synthetic(cfg)
    if cfg.name == "shapes":
        return _shapes(cfg)
    if "://" in cfg.name or os.sep in cfg.name or "." in cfg.name or Path(cfg.name).exists():
        from hpcml.data.user import load_user_dataset

        return load_user_dataset(cfg)
    raise UsageError(
        f"unknown dataset {cfg.name!r}: not a built-in ({', '.join(BUILTINS)}) and no such file or folder"
    )


def _mnist1d() -> Dataset:
    """MNIST-1D with the package's default arguments: 4000 train / 1000 test sequences of length 40.

    Generation takes a few seconds, so the arrays are cached as a plain .npz (no pickle) keyed by a
    hash of the generation arguments.
    """
    import mnist1d.data as m1d

    args = m1d.get_dataset_args(as_dict=True)
    args.pop("url")
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"mnist1d-{key}.npz"
    arrays = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError):
            arrays = None  # a damaged cache file is regenerated below
    if arrays is None:
        state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; leave the caller's alone
        try:
            raw = m1d.make_dataset(m1d.get_dataset_args())
        finally:
            np.random.set_state(state)
        arrays = {k: raw[k] for k in ("x", "y", "x_test", "y_test")}
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:  # ends in .npz: np.savez adds no second suffix
            np.savez(tmp, **arrays)
    return Dataset(
        name="mnist1d",
        kind="sequence",
        x_train=arrays["x"].astype(np.float32)[:, None, :],
        y_train=arrays["y"].astype(np.int64),
        x_test=arrays["x_test"].astype(np.float32)[:, None, :],
        y_test=arrays["y_test"].astype(np.int64),
        classes=[str(i) for i in range(10)],
        source={"builtin": "mnist1d", "generator": "mnist1d.make_dataset", "args": args},
    )


def _digits(layout: str) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, shipped with the package), split 80/20 stratified, seed 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.data.astype(np.float32)
    y = d.target.astype(np.int64)
    if layout in ("auto", "image"):
        x, kind = x.reshape(-1, 1, 8, 8), "image"
    else:
        kind = "tabular"
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return Dataset(
        name="digits",
        kind=kind,
        x_train=xtr,
        y_train=ytr,
        x_test=xte,
        y_test=yte,
        classes=[str(i) for i in range(10)],
        source={"builtin": "digits", "layout": "flat" if kind == "tabular" else "image", "split_seed": 0},
    )


def _synthetic(cfg: DataConfig) -> Dataset:
    """A classification problem of chosen size (scikit-learn's make_classification), for scale tests."""
    from sklearn.datasets import make_classification

    informative = max(2, min(cfg.features, cfg.features // 2 + 1))
    if cfg.classes * 2 > 2**informative:
        raise UsageError(
            f"data.classes={cfg.classes} is too many for data.features={cfg.features}; use more features"
        )
    x, y = make_classification(
        n_samples=cfg.rows,
        n_features=cfg.features,
        n_informative=informative,
        n_redundant=0,
        n_classes=cfg.classes,
        random_state=cfg.data_seed,
    )
    return Dataset(
        name="synthetic",
        kind="tabular",
        **_head_split(cfg, x.astype(np.float32), y.astype(np.int64)),
        classes=[str(i) for i in range(cfg.classes)],
        source={
            "builtin": "synthetic",
            "rows": cfg.rows,
            "features": cfg.features,
            "classes": cfg.classes,
            "data_seed": cfg.data_seed,
        },
    )


def _head_split(cfg: DataConfig, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """A generated set's split: the first round(rows * test_fraction) rows (at least 1) are the test."""
    n_test = max(1, int(round(cfg.rows * cfg.test_fraction)))
    if cfg.rows - n_test < 1:
        raise UsageError(f"data.rows={cfg.rows} leaves no training rows")
    return {"x_train": x[n_test:], "y_train": y[n_test:], "x_test": x[:n_test], "y_test": y[:n_test]}


def _shapes(cfg: DataConfig) -> Dataset:
    """Generated RGB images of 6 shapes and textures (data/shapes.py): `rows` images of
    `image_size` (default 32) pixels square, uint8 like an image folder's."""
    from hpcml.data.shapes import CLASSES, generate

    size = cfg.image_size or 32
    try:
        x, y = generate(cfg.rows, size, seed=cfg.data_seed)
    except ValueError as err:
        raise UsageError(f"shapes: {err}") from None
    return Dataset(
        name="shapes",
        kind="image",
        **_head_split(cfg, x, y),
        classes=list(CLASSES),
        source={"builtin": "shapes", "rows": cfg.rows, "image_size": size, "data_seed": cfg.data_seed},
    )
