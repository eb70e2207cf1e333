"""Parallel batch inference: identical rows to single-process predict, file inputs, clear errors."""

import json
import os
import shutil
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import hpcml
from hpcml.errors import HpcmlError, UsageError
from hpcml.jobs.predict import predict_parallel

FEATURES = 8
CLASSES = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    cfg = {
        "data": {"name": "synthetic", "rows": 600, "features": FEATURES, "classes": CLASSES},
        "model": {"name": "mlp", "kwargs": {"hidden": 32}},
        "epochs": 3,
        "batch_size": 64,
        "threads": 1,
    }
    run = hpcml.train(cfg, out=tmp_path_factory.mktemp("predict") / "run")
    return run.dir / "model"


@pytest.fixture(scope="module")
def x():
    # odd row count and a small batch size: shards and batches end mid-way, so ordering bugs show
    return np.random.default_rng(1).normal(size=(5001, FEATURES)).astype(np.float32)


def _table(x: np.ndarray, *, extra: bool = True) -> pa.Table:
    cols = {f"f{i}": x[:, i] for i in range(x.shape[1])}
    if extra:  # a text id and a label column: neither is a feature
        cols = {"id": [f"row{i}" for i in range(len(x))], **cols}
    return pa.table(cols)


def test_two_workers_match_single_process_row_for_row(model_dir, x, tmp_path):
    # Model.predict in this process at the same batch size: its last batch has 1 row, and BLAS gives
    # a 1-row batch its own kernel (other last bits), which the workers' chunks must reproduce
    model = hpcml.load_model(model_dir)
    ref_idx, ref_prob = model.predict(x, batch_size=1000), model.predict_proba(x, batch_size=1000)
    out2 = tmp_path / "w2.parquet"
    prob2 = hpcml.predict(model_dir, x, workers=2, batch_size=1000, probabilities=True, output=out2)
    assert prob2.shape == (len(x), CLASSES) and prob2.dtype == np.float32
    np.testing.assert_array_equal(prob2, ref_prob)
    np.testing.assert_array_equal(prob2.argmax(1), ref_idx)
    assert len(set(ref_idx.tolist())) > 1  # a constant prediction would hide an ordering bug

    out1 = tmp_path / "w1.parquet"
    predict_parallel(model_dir, x, workers=1, batch_size=1000, probabilities=True, output=out1)
    t1, t2 = pq.read_table(out1), pq.read_table(out2)
    assert t1.equals(t2)
    assert t2.column_names == ["prediction", *(f"prob_{c}" for c in range(CLASSES))]
    assert t2.column("prediction").to_pylist() == [str(i) for i in ref_idx]
    np.testing.assert_array_equal(t2.column("prob_1").to_numpy(), ref_prob[:, 1])
    assert not list(tmp_path.glob(".*tmp*"))  # no temp files left behind


def test_file_inputs_give_the_same_rows(model_dir, x, tmp_path):
    ref = hpcml.predict(model_dir, x)
    table = _table(x)
    pq.write_table(table, tmp_path / "in.parquet")
    pacsv.write_csv(table, tmp_path / "in.csv")
    np.savez(tmp_path / "in.npz", x=x)
    np.save(tmp_path / "in.npy", x)
    from hpcml.data.store import pack

    pack(tmp_path / "in.parquet", tmp_path / "store", features=[f"f{i}" for i in range(FEATURES)])
    for name in ("in.parquet", "in.csv", "in.npz", "in.npy", "store"):
        got = hpcml.predict(model_dir, tmp_path / name)
        np.testing.assert_array_equal(got, ref, err_msg=name)
    out = tmp_path / "preds.csv"
    hpcml.predict(model_dir, str(tmp_path / "in.csv"), output=out)
    rows = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(column_types={"prediction": pa.string()}))
    assert rows.column_names == ["prediction"]
    assert rows.column("prediction").to_pylist() == [str(i) for i in ref]


def test_columns_that_do_not_match_the_model(model_dir, x, tmp_path):
    pacsv.write_csv(_table(x[:, :7]), tmp_path / "seven.csv")
    with pytest.raises(
        UsageError, match=r"seven\.csv: 7 numeric feature column\(s\) but the model takes 8 inputs"
    ):
        hpcml.predict(model_dir, tmp_path / "seven.csv")
    # a model that records its feature names is matched by name, and missing ones are named
    named = tmp_path / "named"
    shutil.copytree(model_dir, named)
    meta = json.loads((named / "model.json").read_text())
    (named / "model.json").write_text(
        json.dumps({**meta, "features": [f"f{i}" for i in range(6)] + ["a", "b"]})
    )
    pacsv.write_csv(_table(x), tmp_path / "in.csv")
    with pytest.raises(UsageError, match=r"missing column\(s\) 'a', 'b' that the model was trained on"):
        hpcml.predict(named, tmp_path / "in.csv")
    # by name, in the model's order: the input's column order does not matter
    (named / "model.json").write_text(json.dumps({**meta, "features": [f"f{i}" for i in range(FEATURES)]}))
    shuffled = _table(x).select(["f3", "id", "f0", "f7", "f1", "f2", "f6", "f5", "f4"])
    pq.write_table(shuffled, tmp_path / "shuffled.parquet")
    np.testing.assert_array_equal(
        hpcml.predict(named, tmp_path / "shuffled.parquet"), hpcml.predict(model_dir, x)
    )


