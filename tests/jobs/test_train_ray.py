"""hpcml train --backend ray: ranks as Ray actors in a placement group, equal to `--nproc` bit for bit.

The end-to-end test runs a real two-node Ray cluster on 127.0.0.1 (tests/jobs/loopback_cluster.py);
the rest checks the placement, rendezvous and argument logic in this process, without Ray.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loopback_cluster import namespace_command, run_cluster
from safetensors.torch import load_file

import hpcml
from hpcml.config import RayLaunchConfig, build_config
from hpcml.errors import HpcmlError, UsageError
from hpcml.jobs.ray_backend import on_loopback
from hpcml.jobs.train_ray import RankActor, infeasible, local_ranks, rank_bundle, rank_env, use_gpus

# 800 training rows, global batch 64: 13 steps an epoch, a checkpoint after each epoch
FLAGS = [
    "--data", "synthetic", "--rows", "1000", "--features", "8", "--classes", "3", "--model", "mlp",
    "--model-kw", "hidden=32", "--optimizer", "sgd", "--lr", "0.05", "--epochs", "2", "--batch-size", "32",
    "--precision", "fp32", "--threads", "1", "--quiet",
]  # fmt: skip
LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1", "::1")


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.mark.slow
def test_two_ray_nodes_on_loopback_train_like_nproc_and_restart_a_killed_rank(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'hpcml[ray]')")
    if namespace_command() is None:
        pytest.skip("needs Linux namespaces (unshare) for a two-node Ray cluster on loopback")
    (tmp_path / "unshared").mkdir()
    ref = tmp_path / "nproc"  # the reference, --nproc 2, trains while the cluster starts
    nproc = subprocess.Popen([sys.executable, "-m", "hpcml", "train", *FLAGS, "--nproc=2", f"--out={ref}"])

    def record(name: str) -> str:
        return f"{{spec: 'hpcml_testkit:RecordPlacement', kwargs: {{path: '{tmp_path / name}.jsonl'}}}}"

    kill = "{spec: 'hpcml_testkit:FailAt', kwargs: {rank: 1, step: 18, mode: kill}}"  # in epoch 2
    # each node has one `slot`, and each rank reserves one: a rank on each node
    ray_flags = ["--backend", "ray", "--nproc", "2", "--address", "{address}", "--placement", "SPREAD",
                 "--rank-resource", "slot=1"]  # fmt: skip
    train = [sys.executable, "-m", "hpcml", "train", *FLAGS, *ray_flags]
    result = run_cluster(
        [
            [*train, "--out", str(tmp_path / "ray"), "--set", f"callbacks=[{record('ray')}]"],
            [*train, "--out", str(tmp_path / "restart"), "--max-restarts", "1", "--set",
             f"callbacks=[{record('restart')}, {kill}]"],
            [*train, "--out", str(tmp_path / "unshared" / "run"), "--max-restarts", "1"],
        ],
        work=tmp_path, timeout=400, unshared=tmp_path / "unshared",
    )  # fmt: skip
    assert nproc.wait(timeout=300) == 0
    print(f"cluster start {result['startup_seconds']} s, runs {[r['seconds'] for r in result['runs']]} s")
    for run in result["runs"][:2]:
        assert run["rc"] == 0, run["stderr"]
    # the same numbers as --nproc 2 with the same global batch, uninterrupted and after a restart
    assert _max_diff(tmp_path / "ray", ref) == 0.0
    assert _max_diff(tmp_path / "restart", ref) == 0.0
    for name, restarts in (("ray", 0), ("restart", 1)):
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert (report["world_size"], report["global_batch_size"], report["restarts"]) == (2, 64, restarts)
    assert "rank 1 failed: its process died" in result["runs"][1]["stderr"]
    assert "restarting all 2 ranks from the newest checkpoint (restart 1 of 1)" in result["runs"][1]["stderr"]
    # a run dir the second node cannot see: refused at once with the reason, not retried, nothing left
    unshared = result["runs"][2]
    assert unshared["rc"] == 2, unshared["stderr"]
    # the rank placed on the second node (Ray numbers the bundles across nodes as it likes)
    refused = r"hpcml: usage error: rank [01] failed: its node \(127\.0\.0\.1\) does not see the run dir"
    assert re.search(refused, unshared["stderr"]), unshared["stderr"]
    assert "restarting" not in unshared["stderr"] and not (tmp_path / "unshared" / "run").exists()
    nodes = set()
    for name, attempts in (("ray", [0]), ("restart", [0, 1])):  # a rank on each node, every attempt
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        where = {(r["attempt"], r["rank"]): r["node"] for r in rows}
        assert sorted(where) == [(a, r) for a in attempts for r in (0, 1)]
        assert all(where[a, 0] != where[a, 1] for a in attempts)
        nodes |= set(where.values())
    assert len(nodes) == 2
    # every socket listening in the cluster's network namespace while it trained: Ray's (GCS, both
    # raylets, agents), the rank actors' (the rendezvous store, gloo), all on 127.0.0.1
    names, ports = [n for _, _, n in result["listening"]], [p for _, p, _ in result["listening"]]
    assert names.count("raylet") >= 2 and "gcs_server" in names and 6379 in ports
    assert any(name.startswith("ray::RankActor") for name in names), names
    assert all(ip in LOOPBACK for ip, _, _ in result["listening"]), result["listening"]


# ------------------------------------------------------------------------ placement logic, no Ray


def test_local_ranks_count_ranks_per_node_in_rank_order():
    assert local_ranks(["a", "b", "a", "a", "b"]) == [(0, 3), (0, 2), (1, 3), (2, 3), (1, 2)]
    assert local_ranks(["a"]) == [(0, 1)]


def test_infeasible_placements_are_named_before_anything_waits():
    nodes = [{"CPU": 4, "slot": 1}, {"CPU": 2, "slot": 1}, {"CPU": 1}]
    one = {"CPU": 1.0}
    assert infeasible(nodes, one, 7, "PACK") is None and infeasible(nodes, one, 7, "SPREAD") is None
    assert infeasible(nodes, one, 8, "PACK") == "the cluster holds 7 of the 8 ranks"
    assert infeasible(nodes, one, 4, "STRICT_PACK") is None
    assert "the most one node holds is 4" in infeasible(nodes, one, 5, "STRICT_PACK")
    assert infeasible(nodes, one, 3, "STRICT_SPREAD") is None
    slot = {"CPU": 1.0, "slot": 1.0}
    assert "needs 3 nodes that each hold a rank; there are 2" in infeasible(nodes, slot, 3, "STRICT_SPREAD")
    assert infeasible(nodes, {"CPU": 1.0, "GPU": 1.0}, 1, "PACK") == "the cluster holds 0 of the 1 ranks"


def test_rank_bundle_and_gpu_choice(small_cfg):
    cfg = build_config(small_cfg)  # threads: 1
    assert rank_bundle(cfg, RayLaunchConfig(), gpu=False) == {"CPU": 1.0}
    custom = RayLaunchConfig(rank_resources={"CPU": 2, "slot": 1})
    assert rank_bundle(cfg, custom, gpu=True) == {"CPU": 2.0, "GPU": 1.0, "slot": 1.0}
    auto = build_config({**small_cfg, "device": "auto"})
    assert use_gpus(auto, {"CPU": 8, "GPU": 2}, 2) and not use_gpus(auto, {"CPU": 8, "GPU": 1}, 2)
    with pytest.raises(UsageError, match="device=cuda, but the Ray cluster has no GPUs"):
        use_gpus(build_config({**small_cfg, "device": "cuda"}), {"CPU": 8}, 2)
    with pytest.raises(UsageError, match="use device=cuda"):
        use_gpus(build_config({**small_cfg, "device": "cuda:1"}), {"GPU": 4}, 2)


def test_rank_env_is_what_torchrun_gives_a_worker():
    env = rank_env(3, 4, (1, 2), ("10.0.0.7", 29400), attempt=2, gpu=False)
    assert env == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29400", "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_USE_AGENT_STORE": "True",
        "CUDA_VISIBLE_DEVICES": "",
    }  # fmt: skip
    assert "CUDA_VISIBLE_DEVICES" not in rank_env(0, 1, (0, 1), ("h", 1), attempt=0, gpu=True)


def test_a_rank_that_does_not_see_the_run_dir_refuses_to_train(tmp_path, small_cfg):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'hpcml[ray]')")
    env = rank_env(1, 2, (0, 1), ("127.0.0.1", 1), attempt=0, gpu=False)
    with pytest.raises(UsageError, match=r"its node \(.*\) does not see the run dir .* shared storage"):
        RankActor().train(small_cfg, str(tmp_path), env, cwd=str(tmp_path), resume=False, token="abc")
    assert "RANK" not in os.environ  # refused before the rank's environment is set


def test_rank_failures_are_named_and_only_runtime_failures_restart():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'hpcml[ray]')")
    from hpcml.jobs.train_ray import _why

    task = ray.exceptions.RayTaskError
    # (the failure in words, retry, a usage error)
    assert _why(ray, task("train", "tb", UsageError("not shared"))) == ("not shared", False, True)
    assert _why(ray, task("train", "tb", HpcmlError("disk full"))) == ("disk full", True, False)
    assert _why(ray, task("train", "tb", RuntimeError("boom\nmore"))) == ("RuntimeError: boom", True, False)
    assert _why(ray, ray.exceptions.ActorDiedError()) == (
        "its process died (killed, crashed, out of memory, or its node was lost)", True, False,
    )  # fmt: skip
    tb = "Traceback (most recent call last):\n  ...\nModuleNotFoundError: No module named 'hpcml'"
    init = ray.exceptions.ActorDiedError(task("RankActor.__init__", tb, ModuleNotFoundError("hpcml")))
    why, retry, usage = _why(ray, init)
    assert why == "its actor could not start: ModuleNotFoundError: No module named 'hpcml'"
    assert not retry and not usage


def test_ray_launch_arguments_are_checked(small_cfg, monkeypatch, tmp_path):
    with pytest.raises(UsageError, match="add --backend ray"):
        hpcml.train(small_cfg, nproc=2, address="127.0.0.1:6379")
    with pytest.raises(UsageError, match="drop --nnodes/--node-rank/--rdzv-endpoint"):
        hpcml.train(small_cfg, nproc=2, nnodes=2, backend="ray")
    with pytest.raises(UsageError, match="placement"):
        hpcml.train(small_cfg, nproc=2, backend="ray", placement="EVERYWHERE")
    with pytest.raises(UsageError, match="resources must be named and > 0, got CPU=0"):
        hpcml.train(small_cfg, nproc=2, backend="ray", rank_resources={"CPU": 0})
    with pytest.raises(UsageError, match="backend must be local or ray"):
        hpcml.train(small_cfg, backend="slurm")
    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UsageError, match="torchrun already started this process as a rank; drop --backend"):
        hpcml.train(small_cfg, out=tmp_path, backend="ray")


def test_loopback_addresses():
    for address in (None, "127.0.0.1:6379", "localhost:6379", "[::1]:6379", "ray://127.0.0.1:10001"):
        assert on_loopback(address), address
    for address in ("10.0.0.1:6379", "auto", "ray://head:10001", "[2001:db8::1]:6379"):
        assert not on_loopback(address), address


_CONNECT = """
from hpcml.jobs.ray_backend import import_ray, on_loopback
ray = import_ray(loopback=on_loopback("127.0.0.1:6379"))
print(ray.util.get_node_ip_address())
"""


def test_a_loopback_address_keeps_ray_on_loopback():
    # without Ray's switch a driver would turn 127.0.0.1 into the machine's address and miss the cluster
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'hpcml[ray]')")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    r = subprocess.run([sys.executable, "-c", _CONNECT], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["127.0.0.1"], r.stderr[-2000:]
