import numpy as np
import pytest

from hpcml.config import DataConfig
from hpcml.data.preprocess import Normalizer
from hpcml.data.sources import cache_dir, load_dataset
from hpcml.errors import UsageError


def test_mnist1d_shapes_and_cache():
    state = np.random.get_state()
    ds = load_dataset(DataConfig(name="mnist1d"))
    # mnist1d reseeds numpy's global RNG while generating; we must leave the caller's state alone
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert ds.x_train.shape == (4000, 1, 40) and ds.x_test.shape == (1000, 1, 40)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert sorted(np.unique(ds.y_train)) == list(range(10)) and ds.num_classes == 10
    assert ds.kind == "sequence"
    cached = list(cache_dir().glob("mnist1d-*.npz"))
    assert len(cached) == 1
    again = load_dataset(DataConfig(name="mnist1d"))  # from the cache: identical arrays
    assert np.array_equal(again.x_train, ds.x_train) and np.array_equal(again.y_test, ds.y_test)


def test_mnist1d_damaged_cache_is_regenerated():
    ds = load_dataset(DataConfig(name="mnist1d"))
    (path,) = cache_dir().glob("mnist1d-*.npz")
    path.write_bytes(b"not a zip file")
    again = load_dataset(DataConfig(name="mnist1d"))
    assert np.array_equal(again.x_train, ds.x_train)


def test_digits_image_and_flat():
    img = load_dataset(DataConfig(name="digits"))
    flat = load_dataset(DataConfig(name="digits", layout="flat"))
    assert img.x_train.shape[1:] == (1, 8, 8) and img.kind == "image"
    assert flat.x_train.shape[1:] == (64,) and flat.kind == "tabular"
    assert len(img.x_train) + len(img.x_test) == 1797
    assert np.array_equal(img.x_train.reshape(len(img.x_train), -1), flat.x_train)


def test_synthetic_sizes_and_seed():
    cfg = DataConfig(name="synthetic", rows=1000, features=12, classes=5, test_fraction=0.25, data_seed=3)
    ds = load_dataset(cfg)
    assert ds.x_train.shape == (750, 12) and ds.x_test.shape == (250, 12)
    assert set(np.unique(np.concatenate([ds.y_train, ds.y_test]))) == set(range(5))
    assert np.array_equal(load_dataset(cfg).x_train, ds.x_train)
    other = load_dataset(cfg.model_copy(update={"data_seed": 4}))
    assert not np.array_equal(other.x_train, ds.x_train)


def test_unknown_dataset_lists_valid():
    with pytest.raises(
        UsageError, match=r"unknown dataset 'nope': not a built-in \(mnist1d, digits, synthetic, shapes\)"
    ):
        load_dataset(DataConfig(name="nope"))


def test_normalizer_fitted_stats():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 3, size=(500, 4)).astype(np.float32)
    x[:, 2] = 7.0  # a constant column passes through unscaled instead of dividing by zero
    n = Normalizer.fit(x, method="standard", per_feature=True)
    z = n(x)
    assert np.allclose(z[:, [0, 1, 3]].mean(0), 0, atol=1e-5) and np.allclose(
        z[:, [0, 1, 3]].std(0), 1, atol=1e-4
    )
    assert np.all(z[:, 2] == 0)
    m = Normalizer.fit(x, method="minmax", per_feature=False)
    assert m.shift.shape == (1,) and np.isclose(m(x).min(), 0) and np.isclose(m(x).max(), 1)
    back = Normalizer.from_json(n.to_json())
    assert np.array_equal(back(x), z)
