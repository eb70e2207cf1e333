"""Training on uint8 image stores: augmented runs that resume bit-exactly, streaming past the memory
budget, channels_last, and predictions on an image store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hpcml_testkit import spec
from PIL import Image
from safetensors.torch import load_file

import hpcml
from hpcml.data import store


@pytest.fixture(scope="module")
def image_store(tmp_path_factory):
    """3 classes of 12x12 RGB images (a bright square, a vertical bar, a horizontal bar on noise)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in range(3):
        for i in range(50):
            a = rng.integers(0, 80, (12, 12, 3)).astype(np.uint8)
            o = int(rng.integers(0, 3))
            if c == 0:
                a[3 + o : 8 + o, 3 + o : 8 + o] = 230
            elif c == 1:
                a[:, 4 + o : 7 + o] = 230
            else:
                a[4 + o : 7 + o, :] = 230
            p = root / "folder" / f"k{c}" / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(p)
    store.pack(root / "folder", root / "store", shard_rows=30)
    return root


def _cfg(path, **kw):
    return {
        "data": {"name": str(path)},
        "model": {"name": "cnn2d", "kwargs": {"channels": 8}},
        "epochs": 3,
        "batch_size": 16,
        "threads": 1,
        "precision": "fp32",
        "augment": ["flip", "crop"],
        "crop_padding": 2,
        **kw,
    }


def _weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_augmented_run_resumes_bit_identical(image_store, tmp_path):
    cfg = _cfg(image_store / "store", checkpoint={"every": "5", "keep": 2})
    ref = hpcml.train(cfg, out=tmp_path / "ref")  # 120 train rows / 16 = 8 steps per epoch
    assert ref.report["augment"] == ["flip", "crop"] and ref.report["steps"] == 24
    with pytest.raises(RuntimeError, match="injected failure at step 13"):
        hpcml.train({**cfg, "callbacks": [spec("FailAt", rank=0, step=13)]}, out=tmp_path / "run")
    resumed = hpcml.train(resume=tmp_path / "run")
    assert resumed.report["resumed_from_step"] == 10
    wa, wb = _weights(ref.dir), _weights(resumed.dir)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # without augmentation the weights differ: it is really applied
    plain = hpcml.train({**cfg, "augment": []}, out=tmp_path / "plain")
    assert not all(torch.equal(wa[k], _weights(plain.dir)[k]) for k in wa)


def test_streamed_image_store_trains_on_uint8_shards(image_store, tmp_path):
    data = {"name": str(image_store / "store"), "memory_budget": "20KB"}
    cfg = _cfg(image_store / "store", epochs=4, data=data)
    run = hpcml.train(cfg, out=tmp_path / "s")
    assert run.report["data"]["streamed"] is True
    assert run.report["test_accuracy"] > 0.6  # 3 classes: chance is 0.33


def test_folder_store_and_predict_agree(image_store, tmp_path):
    run = hpcml.train(_cfg(image_store / "folder", epochs=6, augment=[]), out=tmp_path / "f")
    assert run.report["data"]["input_shape"] == [3, 12, 12]
    x, y, classes, _ = store.read_store(image_store / "store")
    assert x.dtype == np.uint8
    model = hpcml.load_model(run.dir / "model")
    direct = model.predict(x)  # uint8 rows: the model's normalizer works in pixel units
    via_store = hpcml.predict(run.dir / "model", image_store / "store")
    assert np.array_equal(np.asarray(via_store), direct)
    assert (direct == y).mean() > 0.8  # and they are right, against the true labels


def test_channels_last_trains_the_same_model(image_store, tmp_path):
    off = hpcml.train(_cfg(image_store / "store", channels_last="off", epochs=2), out=tmp_path / "off")
    on = hpcml.train(_cfg(image_store / "store", channels_last="on", epochs=2), out=tmp_path / "on")
    assert (off.report["channels_last"], on.report["channels_last"]) == (False, True)
    assert on.report["channels_last_reason"] == "requested"
    w_off, w_on = _weights(off.dir), _weights(on.dir)
    for k in w_off:  # same math, another memory layout: equal up to float reassociation
        torch.testing.assert_close(w_on[k], w_off[k], rtol=1e-4, atol=1e-5)


def test_augment_on_tabular_data_is_a_clear_error(cli, tmp_path):
    r = cli("train", "--data", "synthetic", "--augment", "flip", "--epochs", "1", "--out", str(tmp_path))
    assert r.returncode == 2
    assert "augment (flip) applies to images" in r.stderr and "tabular" in r.stderr
    assert "Traceback" not in r.stderr
