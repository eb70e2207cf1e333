"""Data parallel training with real processes (gloo on 127.0.0.1), checked against one process."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import hpcml
from hpcml.data.loader import DeviceBatches
from hpcml.launch.elastic import free_port

BASE = {
    "data": {"name": "synthetic", "rows": 1000, "features": 8, "classes": 3},  # 800 train rows
    "model": {"name": "mlp", "kwargs": {"hidden": 32}},
    "epochs": 3,
    "threads": 1,
    "precision": "fp32",  # weights are compared across layouts: never the CPU-dependent auto
    "optim": {"name": "sgd", "lr": 0.05},
}
# fp32 sums in a different order (two half-batch means averaged vs one mean) differ by a few ulps
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.parametrize(
    ("world", "accum", "batch", "n"), [(1, 1, 64, 800), (2, 1, 32, 800), (3, 2, 7, 100), (4, 1, 8, 30)]
)
def test_sharding_uses_every_sample_once_and_weights_are_exact(world, accum, batch, n):
    """Rank by rank, no process group: the union of ranks' micro-batches is each epoch's permutation."""
    x = torch.arange(n, dtype=torch.float32)[:, None]
    y = torch.arange(n)
    ranks = [
        DeviceBatches(x, y, batch_size=batch, seed=5, rank=r, world_size=world, accum=accum)
        for r in range(world)
    ]
    for epoch in range(2):
        plans = [b.plan(epoch) for b in ranks]
        assert len({len(p) for p in plans}) == 1  # every rank takes the same number of steps
        seen = []
        for s in range(len(plans[0])):
            step = [(idx, w) for p in plans for idx, w in p[s]]
            assert all(len(p[s]) == accum for p in plans)
            real = [(idx, w) for idx, w in step if w > 0]
            g = sum(len(idx) for idx, _ in real)
            for idx, w in real:  # DDP averages over ranks: w / world / n_local must equal 1 / n_step
                assert w / world / len(idx) == pytest.approx(1 / g)
            seen += [i for idx, _ in real for i in idx.tolist()]
        assert sorted(seen) == list(range(n))
        assert seen == ranks[0].order(epoch).tolist() or world > 1


def test_two_ranks_match_one_process_with_the_global_batch(tmp_path):
    one = hpcml.train({**BASE, "batch_size": 64}, out=tmp_path / "one")
    two = hpcml.train({**BASE, "batch_size": 32}, out=tmp_path / "two", nproc=2)
    accum = hpcml.train({**BASE, "batch_size": 16, "grad_accum": 2}, out=tmp_path / "accum", nproc=2)
    assert (
        two.report["world_size"] == 2
        and two.report["global_batch_size"] == 64
        and two.report["batch_size"] == 32
    )
    assert accum.report["grad_accum"] == 2 and accum.report["global_batch_size"] == 64
    assert one.report["steps"] == two.report["steps"] == accum.report["steps"] == 3 * 13  # 800 / 64 -> 13
    w1 = _weights(one.dir)
    for other in (two, accum):
        w = _weights(other.dir)
        for k in w1:
            torch.testing.assert_close(w[k], w1[k], **TOL)
    assert two.report["test_accuracy"] == pytest.approx(one.report["test_accuracy"], abs=2e-3)
    assert sorted(p.name for p in two.dir.iterdir()) == [
        ".lock",  # held by the launching process while the ranks ran
        "checkpoints",
        "config.yaml",
        "curves.png",
        "metrics.jsonl",
        "model",
        "report.json",
    ]


def test_full_batch_gd_two_ranks(tmp_path):
    cfg = {**BASE, "optim": {"name": "gd", "lr": 0.5}}
    one = hpcml.train(cfg, out=tmp_path / "one")
    two = hpcml.train(cfg, out=tmp_path / "two", nproc=2)
    assert two.report["full_batch"] and two.report["steps"] == 3
    w1, w2 = _weights(one.dir), _weights(two.dir)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], **TOL)


def _cli(*args, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "hpcml.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


SMALL_FLAGS = [
    "train",
    "--precision",
    "fp32",  # weights are compared with a single-node run: never the CPU-dependent auto
    "--data",
    "synthetic",
    "--rows",
    "1000",
    "--features",
    "8",
    "--classes",
    "3",
    "--model",
    "mlp",
    "--model-kw",
    "hidden=32",
    "--epochs",
    "3",
    "--optimizer",
    "sgd",
    "--lr",
    "0.05",
    "--batch-size",
    "32",
    "-q",
]


def test_two_nodes_over_loopback_match_single_node(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    # two launchers = two "nodes" (one rank each) meeting at a c10d rendezvous on loopback; on one
    # machine they share the out dir, which only global rank 0 writes
    nodes = [
        _cli(
            *SMALL_FLAGS,
            "--nnodes",
            "2",
            "--node-rank",
            str(r),
            "--nproc",
            "1",
            "--rdzv-endpoint",
            endpoint,
            "--out",
            str(tmp_path / "nodes"),
        )
        for r in (0, 1)
    ]
    results = [p.communicate(timeout=240) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], results
    report = json.loads((tmp_path / "nodes" / "report.json").read_text())
    assert report["world_size"] == 2 and report["global_batch_size"] == 64
    single = hpcml.train({**BASE, "batch_size": 32}, out=tmp_path / "single", nproc=2)
    w_nodes, w_single = _weights(tmp_path / "nodes"), _weights(single.dir)
    for k in w_single:
        torch.testing.assert_close(w_nodes[k], w_single[k], rtol=0, atol=1e-7)


def test_rank_crash_ends_job_promptly_naming_the_rank(tmp_path):
    t0 = time.perf_counter()
    p = _cli(
        *SMALL_FLAGS,
        "--epochs",
        "50",
        "--nproc",
        "2",
        "--out",
        str(tmp_path / "run"),
        "--set",
        "callbacks=[{spec: 'hpcml_testkit:FailAt', kwargs: {rank: 1, step: 5}}]",
    )
    _, err = p.communicate(timeout=120)
    elapsed = time.perf_counter() - t0
    assert p.returncode == 1
    assert "hpcml: error: rank 1 failed: RuntimeError: injected failure at step 5" in err
    assert "Traceback" not in err
    assert elapsed < 60
    assert not (tmp_path / "run" / "model").exists()


def test_bad_launch_arguments(tmp_path):
    with pytest.raises(hpcml.UsageError, match="needs --rdzv-endpoint"):
        hpcml.train(BASE, out=tmp_path / "x", nnodes=2)
    with pytest.raises(hpcml.UsageError, match="HOST:PORT"):
        hpcml.train(BASE, out=tmp_path / "x", nproc=2, rdzv_endpoint="nohostport")


def test_launch_prints_no_elastic_info_and_leaves_no_temp_dirs(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    # torch's compile cache also defaults to the temp dir (a cache meant to outlive the run): keep it apart
    env = {"TMPDIR": str(tmp), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    p = _cli(
        "train", "--nproc", "2", "--data", "synthetic", "--rows", "400", "--features", "8", "--model", "mlp",
        "--model-kw", "hidden=16", "--epochs", "1", "--threads", "1", "--precision", "fp32",
        "--out", str(tmp_path / "run"), env=env,
    )  # fmt: skip
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err
    assert "torch/distributed/elastic" not in err and "torchelastic" not in err, err
    assert not [line for line in err.splitlines() if line.startswith("I")], err  # glog-style INFO lines
    assert sorted(p.name for p in tmp.iterdir()) == []  # no torchelastic_* log dir, no hpcml-launch-*
    assert (tmp_path / "run" / "report.json").exists()