def test_bad_input_is_a_clear_error(model_dir, x, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x00\x00\x01")
    with pytest.raises(HpcmlError, match=r"model\.safetensors: sha256 mismatch"):
        predict_parallel(bad, x, workers=2)
    with pytest.raises(UsageError, match=r"unknown output type \.txt"):
        hpcml.predict(model_dir, x, output=tmp_path / "p.txt")
    with pytest.raises(UsageError, match="workers must be a whole number >= 1"):
        hpcml.predict(model_dir, x, workers=0)
    with pytest.raises(UsageError, match="model expects"):
        hpcml.predict(model_dir, x[:, :5])
    xn = x[:10].copy()
    xn[4, 2] = np.nan
    pacsv.write_csv(_table(xn), tmp_path / "nan.csv")
    with pytest.raises(UsageError, match=r"nan\.csv: row 5, column 'f2' is missing or not finite"):
        hpcml.predict(model_dir, tmp_path / "nan.csv")
    with pytest.raises(UsageError, match="file not found"):
        hpcml.predict(model_dir, tmp_path / "nope.parquet")
    assert not (tmp_path / "p.txt").exists()


def test_cli_predict(model_dir, x, tmp_path, cli):
    pq.write_table(_table(x), tmp_path / "in.parquet")
    out = tmp_path / "preds.parquet"
    r = cli("predict", str(model_dir), "--input", str(tmp_path / "in.parquet"), "--output", str(out),
            "--workers", "2", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["rows"] == len(x) and doc["workers"] == 2 and doc["rows_per_second"] > 0
    assert doc["workers_reason"] == "workers=2"
    ref = hpcml.predict(model_dir, x)
    assert pq.read_table(out).column("prediction").to_pylist() == [str(i) for i in ref]
    r = cli(
        "predict",
        str(model_dir),
        "--input",
        str(tmp_path / "in.parquet"),
        "--output",
        str(tmp_path / "p.json"),
    )
    assert r.returncode == 2
    assert "unknown output type .json" in r.stderr and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    """A really trained regression model: y = 10 x0 + 100 + noise, so standardized outputs (mean 0,
    std 1) and values in the target's units (mean ~100, std ~10) are far apart."""
    tmp = tmp_path_factory.mktemp("regression")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1200, 3)).astype(np.float32)
    y = 10.0 * x[:, 0] + 100.0 + rng.normal(scale=0.1, size=len(x))
    pacsv.write_csv(pa.table({"f0": x[:, 0], "f1": x[:, 1], "f2": x[:, 2], "y": y}), tmp / "train.csv")
    cfg = {
        "data": {"name": str(tmp / "train.csv"), "target": "y"},
        "model": {"name": "mlp", "kwargs": {"hidden": 32}},
        "epochs": 12,
        "batch_size": 64,
        "threads": 1,
        "precision": "fp32",
    }
    run = hpcml.train(cfg, out=tmp / "run")
    assert run.report["task"] == "regression"
    return run.dir / "model", x, y


def test_regression_predictions_are_in_the_targets_units(regression, tmp_path, cli):
    model_dir, x, y = regression
    ref = hpcml.load_model(model_dir).predict(x)
    # the reference itself is right: close to the true targets, in their units (not standardized)
    assert abs(float(ref.mean()) - 100.0) < 2.0 and float(ref.std()) > 5.0
    assert float(np.abs(ref - y).mean()) < 0.1 * float(y.std())

    pq.write_table(_table(x[:, :3], extra=False), tmp_path / "in.parquet")
    out = tmp_path / "preds.parquet"
    r = cli("predict", str(model_dir), "--input", str(tmp_path / "in.parquet"), "--output", str(out))
    assert r.returncode == 0, r.stderr
    col = pq.read_table(out).column("prediction")
    assert pa.types.is_floating(col.type)
    np.testing.assert_allclose(col.to_numpy(), ref, rtol=1e-5, atol=1e-4)

    two = predict_parallel(model_dir, x, workers=2, batch_size=500, output=tmp_path / "w2.csv")
    np.testing.assert_allclose(two, ref, rtol=1e-5, atol=1e-4)
    csv = pacsv.read_csv(tmp_path / "w2.csv").column("prediction").to_numpy()
    np.testing.assert_allclose(csv, ref, rtol=1e-5, atol=1e-4)
    assert float(np.abs(two - y).mean()) < 0.1 * float(y.std())
    with pytest.raises(UsageError, match="probabilities are for classification models"):
        predict_parallel(model_dir, x[:100], probabilities=True)


