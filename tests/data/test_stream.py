"""Streaming a store: disjoint shards per rank, every kept row once, equal len on every rank, exact
resume, errors from the prefetch thread surface in the caller, and memory stays bounded."""

import json
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hpcml.data import store
from hpcml.data.preprocess import Normalizer
from hpcml.data.stream import (
    StreamBatches,
    dataset_bytes,
    fit_normalizer_stream,
    fits_in_memory,
    iter_eval_chunks,
    parse_size,
    split_shards,
)
from hpcml.errors import HpcmlError, UsageError

ROWS, SHARD = 1030, 100  # 10 full shards + one of 30: unequal shards


def _write(path, n, *, nan_rows=(), seed=0):
    """Column `rid` holds the row id, so every streamed row can be traced back to its source row."""
    rng = np.random.default_rng(seed)
    f0 = rng.standard_normal(n) * 3 + 1
    f0[list(nan_rows)] = np.nan
    table = pa.table({
        "rid": np.arange(n, dtype=np.float64), "f0": f0, "f1": rng.random(n) * 100,
        "label": rng.integers(0, 3, n),
    })  # fmt: skip
    pq.write_table(table, path)
    return table


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    _write(d / "src.parquet", ROWS)
    store.pack(d / "src.parquet", d / "store", target="label", shard_rows=SHARD)
    return d / "store"


def _epoch(sb, e, start=0):
    return [
        [(m.x.clone(), m.y.clone(), m.weight, m.count) for m in step] for step in sb.epoch(e, start=start)
    ]


def _rids(steps):
    return np.concatenate([m[0][:, 0].numpy() for step in steps for m in step if m[3]]).astype(np.int64)


def test_ranks_get_disjoint_shards_and_equal_len(packed):
    world = 3
    ranks = [StreamBatches(packed, batch_size=16, world_size=world, rank=r, seed=5) for r in range(world)]
    assert len({len(sb) for sb in ranks}) == 1
    # 11 shards over 3 ranks: a rank gets 3 or 4; the 3 smallest are 30 + 100 + 100 rows
    assert len(ranks[0]) == 230 // 16 and ranks[0].global_batch == 16 * 3
    for e in range(3):
        orders = [sb.shard_order(e) for sb in ranks]
        flat = [i for o in orders for i in o]
        assert sorted(flat) == list(range(11))  # disjoint and complete
        seen = []
        for sb in ranks:
            steps = _epoch(sb, e)
            assert len(steps) == len(sb)  # equal on every rank in every epoch: DDP stays in step
            assert all(len(step) == 1 and step[0][2] == 1.0 and step[0][3] == 16 for step in steps)
            rids = _rids(steps)
            own = np.concatenate(
                [np.arange(i * SHARD, min((i + 1) * SHARD, ROWS)) for i in sb.shard_order(e)]
            )
            assert np.isin(rids, own).all()  # every row comes from this rank's shards
            assert sb.last_epoch["rows_used"] + sb.last_epoch["rows_not_used"] == len(own)
            seen.append(rids)
        allr = np.concatenate(seen)
        assert len(np.unique(allr)) == len(allr) == world * len(ranks[0]) * 16  # no row twice


