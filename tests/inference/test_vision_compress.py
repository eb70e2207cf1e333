"""The image families through the rest of hpcml: a 1-epoch train on a PNG folder, predict from the
model dir, int8, ONNX export, and --prune refused by name (their residual blocks are no chain)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import hpcml
from hpcml.errors import UsageError
from hpcml.inference.compress import compress, export
from hpcml.models.io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

KWARGS = {
    "resnet18": {"stem": "cifar"},
    "mobilenet_v2": {"stem": "cifar", "width": 0.25},
    # the imagenet stem (32x32 is the least it takes) and a 288x512 head layer, where int8 applies
    "mobilenet_v3_small": {"width": 0.5},
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """40 RGB 32x32 PNGs in 2 classes (dark and bright noise) and the same pixels as (N, 3, 32, 32)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    pixels = []
    for k, label in enumerate(("dark", "light")):
        (root / label).mkdir()
        for i in range(20):
            a = (rng.integers(0, 128, (32, 32, 3)) + 100 * k).astype(np.uint8)
            Image.fromarray(a).save(root / label / f"{i:02d}.png")
            pixels.append(a.transpose(2, 0, 1) / np.float32(255))
    return root, np.stack(pixels).astype(np.float32)


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    """name -> (model dir, the Run): each model trained once for the module."""
    root, _ = images
    runs = {}
    for name, kw in KWARGS.items():
        cfg = {"data": {"name": str(root)}, "model": {"name": name, "kwargs": kw}, "epochs": 1,
               "batch_size": 16, "precision": "fp32", "threads": 1}  # fmt: skip
        run = hpcml.train(cfg, out=tmp_path_factory.mktemp(name) / "run")
        runs[name] = (run.dir / "model", run)
    return runs


