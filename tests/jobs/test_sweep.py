"""Sweeps: a 2x2 grid with 2 folds on the local pool and on a real Ray instance, resume, retries after
a kill, failed jobs, parameter validation, random sampling and folds."""

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml
from hpcml_testkit import spec

import hpcml
from hpcml.config import DataConfig, build_config, load_config
from hpcml.data.folds import apply_folds
from hpcml.data.sources import load_dataset
from hpcml.errors import HpcmlError, UsageError
from hpcml.jobs.sweep import _points, parse_params, resolve_name
from hpcml.jobs.tasks import Runner, Task

BASE = {
    "data": {"name": "synthetic", "rows": 600, "features": 8, "classes": 3},
    "model": {"name": "mlp", "kwargs": {"hidden": 32}},
    "epochs": 3,
    "batch_size": 64,
    "precision": "fp32",  # results are compared between backends and reruns
}
GRID = ["lr=1e-3,1e-2", "batch_size=64,128"]


def _key(rows):
    """What must agree between backends and reruns (timings may differ)."""
    return [(r["params"], r["mean"], r["std"], r["n"], r["of"], r["status"]) for r in rows]


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "local"
    return hpcml.sweep(BASE, params=GRID, folds=2, workers=2, out=out)


def test_local_sweep_table_and_files(local_sweep):
    res, out = local_sweep, local_sweep.dir
    assert res.metric == "cv_accuracy"  # held-out fold accuracy, not the test split's
    assert res.ran == 8 and res.skipped == 0 and res.failed == []
    assert [r["params"] for r in res.rows] and len(res.rows) == 4
    assert {(r["params"]["optim.lr"], r["params"]["batch_size"]) for r in res.rows} == {
        (0.001, 64), (0.001, 128), (0.01, 64), (0.01, 128),
    }  # fmt: skip
    means = [r["mean"] for r in res.rows]
    assert means == sorted(means, reverse=True) and res.best == res.rows[0]
    summary = json.loads((out / "sweep.json").read_text())
    assert summary["jobs"] == 8 and summary["failed"] == 0
    for row in res.rows:  # mean and std are those of the two fold runs' own reports
        reports = [json.loads((out / "runs" / j / "report.json").read_text()) for j in row["jobs"]]
        accs = [r["test_accuracy"] for r in reports]
        assert (
            row["n"] == 2 and row["mean"] == statistics.fmean(accs) and row["std"] == statistics.stdev(accs)
        )
        assert sorted(r["data"]["test_rows"] for r in reports) == [240, 240]  # 480 train rows, 2 folds
        assert reports[0]["threads"] == 1  # 2 cores / 2 workers (1 when the machine has fewer)
    csv = (out / "results.csv").read_text().splitlines()
    assert (
        csv[0]
        == "rank,optim.lr,batch_size,cv_accuracy_mean,cv_accuracy_std,runs,status,train_seconds,jobs,error"
    )
    assert csv[1].startswith(f"1,{res.best['params']['optim.lr']},{res.best['params']['batch_size']},")
    assert len(csv) == 5
    md = (out / "results.md").read_text()
    assert "| rank | optim.lr | batch_size | cv_accuracy (mean ± std) |" in md
    assert (out / "cv_accuracy_vs_params.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_config(out / "best.yaml")  # re-runnable as is: plain training, no folds
    assert best.data.folds is None and best.threads is None
    assert (
        best.optim.lr == res.best["params"]["optim.lr"]
        and best.batch_size == res.best["params"]["batch_size"]
    )


def test_rerun_runs_nothing(local_sweep, tmp_path, cli):
    out = local_sweep.dir
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/report.json")}
    again = hpcml.sweep(BASE, params=GRID, folds=2, workers=2, out=out)
    assert again.ran == 0 and again.skipped == 8
    assert _key(again.rows) == _key(local_sweep.rows)
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/report.json")} == stamps
    # the CLI, same sweep from a YAML base config: nothing to run either
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    r = cli("sweep", "--config", str(tmp_path / "base.yaml"), "--param", GRID[0], "--param", GRID[1],
            "--folds", "2", "--workers", "2", "--out", str(out), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ran"] == 0 and doc["skipped"] == 8 and doc["best"]["mean"] == local_sweep.best["mean"]


def test_killed_job_is_retried_and_config_error_is_neither_retried_nor_ranked(tmp_path):
    # classes=3 SIGKILLs its own process on the first attempt; classes=40 is too many for 8 features:
    # a UsageError at run time, the same on every attempt, so it is not retried
    (tmp_path / "marks").mkdir()
    fault = spec(
        "JobFault", match={"data.classes": 3}, action="kill-first", marker_dir=str(tmp_path / "marks")
    )
    base = {**BASE, "callbacks": [fault]}
    res = hpcml.sweep(base, params={"classes": [3, 4, 40]}, workers=2, retries=1, out=tmp_path / "s")
    *ok, failed = res.rows
    assert sorted(r["params"]["data.classes"] for r in ok) == [3, 4]
    assert all(r["status"] == "ok" and r["mean"] > 0.3 for r in ok)
    assert [r["rank"] for r in ok] == [1, 2] and res.best == ok[0]  # ranked among the successful rows
    assert failed["params"] == {"data.classes": 40} and failed["status"] == "failed"
    assert failed["mean"] is None and failed["rank"] is None
    assert "too many" in failed["error"]
    jobs = {
        tuple(j["params"].values())[0]: j
        for j in json.loads((tmp_path / "s" / "sweep.json").read_text())["job_list"]
    }
    assert jobs[3]["attempts"] == 2 and "killed by SIGKILL" in jobs[3]["errors"][0]
    assert jobs[40]["attempts"] == 1 and jobs[40]["status"] == "failed" and len(jobs[40]["errors"]) == 1
    assert jobs[40]["usage_error"] is True and jobs[3]["usage_error"] is False
    assert [f["params"] for f in res.failed] == [{"data.classes": 40}]
    assert (tmp_path / "s" / "runs" / ok[0]["jobs"][0] / "report.json").exists()
    csv = (tmp_path / "s" / "results.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in csv[1:]] == ["1", "2", ""]  # the failed row has no rank
    md = (tmp_path / "s" / "results.md").read_text()
    assert "- data.classes=40: data.classes=40 is too many" in md and "rank None" not in md


def test_runner_retries_a_failure_but_not_a_usage_error(tmp_path):
    """The decision is made in the worker process and carried back in the Outcome."""
    bad = build_config({**BASE, "data": {**BASE["data"], "classes": 40}}).model_dump(mode="json")
    fault = spec("JobFault", match={}, action="fail-always", marker_dir=str(tmp_path))
    good = build_config({**BASE, "callbacks": [fault]}).model_dump(mode="json")
    tasks = [
        Task(name, "hpcml.jobs.sweep:run_job", {"config": cfg, "out": str(tmp_path / name)})
        for name, cfg in [("usage", bad), ("flaky", good)]
    ]
    with Runner(workers=1) as runner:
        outcomes = runner.run(tasks, retries=2)
    usage, flaky = outcomes["usage"], outcomes["flaky"]
    assert not usage.ok and usage.attempts == 1 and usage.usage_error and "too many" in usage.error
    assert not flaky.ok and flaky.attempts == 3 and not flaky.usage_error
    assert "injected job failure" in flaky.error


def test_bad_parameters_are_named(tmp_path):
    with pytest.raises(
        UsageError, match=r"unknown parameter 'learning_rate'; valid: .*optim\.lr.*batch_size"
    ):
        hpcml.sweep(BASE, params=["learning_rate=0.1"], out=tmp_path / "unused")
    with pytest.raises(UsageError, match=r"--param optim\.lr='abc' is not valid:\n.*optim\.lr"):
        hpcml.sweep(BASE, params=["lr=0.1,abc"], out=tmp_path / "unused")
    with pytest.raises(UsageError, match=r"--param batch_size=0 is not valid"):
        hpcml.sweep(BASE, params={"batch_size": [0, 64]}, out=tmp_path / "unused")
    with pytest.raises(UsageError, match=r"data\.folds.*cannot be swept"):
        hpcml.sweep(BASE, params=["data.folds=2,3"], out=tmp_path / "unused")
    with pytest.raises(UsageError, match=r"add random=N"):
        hpcml.sweep(BASE, params=["lr=1e-4..1e-1:log"], out=tmp_path / "unused")
    with pytest.raises(UsageError, match="folds must be a whole number >= 2"):
        hpcml.sweep(BASE, params=GRID, folds=1, out=tmp_path / "unused")
    assert not (tmp_path / "unused").exists()  # nothing written for a sweep that cannot start


def test_cli_bad_parameter(cli, tmp_path):
    r = cli("sweep", "--param", "foo=1,2", "--out", str(tmp_path))
    assert r.returncode == 2
    assert (
        "unknown parameter 'foo'; valid:" in r.stderr
        and "optim.lr" in r.stderr
        and "Traceback" not in r.stderr
    )


def test_names_and_random_sampling():
    assert resolve_name("lr") == "optim.lr" and resolve_name("batch_size") == "batch_size"
    assert resolve_name("warmup_fraction") == "optim.warmup_fraction"  # a unique last part
    assert resolve_name("model.kwargs.hidden") == "model.kwargs.hidden"
    grid = parse_params(["lr=0.1,0.01", "batch_size=32,64,128"])
    assert grid == {"optim.lr": [0.1, 0.01], "batch_size": [32, 64, 128]}
    assert len(_points(grid, random=None, seed=0)) == 6
    picked = _points(grid, random=3, seed=0)
    assert len({json.dumps(p) for p in picked}) == 3 and picked == _points(grid, random=3, seed=0)
    assert len(_points(grid, random=50, seed=0)) == 6  # N beyond the grid: the whole grid
    ranged = parse_params(["lr=1e-4..1e-1:log", "epochs=2..5", "optimizer=adam,sgd"])
    pts = _points(ranged, random=20, seed=3)
    assert pts == _points(ranged, random=20, seed=3) and len(pts) > 10
    assert all(1e-4 <= p["optim.lr"] <= 1e-1 and p["epochs"] in range(2, 6) for p in pts)
    assert {p["optim.name"] for p in pts} == {"adam", "sgd"} and {p["epochs"] for p in pts} == {2, 3, 4, 5}
    assert np.median([p["optim.lr"] for p in pts]) < 0.02  # log-uniform, not uniform


def test_folds_partition_the_training_split():
    ds = load_dataset(DataConfig(name="synthetic", rows=600, features=8, classes=3))
    held = [apply_folds(ds, folds=3, fold=k, seed=0) for k in range(3)]
    assert sum(len(h.x_test) for h in held) == len(ds.x_train)
    rows = np.concatenate([h.x_test for h in held])
    assert len(np.unique(rows, axis=0)) == len(ds.x_train)  # disjoint and complete
    for h in held:
        assert len(h.x_train) + len(h.x_test) == len(ds.x_train)
        share = np.bincount(h.y_test, minlength=3) / len(h.y_test)  # stratified
        np.testing.assert_allclose(share, np.bincount(ds.y_train, minlength=3) / len(ds.y_train), atol=0.01)
    with pytest.raises(UsageError, match=r"data\.fold must be in 0\.\.2 for data\.folds=3"):
        build_config({"data": {"folds": 3, "fold": 3}})


# ------------------------------------------------------------------------------------------- Ray


def test_unreachable_ray_address_fails_fast(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'hpcml[ray]')")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(HpcmlError, match=rf"cannot connect to Ray at 127\.0\.0\.1:{port}"):
        hpcml.sweep(BASE, params=GRID, backend="ray", address=f"127.0.0.1:{port}", out=tmp_path)
    # a listener that is not Ray: a web server's answer
    srv = socket.create_server(("127.0.0.1", 0))

    def answer():
        conn = srv.accept()[0]
        conn.recv(64)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    with pytest.raises(HpcmlError, match="does not answer like a Ray server"):
        address = f"127.0.0.1:{srv.getsockname()[1]}"
        hpcml.sweep(BASE, params=GRID, backend="ray", address=address, out=tmp_path)
    srv.close()
    assert time.perf_counter() - t0 < 30
    with pytest.raises(UsageError, match="add --backend ray"):
        hpcml.sweep(BASE, params=GRID, address="127.0.0.1:6379", out=tmp_path)


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'hpcml[ray]')")
    from hpcml.jobs.ray_backend import start_local_ray

    restore = start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()
    restore()


def test_ray_instance_is_loopback_only_with_token_auth(ray_instance):
    from ray._raylet import AuthenticationMode, get_authentication_mode

    from hpcml.jobs.ray_backend import probe

    gcs = ray_instance.get_runtime_context().gcs_address
    assert gcs.startswith("127.0.0.1:")
    assert all(n["NodeManagerAddress"] == "127.0.0.1" for n in ray_instance.nodes())
    assert get_authentication_mode() == AuthenticationMode.TOKEN
    probe(gcs)  # a real Ray GCS passes the probe


def test_every_ray_listening_socket_is_on_loopback(ray_instance):
    import psutil

    ray = ray_instance
    assert ray.get(ray.remote(lambda: 1).remote()) == 1  # a worker process exists too
    me = psutil.Process()
    procs = [me, *me.children(recursive=True)]  # the driver, GCS, raylet, workers, agents
    assert {"gcs_server", "raylet"} <= {p.name() for p in procs}
    listening = [
        (p.pid, p.name(), c.laddr)
        for p in procs
        for c in p.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr)
    ]
    assert len(listening) >= 3  # GCS, raylet, object manager at least
    assert all(addr.ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, _, addr in listening), listening


_FRESH = """
import ray_first_or_not
from hpcml.jobs.ray_backend import start_local_ray
start_local_ray(num_cpus=1)
import ray
print(ray.util.get_node_ip_address(), ray.get_runtime_context().gcs_address)
ray.shutdown()
"""


@pytest.mark.parametrize("ray_first", [False, True])
def test_local_ray_is_put_on_loopback_by_hpcml_itself(ray_first):
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'hpcml[ray]')")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    code = _FRESH.replace("ray_first_or_not", "ray" if ray_first else "hpcml")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if ray_first:  # too late to switch Ray to loopback: refused before anything listens
        assert r.returncode != 0 and "Ray was imported before hpcml could keep its local instance" in r.stderr
    else:
        assert r.returncode == 0, r.stderr[-2000:]
        ip, gcs = r.stdout.split()
        assert ip == "127.0.0.1" and gcs.startswith("127.0.0.1:")


