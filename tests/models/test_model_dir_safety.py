"""An untrusted model dir: model.json checked as a schema and against the weights' header before
anything is allocated; files that are not regular files, or too large, refused before reading."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import hpcml
from hpcml.errors import HpcmlError
from hpcml.models.io import _seal, load_model, save_model

KEY = bytes(range(32))
CFG = {
    "data": {"name": "synthetic", "rows": 600, "features": 8, "classes": 3},
    "model": {"name": "mlp", "kwargs": {"hidden": 32}},
    "epochs": 2,
    "batch_size": 64,
    "threads": 1,
    "precision": "fp32",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = hpcml.train(CFG, out=tmp_path_factory.mktemp("safety") / "run")
    return run.dir / "model"


@pytest.fixture
def model_dir(trained, tmp_path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(trained, d)
    return d


def _edit(d: Path, **fields) -> None:
    meta = json.loads((d / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**meta, **fields}))


def _refused(d: Path, pattern: str) -> None:
    with pytest.raises(HpcmlError, match=pattern):
        load_model(d)


def test_untouched_dir_loads_and_predicts_as_its_own_stats_say(model_dir):
    """The reference for the tampering cases: the model's forward recomputed from model.json."""
    meta = json.loads((model_dir / "model.json").read_text())
    x = np.random.default_rng(0).normal(size=(200, 8)).astype(np.float32)
    model = load_model(model_dir)
    pre = meta["preprocessing"]
    xn = (x - np.asarray(pre["shift"], np.float32)) / np.asarray(pre["scale"], np.float32)
    from safetensors.torch import load_file

    w = load_file(str(model_dir / "model.safetensors"))
    h = torch.from_numpy(xn)
    for i in (1, 3):  # MLP: Flatten, Linear, ReLU, Linear, ReLU, Linear
        h = torch.relu(h @ w[f"{i}.weight"].T + w[f"{i}.bias"])
    logits = h @ w["5.weight"].T + w["5.bias"]
    np.testing.assert_array_equal(model.predict(x), logits.argmax(1).numpy())
    np.testing.assert_allclose(model.logits(x).numpy(), logits.numpy(), rtol=1e-5, atol=1e-5)


def test_class_names_must_match_the_outputs(model_dir):
    _edit(model_dir, classes=["a", "b"])
    _refused(model_dir, r"model\.json: classes: 2 names but the model has 3 outputs")
    _edit(model_dir, classes=["a", "b", "c", "d"], num_outputs=4)  # consistent, but not the weights
    _refused(model_dir, r"model\.safetensors: tensor '5\.weight' has shape \[3, 32\].* gives \[4, 32\]")
    _edit(model_dir, classes=["a", "b", "a"], num_outputs=3)
    _refused(model_dir, r"model\.json: classes: the same name appears twice")


def test_normalization_stats_must_match_the_features(model_dir):
    meta = json.loads((model_dir / "model.json").read_text())
    pre = meta["preprocessing"]
    _edit(model_dir, preprocessing={**pre, "shift": [0.5]})  # would broadcast over all 8 features
    _refused(model_dir, r"model\.json: preprocessing\.shift: 1 value\(s\) but the model takes 8 features")
    _edit(model_dir, preprocessing={**pre, "scale": pre["scale"][:7] + [0.0]})
    _refused(model_dir, r"preprocessing\.scale: a scale of 0")
    _edit(model_dir, preprocessing={**pre, "scale": [[1.0], [2.0, 3.0]]})
    _refused(model_dir, r"preprocessing\.scale: not a \(nested\) list of numbers")
    _edit(model_dir, preprocessing=pre, features=["a", "b"])
    _refused(model_dir, r"model\.json: features: 2 names but the model takes 8 inputs")


def test_regression_fields(model_dir):
    _edit(model_dir, task="regression")
    _refused(model_dir, r"model\.json: num_outputs: 3, but a regression model has 1 output")
    _edit(model_dir, task="regression", num_outputs=1, classes=None, target_scale=None)
    _refused(model_dir, r"model\.json: target_scale: missing")
    _edit(model_dir, target_scale={"mean": 100.0, "std": 0.0})
    _refused(model_dir, r"model\.json: target_scale\.std: Input should be greater than 0")


def test_huge_architectures_are_refused_before_allocating(model_dir):
    _edit(model_dir, kwargs={"hidden": 1e9})
    _refused(
        model_dir, r"model\.json: kwargs: model mlp: kwargs\.hidden must be a whole number, got 1000000000\.0"
    )
    h = 10**9  # 8 -> h -> h -> 3, weights and biases: ~1e18 parameters, only built on the meta device
    _edit(model_dir, kwargs={"hidden": h})
    _refused(
        model_dir,
        rf"model\.json: mlp .* has {(8 * h + h) + (h * h + h) + (h * 3 + 3):,} parameters, more than",
    )
    _edit(model_dir, kwargs={"hidden": 64})
    _refused(model_dir, r"model\.safetensors: tensor '1\.weight' has shape \[32, 8\].* gives \[64, 8\]")
    _edit(model_dir, kwargs={"hidden": 16})
    _refused(model_dir, r"model\.safetensors: tensor '1\.weight' has shape \[32, 8\].* gives \[16, 8\]")
    _edit(model_dir, kwargs={"hidden": [32]})
    _refused(model_dir, r"model\.json: kwargs: model mlp: kwargs\.hidden must be a whole number, got \[32\]")
    _edit(model_dir, kwargs={"hidden": {"a": 1}})
    _refused(model_dir, r"model\.json: kwargs: hidden: must be a number, string")
    _edit(model_dir, kwargs={"hidden": 32}, input_shape=[100000, 100000])
    _refused(model_dir, r"model\.json: input_shape: \[100000, 100000\] is 10,000,000,000 values per row")
    _edit(model_dir, input_shape=[8, 0])
    _refused(model_dir, r"model\.json: input_shape: .*every size must be > 0")
    _edit(model_dir, input_shape=[8.0])
    _refused(model_dir, r"model\.json: input_shape\[0\]: Input should be a valid integer")


