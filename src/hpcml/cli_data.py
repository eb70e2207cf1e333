"""`hpcml data pack | verify | info`: the dataset store on the command line. No logic lives here.

Registered in cli.py with `app.add_typer(data_app, name="data")`. Heavy imports (pyarrow, the store)
happen inside the commands so `hpcml --help` stays fast.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from hpcml.errors import HpcmlError

__all__ = ["data_app"]

data_app = typer.Typer(
    name="data",
    help="Pack files into a checksummed, sharded dataset store; verify and describe stores.\n\n"
    "Examples:\n\n"
    "  hpcml data pack train.csv --out stores/train --target label\n\n"
    "  hpcml data verify stores/train\n\n"
    "  hpcml data info stores/train --json",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_JSON = typer.Option("--json", help="Print machine-readable JSON on stdout (and nothing else).")


def _store():
    try:
        from hpcml.data import store
    except ImportError as err:  # pyarrow/fsspec are the optional [data] extra
        raise HpcmlError(f"hpcml data needs pyarrow and fsspec ({err}); pip install 'hpcml[data]'") from None
    return store


@contextmanager
def _progress(enabled: bool, label: str, total: int | None):
    """A rich progress bar on stderr (stdout stays clean for pipes), or a no-op callback."""
    from rich.console import Console

    console = Console(stderr=True)
    if not (enabled and console.is_terminal):  # no bar in logs or pipes: it would only add blank lines
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.update(task, completed=n)


def _table(title: str, rows: list[tuple[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_header=False, title_justify="left")
    for k, v in rows:
        t.add_row(k, str(v))
    Console().print(t)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@data_app.command(
    help="Pack a CSV, Parquet or NumPy file or an image folder (one subfolder per class of PNG/JPEG; "
    "local path or fsspec URL) into a store: Parquet shards (zstd) "
    "+ manifest.json with sha256 per shard. The source is streamed, so it may be larger than memory; the "
    "store appears only when complete.\n\n"
    "Examples:\n\n"
    "  hpcml data pack iris.csv --out stores/iris --target species\n\n"
    "  hpcml data pack s3://bucket/big.parquet --out stores/big --target y --shard-rows 500000 --json\n\n"
    "  hpcml data pack photos/ --out stores/photos --image-size 64",
)
def pack(
    src: Annotated[
        str,
        typer.Argument(
            metavar="SRC", help="Source file, image folder or URL (.csv[.gz], .parquet, .npz, .npy)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Store folder to create (local).")],
    target: Annotated[str | None, typer.Option(help="Label column (recorded with its classes).")] = None,
    feature: Annotated[
        list[str] | None, typer.Option("--feature", help="Feature column to keep (repeatable; default all).")
    ] = None,
    shard_rows: Annotated[int | None, typer.Option(help="Rows per shard (default 1,000,000).")] = None,
    compression: Annotated[str, typer.Option(help="zstd, snappy, gzip, lz4, brotli or none.")] = "zstd",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing store at --out.")
    ] = False,
    image_size: Annotated[
        str | None, typer.Option(help="Image folders: resize to N or HxW (default: all must match).")
    ] = None,
    image_mode: Annotated[str, typer.Option(help="Image folders: auto, L (gray) or RGB.")] = "auto",
    json_: Annotated[bool, _JSON] = False,
) -> None:
    store = _store()
    kw = {} if shard_rows is None else {"shard_rows": shard_rows}
    if image_size is not None:
        kw["image_size"] = _image_size(image_size)
    t0 = time.perf_counter()
    with _progress(not json_, "packing rows", None) as progress:
        manifest = store.pack(
            src, out, target=target, features=feature, compression=compression, overwrite=overwrite,
            progress=progress, image_mode=image_mode, **kw,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    rows, nbytes = manifest["total_rows"], sum(s["bytes"] for s in manifest["shards"])
    if json_:
        result = {"store": str(out), "rows": rows, "shards": len(manifest["shards"]), "bytes": nbytes,
                  "seconds": seconds, "rows_per_second": rows / seconds, "manifest": manifest}  # fmt: skip
        typer.echo(json.dumps(result, indent=2))
        return
    _table("hpcml data pack", [
        ("store", out), ("source", manifest["source"]["path"]), ("rows", f"{rows:,}"),
        ("columns", len(manifest["schema"])), ("shards", len(manifest["shards"])),
        ("size", f"{_size(nbytes)} ({manifest['compression']})"),
        ("target", manifest["target"] or "-"), ("classes", _classes(manifest["classes"])),
        ("time", f"{seconds:.2f} s ({rows / seconds:,.0f} rows/s)"),
    ])  # fmt: skip


@data_app.command(
    help="Re-hash every shard of a store and check sizes, row counts and schemas against manifest.json. "
    "Exits 1 and names every bad shard if anything is missing, truncated, modified or mismatched.\n\n"
    "Example:\n\n  hpcml data verify stores/iris --json",
)
def verify(
    store_dir: Annotated[str, typer.Argument(metavar="STORE", help="Store folder or URL.")],
    json_: Annotated[bool, _JSON] = False,
) -> None:
    store = _store()
    shards = len(store.read_manifest(store_dir)["shards"])
    try:
        with _progress(not json_, "verifying shards", shards) as progress:
            report = store.verify(store_dir, progress=progress)
    except store.StoreError as err:
        if json_:  # the findings on stdout for machines; main() still prints the error and exits 1
            typer.echo(json.dumps({"store": store_dir, "ok": False, "problems": err.problems}, indent=2))
        raise
    if json_:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(
        f"{store_dir}: OK, {report['shards']} shard(s), {report['rows']:,} rows, {_size(report['bytes'])} "
        f"verified in {report['seconds']:.2f} s"
    )


@data_app.command(
    help="Describe a store from its manifest: rows, columns, classes, shards, source (no hashing; see "
    "verify).\n\nExample:\n\n  hpcml data info stores/iris --json",
)
def info(
    store_dir: Annotated[str, typer.Argument(metavar="STORE", help="Store folder or URL.")],
    json_: Annotated[bool, _JSON] = False,
) -> None:
    summary = _store().info(store_dir)
    if json_:
        typer.echo(json.dumps(summary, indent=2))
        return
    source = summary["source"] or {}
    _table(f"hpcml data info {store_dir}", [
        ("rows", f"{summary['rows']:,}"), ("columns", summary["columns"]),
        ("target", summary["target"] or "-"), ("task", summary["task"] or "-"),
        ("classes", _classes(summary["classes"])), ("shards", summary["shards"]),
        ("size", f"{_size(summary['bytes'])} ({summary['compression']})"),
        ("source", f"{source.get('path', '?')} ({source.get('format', '?')})"),
        ("created", f"{summary['created_utc']} by hpcml {summary['hpcml_version']}"),
    ])  # fmt: skip


@data_app.command(
    help="Write the generated `shapes` image set (6 classes of shapes and textures, RGB PNG) as an "
    "image folder: one subfolder per class, like a user's photos. Nothing is downloaded.\n\n"
    "Example:\n\n  hpcml data shapes photos --rows 1200 --size 64\n\n"
    "  hpcml data pack photos --out stores/photos",
)
def shapes(
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to create (must not exist).")],
    rows: Annotated[int, typer.Option(min=6, help="Images in all (classes in turn).")] = 1200,
    size: Annotated[int, typer.Option(min=8, help="Image side in pixels.")] = 64,
    seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 0,
) -> None:
    from hpcml._files import atomic_dir
    from hpcml.data.shapes import write_folder
    from hpcml.errors import UsageError

    if out.exists():
        raise UsageError(f"{out}: already exists; choose a new folder")
    with atomic_dir(out) as tmp:
        write_folder(tmp, rows, size, seed=seed)
    typer.echo(f"wrote {rows} images of {size}x{size} in 6 class folders to {out}")


def _image_size(text: str) -> int | tuple[int, int]:
    """'32' -> 32, '32x48' -> (32, 48) (height x width)."""
    from hpcml.errors import UsageError

    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise UsageError(f"--image-size {text!r}: give N or HxW, e.g. 32 or 32x48")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _classes(classes: list[str] | None) -> str:
    if classes is None:
        return "-"
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    return f"{len(classes)}: {shown}"
