"""Image batches on the device: uint8 stores, normalization and crop/flip augmentation, each checked
against plain NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hpcml.data import store
from hpcml.data.augment import Augment, ImageTransform
from hpcml.data.loader import DeviceBatches
from hpcml.data.preprocess import Normalizer
from hpcml.errors import UsageError


def _transform(x: np.ndarray, aug: Augment, seed: int = 0, method: str = "standard") -> ImageTransform:
    norm = Normalizer.fit(x, method=method, per_feature=False)
    return ImageTransform(norm, aug, seed=seed, device=torch.device("cpu"))


def _numpy_crop_flip(img: np.ndarray, dy: int, dx: int, flip: int, p: int) -> np.ndarray:
    """The augmentation written the obvious way: pad with zeros, slice, mirror."""
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * p, w + 2 * p), img.dtype)
    padded[:, p : p + h, p : p + w] = img
    out = padded[:, dy : dy + h, dx : dx + w]
    return out[:, :, ::-1] if flip else out


def test_crop_and_flip_equal_numpy_slicing():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 3, 7, 9), dtype=np.uint8)
    t = _transform(x, Augment(flip=True, crop=3))
    rows = torch.arange(1000, 1064)
    draws = t.draws(rows, epoch=2)
    out = t.crop_flip(torch.from_numpy(x), draws).numpy()
    assert out.shape == x.shape and out.dtype == np.uint8
    for i in range(len(x)):
        dy, dx, flip = draws[i].tolist()
        assert 0 <= dy <= 6 and 0 <= dx <= 6 and flip in (0, 1)
        assert np.array_equal(out[i], _numpy_crop_flip(x[i], dy, dx, flip, 3)), i


def test_draws_depend_on_seed_epoch_and_row_only_and_are_uniform():
    x = np.zeros((1, 1, 4, 4), np.uint8)
    t = _transform(x, Augment(flip=True, crop=1), seed=5)
    rows = torch.arange(30_000)
    a = t.draws(rows, epoch=0)
    perm = torch.randperm(len(rows))
    assert torch.equal(t.draws(rows[perm], epoch=0), a[perm])  # per row: batch order does not matter
    assert not torch.equal(t.draws(rows, epoch=1), a)
    assert not torch.equal(_transform(x, Augment(flip=True, crop=1), seed=6).draws(rows, epoch=0), a)
    for col, k in ((0, 3), (1, 3), (2, 2)):  # offsets 0..2 and flip 0/1, each about equally often
        freq = torch.bincount(a[:, col], minlength=k).double() / len(rows)
        assert torch.all((freq - 1 / k).abs() < 0.02), (col, freq)
    # vertical and horizontal offsets are not the same draw
    assert (a[:, 0] == a[:, 1]).double().mean() < 0.4


def test_normalization_on_the_device_equals_the_host_normalizer_bitwise():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (50, 3, 5, 5), dtype=np.uint8)
    for method in ("standard", "minmax", "none"):
        norm = Normalizer.fit(x, method=method, per_feature=False)
        t = ImageTransform(norm, Augment(), seed=0, device=torch.device("cpu"))
        got = t.eval(torch.from_numpy(x))
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.from_numpy(norm(x))), method  # what Model.predict feeds the model


def test_uint8_normalizer_matches_float64_statistics():
    rng = np.random.default_rng(2)
    x = rng.integers(3, 200, (40, 3, 8, 8), dtype=np.uint8)
    norm = Normalizer.fit(x, method="standard", per_feature=False)
    ref = x.astype(np.float64)
    assert norm.shift.shape == (1, 1, 1)
    assert norm.shift.item() == pytest.approx(ref.mean(), rel=1e-6)
    assert norm.scale.item() == pytest.approx(ref.std(), rel=1e-6)
    mm = Normalizer.fit(x, method="minmax", per_feature=False)
    assert (mm.shift.item(), mm.scale.item()) == (float(x.min()), float(x.max() - x.min()))


def test_ranks_see_the_augmented_rows_one_process_sees():
    """Augmentation is a function of the row, so two data-parallel ranks together get exactly the
    images one process with the global batch gets."""
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.integers(0, 256, (50, 1, 6, 6), dtype=np.uint8))
    y = torch.arange(50)
    t = _transform(x.numpy(), Augment(flip=True, crop=2), seed=9)
    one = DeviceBatches(x, y, batch_size=16, seed=9, transform=t)
    ranks = [DeviceBatches(x, y, batch_size=8, seed=9, rank=r, world_size=2, transform=t) for r in (0, 1)]
    for epoch in (0, 1):
        steps1 = list(one.epoch(epoch))
        steps2 = [list(r.epoch(epoch)) for r in ranks]
        assert len(steps1) == len(steps2[0]) == 4
        for s, micro in enumerate(steps1):
            rows = {int(i): xb for mb in micro for i, xb in zip(mb.index, mb.x, strict=True)}
            for r in (0, 1):
                for mb in steps2[r][s]:
                    for i, xb in zip(mb.index, mb.x, strict=True):
                        assert torch.equal(xb, rows[int(i)])
    # and the batches are augmented: not just the normalized images
    mb = next(iter(one.epoch(0)))[0]
    assert not torch.equal(mb.x, t.eval(x[mb.index]))


def test_augment_names_are_checked():
    with pytest.raises(UsageError, match="augment rotate: unknown; valid: flip, crop"):
        Augment.from_config(["flip", "rotate"], 4)
    assert Augment.from_config(["crop"], 2) == Augment(flip=False, crop=2)


def test_packed_image_store_is_uint8_sized(tmp_path):
    """N images of C x H x W take about N*C*H*W bytes before compression (float32 columns took 4x)."""
    rng = np.random.default_rng(4)
    n, h, w = 120, 24, 20
    for i in range(n):  # random pixels: incompressible, so the bytes on disk are the raw bytes
        p = tmp_path / "imgs" / f"c{i % 3}" / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
    m = store.pack(tmp_path / "imgs", tmp_path / "st", compression="none")
    raw = n * 3 * h * w
    on_disk = sum(s["bytes"] for s in m["shards"])
    assert raw <= on_disk <= 1.1 * raw, (on_disk, raw)
    assert [c["name"] for c in m["schema"]] == ["image", "label"] and "uint8" in m["schema"][0]["type"]
    x, y, classes, _ = store.read_store(tmp_path / "st")
    assert x.dtype == np.uint8 and x.shape == (n, 3, h, w) and classes == ["c0", "c1", "c2"]
    zstd = store.pack(tmp_path / "imgs", tmp_path / "z")
    assert sum(s["bytes"] for s in zstd["shards"]) <= 1.1 * raw
