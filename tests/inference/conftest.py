"""Shared by the serve tests: one tiny trained classifier (4 features, 3 classes) per module."""

from __future__ import annotations

import pytest

import hpcml

FEATURES, CLASSES = 4, 3


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    cfg = {
        "data": {"name": "synthetic", "rows": 400, "features": FEATURES, "classes": CLASSES},
        "model": {"name": "mlp", "kwargs": {"hidden": 16}},
        "epochs": 2, "batch_size": 64, "threads": 1, "precision": "fp32",
    }  # fmt: skip
    return hpcml.train(cfg, out=tmp_path_factory.mktemp("clf") / "run", quiet=True).dir / "model"
