"""The default recipe: `optim.lr: null` and `epochs: null` resolved per model into config.yaml."""

import pytest

from hpcml.config import build_config
from hpcml.data.sources import load_dataset
from hpcml.training.run import resolve_defaults


@pytest.fixture(scope="module")
def mnist1d():
    return load_dataset(build_config({}).data)


@pytest.mark.parametrize(
    ("values", "lr", "epochs"),
    [
        ({}, 0.03, 8),  # auto -> convnet1d on sequences: its own recipe
        ({"model": {"name": "mlp"}}, 0.01, 10),  # a model without one: the generic recipe
        ({"optim": {"lr": 0.002}, "epochs": 3}, 0.002, 3),  # given values are kept
        ({"epochs": 5}, 0.03, 5),
        ({"optim": {"name": "sgd"}}, 0.01, 10),  # convnet1d's recipe was measured with AdamW only
        ({"optim": {"schedule": "cosine"}}, 0.01, 10),  # ... and onecycle only
    ],
)
def test_recipe_resolution(mnist1d, values, lr, epochs):
    cfg = resolve_defaults(build_config(values), mnist1d)
    assert cfg.optim.lr == lr and cfg.epochs == epochs
    assert cfg.model.name != "auto"
    unresolved = build_config(values)
    assert (unresolved.optim.lr is None) == ("lr" not in values.get("optim", {}))
