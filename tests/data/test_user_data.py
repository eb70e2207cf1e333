"""Training on a user's own files end to end: CSV -> store -> train -> predict round trip, regression,
cleaning counts in the report, bad input through the CLI, and streaming past the memory budget
(with a kill and an exact resume)."""

from __future__ import annotations

import csv
import json
import signal

import numpy as np
import pytest
import torch
from hpcml_testkit import spec
from safetensors.torch import load_file

import hpcml
from hpcml.data import store


def _write_csv(path, x, y, header, *, bad_row: int | None = None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for i in range(len(x)):
            row = [*(f"{v:.6f}" for v in x[i]), y[i]]
            if i == bad_row:
                row[1] = "nan"
            w.writerow(row)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """1,200 rows, 4 features, string labels 'cat'/'dog'/'eel', one NaN row and one duplicate."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 4))
    score = x[:, 0] + 0.5 * x[:, 1]
    y = np.array(["cat", "dog", "eel"])[np.digitize(score, [-0.5, 0.5])]
    x[7] = x[3]
    y[7] = y[3]
    path = tmp_path_factory.mktemp("csv") / "animals.csv"
    _write_csv(path, x, y, ["f0", "f1", "f2", "f3", "kind"], bad_row=11)
    return path, x


def _cfg(name, **data):
    return {
        "data": {"name": str(name), "target": "kind", **data},
        "model": {"name": "mlp", "kwargs": {"hidden": 32}},
        "epochs": 4,
        "batch_size": 64,
        "threads": 1,
        "precision": "fp32",
    }


def test_csv_to_store_to_train_gives_the_same_model_as_the_csv(tmp_path, table):
    path, x = table
    packed = tmp_path / "animals.store"
    store.pack(str(path), out=packed, target="kind", shard_rows=300)
    assert store.verify(packed)["ok"] is True and store.verify(packed)["rows"] == 1200
    from_csv = hpcml.train(_cfg(path), out=tmp_path / "csv")
    from_store = hpcml.train(_cfg(packed), out=tmp_path / "store")
    assert from_csv.report["data"]["cleaning"]["rows_dropped"] == 1  # the NaN row
    assert from_csv.report["data"]["cleaning"]["duplicate_rows"] == 1
    assert from_csv.report["data"]["train_rows"] == from_store.report["data"]["train_rows"] == 959
    w1, w2 = (load_file(str(r.dir / "model" / "model.safetensors")) for r in (from_csv, from_store))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    p1 = hpcml.predict(hpcml.load_model(from_csv.dir / "model"), x.astype(np.float32))
    p2 = hpcml.predict(hpcml.load_model(from_store.dir / "model"), x.astype(np.float32))
    assert (p1 == p2).all()
    model = hpcml.load_model(from_csv.dir / "model")
    assert model.classes == ["cat", "dog", "eel"] and model.meta["features"] == ["f0", "f1", "f2", "f3"]
    assert from_csv.report["test_accuracy"] > 0.85
    # evaluate on the CSV itself: every cleaned row (1199), labels mapped by name
    ev = hpcml.evaluate(from_csv.dir / "model", str(path))
    assert ev["rows"] == 1199 and ev["test_accuracy"] > 0.85


def test_corrupt_shard_is_named_by_training(tmp_path, table, cli):
    path, _ = table
    packed = tmp_path / "s"
    store.pack(str(path), out=packed, target="kind", shard_rows=300)
    shard = sorted(packed.glob("*.parquet"))[2]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0x01
    shard.write_bytes(bytes(data))
    out = cli("train", "--data", str(packed), "--model", "mlp", "--epochs", "1", "--out", str(tmp_path / "r"))
    assert out.returncode == 1 and shard.name in out.stderr and "sha256" in out.stderr
    assert not (tmp_path / "r" / "report.json").exists()


def test_regression_reports_rmse_and_r2_and_predicts_values(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1500, 3))
    y = 4.0 * x[:, 0] - 2.0 * x[:, 2] + 100.0 + rng.normal(scale=0.05, size=1500)
    path = tmp_path / "prices.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "price": y}), path)
    cfg = {**_cfg(path, target="price"), "epochs": 15}
    run = hpcml.train(cfg, out=tmp_path / "r")
    rep = run.report
    assert rep["task"] == "regression" and "test_accuracy" not in rep
    assert rep["test_r2"] > 0.95 and rep["test_rmse"] == pytest.approx(rep["test_loss"] ** 0.5)
    pred = hpcml.predict(run.model, x[:5].astype(np.float32))
    assert pred.dtype == np.float32 and np.abs(pred - y[:5]).max() < 2.0  # in the target's units
    ev = hpcml.evaluate(run.dir / "model", str(path))
    assert ev["task"] == "regression" and ev["test_r2"] > 0.95 and ev["rows"] == 1500
    with pytest.raises(hpcml.UsageError, match="regression"):
        hpcml.predict(run.model, x[:2].astype(np.float32), probabilities=True)


def test_val_split_and_cleaning_options(tmp_path, table):
    path, _ = table
    cfg = _cfg(path, val_fraction=0.1, drop_duplicates=True, missing="error")
    with pytest.raises(hpcml.UsageError, match=r"row 12 \(line 13\): column 'f1' is nan"):
        hpcml.train(cfg, out=tmp_path / "err")
    run = hpcml.train({**cfg, "data": {**cfg["data"], "missing": "median"}}, out=tmp_path / "ok")
    clean = run.report["data"]["cleaning"]
    assert clean["values_imputed"] == 1 and clean["duplicates_dropped"] == 1
    assert run.report["data"]["val_rows"] == 120 and "val_accuracy" in run.report
    assert run.report["data"]["train_rows"] + 120 + run.report["data"]["test_rows"] == 1199


def test_bad_input_through_the_cli(tmp_path, table, cli):
    path, _ = table
    cases = [
        (["--data", str(path), "--target", "nope"], "target column 'nope' not found"),
        (["--data", str(tmp_path / "x.xlsx")], "x.xlsx"),
        (["--data", "ftp2://host/x.csv"], "unknown URL scheme"),
        (["--data", str(path), "--target", "kind", "--features", "f0,zz"], "zz"),
    ]
    (tmp_path / "x.xlsx").write_text("a,b\n1,2\n")
    for args, message in cases:
        out = cli("train", *args, "--epochs", "1", "--out", str(tmp_path / "never"))
        assert out.returncode == 2, (args, out.stderr)
        assert message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    assert not (tmp_path / "never").exists()


def test_streaming_past_the_memory_budget_matches_resume_after_kill(tmp_path, cli, monkeypatch):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6000, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    packed = tmp_path / "d.store"
    store.pack(str(tmp_path / "d.npz"), out=packed, shard_rows=500)
    cfg = {
        "data": {"name": str(packed), "memory_budget": "100KB"},
        "model": {"name": "mlp", "kwargs": {"hidden": 16}},
        "epochs": 2,
        "batch_size": 100,
        "threads": 1,
        "checkpoint": {"every": "20"},
    }
    ref = hpcml.train(cfg, out=tmp_path / "ref")
    assert ref.report["data"]["streamed"] is True and ref.report["test_accuracy"] > 0.9
    assert ref.report["data"]["test_rows"] == 1500  # ceil(0.2 x 12) = 3 whole shards held out
    assert ref.report["steps"] == 2 * 45  # 9 train shards x 500 rows / batch 100

    import yaml

    # killed in epoch 2; newest checkpoint: step 40, mid epoch 1
    faulty = {**cfg, "callbacks": [spec("FailAt", rank=0, step=57, mode="kill")]}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(faulty))
    killed = cli("train", "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "run"), "--quiet")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = cli("train", "--resume", str(tmp_path / "run"), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from_step"] == 40
    w1 = load_file(str(ref.dir / "model" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
