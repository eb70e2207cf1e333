"""User files -> arrays: CSV, Parquet, NumPy and image folders, from a local path or any fsspec URL.

Formats (picked by extension; `.gz`/`.bz2`/`.xz` on a CSV are decompressed on the fly):
  `.csv`              header row required; every feature column must be numeric
  `.parquet`, `.pq`   feature columns must be numeric (int, float, bool)
  `.npz`              features in array `x` (N, ...), labels in the array named by `target` (default `y`)
  `.npy`              `foo.npy` holds the features, the sibling `foo.labels.npy` the labels
  a folder            one subfolder per class of .png/.jpg/.jpeg images (images.py; `image_size`)
NumPy files are always loaded with allow_pickle=False; an object array is refused.
Any URL fsspec knows works (file://, memory://, s3:// with s3fs, gs:// with gcsfs, ...).

CSV and Parquet stream in batches (`open_table`), so a file larger than memory can be packed into a
store; NumPy files are loaded whole. Cleaning and label rules live in clean.py.
"""

from __future__ import annotations

import lzma
import re
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from hpcml.data.clean import MISSING, check_features, numeric, table_to_arrays, target_hint
from hpcml.errors import HpcmlError, UsageError

__all__ = [
    "FORMATS",
    "MISSING",
    "TableSource",
    "resolve",
    "redact_url",
    "source_format",
    "open_table",
    "read_table",
    "DECOMPRESS_ERRORS",
    "corrupt_file",
]

FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz", ".npy": "npy"}
BATCH_ROWS = 65_536
_COMPRESSED = (".gz", ".bz2", ".xz")
_CSV_CONVERT = re.compile(
    r"In CSV column #(\d+): (?:Row #(\d+): )?CSV conversion error to \w+: invalid value '(.*)'"
)
_CSV_PARSE = re.compile(r"CSV parse error: (?:Row #(\d+): )?(.*)", re.S)
# What reading a truncated or corrupt .gz/.bz2/.xz raises, through Arrow or not: gzip raises EOFError
# at a cut, BadGzipFile (an OSError) or zlib.error on bad bytes; bz2 OSError/EOFError; xz LZMAError.
# Click would turn a bare EOFError into "aborted" (exit 130), so these must never reach the CLI raw.
DECOMPRESS_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError)


@dataclass
class TableSource:
    """An open source: its schema (features first, target last) and a one-shot stream of batches."""

    name: str
    format: str
    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]
    target: str | None
    features: list[str]
    feature_shape: list[int] | None = None  # NumPy sources with x.ndim > 2 (images, sequences)
    bytes: int | None = None
    url: str = ""  # absolute, with its scheme (file:///..., memory://...): what a manifest records
    extra: dict = field(default_factory=dict)  # source-specific report fields (image folders: size, mode)


def resolve(path_or_url: str | Any) -> tuple[Any, str, str]:
    """(filesystem, path on it, name for messages). Any fsspec scheme works if its package is installed."""
    name = redact_url(str(path_or_url))
    try:
        fs, path = fsspec.core.url_to_fs(str(path_or_url))
    except ValueError as err:  # "Protocol not known: foo"
        raise UsageError(f"{name}: unknown URL scheme ({err})") from None
    except (ImportError, OSError) as err:  # e.g. s3:// without s3fs; keep only the first line
        raise UsageError(f"{name}: cannot open this URL scheme: {str(err).splitlines()[0]}") from None
    return fs, path, name


def redact_url(url: str) -> str:
    """Drop user:password@ from a URL, so no secret lands in a message or a manifest."""
    if "@" not in url or "://" not in url:
        return url
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))  # keeps host:port


def source_format(path: str, name: str | None = None) -> tuple[str, str | None]:
    """(format, compression) from the file name; an unknown extension is a UsageError."""
    lower = path.lower()
    comp = next((c for c in _COMPRESSED if lower.endswith(c)), None)
    stem = lower[: -len(comp)] if comp else lower
    fmt = next((f for ext, f in FORMATS.items() if stem.endswith(ext)), None)
    if fmt is None or (comp and fmt != "csv"):
        raise UsageError(
            f"{name or path}: unknown file type; expected one of {', '.join(FORMATS)} "
            "(CSV may end in .gz/.bz2/.xz)"
        )
    return fmt, fsspec.utils.infer_compression(path) if comp else None