def test_ray_sweep_gives_the_same_table(ray_instance, local_sweep, tmp_path):
    res = hpcml.sweep(BASE, params=GRID, folds=2, workers=2, backend="ray", out=tmp_path)
    assert res.ran == 8 and res.failed == []
    assert _key(res.rows) == _key(local_sweep.rows)
    assert sorted(p.name for p in tmp_path.glob("runs/*")) == sorted(
        p.name for p in local_sweep.dir.glob("runs/*")
    )


def test_ray_predict_matches_local(ray_instance, local_sweep):
    model_dir = local_sweep.dir / "runs" / local_sweep.best["jobs"][0] / "model"
    x = np.random.default_rng(0).normal(size=(3001, 8)).astype(np.float32)
    got = hpcml.predict(model_dir, x, workers=2, backend="ray", probabilities=True)
    np.testing.assert_array_equal(got, hpcml.predict(model_dir, x, probabilities=True))


def test_user_model_sweep_local_and_ray_agree(ray_instance, tmp_path):
    """A model defined in the tests (usernets:build), varied by its own kwarg, on both backends; its
    run dirs predict on Ray workers only with trust_code."""
    base = {**BASE, "model": {"name": "usernets:build", "kwargs": {"width": 8}}}
    params = {"model.kwargs.width": [8, 16]}
    local = hpcml.sweep(base, params=params, workers=2, out=tmp_path / "local")
    ray = hpcml.sweep(base, params=params, workers=2, backend="ray", out=tmp_path / "ray")
    assert local.failed == [] and ray.failed == [] and len(local.rows) == 2
    assert _key(ray.rows) == _key(local.rows)
    model_dir = local.dir / "runs" / local.best["jobs"][0] / "model"
    assert json.loads((model_dir / "model.json").read_text())["architecture"] == "usernets:build"
    x = np.random.default_rng(0).normal(size=(501, 8)).astype(np.float32)
    with pytest.raises(UsageError, match=r"usernets:build.*--trust-code"):
        hpcml.predict(model_dir, x, workers=2, backend="ray")
    got = hpcml.predict(model_dir, x, workers=2, backend="ray", trust_code=True)
    np.testing.assert_array_equal(got, hpcml.load_model(model_dir, trust_code=True).predict(x))
