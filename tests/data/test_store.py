"""The dataset store: pack -> manifest -> verify/read, atomic writes, damage named shard by shard, CLI."""

import hashlib
import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpcml.data import _packing, store
from hpcml.data.files import read_table
from hpcml.errors import HpcmlError, UsageError

ROWS = 103


@pytest.fixture
def csv_path(tmp_path):
    """103 rows, 5 features, text labels, with NaN/Inf/missing-label rows and a duplicate."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, 5)).round(4)
    labels = rng.choice(["ant", "bee", "cat"], ROWS)
    lines = ["f0,f1,f2,f3,f4,label"]
    for i in range(ROWS):
        vals = [str(float(v)) for v in x[i]]
        if i == 10:
            vals[2] = ""
        if i == 20:
            vals[0] = "inf"
        lines.append(",".join(vals) + "," + ("" if i == 30 else labels[i]))
    lines[42] = lines[41]  # a duplicate row
    p = tmp_path / "src.csv"
    p.write_text("\n".join(lines) + "\n")
    return p


@pytest.fixture
def packed(tmp_path, csv_path):
    out = tmp_path / "store"
    manifest = store.pack(csv_path, out, target="label", shard_rows=25)
    return out, manifest


def _same(a, b):
    assert np.array_equal(a[0], b[0]) and a[0].dtype == b[0].dtype
    assert np.array_equal(a[1], b[1]) and a[1].dtype == b[1].dtype
    assert a[2] == b[2]


def test_round_trip_equals_read_table(csv_path, packed):
    out, _ = packed
    for missing in ("drop", "mean"):
        a = read_table(csv_path, target="label", missing=missing)
        b = store.read_store(out, missing=missing)
        _same(a, b)
        for key in (
            "rows",
            "rows_dropped",
            "rows_nonfinite",
            "rows_missing_label",
            "duplicate_rows",
            "values_imputed",
        ):
            assert a[3][key] == b[3][key], key
    assert b[3]["rows_read"] == ROWS and b[3]["duplicate_rows"] == 1 and b[3]["verified"] is True


def test_manifest_describes_every_shard(tmp_path, csv_path, packed):
    out, m = packed
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["format"] == "hpcml.store/1" and m["target"] == "label" and m["classes"] == ["ant", "bee", "cat"]
    assert [s["file"] for s in m["shards"]] == [f"shard-{i:05d}.parquet" for i in range(5)]
    assert [s["rows"] for s in m["shards"]] == [25, 25, 25, 25, 3] and m["total_rows"] == ROWS
    assert m["schema"] == [{"name": f"f{i}", "type": "double"} for i in range(5)] + [
        {"name": "label", "type": "string"}
    ]
    assert m["source"]["path"] == csv_path.as_uri() and m["source"]["format"] == "csv"
    for s in m["shards"]:
        data = (out / s["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"] and len(data) == s["bytes"]
        assert pq.ParquetFile(out / s["file"]).metadata.row_group(0).column(0).compression == "ZSTD"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.csv", "store"]  # no temp folder left
    assert store.verify(out)["rows"] == ROWS and store.info(out)["shards"] == 5


def test_iter_shards_subset(packed):
    out, _ = packed
    got = list(store.iter_shards(out, shards=[4, 1]))
    assert [i for i, _ in got] == [4, 1] and [t.num_rows for _, t in got] == [3, 25]
    with pytest.raises(UsageError, match="shard index 5 out of range"):
        list(store.iter_shards(out, shards=[5]))


def _flip(path, offset=200):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_names_each_bad_shard(packed):
    out, m = packed
    _flip(out / "shard-00001.parquet")
    data = (out / "shard-00002.parquet").read_bytes()
    (out / "shard-00002.parquet").write_bytes(data[: len(data) // 2])
    (out / "shard-00004.parquet").unlink()
    with pytest.raises(store.StoreError) as err:
        store.verify(out)
    text = str(err.value)
    assert {p["shard"] for p in err.value.problems} == {f"shard-0000{i}.parquet" for i in (1, 2, 4)}
    assert "shard-00001.parquet: sha256 mismatch" in text
    assert "shard-00002.parquet: truncated" in text
    assert "shard-00004.parquet: missing" in text
    assert "shard-00000.parquet" not in text and "shard-00003.parquet" not in text


def test_verify_and_read_catch_schema_mismatch(packed):
    out, m = packed
    # A shard with the right name, hash, size and rows in the manifest, but another schema: only the
    # schema check can catch it.
    path = out / "shard-00003.parquet"
    t = pq.read_table(path)
    pq.write_table(t.set_column(1, "f1", t.column("f1").cast(pa.float32())), path, compression="zstd")
    entry = m["shards"][3]
    entry.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        store.StoreError, match=r"shard-00003\.parquet: schema mismatch: column 'f1' is float"
    ):
        store.verify(out)
    with pytest.raises(HpcmlError, match=r"shard-00003\.parquet: schema mismatch"):
        store.read_store(out)


def test_read_store_names_flipped_and_missing_shard(packed):
    out, m = packed
    _flip(out / "shard-00002.parquet")
    with pytest.raises(HpcmlError, match=r"store/shard-00002\.parquet: sha256 mismatch"):
        store.read_store(out)
    (out / "shard-00002.parquet").unlink()
    with pytest.raises(HpcmlError, match=r"store/shard-00002\.parquet: missing \(listed in the manifest\)"):
        store.read_store(out)


def test_manifest_is_untrusted_input(packed):
    out, m = packed
    m["shards"][0]["file"] = "../../etc/passwd"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(HpcmlError, match="invalid file name '../../etc/passwd'"):
        store.read_store(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(HpcmlError, match="manifest.json: not valid JSON"):
        store.verify(out)
    (out / "manifest.json").unlink()
    with pytest.raises(UsageError, match="not an hpcml store"):
        store.info(out)


def test_pack_is_atomic(tmp_path, csv_path, monkeypatch):
    real = _packing._finish_shard
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(_packing, "_finish_shard", failing)
    with pytest.raises(OSError, match="simulated"):
        store.pack(csv_path, tmp_path / "out", target="label", shard_rows=25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.csv"]  # no out, no temp folder

    monkeypatch.setattr(_packing, "_finish_shard", real)
    before = store.pack(csv_path, tmp_path / "out", target="label", shard_rows=50)
    monkeypatch.setattr(_packing, "_finish_shard", failing)
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        store.pack(csv_path, tmp_path / "out", target="label", shard_rows=25, overwrite=True)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == before  # old store intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src.csv"]


def test_pack_refuses_to_clobber(tmp_path, csv_path, packed):
    out, _ = packed
    with pytest.raises(UsageError, match="already exists"):
        store.pack(csv_path, out, target="label")
    m = store.pack(csv_path, out, target="label", overwrite=True)
    assert len(m["shards"]) == 1
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(UsageError, match="is not an hpcml store; refusing to overwrite"):
        store.pack(csv_path, tmp_path / "mine", target="label", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_pack_bad_input_names_file(tmp_path):
    p = tmp_path / "ragged.csv"
    p.write_text("a,label\n" + "1,x\n" * 100 + "1,2,3\n")
    with pytest.raises(UsageError, match=r"ragged\.csv: malformed CSV at line 102"):
        store.pack(p, tmp_path / "out", target="label", shard_rows=10)
    p.write_text("a,label\n" + "1,x\n" * 100)
    with pytest.raises(
        UsageError, match=r"column 'label' is not numeric: found 'x' \(line 2\); if 'label' is"
    ):
        store.pack(p, tmp_path / "out")
    with pytest.raises(UsageError, match="compression='lzma'"):
        store.pack(p, tmp_path / "out", target="label", compression="lzma")
    with pytest.raises(UsageError, match="pack writes to a local folder"):
        store.pack(p, "memory://x/out", target="label")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["ragged.csv"]


def test_parquet_and_memory_sources_stream_into_shards(tmp_path):
    rng = np.random.default_rng(1)
    table = pa.table(
        {"a": rng.standard_normal(95), "b": rng.integers(0, 9, 95), "y": rng.integers(0, 3, 95) * 1.5}
    )
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=20)
    fs = fsspec.filesystem("memory")
    fs.pipe("/hpcml-store-test/t.parquet", buf.getvalue().to_pybytes())
    try:
        m = store.pack("memory://hpcml-store-test/t.parquet", tmp_path / "s", target="y", shard_rows=10)
    finally:
        fs.rm("/hpcml-store-test", recursive=True)
    assert [s["rows"] for s in m["shards"]] == [10] * 9 + [5]
    assert m["classes"] is None and m["task"] == "regression"  # 0, 1.5, 3.0: non-integral, so regression
    pq.write_table(table, tmp_path / "t.parquet")
    _same(read_table(tmp_path / "t.parquet", target="y"), store.read_store(tmp_path / "s"))


def test_store_read_from_memory_url(packed):
    out, _ = packed
    fs = fsspec.filesystem("memory")
    for p in out.iterdir():
        fs.pipe(f"/hpcml-url-store/{p.name}", p.read_bytes())
    try:
        assert store.is_store("memory://hpcml-url-store")
        assert store.verify("memory://hpcml-url-store")["ok"]
        _same(store.read_store("memory://hpcml-url-store"), store.read_store(out))
    finally:
        fs.rm("/hpcml-url-store", recursive=True)


def test_numpy_images_keep_their_shape(tmp_path):
    x = np.random.default_rng(2).random((30, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "imgs.npz", x=x, y=np.arange(30) % 3)
    m = store.pack(tmp_path / "imgs.npz", tmp_path / "s", shard_rows=8)
    assert m["feature_shape"] == [1, 4, 4] and m["target"] == "y" and m["classes"] == ["0", "1", "2"]
    xs, y, classes, report = store.read_store(tmp_path / "s")
    assert xs.shape == (30, 1, 4, 4) and np.array_equal(xs, x) and report["kind"] == "image"
    assert store.read_data(tmp_path / "imgs.npz")[0].shape == xs.shape  # read_data: file or store


# ---- CLI: the real entry point (hpcml.cli.main), with the data group registered as cli.py will ----


@pytest.fixture
def hpcml_main():
    import hpcml.cli as cli
    from hpcml.cli_data import data_app

    if not any(g.name == "data" for g in cli.app.registered_groups):
        cli.app.add_typer(data_app, name="data")
    return cli.main


def test_cli_pack_verify_info(tmp_path, csv_path, hpcml_main, capsys):
    out = tmp_path / "cli-store"
    assert hpcml_main(["data", "pack", str(csv_path), "--out", str(out), "--target", "label", "--json"]) == 0
    packed = json.loads(capsys.readouterr().out)
    assert packed["rows"] == ROWS and packed["manifest"]["classes"] == ["ant", "bee", "cat"]
    assert hpcml_main(["data", "verify", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert hpcml_main(["data", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == ROWS
    assert hpcml_main(["data", "info", str(out)]) == 0
    assert "classes" in capsys.readouterr().out


def test_cli_errors_exit_nonzero_with_message(tmp_path, packed, hpcml_main, capsys):
    out, _ = packed
    assert hpcml_main(["data", "pack", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "nope.csv: file not found" in capsys.readouterr().err
    _flip(out / "shard-00001.parquet")
    assert hpcml_main(["data", "verify", str(out), "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["ok"] is False and report["problems"][0]["shard"] == "shard-00001.parquet"
    assert "shard-00001.parquet: sha256 mismatch" in captured.err
    assert hpcml_main(["data", "info", str(tmp_path)]) == 2
    assert "not an hpcml store" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["pack", "verify", "info"])
def test_cli_help_has_an_example(hpcml_main, capsys, command):
    assert hpcml_main(["data", command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "Example" in text and f"hpcml data {command}" in text and "--json" in text


def test_arrow_types_survive_the_store(tmp_path):
    table = pa.table({
        "u8": pa.array([1, 2, 3, 4, 5], pa.uint8()),
        "i32": pa.array([1, None, 3, 4, 5], pa.int32()),
        "b": pa.array([True, False, True, None, False]),
        "h": pa.array(np.arange(1, 6, dtype=np.float16)),
        "lab": pa.array(["a", "b", "a", "c", "b"]).dictionary_encode(),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "odd.parquet")
    m = store.pack(tmp_path / "odd.parquet", tmp_path / "s", target="lab", shard_rows=2)
    assert [c["type"] for c in m["schema"][:4]] == ["uint8", "int32", "bool", "halffloat"]
    assert store.verify(tmp_path / "s")["ok"]
    a = read_table(tmp_path / "odd.parquet", target="lab", missing="mean")
    _same(a, store.read_store(tmp_path / "s", missing="mean"))
    assert a[2] == ["a", "b", "c"] and a[0][1, 1] == 3.25 and a[3]["imputed_with"] == {"i32": 3.25, "b": 0.5}
