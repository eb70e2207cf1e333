"""A run dir is written by one process at a time, a bad --out fails before any work, and a resume
refuses a config.yaml that no longer describes the run it continues."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from hpcml_testkit import spec
from safetensors.torch import load_file

import hpcml
from hpcml.errors import UsageError


def _popen(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "hpcml.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(tmp_path, cli):
    out = tmp_path / "run"
    # long enough (tens of seconds on 2 cores) to outlast the second process's start-up (imports)
    args = ["train", "--data", "synthetic", "--rows", "20000", "--model", "mlp", "--epochs", "40",
            "--threads", "1", "--precision", "fp32", "--quiet", "--out", str(out)]  # fmt: skip
    first = _popen(*args)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the first run holds the lock from before it loads data
        assert first.poll() is None, first.communicate()
        second = cli(*args)
        assert second.returncode == 2
        assert f"in use by pid {first.pid}" in second.stderr and str(out) in second.stderr
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 41))  # one run's rows, one object per line
    assert json.loads((out / "report.json").read_text())["epochs"] == 40


def test_a_killed_run_leaves_no_lock_behind(tmp_path, small_cfg, cli):
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    faulty = {
        **small_cfg,
        "checkpoint": {"every": "5"},
        "callbacks": [spec("FailAt", rank=0, step=12, mode="kill")],
    }
    cfg.write_text(yaml.safe_dump(faulty))
    killed = _popen("train", "--config", str(cfg), "--out", str(out), "--quiet")
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    resumed = cli("train", "--resume", str(out), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from_step"] == 10


def test_out_that_is_a_file_or_unwritable_fails_up_front(tmp_path, cli):
    afile = tmp_path / "afile"
    afile.write_text("x")
    r = cli("train", "--data", "mnist1d", "--out", str(afile))
    assert r.returncode == 2 and f"--out {afile}: exists and is not a folder" in r.stderr
    assert afile.read_text() == "x"
    with pytest.raises(UsageError, match="not a folder"):
        hpcml.train({"epochs": 1}, out=afile)
    if os.geteuid() != 0:  # root writes anywhere: the permission check cannot fail for it
        locked = tmp_path / "ro"
        locked.mkdir(mode=0o500)
        r = cli("train", "--out", str(locked / "run"))
        assert r.returncode == 2 and "is not writable" in r.stderr


def _edit(run_dir, **changes):
    path = run_dir / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"optim__lr": 0.05}, "optim.lr 0.01 -> 0.05"),
        ({"seed": 7}, "seed 0 -> 7"),
        ({"epochs": 5}, "epochs 3 -> 5"),  # cosine: a longer horizon would raise the lr again
    ],
)
def test_resume_refuses_an_edited_config_naming_the_fields(tmp_path, small_cfg, cli, changes, named):
    out = tmp_path / "run"
    hpcml.train({**small_cfg, "checkpoint": {"every": "5"}}, out=out)
    _edit(out, **changes)
    r = cli("train", "--resume", str(out))
    assert r.returncode == 2 and named in r.stderr, r.stderr
    if "epochs" in changes:
        assert "constant" in r.stderr  # says which schedules may be extended


def test_more_epochs_extend_a_constant_schedule_run_exactly(tmp_path, small_cfg, cli):
    cfg = {**small_cfg, "optim": {"name": "adamw", "lr": 0.01, "schedule": "constant"}}
    whole = hpcml.train({**cfg, "epochs": 5}, out=tmp_path / "whole")
    short = tmp_path / "short"
    hpcml.train({**cfg, "epochs": 3}, out=short)
    r = cli("train", "--resume", str(short), "--epochs", "5", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["epochs"] == 5
    a, b = (load_file(str(d / "model" / "model.safetensors")) for d in (whole.dir, short))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert yaml.safe_load((short / "config.yaml").read_text())["epochs"] == 5
