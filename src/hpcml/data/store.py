"""The dataset store: a folder of Parquet shards (zstd) + `manifest.json`, checksummed and atomic.

    out/
      shard-00000.parquet   rows 0 .. shard_rows-1, written from the source in streamed batches
      shard-00001.parquet
      manifest.json         format tag, schema, rows and sha256 per shard, classes, target, source

`pack` writes into a hidden temporary sibling folder, fsyncs every file, renames the folder into
place and fsyncs the parent (`_files.atomic_dir`), so a crash leaves either no store or a complete
one. Readers check the manifest's sha256 for every shard they read and name the shard that does not
match. A store can be read from any fsspec URL; `pack` writes to a local folder (object stores have
no atomic rename).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hpcml._version import __version__
from hpcml.data._packing import write_shards
from hpcml.data.clean import MISSING, label_classes, table_to_arrays
from hpcml.data.files import BATCH_ROWS, open_table, read_table, redact_url, resolve
from hpcml.errors import HpcmlError, UsageError

__all__ = [
    "FORMAT", "MANIFEST", "SHARD_ROWS", "COMPRESSIONS", "StoreError",
    "pack", "verify", "info", "read_manifest", "read_store", "iter_shards", "is_store", "read_data",
]  # fmt: skip

FORMAT = "hpcml.store/1"
MANIFEST = "manifest.json"
SHARD_ROWS = 1_000_000
COMPRESSIONS = ("zstd", "snappy", "gzip", "lz4", "brotli", "none")
_SHARD_NAME = re.compile(r"shard-\d{5,}\.parquet")


class StoreError(HpcmlError):
    """A damaged store. `problems` lists one {"shard", "problem"} per finding, for --json output."""

    def __init__(self, store: str, problems: list[dict[str, str]]):
        self.problems = problems
        lines = "\n".join(f"  {p['shard']}: {p['problem']}" for p in problems)
        super().__init__(f"{store}: {len(problems)} problem(s) found:\n{lines}")


def pack(
    src: str | Path,
    out: str | Path,
    *,
    target: str | None = None,
    features: list[str] | None = None,
    shard_rows: int = SHARD_ROWS,
    compression: str = "zstd",
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    image_size: int | tuple[int, int] | None = None,
    image_mode: str = "auto",
) -> dict[str, Any]:
    """Pack a CSV/Parquet/NumPy file or an image folder (path or URL) into a store at `out`; returns
    the manifest. Image folders: see images.py (`image_size`, `image_mode`).

    The source is streamed: memory use is one batch plus one open shard writer, whatever its size.
    `progress(rows_so_far)` is called after every batch.
    """
    from hpcml._files import atomic_dir

    if compression not in COMPRESSIONS:
        raise UsageError(f"compression={compression!r}; valid: {', '.join(COMPRESSIONS)}")
    if shard_rows < 1:
        raise UsageError(f"shard_rows must be at least 1, got {shard_rows}")
    out = _local_out(out, overwrite)
    with atomic_dir(out) as tmp:  # an old store at `out` (overwrite=True) is replaced
        with open_table(
            src, target=target, features=features, batch_rows=min(shard_rows, BATCH_ROWS),
            image_size=image_size, image_mode=image_mode, image_shuffle=True,
        ) as t:  # fmt: skip
            shards, schema, labels = write_shards(t, tmp, shard_rows, compression, progress)
            source = {"path": redact_url(t.url), "format": t.format, "bytes": t.bytes, **t.extra}
            target, feature_shape = t.target, t.feature_shape
        if not shards:
            raise UsageError(f"{source['path']}: no data rows")
        schema = pq.read_schema(tmp / shards[0]["file"])  # the schema readers will see, after Parquet
        classes = None  # no target, or a regression target (labels is None)
        if target is not None and labels is not None:
            classes = label_classes(
                pa.array(list(labels), schema.field(target).type), name=str(src), target=target
            )
        manifest = {
            "format": FORMAT,
            "hpcml_version": __version__,
            "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "source": source,
            "target": target,
            "task": None if target is None else ("regression" if classes is None else "classification"),
            "classes": classes,
            "feature_shape": feature_shape,
            "schema": _schema_list(schema),
            "compression": compression,
            "shard_rows": shard_rows,
            "total_rows": sum(s["rows"] for s in shards),
            "shards": shards,
        }
        # written last: a folder without it is not a store
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _local_out(out: str | Path, overwrite: bool) -> Path:
    text = str(out)
    if "://" in text and not text.startswith("file://"):
        raise UsageError(
            f"{text}: pack writes to a local folder (atomic rename); copy it to the URL afterwards"
        )
    path = Path(text.removeprefix("file://")).absolute()
    if path.exists():
        if not overwrite:
            raise UsageError(
                f"{path}: already exists; choose another --out or pass --overwrite to replace it"
            )
        if not path.is_dir() or (any(path.iterdir()) and not (path / MANIFEST).exists()):
            raise UsageError(f"{path}: exists and is not an hpcml store; refusing to overwrite it")
    return path


def _schema_list(schema: pa.Schema) -> list[dict[str, str]]:
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def _fs(store: str | Path) -> tuple[Any, str, str]:
    fs, root, name = resolve(store)
    return fs, root.rstrip("/"), name


def is_store(path_or_url: str | Path) -> bool:
    """True when the path is a folder with a manifest.json (an hpcml store)."""
    try:
        fs, root, _ = _fs(path_or_url)
        return fs.isdir(root) and fs.exists(f"{root}/{MANIFEST}")
    except (UsageError, OSError):
        return False


def read_manifest(store: str | Path) -> dict[str, Any]:
    """Load and sanity-check manifest.json; the manifest is input, so its file names are checked too."""
    fs, root, name = _fs(store)
    try:
        raw = fs.cat_file(f"{root}/{MANIFEST}")
    except (FileNotFoundError, NotADirectoryError):
        if fs.isfile(root):  # e.g. `hpcml data info train.csv`
            raise UsageError(
                f"{name}: is a file, not an hpcml store; `hpcml data info` and `data verify` take a "
                f"store folder made by `hpcml data pack` (e.g. `hpcml data pack {name} --out "
                "stores/NAME --target COLUMN`)"
            ) from None
        if not fs.exists(root):
            raise UsageError(f"{name}: not found (expected an hpcml store folder)") from None
        raise UsageError(
            f"{name}: not an hpcml store (no {MANIFEST}); create one with `hpcml data pack`"
        ) from None
    except IsADirectoryError:
        raise UsageError(f"{name}: not an hpcml store") from None
    try:
        m = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HpcmlError(f"{name}/{MANIFEST}: not valid JSON ({err})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        got = m.get("format") if isinstance(m, dict) else type(m).__name__
        raise HpcmlError(f"{name}/{MANIFEST}: format is {got!r}, expected {FORMAT!r}")
    for key in ("schema", "shards", "total_rows", "target", "classes"):
        if key not in m:
            raise HpcmlError(f"{name}/{MANIFEST}: missing field {key!r}")
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or not all(k in s for k in ("file", "rows", "bytes", "sha256")):
            raise HpcmlError(f"{name}/{MANIFEST}: shard entry {i} lacks file/rows/bytes/sha256")
        if not _SHARD_NAME.fullmatch(str(s["file"])):  # no "../" or absolute paths out of the store
            raise HpcmlError(f"{name}/{MANIFEST}: shard entry {i} has an invalid file name {s['file']!r}")
    return m


def info(store: str | Path) -> dict[str, Any]:
    """A summary from the manifest (no hashing; see verify for that)."""
    m = read_manifest(store)
    return {
        "store": str(store),
        "format": m["format"],
        "hpcml_version": m.get("hpcml_version"),
        "created_utc": m.get("created_utc"),
        "source": m.get("source"),
        "target": m["target"],
        "task": m.get("task"),
        "num_classes": None if m["classes"] is None else len(m["classes"]),
        "classes": m["classes"],
        "rows": m["total_rows"],
        "columns": len(m["schema"]),
        "schema": m["schema"],
        "feature_shape": m.get("feature_shape"),
        "shards": len(m["shards"]),
        "bytes": sum(s["bytes"] for s in m["shards"]),
        "compression": m.get("compression"),
    }


def verify(store: str | Path, *, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Re-hash every shard and check its size, row count and schema against the manifest.

    Raises StoreError listing every bad shard (missing, truncated, modified, unreadable, wrong rows
    or schema); returns a summary when all is well. `progress(shards_done)` after each shard.
    """
    t0 = time.perf_counter()
    fs, root, name = _fs(store)
    m = read_manifest(store)
    problems: list[dict[str, str]] = []
    for i, entry in enumerate(m["shards"]):
        problems += [
            {"shard": entry["file"], "problem": p} for p in _check_shard(fs, root, entry, m["schema"])
        ]
        if progress:
            progress(i + 1)
    if sum(s["rows"] for s in m["shards"]) != m["total_rows"]:
        problems.append({"shard": MANIFEST, "problem": f"total_rows {m['total_rows']} != sum of shard rows"})
    if problems:
        raise StoreError(name, problems)
    seconds = time.perf_counter() - t0
    return {
        "store": name, "ok": True, "shards": len(m["shards"]), "rows": m["total_rows"],
        "bytes": sum(s["bytes"] for s in m["shards"]), "seconds": seconds,
        "rows_per_second": m["total_rows"] / seconds if seconds > 0 else None,
    }  # fmt: skip