def test_output_that_would_overwrite_the_input_is_refused(model_dir, x, tmp_path, cli):
    src = tmp_path / "in.parquet"
    pq.write_table(_table(x), src)
    before = src.read_bytes()
    for output in (src, tmp_path / "." / "in.parquet", f"file://{src}"):
        r = cli("predict", str(model_dir), "--input", str(src), "--output", str(output))
        assert r.returncode == 2 and "would overwrite the input" in r.stderr, r.stderr
    from hpcml.data import store as stores

    store = tmp_path / "store"
    stores.pack(str(src), out=store, target="id")
    with pytest.raises(UsageError, match="would overwrite the input"):
        hpcml.predict(model_dir, str(store), output=store / "manifest.parquet")
    assert src.read_bytes() == before and stores.verify(store)["ok"]


# ------------------------------------------------------------------------------- the warm worker pool


class _SlowHere:
    """This process's share of a pool, made slow (a test wrapper around the real Model): the helper
    then predicts most chunks, so its rows are what the comparison checks."""

    def __init__(self, model):
        self.model = model
        self.rows_per_forward = model.rows_per_forward

    def predict(self, x, **kw):
        time.sleep(0.05)
        return self.model.predict(x, **kw)

    def predict_proba(self, x, **kw):
        time.sleep(0.05)
        return self.model.predict_proba(x, **kw)


def _ready(pool, timeout=120.0):
    t0 = time.monotonic()
    while not pool.ready:
        assert time.monotonic() - t0 < timeout, "the helper never became ready"
        time.sleep(0.05)


def test_pool_rows_equal_model_predict_exactly(model_dir, regression, x):
    from hpcml.inference.pool import WorkerPool

    for path, rows in ((model_dir, x), (regression[0], np.tile(regression[1], (4, 1)))):  # 4+ chunks
        model = hpcml.load_model(path)
        with WorkerPool(path, workers=2, model=_SlowHere(model)) as pool:
            _ready(pool)
            got = pool.predict(rows)
            assert pool.rows_last_call[1] > pool.rows_last_call[0] > 0  # both predicted, mostly the helper
            np.testing.assert_array_equal(got, model.predict(rows))  # fp32 bits, in input order
            assert got.dtype == model.predict(rows[:2]).dtype
            if model.task == "classification":
                # a 1-row last batch (5001 = 5 x 1000 + 1) keeps its own kernel's bits in the pool too
                probs = pool.predict(rows, batch_size=1000, probabilities=True)
                np.testing.assert_array_equal(probs, model.predict_proba(rows, batch_size=1000))
                assert len(set(got.tolist())) > 1
                # uint8 rows (image pixels): 1-byte items, whose 2-D buffers a pipe sizes by rows
                pixels = (np.abs(rows) * 60).astype(np.uint8)
                np.testing.assert_array_equal(pool.predict(pixels), model.predict(pixels))
                assert pool.rows_last_call[1] > 0
            else:  # in the target's units, not standardized
                assert abs(float(got.mean()) - 100.0) < 2.0


def test_a_second_call_reuses_the_warm_workers(model_dir, x):
    from hpcml.inference.predictor import close_shared, shared_predictor

    try:
        first = hpcml.predict(model_dir, x, workers=2)
        pids = shared_predictor(model_dir, workers=2).pids
        second = hpcml.predict(model_dir, x, workers=2)
        assert shared_predictor(model_dir, workers=2).pids == pids
        assert len(pids) == 1 and pids[0] != os.getpid()
        os.kill(pids[0], 0)  # still running
        np.testing.assert_array_equal(first, second)
    finally:
        close_shared()


def _wait_dead(pid, timeout=30.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} still running")


def test_a_killed_worker_is_a_clear_error_then_a_new_pool_starts(model_dir, x):
    ref = hpcml.load_model(model_dir).predict(x)
    with hpcml.Predictor(model_dir, workers=2) as p:
        _ready(p.pool)
        (pid,) = p.pids
        os.kill(pid, signal.SIGKILL)
        _wait_dead(pid)
        with pytest.raises(HpcmlError, match=rf"predict worker 1 \(pid {pid}\) failed: .*killed by SIGKILL"):
            p.predict(x)
        np.testing.assert_array_equal(p.predict(x), ref)  # the next call starts a new pool
        assert p.pids and p.pids != [pid]


