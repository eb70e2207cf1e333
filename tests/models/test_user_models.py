"""Any torch.nn.Module through hpcml: `module:function` specs (trusted explicitly) and installed
plugins (entry points `hpcml.models`), in this process and through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pytest
import torch

import hpcml
from hpcml.config import build_config
from hpcml.errors import HpcmlError, UsageError
from hpcml.models import create_model, describe_models
from hpcml.models.io import load_model

SRC = str(Path(hpcml.__file__).resolve().parents[1])

MYNETS = """
import math
import os
import pathlib

import torch
from torch import nn

if os.environ.get("MYNETS_MARKER"):  # proves whether hpcml imported this module
    pathlib.Path(os.environ["MYNETS_MARKER"]).write_text("imported")


def build(input_shape, num_outputs, width=64):
    return nn.Sequential(
        nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(), nn.Linear(width, num_outputs)
    )


def needs_real_tensors(input_shape, num_outputs, width=64):
    # .item() cannot run on the meta device: hpcml must fall back to a CPU build to check the weights
    width = int(torch.tensor(float(width)).item())
    return build(input_shape, num_outputs, width=width)


class Net(nn.Module):
    def __init__(self, *, input_shape, num_outputs, depth: int = 1):
        super().__init__()
        self.body = nn.Flatten()
        self.head = nn.Linear(math.prod(input_shape), num_outputs)

    def forward(self, x):
        return self.head(self.body(x))


class ItemForward(nn.Module):
    # builds anywhere; its forward reads a value (.item()), which the meta device cannot give

    def __init__(self, *, input_shape, num_outputs):
        super().__init__()
        self.net = build(input_shape, num_outputs, width=4)

    def forward(self, x):
        return self.net(x) * (1.0 if x.abs().max().item() >= 0 else 0.0)


class Outer:
    build = staticmethod(build)


NOT_CALLABLE = 3


def returns_list(input_shape, num_outputs):
    return [nn.Linear(1, 1)]


def wrong_width(input_shape, num_outputs):
    return build(input_shape, num_outputs + 1)


def raises(input_shape, num_outputs):
    raise RuntimeError("boom in the factory")


def bad_forward(input_shape, num_outputs):
    return nn.Linear(math.prod(input_shape) + 5, num_outputs)
"""

PLUGIN_MOD = """
import math

from torch import nn