@contextmanager
def open_table(
    path_or_url: str | Any,
    *,
    target: str | None,
    features: list[str] | None = None,
    batch_rows: int = BATCH_ROWS,
    image_size: int | tuple[int, int] | None = None,
    image_mode: str = "auto",
    image_shuffle: bool = False,
) -> Iterator[TableSource]:
    """Open a file (or image folder) for streaming: validates columns up front, yields batches
    without loading it all. `image_size`/`image_mode`/`image_shuffle` apply to image folders only
    (see images.py)."""
    fs, path, name = resolve(path_or_url)
    if fs.isdir(path):
        yield _open_folder(
            fs, path, name, target, features, batch_rows, image_size, image_mode, image_shuffle
        )
        return
    fmt, compression = source_format(path, name)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        raise UsageError(f"{name}: file not found") from None
    if not size:
        raise UsageError(f"{name}: empty file")
    opener = {"csv": _open_csv, "parquet": _open_parquet, "npz": _open_numpy, "npy": _open_numpy}[fmt]
    local = isinstance(fs, LocalFileSystem) and compression is None and fmt in ("csv", "parquet")
    # Arrow reads a local path natively with its own read-ahead: ~1.5x faster than a Python file object
    with nullcontext(path) if local else fs.open(path, "rb", compression=compression) as f:
        try:  # the opener reads the header (CSV: the first block), so a bad stream can fail here
            src = opener(f, fs, path, name, fmt, target, features, batch_rows)
        except DECOMPRESS_ERRORS as err:
            if compression is None:
                raise
            raise corrupt_file(name, err, compression) from None
        src.bytes, src.url = size, fs.unstrip_protocol(path)
        if compression is not None:
            src.batches = _decompressed(src.batches, name, compression)
        yield src


def read_table(
    path_or_url: str | Any,
    *,
    target: str | None = None,
    features: list[str] | None = None,
    missing: str = "drop",
    image_size: int | tuple[int, int] | None = None,
    image_mode: str = "auto",
) -> tuple[np.ndarray, np.ndarray, list[str] | None, dict]:
    """Read and clean a whole file: (x float32, y int64 class ids | float32 targets, classes, report).

    An image folder gives x (N, C, H, W) in [0, 1] and report["kind"] == "image" (see images.py)."""
    # "" = required but not given: NumPy sources default to "y", tables say which columns there are
    with open_table(
        path_or_url, target=target or "", features=features, image_size=image_size, image_mode=image_mode
    ) as src:
        batches = list(_named(src.batches, src.name))
        table = pa.Table.from_batches(batches, schema=src.schema)
    x, y, classes, report = table_to_arrays(
        table,
        name=src.name,
        fmt=src.format,
        target=src.target,
        missing=missing,
        feature_shape=src.feature_shape,
    )
    report.update(src.extra)
    return x, y, classes, report


def _open_folder(
    fs, path, name, target, features, batch_rows, image_size, image_mode, shuffle=False
) -> TableSource:
    """A folder that is not a store: an image folder (class subfolders), else a clear error."""
    from hpcml.data import images

    if fs.exists(f"{path.rstrip('/')}/manifest.json"):
        raise UsageError(f"{name}: is an hpcml store; read it with read_store / read_data")
    src, extra = images.open_images(
        fs, path, name, target=target, features=features, image_size=image_size, mode=image_mode,
        shuffle=shuffle,
        batch_rows=batch_rows,
    )  # fmt: skip
    src.extra, src.url = extra, fs.unstrip_protocol(path)
    return src