def _check_shard(fs, root: str, entry: dict, schema: list[dict]) -> list[str]:
    path = f"{root}/{entry['file']}"
    if not fs.exists(path):
        return ["missing (listed in the manifest, not on disk)"]
    found: list[str] = []
    size = fs.size(path)
    if size != entry["bytes"]:
        what = "truncated" if size < entry["bytes"] else "grown"
        found.append(f"{what}: {size} bytes, manifest says {entry['bytes']}")
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    if (digest := h.hexdigest()) != entry["sha256"]:
        found.append(
            f"sha256 mismatch ({digest[:12]}..., manifest {entry['sha256'][:12]}...): corrupt or modified"
        )
    try:
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            rows, got = pf.metadata.num_rows, _schema_list(pf.schema_arrow)
    except (pa.ArrowException, OSError) as err:
        return [*found, f"not a readable Parquet file ({str(err).splitlines()[0]})"]
    if rows != entry["rows"]:
        found.append(f"{rows} rows, manifest says {entry['rows']}")
    if got != schema:
        found.append(f"schema mismatch: {_schema_diff(got, schema)}")
    return found


def _schema_diff(got: list[dict], want: list[dict]) -> str:
    g = {c["name"]: c["type"] for c in got}
    w = {c["name"]: c["type"] for c in want}
    parts = [f"missing column {n!r}" for n in w if n not in g]
    parts += [f"extra column {n!r}" for n in g if n not in w]
    parts += [f"column {n!r} is {g[n]}, manifest says {w[n]}" for n in w if n in g and g[n] != w[n]]
    return "; ".join(parts) or "column order differs"