def test_every_row_once_and_rows_match_labels(packed):
    src = pq.read_table(packed.parent / "src.parquet")
    labels = src.column("label").to_numpy()
    sb = StreamBatches(packed, batch_size=10, accum=3, seed=1, shuffle_buffer=150)
    assert len(sb) == ROWS // 30 and sb.global_batch == 30
    steps = list(sb.epoch(0))
    assert all(len(step) == 3 and all(m.count == 10 for m in step) for step in steps)
    x = torch.cat([m.x for step in steps for m in step])
    y = torch.cat([m.y for step in steps for m in step])
    rid = x[:, 0].long().numpy()
    assert len(np.unique(rid)) == len(rid) == len(sb) * 30 and sb.last_epoch["rows_not_used"] == ROWS % 30
    assert np.array_equal(y.numpy(), labels[rid])  # features and labels stay aligned
    assert np.array_equal(x[:, 1].numpy(), src.column("f0").to_numpy()[rid].astype(np.float32))
    if hasattr(steps[0][0], "index") and steps[0][0].index is not None:
        assert np.array_equal(torch.cat([m.index for s in steps for m in s]).numpy(), rid)
    assert not np.array_equal(rid, np.sort(rid))  # shuffled across shards
    spans = {int(r) // SHARD for r in rid[:30]}
    assert len(spans) > 1  # the buffer mixes rows of several shards into one step


def test_resume_yields_exactly_the_tail(packed):
    sb = StreamBatches(packed, batch_size=8, accum=2, seed=3, world_size=2, rank=1, shuffle_buffer=64)
    full = _epoch(sb, 4)
    for start in (0, 1, 17, len(sb) - 1, len(sb)):
        tail = _epoch(StreamBatches(packed, batch_size=8, accum=2, seed=3, world_size=2, rank=1,
                                    shuffle_buffer=64), 4, start=start)  # fmt: skip
        assert len(tail) == len(full) - start
        for a, b in zip(full[start:], tail, strict=True):
            for ma, mb in zip(a, b, strict=True):
                assert torch.equal(ma[0], mb[0]) and torch.equal(ma[1], mb[1]) and ma[2:] == mb[2:]
    with pytest.raises(UsageError, match="start step"):
        list(sb.epoch(0, start=len(sb) + 1))


def test_epochs_and_seeds_change_the_order(packed):
    a = _rids(_epoch(StreamBatches(packed, batch_size=50, seed=0), 0))
    assert np.array_equal(a, _rids(_epoch(StreamBatches(packed, batch_size=50, seed=0), 0)))
    assert not np.array_equal(a, _rids(_epoch(StreamBatches(packed, batch_size=50, seed=0), 1)))
    assert not np.array_equal(a, _rids(_epoch(StreamBatches(packed, batch_size=50, seed=1), 0)))
    flat = _rids(_epoch(StreamBatches(packed, batch_size=50, shuffle=False), 0))
    assert np.array_equal(flat, np.arange(len(flat)))  # shuffle=False: store order


def test_dropped_rows_are_skipped_and_short_ranks_padded(tmp_path):
    bad = list(range(0, 100, 10))  # 10 rows with NaN in a 100-row single shard
    _write(tmp_path / "nan.parquet", 100, nan_rows=bad)
    store.pack(tmp_path / "nan.parquet", tmp_path / "s", target="label")
    sb = StreamBatches(tmp_path / "s", batch_size=10)
    steps = list(sb.epoch(0))
    assert len(steps) == len(sb) == 10  # from the manifest's 100 rows
    rid = torch.cat([s[0].x[:, 0] for s in steps[:9]]).long().numpy()
    assert sorted(rid.tolist()) == sorted(set(range(100)) - set(bad))
    assert steps[9][0].weight == 0.0 and steps[9][0].count == 0 and len(steps[9][0].x) == 1
    assert sb.last_epoch["padded_steps"] == 1 and sb.last_epoch["rows_dropped_cleaning"] == 10
    if hasattr(steps[0][0], "index") and steps[0][0].index is not None:
        assert np.array_equal(torch.cat([s[0].index for s in steps[:9]]).numpy(), rid)


def test_corrupt_shard_error_surfaces_in_the_caller(packed, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(packed, broken)
    shard = broken / "shard-00007.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    sb = StreamBatches(broken, batch_size=10, prefetch=3, workers=2, shuffle=False)
    got = []
    with pytest.raises(HpcmlError, match=r"broken/shard-00007\.parquet: sha256 mismatch"):
        for step in sb.epoch(0):
            got.append(step)
    assert len(got) == 70  # shards 0-6 were yielded in full before the bad one
    assert not [t for t in threading.enumerate() if t.name.startswith("hpcml-stream")]  # none left
    with pytest.raises(HpcmlError, match=r"shard-00007\.parquet: sha256 mismatch"):
        list(iter_eval_chunks(broken, shards=[6, 7]))


def test_normalizer_fit_matches_in_memory(packed):
    train, test = split_shards(packed, test_fraction=0.2, seed=0)
    x, *_ = store.read_store(packed)
    rows = np.concatenate([np.arange(i * SHARD, min((i + 1) * SHARD, ROWS)) for i in train])
    xt = x[rows]
    for method in ("standard", "minmax", "none"):
        for per_feature in (True, False):
            want = Normalizer.fit(xt, method=method, per_feature=per_feature)
            got = fit_normalizer_stream(packed, shards=train, method=method, per_feature=per_feature)
            assert got.method == want.method and got.shift.shape == want.shift.shape
            np.testing.assert_allclose(got.shift, want.shift, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(got.scale, want.scale, rtol=1e-6)
    norm = fit_normalizer_stream(packed, shards=train, method="standard")
    chunks = list(iter_eval_chunks(packed, shards=test, rows=64, transform=norm))
    assert max(len(c[0]) for c in chunks) == 64
    want_x = norm(x[np.concatenate([np.arange(i * SHARD, min((i + 1) * SHARD, ROWS)) for i in test])])
    assert torch.equal(torch.cat([c[0] for c in chunks]), torch.from_numpy(want_x))


def test_split_sizes_and_budget_rules(packed):
    train, test = split_shards(packed, test_fraction=0.2, seed=0)
    assert len(test) == 3 and sorted(train + test) == list(range(11)) and not set(train) & set(test)
    assert (train, test) == split_shards(packed, test_fraction=0.2, seed=0)
    assert test != split_shards(packed, test_fraction=0.2, seed=1)[1]
    assert split_shards(packed, test_fraction=0.0, seed=0) == (list(range(11)), [])
    one = {"shards": [{"rows": 5}]}
    with pytest.raises(UsageError, match="1 shard\\(s\\): too few to hold out 20%"):
        split_shards(one, test_fraction=0.2, seed=0)
    assert parse_size("64MB") == 64_000_000 and parse_size("1.5 GiB") == 1_610_612_736
    assert parse_size("4096") == 4096 and parse_size("2kib") == 2048
    for bad in ("64XB", "-1MB", "MB", "0", ""):
        with pytest.raises(UsageError, match=f"memory size {bad!r}"):
            parse_size(bad)
    assert dataset_bytes(packed) == ROWS * (3 * 4 + 8)
    assert fits_in_memory(packed, ROWS * 20 * 4) and not fits_in_memory(packed, ROWS * 20 * 4 - 1)


def test_bad_construction(packed):
    with pytest.raises(UsageError, match="11 training shard\\(s\\) for 12 ranks"):
        StreamBatches(packed, batch_size=4, world_size=12)
    with pytest.raises(UsageError, match="shard index 11 out of range"):
        StreamBatches(packed, batch_size=4, shards=[0, 11])
    with pytest.raises(UsageError, match="repack with --target f1"):
        StreamBatches(packed, batch_size=4, target="f1")
    assert StreamBatches(packed, batch_size=10**6).batch_size == ROWS  # shrinks to the data, as DeviceBatches


_CHILD = """
import json, sys, threading, time, psutil
from hpcml.data.stream import StreamBatches, dataset_bytes
proc = psutil.Process()
sb = StreamBatches(sys.argv[1], batch_size=1024, prefetch=2, shuffle_buffer=25_000, seed=0)
sb._read(0)  # warm up once: codec and thread-pool set-up is not data
base = peak = proc.memory_info().rss
done = False
def poll():
    global peak
    while not done:
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.001)
t = threading.Thread(target=poll, daemon=True)
t.start()
rows = sum(m.count for step in sb.epoch(0) for m in step)
done = True
t.join()
print(json.dumps({"rows": rows, "steps": len(sb), "growth": peak - base,
                  "dataset": dataset_bytes(sb.manifest)}))
"""


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """2,000,000 rows x 16 float32 features, 25,000-row shards (80 shards)."""
    d = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    n = 2_000_000
    x = rng.standard_normal((n, 16), dtype=np.float32)
    pq.write_table(
        pa.table({**{f"f{j}": x[:, j] for j in range(16)}, "label": rng.integers(0, 10, n)}),
        d / "big.parquet",
        compression="none",
    )
    del x
    store.pack(d / "big.parquet", d / "store", target="label", shard_rows=25_000)
    return d / "store"


def test_streaming_memory_is_bounded(big_store):
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(big_store)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["rows"] == r["steps"] * 1024 and r["rows"] > 2_000_000 - 1024
    assert r["dataset"] == 2_000_000 * (16 * 4 + 8)
    assert r["growth"] < r["dataset"] / 3, r  # ~25 MB measured for a 144 MB dataset
