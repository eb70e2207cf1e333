"""The images bench case's contenders and measurements, on tiny data (the case itself runs minutes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hpcml.bench import image_loops
from hpcml.bench.cases_images import _peak_rss
from hpcml.data import store
from hpcml.data.shapes import CLASSES, generate, write_folder

SPEC = {
    "model": "cnn2d", "model_kw": {"channels": 4}, "batch_size": 16, "lr": 3e-3, "crop_padding": 2,
    "classes": 6, "mean": 120.0, "std": 60.0,
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return write_folder(root / "train", 48, 16, seed=0), write_folder(root / "test", 24, 16, seed=1)


def test_shapes_are_balanced_reproducible_and_match_their_png_folder(folders):
    x, y = generate(48, 16, seed=0)
    assert x.dtype == np.uint8 and x.shape == (48, 3, 16, 16)
    assert np.bincount(y).tolist() == [8] * len(CLASSES)
    assert np.array_equal(generate(48, 16, seed=0)[0], x)
    assert not np.array_equal(generate(48, 16, seed=1)[0], x)
    store.pack(folders[0], folders[0].parent / "st")
    packed, labels, classes, _ = store.read_store(folders[0].parent / "st")
    assert sorted(classes) == sorted(CLASSES)
    # the folder holds exactly the generated images (PNG is lossless), grouped by class
    want = sorted(map(bytes, (img for img in x)))
    assert sorted(map(bytes, (img for img in packed))) == want and len(labels) == 48


def test_folder_dataset_crops_and_flips_like_numpy(folders):
    files, classes = image_loops.folder_files(folders[0])
    ds = image_loops.FolderDataset(files[:1], 0.0, 1.0, 2, train=True)
    from PIL import Image

    raw = np.asarray(Image.open(files[0][0]).convert("RGB"), np.float32).transpose(2, 0, 1)
    np.random.seed(3)
    got = ds[0][0].numpy()
    np.random.seed(3)
    dy, dx = np.random.randint(0, 5, 2)
    flip = np.random.rand() < 0.5
    padded = np.pad(raw, ((0, 0), (2, 2), (2, 2)))
    want = padded[:, dy : dy + 16, dx : dx + 16]
    assert np.array_equal(got, want[:, :, ::-1] if flip else want)
    assert classes == sorted(CLASSES)


def test_contenders_train_and_report_images_per_second(folders):
    train_files, _ = image_loops.folder_files(folders[0])
    test_files, _ = image_loops.folder_files(folders[1])
    folder = image_loops.run_folder(SPEC, train_files, test_files, epochs=1, seed=0, threads=1)
    data = (*generate(48, 16, seed=0), *generate(24, 16, seed=1))
    tensor = image_loops.run_tensor(SPEC, data, epochs=1, seed=0, threads=1)
    for r in (folder, tensor):
        assert r["images_per_second"] == pytest.approx(48 / r["train_seconds"])
        assert 0.0 <= r["test_accuracy"] <= 1.0
    assert torch.get_num_threads() == 1


def test_peak_rss_is_the_childs_own(tmp_path):
    args = ["train", "--data", "synthetic", "--rows", "200", "--epochs", "1", "--quiet"]
    rss = _peak_rss([*args, "--out", str(tmp_path / "r")])
    assert 100 << 20 < rss < 4 << 30  # torch alone is > 100 MiB; far below this test process's parent
    with pytest.raises(RuntimeError, match="unknown dataset"):
        _peak_rss(["train", "--data", "nope", "--out", str(tmp_path / "n")])