def corrupt_file(name: str, err: BaseException, compression: str | None) -> HpcmlError:
    """The error for a compressed file that cannot be decompressed to its end: names the file."""
    msg = str(err).splitlines()[0] if str(err) else type(err).__name__
    tool = {"gzip": "gzip", "bz2": "bzip2", "xz": "xz"}.get(compression or "")
    check = f" (`{tool} -t FILE` tests it)" if tool else ""
    return HpcmlError(
        f"{name}: truncated or corrupt {compression or 'compressed'} file ({msg}); copy or compress it "
        f"again{check}"
    )


def _decompressed(batches: Iterator[pa.RecordBatch], name: str, compression: str) -> Iterator[pa.RecordBatch]:
    """Batches of a compressed CSV, with a cut or corrupt stream (found mid-file) named."""
    try:
        yield from batches
    except DECOMPRESS_ERRORS as err:
        raise corrupt_file(name, err, compression) from None


def _named(batches: Iterator[pa.RecordBatch], name: str) -> Iterator[pa.RecordBatch]:
    """Turn pyarrow's errors mid-stream into UsageErrors that name the file (and line, for CSV)."""
    try:
        yield from batches
    except (pa.ArrowInvalid, OSError) as err:
        raise _arrow_error(err, name, None) from None


def _arrow_error(
    err: Exception, name: str, header: list[str] | None, *, add_hint: bool = False
) -> UsageError:
    msg = str(err)
    if m := _CSV_CONVERT.search(msg):
        col = int(m.group(1))
        col_name = header[col] if header and col < len(header) else f"#{col + 1}"
        at = f" (line {m.group(2)})" if m.group(2) else ""
        return UsageError(
            f"{name}: column {col_name!r} is not numeric: found {m.group(3)!r}{at}"
            + (target_hint(col_name, None) if add_hint else "")
        )
    if m := _CSV_PARSE.search(msg):
        at = f"line {m.group(1)}" if m.group(1) else "a row"
        return UsageError(f"{name}: malformed CSV at {at}: {m.group(2).strip()}")
    if "Empty CSV file" in msg:
        return UsageError(f"{name}: empty file")
    return UsageError(f"{name}: cannot read: {msg.splitlines()[0] if msg else type(err).__name__}")


def _pick(names: list[str], target: str | None, features: list[str] | None, name: str) -> list[str]:
    """Feature columns in order; validates that the target and every named feature exist."""
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UsageError(f"{name}: column name {dup!r} appears more than once in the header")
    if target == "":
        raise UsageError(f"{name}: no target column given; available columns: {', '.join(names)}")
    if target is not None and target not in names:
        raise UsageError(f"{name}: target column {target!r} not found; available columns: {', '.join(names)}")
    if features is None:
        return [n for n in names if n != target]
    for f in features:
        if f not in names:
            raise UsageError(f"{name}: feature column {f!r} not found; available columns: {', '.join(names)}")
    return list(features)


def _open_csv(f, fs, path, name, fmt, target, features, batch_rows) -> TableSource:
    # One threaded-off pass over the first block for the header: then the real pass can force every
    # feature column to float64 (streamed type inference would fail on an int column that later holds
    # 1.5) and the target to text, so a CSV and its packed store give the same arrays.
    read = pacsv.ReadOptions(use_threads=False, block_size=1 << 22)  # unthreaded: errors carry line numbers
    try:
        header = pacsv.open_csv(f, read_options=read).schema.names
    except pa.ArrowInvalid as err:
        raise _arrow_error(err, name, None) from None
    feats = _pick(header, target, features, name)
    if not isinstance(f, str):
        f.seek(0)
    types = {c: pa.float64() for c in feats} | ({target: pa.string()} if target else {})
    # strings_can_be_null: an empty or "NA" label is a missing label, not a class named ""
    convert = pacsv.ConvertOptions(
        column_types=types, include_columns=[*feats, *([target] if target else [])], strings_can_be_null=True
    )
    try:  # opening converts the first block already, so its errors are translated here too
        reader = pacsv.open_csv(f, read_options=read, convert_options=convert)
    except pa.ArrowInvalid as err:
        raise _arrow_error(err, name, header, add_hint=target is None) from None

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            yield from reader
        except pa.ArrowInvalid as err:
            raise _arrow_error(err, name, header, add_hint=target is None) from None

    return TableSource(name, fmt, reader.schema, batches(), target, feats)