def iter_shards(
    store: str | Path, *, shards: list[int] | None = None, verify: bool = True
) -> Iterator[tuple[int, pa.Table]]:
    """(index, table) per shard, in order. Each shard is read once, hashed from the same bytes, and
    checked against the manifest's sha256, rows and schema before it is yielded."""
    fs, root, name = _fs(store)
    m = read_manifest(store)
    n = len(m["shards"])
    for i in range(n) if shards is None else shards:
        if not 0 <= i < n:
            raise UsageError(f"{name}: shard index {i} out of range (the store has {n} shards)")
        entry = m["shards"][i]
        where = f"{name}/{entry['file']}"
        try:
            data = fs.cat_file(f"{root}/{entry['file']}")
        except FileNotFoundError:
            raise HpcmlError(
                f"{where}: missing (listed in the manifest); run `hpcml data verify {name}`"
            ) from None
        if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise HpcmlError(
                f"{where}: sha256 mismatch with the manifest: the shard is corrupt or was modified"
            )
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowException, OSError) as err:
            raise HpcmlError(f"{where}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
        if _schema_list(table.schema) != m["schema"]:
            raise HpcmlError(
                f"{where}: schema mismatch: {_schema_diff(_schema_list(table.schema), m['schema'])}"
            )
        if table.num_rows != entry["rows"]:
            raise HpcmlError(f"{where}: {table.num_rows} rows, manifest says {entry['rows']}")
        yield i, table


def read_store(
    store: str | Path,
    *,
    target: str | None = None,
    features: list[str] | None = None,
    missing: str = "drop",
    verify: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str] | None, dict]:
    """All shards -> (x, y, classes, report), the same arrays read_table gives on the packed source.

    `target` defaults to the manifest's; class ids come from the manifest so they are stable.
    """
    if missing not in MISSING:
        raise UsageError(f"missing={missing!r}; valid: {', '.join(MISSING)}")
    m = read_manifest(store)
    name = _fs(store)[2]
    target = target or m["target"]
    tables = [t for _, t in iter_shards(store, verify=verify)]
    table = pa.concat_tables(tables) if tables else pa.schema([]).empty_table()
    x, y, classes, report = table_to_arrays(
        table, name=name, fmt="hpcml-store", target=target, features=features, missing=missing,
        classes=m["classes"] if target == m["target"] else None,
        feature_shape=m.get("feature_shape") if features is None else None,
    )  # fmt: skip
    report.update(store_source=m.get("source"), shards=len(m["shards"]), verified=verify)
    return x, y, classes, report


def read_data(
    path_or_url: str | Path,
    *,
    target: str | None = None,
    features: list[str] | None = None,
    missing: str = "drop",
    image_size: int | tuple[int, int] | None = None,
    image_mode: str = "auto",
) -> tuple[np.ndarray, np.ndarray, list[str] | None, dict]:
    """A store (folder with manifest.json), a CSV/Parquet/NumPy file or an image folder, whichever
    the path is. `image_size`/`image_mode` apply to image folders only."""
    if is_store(path_or_url):
        return read_store(path_or_url, target=target, features=features, missing=missing)
    return read_table(
        path_or_url, target=target, features=features, missing=missing,
        image_size=image_size, image_mode=image_mode,
    )  # fmt: skip