def test_weights_header_must_account_for_every_byte(model_dir):
    weights = model_dir / "model.safetensors"
    blob = weights.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    header["1.bias"]["data_offsets"] = [0, 64]  # half the bias: a gap the sha256 does not know of
    body = json.dumps(header).encode()
    forged = len(body).to_bytes(8, "little") + body + blob[8 + n :]
    weights.write_bytes(forged)
    import hashlib

    _edit(model_dir, weights_sha256=hashlib.sha256(forged).hexdigest())
    _refused(model_dir, r"model\.safetensors: tensor '1\.bias': data_offsets \[0, 64\] do not match")
    weights.write_bytes((1 << 40).to_bytes(8, "little") + blob[8:])  # a 1 TiB header length
    _edit(model_dir, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    _refused(model_dir, r"model\.safetensors: the safetensors header claims 1,099,511,627,776 bytes")
    weights.write_bytes(blob + bytes(1 << 20))  # more bytes than 3 small layers can need: not read
    _edit(model_dir, weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest())
    _refused(model_dir, rf"model\.safetensors: {len(blob) + (1 << 20):,} bytes, more than [\d,]+ \(the size")


def test_oversize_model_json_is_not_read(model_dir):
    text = (model_dir / "model.json").read_text()
    (model_dir / "model.json").write_text(text + " " * (5 << 20))  # still valid JSON
    _refused(model_dir, r"model\.json: 5,2\d\d,\d\d\d bytes, more than 4,194,304")
    (model_dir / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    _refused(model_dir, r"model\.json: not valid JSON")


def test_non_regular_files_are_refused(model_dir):
    weights = model_dir / "model.safetensors"
    weights.unlink()
    weights.mkdir()
    _refused(model_dir, r"model\.safetensors: not a regular file: a directory")
    weights.rmdir()
    os.mkfifo(weights)  # opening a FIFO for reading would block until a writer comes
    _refused(model_dir, r"model\.safetensors: not a regular file: a FIFO")
    weights.unlink()
    (model_dir / "model.json").rename(model_dir / "real.json")
    (model_dir / "model.json").symlink_to(model_dir / "real.json")  # a symlink to a regular file: fine
    weights.symlink_to("/dev/null")
    _refused(model_dir, r"model\.safetensors: not a regular file: a character device \(through a symlink\)")


def test_weights_linked_to_dev_zero_fail_fast_in_the_cli(model_dir, tmp_path):
    """Reading /dev/zero never ends: the old loader ran until MemoryError. In a child process with a
    memory cap and a timeout, so a regression cannot take the machine's memory."""
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors").symlink_to("/dev/zero")
    np.save(tmp_path / "x.npy", np.zeros((4, 8), np.float32))
    code = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        from hpcml.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    args = [
        "predict",
        str(model_dir),
        "--input",
        str(tmp_path / "x.npy"),
        "--output",
        str(tmp_path / "p.csv"),
    ]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "hpcml: error:" in r.stderr and "Traceback" not in r.stderr
    assert "model.safetensors: not a regular file: a character device (through a symlink)" in r.stderr
    assert not (tmp_path / "p.csv").exists()


def test_encrypted_dir_is_checked_after_decryption(trained, tmp_path):
    model = load_model(trained)
    enc = save_model(tmp_path / "enc", model.module, model.meta, key=KEY)
    x = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    np.testing.assert_array_equal(load_model(enc, key=KEY).predict(x), model.predict(x))
    # a key holder's model.json that contradicts the weights: sealed, so only the header check sees it
    from safetensors.torch import save

    plain = save({k: v.contiguous() for k, v in model.module.state_dict().items()}, metadata={"format": "x"})
    meta = {k: v for k, v in model.meta.items() if k != "weights_sha256"}
    doc, blob = _seal({**meta, "format": "hpcml.model/1", "kwargs": {"hidden": 64}}, plain, KEY)
    (enc / "model.safetensors").write_bytes(blob)
    (enc / "model.json").write_text(json.dumps(doc))
    with pytest.raises(HpcmlError, match=r"model\.safetensors: tensor '1\.weight' has shape \[32, 8\]"):
        load_model(enc, key=KEY)
    doc["encryption"] = "AES"
    (enc / "model.json").write_text(json.dumps(doc))
    with pytest.raises(HpcmlError, match=r"model\.json: encryption: Input should be a valid dictionary"):
        load_model(enc, key=KEY)