def _open_parquet(f, fs, path, name, fmt, target, features, batch_rows) -> TableSource:
    try:
        pf = pq.ParquetFile(f)
    except (pa.ArrowInvalid, OSError) as err:
        raise UsageError(f"{name}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    feats = _pick(pf.schema_arrow.names, target, features, name)
    cols = [*feats, *([target] if target else [])]
    schema = pa.schema([pf.schema_arrow.field(c) for c in cols])
    try:
        check_features(schema, feats, target, name)
    except UsageError as err:
        raise UsageError(f"{err}{_parquet_sample(pf, schema, feats)}") from None
    return TableSource(name, fmt, schema, pf.iter_batches(batch_size=batch_rows, columns=cols), target, feats)


def _parquet_sample(pf: pq.ParquetFile, schema: pa.Schema, feats: list[str]) -> str:
    """', e.g. 'abc'': the first value of the first non-numeric column, so the user can find it."""
    col = next(c for c in feats if not numeric(schema.field(c).type))
    try:
        vals = pf.read_row_group(0, columns=[col]).column(0).drop_null()
    except (pa.ArrowException, IndexError):
        return ""
    return f", e.g. {vals[0].as_py()!r}" if len(vals) else ""


def _open_numpy(f, fs, path, name, fmt, target, features, batch_rows) -> TableSource:
    target = target or "y"
    if fmt == "npz":
        with _no_pickle(name):
            with np.load(f, allow_pickle=False) as z:
                keys = list(z.files)
                for k in ("x", target):
                    if k not in keys:
                        raise UsageError(
                            f"{name}: no array {k!r} in the .npz; it holds {', '.join(keys) or 'nothing'}"
                            " (features go in 'x', labels in the array named by target, default 'y')"
                        )
                x, y = z["x"], z[target]
        yname = f"{name}[{target!r}]"
    else:
        with _no_pickle(name):
            x = np.load(f, allow_pickle=False)
        label_path = path[: -len(".npy")] + ".labels.npy"
        yname = name[: -len(".npy")] + ".labels.npy"
        try:
            with fs.open(label_path, "rb") as g, _no_pickle(yname):
                y = np.load(g, allow_pickle=False)
        except FileNotFoundError:
            raise UsageError(
                f"{name}: labels file {yname} not found (a .npy source needs its labels there)"
            ) from None
    if x.dtype.kind not in "biuf" or x.ndim == 0:
        raise UsageError(
            f"{name}: features must be a numeric array with one row per sample, got {x.dtype} {x.shape}"
        )
    shape = list(x.shape[1:]) if x.ndim > 2 else None
    x = x.reshape(len(x), -1) if x.ndim != 1 else x.reshape(-1, 1)
    if y.ndim != 1 or len(y) != len(x):
        raise UsageError(
            f"{yname}: labels must be 1-D with one per row: shape {y.shape}, features have {len(x)} rows"
        )
    if features is not None:
        raise UsageError(f"{name}: NumPy sources have no named columns; features= cannot be used")
    feats = [f"x{i}" for i in range(x.shape[1])]
    table = pa.table({**{c: x[:, i] for i, c in enumerate(feats)}, target: y})
    return TableSource(name, fmt, table.schema, iter(table.to_batches(batch_rows)), target, feats, shape)


@contextmanager
def _no_pickle(name: str) -> Iterator[None]:
    try:
        yield
    except ValueError as err:
        if "allow_pickle" in str(err) or "Object arrays" in str(err):
            raise UsageError(
                f"{name}: holds Python objects (pickle); hpcml never unpickles, because that can "
                "run arbitrary code. Save plain numeric/string arrays instead."
            ) from None
        raise UsageError(f"{name}: not a readable NumPy file ({err})") from None
    except (OSError, EOFError) as err:
        raise UsageError(f"{name}: not a readable NumPy file ({err})") from None