def build(input_shape, num_outputs, width: int = 8):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                         nn.Linear(width, num_outputs))
"""


@pytest.fixture(scope="module")
def netdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("usernets")
    (d / "mynets.py").write_text(MYNETS)
    (d / "brokennet.py").write_text("import not_a_real_dependency_xyz\n")
    (d / "untouched.py").write_text("raise SystemExit('hpcml imported untouched.py')\n")
    return d


@pytest.fixture
def on_path(netdir, monkeypatch) -> Path:
    monkeypatch.syspath_prepend(str(netdir))
    return netdir


def _cli(*args: str, path: list[Path], marker: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, *map(str, path)]), "PYTHONUNBUFFERED": "1"}
    env.pop("MYNETS_MARKER", None)
    if marker is not None:
        env["MYNETS_MARKER"] = str(marker)
    return subprocess.run(
        [sys.executable, "-m", "hpcml.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


TRAIN = ["train", "--data", "digits", "--layout", "flat", "--epochs", "1", "--threads", "1"]
TRAIN += ["--precision", "fp32", "--quiet"]


# ------------------------------------------------------------------------------- create_model


def test_spec_builds_function_class_and_nested_attribute(on_path):
    m = create_model("mynets:build", input_shape=(8,), num_outputs=3, trust_code=True, width=16)
    assert isinstance(m, torch.nn.Sequential) and m[1].out_features == 16
    assert m(torch.randn(5, 8)).shape == (5, 3)
    net = create_model("mynets:Net", input_shape=(2, 4), num_outputs=5, trust_code=True)
    assert type(net).__name__ == "Net" and net(torch.randn(3, 2, 4)).shape == (3, 5)
    assert (
        create_model("mynets:Outer.build", input_shape=(8,), num_outputs=2, trust_code=True, width=4)[
            1
        ].out_features
        == 4
    )
    with torch.device("meta"):  # shapes only: how a model dir is checked before allocating
        meta = create_model("mynets:build", input_shape=(8,), num_outputs=3, trust_code=True, width=16)
    assert meta[3].weight.device.type == "meta" and meta[3].weight.shape == (3, 16)
    with torch.device("meta"):  # its forward cannot run on meta: checked on the CPU build instead
        assert create_model("mynets:ItemForward", input_shape=(8,), num_outputs=3, trust_code=True)
    cpu = create_model("mynets:ItemForward", input_shape=(8,), num_outputs=3, trust_code=True)
    assert cpu(torch.zeros(2, 8)).shape == (2, 3)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("missing_mod_xyz:build", r"model missing_mod_xyz:build: module 'missing_mod_xyz' not found"),
        ("mynets:nope", r"model mynets:nope: mynets has no attribute 'nope'"),
        ("mynets:Outer.nope", r"model mynets:Outer\.nope: mynets\.Outer has no attribute 'nope'"),
        ("mynets:NOT_CALLABLE", r"model mynets:NOT_CALLABLE: int object is not callable"),
        ("mynets:returns_list", r"model mynets:returns_list: returned list, not a torch\.nn\.Module"),
        (
            "mynets:wrong_width",
            r"model mynets:wrong_width: output is \(2, 4\) for 2 rows of input shape \(8,\); the task "
            r"needs \(2, 3\)",
        ),
        ("mynets:raises", r"model mynets:raises: building it raised RuntimeError: boom in the factory"),
        (
            "mynets:bad_forward",
            r"model mynets:bad_forward: forward of a zero batch of input shape \(8,\) failed: RuntimeError",
        ),
        (
            "brokennet:build",
            r"model brokennet:build: importing brokennet failed: ModuleNotFoundError: .*not_a_real_dep",
        ),
        (
            "mynets",
            r"unknown model 'mynets'; valid: mlp, cnn1d, convnet1d, cnn2d, mobilenet_v2, mobilenet_v3_small, "
            r"resnet18, resnet34, or module:function",
        ),
        ("mynets:build:x", r"bad model spec 'mynets:build:x'"),
        ("my-nets:build", r"bad model spec 'my-nets:build'"),
    ],
)
def test_bad_specs_name_the_spec(on_path, spec, message):
    with pytest.raises(UsageError, match=message) as err:
        create_model(spec, input_shape=(8,), num_outputs=3, trust_code=True)
    assert "\n" not in str(err.value)


def test_factory_kwargs_errors_name_the_spec(on_path):
    with pytest.raises(UsageError, match=r"model mynets:build: building it raised TypeError: .*'widht'"):
        create_model("mynets:build", input_shape=(8,), num_outputs=3, trust_code=True, widht=3)


def test_spec_syntax_is_checked_at_config_validation_without_importing(on_path):
    assert build_config({"model": {"name": "untouched:build"}}).model.name == "untouched:build"
    assert "untouched" not in sys.modules
    with pytest.raises(UsageError, match=r"config: model\.name: bad model spec 'mynets:'"):
        build_config({"model": {"name": "mynets:"}})
    with pytest.raises(UsageError, match=r"model\.name: unknown model 'mynets'; valid: auto, mlp, cnn1d"):
        build_config({"model": {"name": "mynets"}})


def test_spec_without_trust_is_refused_before_import(on_path):
    with pytest.raises(UsageError, match=r"names code outside hpcml \(untouched:build\); pass --trust-code"):
        create_model("untouched:build", input_shape=(8,), num_outputs=3)
    assert "untouched" not in sys.modules
    assert create_model("mlp", input_shape=(8,), num_outputs=3, hidden=4)[1].out_features == 4  # no trust


# ------------------------------------------------------------------------------ CLI, model dir


@pytest.fixture(scope="module")
def spec_run(netdir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("specrun") / "run"
    r = _cli(*TRAIN, "--model", "mynets:build", "--model-kw", "width=16", "--out", str(out), path=[netdir])
    assert r.returncode == 0, r.stderr
    return out / "model"


def test_cli_trains_a_spec_and_records_it(spec_run):
    meta = json.loads((spec_run / "model.json").read_text())
    assert meta["architecture"] == "mynets:build" and meta["kwargs"] == {"width": 16}
    cfg = (spec_run.parent / "config.yaml").read_text()
    assert "name: mynets:build" in cfg and "width: 16" in cfg


def test_cli_refuses_spec_model_without_trust_and_never_imports_it(spec_run, netdir, tmp_path):
    marker = tmp_path / "imported.marker"
    np.save(tmp_path / "x.npy", np.zeros((4, 64), np.float32))
    r = _cli("evaluate", str(spec_run), "--data", "digits", path=[netdir], marker=marker)
    assert r.returncode == 2, r.stderr
    assert "model.json names code outside hpcml (mynets:build); pass --trust-code" in r.stderr
    assert "Traceback" not in r.stderr
    out = tmp_path / "p.csv"
    r = _cli("predict", str(spec_run), "--input", str(tmp_path / "x.npy"), "--output", str(out),
             path=[netdir], marker=marker)  # fmt: skip
    assert r.returncode == 2 and "(mynets:build); pass --trust-code" in r.stderr, r.stderr
    assert not marker.exists() and not out.exists()
    r = _cli("evaluate", str(spec_run), "--data", "digits", "--trust-code", path=[netdir], marker=marker)
    assert r.returncode == 0 and marker.exists(), r.stderr  # the same setup does import it when trusted


def test_cli_predict_with_trust_matches_in_process(spec_run, on_path, tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "p.csv"
    r = _cli("predict", str(spec_run), "--input", str(tmp_path / "x.npy"), "--output", str(out),
             "--workers", "2", "--trust-code", path=[on_path])  # fmt: skip
    assert r.returncode == 0, r.stderr
    model = load_model(spec_run, trust_code=True)
    want = [model.classes[i] for i in model.predict(x)]
    got = [str(v) for v in pacsv.read_csv(out).column("prediction").to_pylist()]
    assert got == want
    r = _cli("evaluate", str(spec_run), "--data", "digits", "--trust-code", "--json", path=[on_path])
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["model"] == "mynets:build"
    assert result == hpcml.evaluate(spec_run, "digits", trust_code=True)


def test_api_refuses_untrusted_spec_dirs(spec_run, on_path, tmp_path):
    import shutil

    d = tmp_path / "model"
    shutil.copytree(spec_run, d)
    meta = json.loads((d / "model.json").read_text())
    (d / "model.json").write_text(json.dumps({**meta, "architecture": "untouched:build"}))
    x = np.zeros((3, 64), np.float32)
    for call in (
        lambda: hpcml.load_model(d),
        lambda: hpcml.evaluate(d, "digits"),
        lambda: hpcml.predict(d, x),
    ):
        with pytest.raises(UsageError, match=r"model\.json names code outside hpcml \(untouched:build\)"):
            call()
    assert "untouched" not in sys.modules
    (d / "model.json").write_text(json.dumps({**meta, "architecture": "mynets"}))
    with pytest.raises(HpcmlError, match=r"model\.json: architecture: unknown model 'mynets'"):
        hpcml.load_model(d, trust_code=True)


def test_model_that_cannot_build_on_meta_is_checked_after_a_cpu_build(spec_run, on_path, tmp_path):
    import hashlib
    import shutil

    from hpcml.models.schema import validate_meta
    from hpcml.models.weights import expected_state

    d = tmp_path / "model"
    shutil.copytree(spec_run, d)
    meta = {**json.loads((d / "model.json").read_text()), "architecture": "mynets:needs_real_tensors"}

    def write(**fields) -> None:
        (d / "model.json").write_text(json.dumps({**meta, **fields}))

    write()
    assert expected_state(validate_meta(meta, "m"), d, trust_code=True) is None  # the fallback path
    x = np.random.default_rng(1).normal(size=(20, 64)).astype(np.float32)
    ref = load_model(spec_run, trust_code=True)
    np.testing.assert_array_equal(load_model(d, trust_code=True).predict(x), ref.predict(x))
    write(kwargs={"width": 8})
    with pytest.raises(HpcmlError, match=r"tensor '1\.weight' has shape \[16, 64\].* gives \[8, 64\]"):
        load_model(d, trust_code=True)
    weights = d / "model.safetensors"
    blob = weights.read_bytes() + bytes(1 << 16)  # bytes the header does not declare: never read
    weights.write_bytes(blob)
    write(weights_sha256=hashlib.sha256(blob).hexdigest())
    with pytest.raises(HpcmlError, match=r"model\.safetensors: [\d,]+ bytes, more than .*its own header"):
        load_model(d, trust_code=True)
    weights.write_bytes((1 << 40).to_bytes(8, "little") + blob[8:])
    with pytest.raises(HpcmlError, match=r"header claims 1,099,511,627,776 bytes, more than"):
        load_model(d, trust_code=True)


# ------------------------------------------------------------------------------------ plugins


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("plugins")
    info = d / "myplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[hpcml.models]\ntiny = myplug_mod:build\nbroken = no_such_plugin_mod_xyz:build\n"
        "mlp = myplug_mod:build\n"  # a built-in's name: ignored, listed as a clash
    )
    (d / "myplug_mod.py").write_text(PLUGIN_MOD)
    return d


def test_plugin_is_listed_trained_and_evaluated_without_trust(plugin_dir, tmp_path):
    r = _cli("models", "--json", path=[plugin_dir])
    assert r.returncode == 0, r.stderr
    rows = {(m["name"], m["kind"]): m for m in json.loads(r.stdout)["models"]}
    tiny = rows["tiny", "plugin"]
    assert tiny["target"] == "myplug_mod:build" and tiny["source"] == "myplug 0.1" and tiny["error"] is None
    assert tiny["kwargs"] == {"width": {"default": 8, "type": "int"}}
    assert rows["mlp", "built-in"]["kwargs"]["hidden"] == {"default": 256, "type": "int"}
    assert "no_such_plugin_mod_xyz" in rows["broken", "plugin"]["error"]
    assert "already taken" in rows["mlp", "plugin"]["error"]
    r = _cli("models", path=[plugin_dir])
    assert r.returncode == 0 and "tiny" in r.stdout and "BROKEN" in r.stdout, r.stderr

    out = tmp_path / "run"
    r = _cli(*TRAIN, "--model", "tiny", "--model-kw", "width=4", "--out", str(out), path=[plugin_dir])
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "model" / "model.json").read_text())["architecture"] == "tiny"
    r = _cli("evaluate", str(out / "model"), "--data", "digits", "--json", path=[plugin_dir])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "tiny"
    r = _cli(*TRAIN, "--model", "broken", "--out", str(tmp_path / "b"), path=[plugin_dir])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model plugin 'broken' (no_such_plugin_mod_xyz:build from myplug 0.1) is broken" in r.stderr
    r = _cli("evaluate", str(out / "model"), "--data", "digits", path=[])  # plugin not installed here
    assert r.returncode == 1 and "architecture: unknown model 'tiny'" in r.stderr, r.stderr


def test_builtins_are_described_without_plugins():
    rows = {r.name: r for r in describe_models() if r.kind == "built-in"}
    assert list(rows) == [
        "mlp", "cnn1d", "convnet1d", "cnn2d", "mobilenet_v2", "mobilenet_v3_small", "resnet18", "resnet34"
    ]  # fmt: skip
    assert rows["cnn2d"].kwargs == {
        "channels": {"default": 32, "type": "int"},
        "widths": {"default": None, "type": "list[int] | None"},
    }


def test_help_texts_have_trust_examples_and_models_help_is_light():
    code = textwrap.dedent(
        """
        import sys; from hpcml.cli import main
        rc = main(['models', '--help'])
        print('HEAVY', [m for m in ('torch', 'pyarrow') if m in sys.modules], rc)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": SRC})  # fmt: skip
    assert "HEAVY [] 0" in r.stdout and "hpcml models --json" in r.stdout, r.stdout + r.stderr
    for cmd in ("evaluate", "predict"):
        r = _cli(cmd, "--help", path=[])
        assert "--trust-code" in r.stdout and f"hpcml {cmd} runs/mine/model" in r.stdout, r.stdout