@pytest.mark.parametrize("name", KWARGS)
def test_trains_and_predicts_from_the_model_dir(trained, images, name):
    model_dir, run = trained[name]
    x = images[1][::5]  # 8 images of both classes
    report = json.loads((run.dir / "report.json").read_text())
    assert report["epochs"] == 1 and report["precision"] == "fp32" and 0 <= report["test_accuracy"] <= 1
    meta = json.loads((model_dir / "model.json").read_text())
    assert meta["architecture"] == name and meta["kwargs"] == KWARGS[name]
    assert meta["input_shape"] == [3, 32, 32] and meta["classes"] == ["dark", "light"]
    loaded = load_model(model_dir)
    expected = run.model.predict(x)  # the model the run holds in memory
    np.testing.assert_array_equal(loaded.predict(x), expected)
    np.testing.assert_array_equal(hpcml.predict(str(model_dir), x.reshape(len(x), -1)), expected)  # flat
    np.testing.assert_allclose(loaded.logits(x).numpy(), run.model.logits(x).numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", KWARGS)
def test_prune_is_refused_by_name_before_anything_runs(trained, images, tmp_path, name):
    out = tmp_path / "small"
    why = "its residual blocks are not a plain chain of layers"
    with pytest.raises(UsageError, match=f"^--prune: {name} cannot be pruned: {why}"):
        compress(trained[name][0], out=out, prune=0.5, data=str(images[0]))
    assert not out.exists()


def test_prune_refusal_exits_2_through_the_cli(trained, images, tmp_path, capsys):
    from hpcml.cli import main

    capsys.readouterr()
    rc = main(["compress", str(trained["mobilenet_v2"][0]), "--prune", "0.3", "--out", str(tmp_path / "s"),
               "--data", str(images[0])])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--prune: mobilenet_v2 cannot be pruned" in err, err
    assert "train a narrower one instead (--model-kw width=0.5)" in err and not (tmp_path / "s").exists()


def test_int8_quantizes_the_large_head_layer(trained, images, tmp_path):
    root, x = images
    out = tmp_path / "int8"
    report = compress(trained["mobilenet_v3_small"][0], out=out, quantize="int8", data=str(root))
    assert report["quantization"]["layers"][0] == {
        "layer": "classifier.0",
        "shape": [512, 288],
        "dtype": "int8",
    }
    assert json.loads((out / "model.json").read_text())["quantization"]["layers"] == ["classifier.0"]
    # one small int8 layer in a conv net: the classes follow the float model's wherever it is sure
    float_logits = load_model(trained["mobilenet_v3_small"][0]).logits(x)
    sure = (float_logits[:, 0] - float_logits[:, 1]).abs().numpy() > 0.05
    np.testing.assert_array_equal(load_model(out).predict(x)[sure], float_logits.argmax(1).numpy()[sure])


def test_int8_of_a_model_without_a_large_linear_layer_says_why(trained, images, tmp_path):
    with pytest.raises(UsageError, match=r"no Linear layer is large enough .* the largest is 'fc'"):
        compress(trained["resnet18"][0], out=tmp_path / "r8", quantize="int8", data=str(images[0]))
    assert not (tmp_path / "r8").exists()


def test_onnx_export_matches_eager(trained, images, tmp_path):
    """mobilenet_v3_small: hardswish, hardsigmoid, squeeze-excitation and residual sums through the
    exporter (resnet18 exports too, by hand: 3 s to export, its latency the slow part)."""
    pytest.importorskip("onnxruntime")
    report = export(trained["mobilenet_v3_small"][0], out=tmp_path / "m.onnx", data=str(images[0]))
    assert report["verify"]["rows"] == 40 and report["verify"]["max_abs_diff"] < 1e-4
    after, before = report["metric"]["after"]["value"], report["metric"]["before"]["value"]
    assert after == pytest.approx(before, abs=1e-9) and (tmp_path / "m.onnx").stat().st_size > 0
    assert sorted(k for k in report["latency_ms"] if k.startswith("batch_")) == ["batch_1", "batch_1024"]


@pytest.mark.parametrize(
    ("name", "shape", "kw", "batches"),
    [
        ("mlp", (40,), {}, (1, 1024)),
        ("cnn2d", (1, 8, 8), {}, (1, 1024)),  # digits: 1.2 MMACs a row
        ("mobilenet_v2", (3, 32, 32), {"stem": "cifar"}, (1, 16)),  # 88 MMACs a row
        ("resnet18", (3, 32, 32), {"stem": "cifar"}, (1, 2)),  # 0.56 GMACs a row
        ("resnet18", (3, 224, 224), {}, (1,)),  # 1.8 GMACs a row
    ],
)
def test_the_large_timed_batch_costs_at_most_2_gmacs(name, shape, kw, batches):
    from hpcml.inference.measure import batches_for
    from hpcml.models import create_model

    assert batches_for(create_model(name, input_shape=shape, num_outputs=10, **kw), shape) == batches


def test_channels_last_and_augmentation_train_the_same_model(images, tmp_path):
    """The 4-D batches stay channels_last through the model (no reshape): the same model as NCHW."""
    model = {"name": "mobilenet_v2", "kwargs": KWARGS["mobilenet_v2"]}
    cfg = {"data": {"name": str(images[0])}, "model": model, "optim": {"name": "sgd"}, "epochs": 1,
           "batch_size": 16, "precision": "fp32", "threads": 1, "augment": ["flip", "crop"]}  # fmt: skip
    runs = {cl: hpcml.train({**cfg, "channels_last": cl}, out=tmp_path / cl) for cl in ("off", "on")}
    assert [runs[cl].report["channels_last"] for cl in ("off", "on")] == [False, True]
    # compared by what they compute, with SGD: the projection BatchNorms' biases have a zero gradient
    # (the next BatchNorm removes any shift), so they get float noise, which Adam would scale up to
    # +-lr steps that differ run to run. torch's float32 CPU kernels in channels_last are less exact
    # (one ResNet-18 weight gradient measured 13% off the float64 one, NCHW 0.7%; float64 agrees to
    # 1e-14): after 2 steps the logits differ by ~0.5%, a mixed-up layout would change them by ~100%
    off, on = (load_model(runs[cl].dir / "model").logits(images[1]) for cl in ("off", "on"))
    torch.testing.assert_close(on, off, rtol=0, atol=2e-2 * float(off.abs().max()))
