"""TensorBoard and MLflow loggers, read back with the trackers' own readers: TensorBoard's event reader,
MlflowClient against a file store (SQLite) and against a live `mlflow server` on a loopback port."""

import json
import logging
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import hpcml
from hpcml.launch.elastic import free_port

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
pytest.importorskip("mlflow", reason="the mlflow extra is not installed")


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_every_epoch_and_the_report(small_cfg, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = hpcml.train({**small_cfg, "log": ["tensorboard"]}, out=tmp_path / "r")
    acc = EventAccumulator(str(run.dir / "tensorboard"))
    acc.Reload()
    rows = _rows(run.dir)
    for key in ("train_loss", "test_accuracy", "lr", "samples_per_second"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [1, 2, 3]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert acc.Scalars("report/test_accuracy")[-1].value == pytest.approx(run.report["test_accuracy"])
    assert "optim:" in acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()


def _check_mlflow_run(client, run_id: str, run_dir: Path, *, parent: str | None = None) -> None:
    r = client.get_run(run_id)
    assert r.info.status == "FINISHED" and r.info.run_name == run_dir.name
    assert r.data.tags.get("mlflow.parentRunId") == parent
    cfg = json.loads(json.dumps(hpcml.config.load_config(run_dir / "config.yaml").model_dump(mode="json")))
    assert (
        r.data.params["optim.lr"] == json.dumps(cfg["optim"]["lr"])
        and r.data.params["data.name"] == "synthetic"
    )
    rows = _rows(run_dir)
    history = client.get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in history] == [
        (r["epoch"], pytest.approx(r["train_loss"])) for r in rows
    ]
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [1, 2, 3]
    report = json.loads((run_dir / "report.json").read_text())
    assert r.data.metrics["report.test_accuracy"] == pytest.approx(report["test_accuracy"])
    arts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "model")
    }
    assert {"report.json", "model/model.safetensors", "model/model.json"} <= arts
    assert not any(p.endswith((".pkl", ".pt", ".pth")) for p in arts)  # never a pickled model


def test_mlflow_file_store_gets_params_metrics_report_and_model(small_cfg, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the store's artifacts go to ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run = hpcml.train({**small_cfg, "log": ["mlflow"]}, out=tmp_path / "r")
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("hpcml").experiment_id])
    assert len(runs) == 1
    _check_mlflow_run(client, runs[0].info.run_id, run.dir)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free 127.0.0.1 port, with a SQLite store and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--artifacts-destination", str(root / "art"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            urllib.request.urlopen(uri + "/health", timeout=2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("mlflow server did not come up")
            time.sleep(0.5)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_live_mlflow_server_gets_the_run(mlflow_server, small_cfg, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    run = hpcml.train({**small_cfg, "log": ["mlflow"]}, out=tmp_path / "live")
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("hpcml").experiment_id
    found = client.search_runs([exp], filter_string=f"attributes.run_name = '{run.dir.name}'")
    assert len(found) == 1
    _check_mlflow_run(client, found[0].info.run_id, run.dir)


@pytest.mark.slow
def test_sweep_jobs_are_nested_under_the_sweep_run(mlflow_server, small_cfg, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the spawned job processes inherit it
    res = hpcml.sweep(
        {**small_cfg, "log": ["mlflow"]}, params={"lr": [0.01, 0.03]}, workers=2, out=tmp_path / "sw"
    )
    assert res.failed == []
    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("hpcml").experiment_id
    parent = client.search_runs([exp], filter_string="attributes.run_name = 'sw'")[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_test_accuracy"] == pytest.approx(res.best["mean"])
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(
        p.name for p in (tmp_path / "sw" / "runs").iterdir()
    )
    for c in children:
        _check_mlflow_run(
            client, c.info.run_id, tmp_path / "sw" / "runs" / c.info.run_name, parent=parent.info.run_id
        )


def test_a_tracking_server_that_is_down_loses_nothing_but_the_log(small_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with caplog.at_level(logging.WARNING, logger="hpcml"):
        run = hpcml.train({**small_cfg, "log": ["mlflow", "tensorboard"]}, out=tmp_path / "down")
    assert {"report.json", "metrics.jsonl", "model", "config.yaml", "tensorboard"} <= {
        p.name for p in run.dir.iterdir()
    }
    assert len(_rows(run.dir)) == 3
    text = caplog.text
    assert "does not answer" in text
    assert (
        "mlflow: not logged" in text
        and "epoch 3 metrics" in text
        and "the final report and model dir" in text
    )


_BLOCKED = """
import sys
class Block:  # stands in for an environment without the extras
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlflow", "tensorboard", "optuna"):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Block())
import hpcml
for call in (
    lambda: hpcml.train({"log": ["mlflow"]}, out=OUT + "/a"),
    lambda: hpcml.train({"log": ["tensorboard"]}, out=OUT + "/b"),
    lambda: hpcml.sweep(
        {"data": {"name": "x.csv", "val_fraction": 0.1}}, params={"lr": [0.1]}, prune="median", out=OUT + "/c"
    ),
):
    try:
        call()
    except hpcml.UsageError as err:
        print(err)
"""


def test_a_missing_extra_names_the_pip_command(tmp_path):
    code = _BLOCKED.replace("OUT", repr(str(tmp_path)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.splitlines() == [
        "--log mlflow needs mlflow: pip install 'hpcml[mlflow]'",
        "--log tensorboard needs tensorboard: pip install 'hpcml[tensorboard]'",
        "--search tpe and --prune need Optuna: pip install 'hpcml[optuna]'",
    ], r.stderr[-2000:]
