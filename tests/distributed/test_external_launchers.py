"""torchrun and SLURM start hpcml's ranks: the job trains as one, exactly like `hpcml train --nproc 2`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hpcml
from hpcml.distributed.dist import DistInfo, launcher_env
from hpcml.errors import UsageError
from hpcml.launch.elastic import free_port

TORCHRUN = Path(sys.executable).with_name("torchrun")
FLAGS = [
    "--data", "synthetic", "--rows", "1000", "--features", "8", "--classes", "3", "--model", "mlp",
    "--model-kw", "hidden=32", "--optimizer", "sgd", "--lr", "0.05", "--epochs", "2", "--batch-size", "32",
    "--precision", "fp32", "--threads", "1", "--quiet",
]  # fmt: skip
# the env of the test process minus any launcher variables it may itself run under
CLEAN = {
    k: v for k, v in os.environ.items()
    if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")
}  # fmt: skip


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _check(run_dir: Path, reference: Path) -> None:
    w, ref = _weights(run_dir), _weights(reference)
    for k in ref:
        assert torch.equal(w[k], ref[k]), k  # same ranks, same sums: bit for bit
    report = json.loads((run_dir / "report.json").read_text())
    assert report["world_size"] == 2 and report["global_batch_size"] == 64
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2  # one writer, not two


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "nproc"
    subprocess.run(
        [sys.executable, "-m", "hpcml", "train", *FLAGS, "--nproc", "2", "--out", str(out)],
        check=True, env=CLEAN, timeout=300,
    )  # fmt: skip
    return out


def test_torchrun_trains_one_job_equal_to_nproc(reference, tmp_path):
    out = tmp_path / "t"
    cmd = [
        str(TORCHRUN), "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port",
        str(free_port()), "-m", "hpcml", "train", *FLAGS, "--out", str(out), "--log-to", "tensorboard",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=CLEAN, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check(out, reference)
    assert len(list((out / "tensorboard").iterdir())) == 1  # rank 0 logs, rank 1 does not


def test_slurm_tasks_train_one_job_equal_to_nproc(reference, tmp_path):
    out = tmp_path / "s"
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hpcml", "train", *FLAGS, "--out", str(out)],
            env={
                **CLEAN,
                "SLURM_PROCID": str(r),
                "SLURM_NTASKS": "2",
                "SLURM_LOCALID": str(r),
                "SLURM_NTASKS_PER_NODE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    _check(out, reference)


def test_launcher_env_is_read_as_torchrun_and_slurm_set_it():
    assert launcher_env({}) is None
    assert launcher_env({"WORLD_SIZE": "1", "RANK": "0"}) is None  # a job of one: nothing to join
    assert launcher_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == (
        "torchrun",
        DistInfo(3, 4, 1, 2),
    )
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
             "SLURM_TASKS_PER_NODE": "4(x2)", "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}  # fmt: skip
    assert launcher_env(slurm) == ("SLURM", DistInfo(5, 8, 1, 4))
    with pytest.raises(UsageError, match="needs MASTER_ADDR and MASTER_PORT"):
        launcher_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_nproc_under_torchrun_and_missing_out_are_clear_errors(monkeypatch, small_cfg):
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UsageError, match="torchrun already started this process as rank 0 of 2"):
        hpcml.train(small_cfg, out="unused", nproc=2)
    with pytest.raises(UsageError, match="under torchrun give --out"):
        hpcml.train(small_cfg)