def test_auto_predicts_a_small_input_in_this_process(model_dir, x):
    with hpcml.Predictor(model_dir) as p:  # workers="auto" is the default
        got = p.predict(x[:100])
        assert p.decision.workers == 1 and p.pids == []
        assert p.decision.reason.startswith("auto: 1 worker: 100 rows take")
    np.testing.assert_array_equal(got, hpcml.load_model(model_dir).predict(x[:100]))


def test_auto_chooses_workers_from_the_measured_rates():
    from hpcml.inference.predictor import choose_workers

    asked = []

    def free(cores):
        return lambda: asked.append(cores) or cores

    def choose(rate_all, rate_one, cores_free, rows=1_000_000, startup=1.2, pool_workers=None):
        return choose_workers(rows=rows, rate_all=rate_all, rate_one=rate_one, cores=2, startup=startup,
                              free=free(cores_free), pool_workers=pool_workers)  # fmt: skip

    # 2 threads twice as fast as 1: two processes cannot beat them; free cores are not even sampled
    assert choose(200_000, 100_000, 2.0)[:2] == (1, 2) and not asked
    # threads that do not scale (a small model): two processes pay on a long input, both cores free
    workers, threads, why = choose(100_000, 100_000, 2.0)
    assert (workers, threads) == (2, 1) and "2.0 of 2 cores free" in why
    # ... less with one core busy: a third of the CPU each, a slower start-up: not 1.25x any more
    assert choose(100_000, 100_000, 1.0)[:2] == (1, 2)
    # a busy machine where 1 thread beats 2 (OpenMP waits): this process, on 1 thread ...
    assert choose(60_000, 100_000, 0.0)[:2] == (1, 1)
    # ... unless the input is long enough for the pool's share of the CPU to pay for its start-up
    assert choose(60_000, 100_000, 0.0, rows=5_000_000)[:2] == (2, 1)
    # a short input: the start-up would eat the gain; a warm pool has none
    assert choose(100_000, 100_000, 2.0, rows=150_000)[0] == 1
    assert choose(100_000, 100_000, 2.0, rows=150_000, startup=0.0, pool_workers=2)[0] == 2


def test_chunks_from_a_batch_start_are_whole_batches():
    from hpcml.inference.forward import SAME_KERNEL_ROWS, chunk_stop

    assert chunk_stop(0, 5000, 10_000, 1024) == 4096  # 4 whole batches
    assert chunk_stop(4096, 100_000, 10_000, 1024) == 10_000  # to the end
    assert chunk_stop(256, 5000, 10_000, 1024) == 1024  # mid-batch: up to the batch's end
    assert chunk_stop(0, 256, 10_000, 1024) == 256  # less than a batch: a piece of it
    assert chunk_stop(0, 900, 10_000, 1024) == 1024  # ... never leaving less than SAME_KERNEL_ROWS
    assert 1024 - 900 < SAME_KERNEL_ROWS


def test_auto_with_a_pool_gives_the_rows_of_one_process(model_dir, x, monkeypatch):
    """auto's path into a pool (calibration chunks here, the rest from `start` in the pool) keeps
    every row equal to Model.predict's; the decision itself is forced (it is tested above)."""
    import hpcml.inference.predictor as predictor

    monkeypatch.setattr(predictor, "MIN_POOL_SECONDS", 0.0)
    monkeypatch.setattr(predictor, "STARTUP_SECONDS", 0.0)
    monkeypatch.setattr(predictor, "CALIBRATE_SECONDS", 0.0)  # stop measuring after the second chunk
    monkeypatch.setattr(predictor, "choose_workers", lambda **kw: (2, 1, "forced by the test"))
    rows = np.tile(x, (40, 1))
    with hpcml.Predictor(model_dir) as p:
        got = p.predict(rows)
        assert p.decision.workers == 2 and p.decision.reason == "auto: 2 workers: forced by the test"
        assert sum(p.pool.rows_last_call) < len(rows)  # the calibration rows were predicted here first
    np.testing.assert_array_equal(got, hpcml.load_model(model_dir).predict(rows))


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_a_bad_batch_size_is_a_usage_error_before_any_worker(model_dir, x, bad):
    from hpcml.errors import UsageError
    from hpcml.jobs.predict import predict_parallel

    with pytest.raises(UsageError, match=r"batch_size must be a whole number >= 1"):
        predict_parallel(model_dir, x, workers=2, batch_size=bad)
    with pytest.raises(UsageError, match=r"batch_size must be a whole number >= 1"):
        hpcml.load_model(model_dir).predict(x, batch_size=bad)
