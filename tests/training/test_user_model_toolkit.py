"""A model defined in the tests (tests/usernets.py) through the whole toolkit: the API forms, DDP
ranks, gradient accumulation, SIGKILL + bit-exact resume, elastic restarts, callbacks, early stopping
and the doctor. Sweeps and parallel predict: tests/parallel/test_sweep.py; CLI specs, trust refusal
and plugins: tests/models/test_user_models.py."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest
import torch
import usernets
import yaml
from hpcml_testkit import spec
from safetensors.torch import load_file

import hpcml

CFG = {
    "data": {"name": "synthetic", "rows": 1000, "features": 8, "classes": 3},  # 800 train rows
    "model": {"name": "usernets:build", "kwargs": {"width": 16}},
    "epochs": 3,
    "batch_size": 64,
    "threads": 1,
    "precision": "fp32",
    "optim": {"name": "sgd", "lr": 0.05},
}


def _weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def test_factory_module_and_spec_train_the_same_model(tmp_path):
    by_spec = hpcml.train(CFG, out=tmp_path / "spec")
    by_factory = hpcml.train({**CFG, "model": {"name": "auto", "kwargs": {"width": 16}}}, out=tmp_path / "f",
                             model=usernets.build)  # fmt: skip
    torch.manual_seed(CFG["seed"] if "seed" in CFG else 0)  # what hpcml seeds before building
    ready = usernets.build((8,), 3, width=16)
    by_module = hpcml.train(CFG, out=tmp_path / "m", model=ready)
    a, b, c = _weights(by_spec.dir), _weights(by_factory.dir), _weights(by_module.dir)
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    for run, arch in (
        (by_spec, "usernets:build"),
        (by_factory, "usernets:build"),
        (by_module, "torch.nn.modules.container:Sequential"),
    ):
        assert json.loads((run.dir / "model" / "model.json").read_text())["architecture"] == arch
    assert yaml.safe_load((by_factory.dir / "config.yaml").read_text())["model"]["name"] == "usernets:build"
    x = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    with pytest.raises(hpcml.UsageError, match="usernets:build"):
        hpcml.load_model(by_spec.dir / "model")
    loaded = hpcml.load_model(by_spec.dir / "model", trust_code=True)
    np.testing.assert_array_equal(loaded.predict(x), by_spec.model.predict(x))


def test_two_ranks_and_accumulation_match_one_process(tmp_path):
    # TinyNet (no BatchNorm: BatchNorm normalizes each rank's own half batch, so it differs from one
    # process by construction, not by rounding)
    cfg = {**CFG, "model": {"name": "usernets:TinyNet", "kwargs": {"width": 16}}}
    one = hpcml.train(cfg, out=tmp_path / "one")
    two = hpcml.train({**cfg, "batch_size": 32}, out=tmp_path / "two", nproc=2)
    accum = hpcml.train({**cfg, "batch_size": 16, "grad_accum": 2}, out=tmp_path / "acc", nproc=2)
    assert two.report["world_size"] == 2 and accum.report["global_batch_size"] == 64
    assert one.report["steps"] == two.report["steps"] == accum.report["steps"] == 3 * 13
    w1 = _weights(one.dir)
    for other in (two, accum):
        w = _weights(other.dir)
        for k in w1:  # fp32 sums in another order: a few ulps
            torch.testing.assert_close(w[k], w1[k], rtol=1e-5, atol=1e-6)


def test_sigkill_then_resume_is_bit_exact_and_elastic_restart_recovers(tmp_path, cli):
    cfg = {**CFG, "checkpoint": {"every": "5"}}
    ref = hpcml.train(cfg, out=tmp_path / "ref")
    faulty = {**cfg, "callbacks": [spec("FailAt", rank=0, step=17, mode="kill")]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(faulty))
    killed = cli("train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = cli("train", "--resume", str(tmp_path / "run"), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from_step"] == 15
    a, b = _weights(ref.dir), _weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)

    ddp = {**cfg, "batch_size": 32}
    ref2 = hpcml.train(ddp, out=tmp_path / "ref2", nproc=2)
    kill1 = {**ddp, "callbacks": [spec("FailAt", rank=1, step=13, mode="kill")]}
    run = hpcml.train(kill1, out=tmp_path / "elastic", nproc=2, max_restarts=1)
    assert run.report["resumed_from_step"] == 10 and run.report["restarts"] == 1
    a, b = _weights(ref2.dir), _weights(run.dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


class _Recorder(hpcml.Callback):
    def __init__(self):
        self.events = []

    def on_train_start(self, run, state):
        self.events.append(("start", state.step))

    def on_epoch_end(self, run, state, row):
        self.events.append(("epoch", row["epoch"], state.step))

    def on_train_end(self, run, state):
        self.events.append(("end", state.step))


def test_callbacks_see_each_epoch_and_early_stopping_follows_its_rule(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.8, size=400) > 0).astype(int)
    lines = [
        "a,b,c,d,e,f,label",
        *(",".join(f"{v:.5f}" for v in row) + f",{t}" for row, t in zip(x, y, strict=True)),
    ]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    data = {"name": str(tmp_path / "t.csv"), "target": "label", "val_fraction": 0.2}
    cfg = {**CFG, "epochs": 25, "data": data, "optim": {"name": "adamw", "lr": 0.05}}
    rec = _Recorder()
    full = hpcml.train(cfg, out=tmp_path / "full", callbacks=[rec])
    steps = full.report["steps"] // 25
    assert rec.events == [("start", 0), *(("epoch", e, e * steps) for e in range(1, 26)), ("end", 25 * steps)]

    patience = 2
    history = [m["val_accuracy"] for m in full.metrics]
    expected = next(  # the first epoch after which the best is `patience` epochs old (independent rule)
        (e for e in range(1, 26) if e - 1 - max(range(e), key=history.__getitem__) >= patience), 25
    )
    early = hpcml.train({**cfg, "patience": patience}, out=tmp_path / "early")
    assert early.report["epochs"] == expected
    assert [m["val_accuracy"] for m in early.metrics] == history[:expected]
    assert expected < 25  # this data plateaus: the rule does fire
    assert early.report["stopped_early"] and "has not improved" in early.report["stopped_by"]
    with pytest.raises(hpcml.UsageError, match="val_fraction"):
        hpcml.train({**CFG, "patience": 2}, out=tmp_path / "noval")


def test_doctor_breaks_down_a_config_that_names_a_user_model(tmp_path, cli):
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CFG))
    r = cli("bench", "--doctor", str(tmp_path / "cfg.yaml"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["breakdown"]["model"] == "usernets:build" and doc["breakdown"]["loop_seconds_per_step"] > 0
