"""Parallel batch inference: the input split into contiguous shards, one per worker.

Each worker loads the model dir once (load_model checks it), sets its thread count and predicts its
shard with `Model.predict` / `Model.predict_proba`, the one forward path (preprocessing and target
scale included). The parent puts the shards back in input order and, when asked, writes them atomically
as Parquet or CSV: a `prediction` column (class name, or the value for a regression model), plus one
`prob_<class>` column per class with `probabilities=True`.

Inputs: a NumPy array (or torch tensor), or a path/URL to CSV, Parquet, .npy, .npz (array `x`) or an
hpcml store. Table columns are matched to the model: by name when the model records the `features` it
was trained on, otherwise every numeric column except the model's target column, whose count must
equal the model's input size.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from hpcml._files import atomic_file
from hpcml._system import available_cores
from hpcml.errors import UsageError
from hpcml.inference.columns import choose_columns as _choose
from hpcml.inference.columns import schema_columns
from hpcml.inference.columns import table_matrix as _matrix
from hpcml.jobs.tasks import Runner, Task, attached

__all__ = ["predict_parallel", "read_input", "write_output", "OUTPUT_FORMATS"]

OUTPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
RUNTIMES = ("torch", "onnx")


def predict_parallel(
    model_dir: Any,
    data: Any,
    *,
    workers: int = 1,
    backend: str = "local",
    address: str | None = None,
    batch_size: int = 65536,
    probabilities: bool = False,
    output: str | Path | None = None,
    stats: dict[str, Any] | None = None,
    trust_code: bool = False,
    runtime: str = "torch",
) -> np.ndarray:
    """Predict every row of `data` with the model in `model_dir` on `workers` processes.

    Returns class indices (into `model.classes`), class probabilities (N, C) with `probabilities=True`,
    or the predicted values of a regression model; with `output`, also writes them to that .parquet or
    .csv file. `workers=1` on the local backend predicts in this process. `stats`, if given, is filled
    with rows, seconds and rows_per_second. `trust_code=True` lets this process and every worker
    import the `module:function` a model dir names (it must be importable there).
    `runtime="onnx"` predicts with ONNX Runtime (the model dir exported in memory, normalization
    folded in; needs `pip install 'hpcml[onnx]'`) instead of torch.
    """
    from hpcml.models.io import Model

    t0 = time.perf_counter()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    out_fmt = _output_format(output) if output is not None else None
    if output is not None:
        _refuse_overwriting_input(output, data)
    runner = Runner(workers=workers, backend=backend, address=address)  # validates the options
    if isinstance(model_dir, Model):
        if runtime != "torch":
            raise UsageError("runtime='onnx' needs the model dir, not a loaded Model")
        if workers > 1 or backend != "local":
            raise UsageError("parallel predict needs the model dir (each worker loads it), not a Model")
        model = model_dir
    else:
        if runtime == "onnx":
            from hpcml.inference.onnx_runtime import require_onnx

            require_onnx("onnxruntime", "onnx", "onnxscript")  # before any worker starts
        here = runtime if workers == 1 and backend == "local" else "torch"  # workers export their own
        # verified here first: a bad dir fails before any worker starts
        model = _load(model_dir, runtime=here, trust_code=trust_code, threads=available_cores())
    regression = model.meta.get("task") == "regression"
    if probabilities and regression:
        raise UsageError("probabilities are for classification models; this model is a regression model")
    x, name = read_input(data, model)
    if len(x) == 0:
        raise UsageError(f"{name}: no rows to predict")

    if workers == 1 and backend == "local":
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(available_cores())
        try:
            result = _predict(model, x, batch_size=batch_size, probabilities=probabilities)
        finally:
            torch.set_num_threads(before)
    else:
        where = str(Path(model_dir).absolute())  # workers may run elsewhere (Ray has its own cwd)
        result = _predict_sharded(
            runner, where, x, batch_size=batch_size, probabilities=probabilities, trust_code=trust_code,
            runtime=runtime,
        )  # fmt: skip
    if output is not None:
        write_output(output, result, model=model, probabilities=probabilities, fmt=out_fmt)
    if stats is not None:
        seconds = time.perf_counter() - t0
        stats.update(rows=len(x), seconds=seconds, rows_per_second=len(x) / seconds, source=name)
    return result


def _predict_sharded(runner: Runner, model_dir: str, x: np.ndarray, **kw: Any) -> np.ndarray:
    from hpcml.errors import HpcmlError

    bounds = np.linspace(0, len(x), runner.workers + 1).astype(int)
    with runner:
        shared = runner.share(np.ascontiguousarray(x))
        tasks = [
            Task(f"shard-{i}", "hpcml.jobs.predict:predict_shard",
                 {"model_dir": model_dir, "data": shared, "start": int(a), "stop": int(b), **kw})
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)) if b > a
        ]  # fmt: skip
        outcomes = runner.run(tasks, retries=1)
    failed = [o for o in outcomes.values() if not o.ok]
    if failed:
        raise HpcmlError(f"predict {failed[0].id} failed: {failed[0].error}")
    return np.concatenate([outcomes[t.id].value for t in tasks])


def predict_shard(
    *, model_dir: str, data: Any, start: int, stop: int, batch_size: int, probabilities: bool, threads: int,
    attempt: int, trust_code: bool = False, runtime: str = "torch",
) -> np.ndarray:  # fmt: skip
    """In a worker: load the model once, predict rows [start, stop) of the shared input."""
    model = _load(model_dir, runtime=runtime, trust_code=trust_code, threads=threads)
    with attached(data) as arr:
        x = np.array(arr[start:stop])  # a private copy: the shared buffer can be released right away
    return _predict(model, x, batch_size=batch_size, probabilities=probabilities)


def _load(model_dir: Any, *, runtime: str, trust_code: bool, threads: int) -> Any:
    """A Model (torch) or an OnnxModel (onnxruntime session with `threads` threads)."""
    if runtime == "onnx":
        from hpcml.inference.onnx_runtime import load_onnx

        return load_onnx(model_dir, threads=threads, trust_code=trust_code)
    from hpcml.models.io import load_model

    return load_model(model_dir, trust_code=trust_code)


def _predict(model: Any, x: np.ndarray, *, batch_size: int, probabilities: bool) -> np.ndarray:
    """Model.predict / predict_proba: the one forward path (preprocessing, target scale), so every
    worker and sharding gives the rows that Model.predict gives."""
    if probabilities:
        return model.predict_proba(x, batch_size=batch_size)
    return model.predict(x, batch_size=batch_size)


# ------------------------------------------------------------------------------------------- input


def read_input(data: Any, model: Any) -> tuple[np.ndarray, str]:
    """(features, name for messages): an array as is, a file or store matched to the model's columns."""
    import torch

    if isinstance(data, torch.Tensor):
        return data.detach().cpu().numpy(), "input tensor"
    if isinstance(data, np.ndarray):
        if not np.issubdtype(data.dtype, np.number):
            raise UsageError(f"input array must be numeric, got dtype {data.dtype}")
        return data, "input array"
    if not isinstance(data, str | Path):
        raise UsageError(f"input must be an array or a path/URL, got {type(data).__name__}")
    from hpcml.data.files import resolve, source_format
    from hpcml.data.store import is_store

    path = str(data)
    if is_store(path):
        return _from_store(path, model)
    fs, fpath, name = resolve(path)
    if not fs.exists(fpath):
        raise UsageError(f"{name}: file not found")
    fmt, _ = source_format(fpath, name)
    if fmt in ("npy", "npz"):
        return _from_numpy(fs, fpath, name, fmt), name
    return _from_table(path, name, fmt, fs, fpath, model), name


def _from_table(path: str, name: str, fmt: str, fs: Any, fpath: str, model: Any) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from hpcml.data.files import DECOMPRESS_ERRORS, corrupt_file, open_table, source_format

    # Only the header (CSV: types inferred from the first block) to pick the columns; open_table then
    # streams exactly those, converted to float64 with errors that name the row.
    compression = source_format(fpath, name)[1]
    with fs.open(fpath, "rb", compression=compression) as f:
        try:
            schema = pq.read_schema(f) if fmt == "parquet" else pacsv.open_csv(f).schema
        except pa.ArrowException as err:
            raise UsageError(f"{name}: not a readable {fmt} file ({str(err).splitlines()[0]})") from None
        except DECOMPRESS_ERRORS as err:  # a cut .csv.gz: EOFError, which the CLI must not see raw
            if compression is not None:
                raise corrupt_file(name, err, compression) from None
            raise UsageError(f"{name}: not a readable {fmt} file ({str(err).splitlines()[0]})") from None
    feats = _choose(schema_columns(schema), model, name)
    with open_table(path, target=None, features=feats) as src:
        table = pa.Table.from_batches(list(src.batches), schema=src.schema)
    return _matrix(table, feats, name)


def _from_store(path: str, model: Any) -> tuple[np.ndarray, str]:
    import pyarrow as pa

    from hpcml.data.store import iter_shards

    tables = [t for _, t in iter_shards(path)]  # each shard checked against the manifest's sha256
    table = pa.concat_tables(tables)
    feats = _choose(schema_columns(table.schema), model, path)
    return _matrix(table.select(feats), feats, path), path


def _from_numpy(fs: Any, fpath: str, name: str, fmt: str) -> np.ndarray:
    try:
        with fs.open(fpath, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if fmt == "npz":
                with loaded as z:
                    if "x" not in z.files:
                        raise UsageError(f"{name}: no array 'x' in the .npz; it holds {', '.join(z.files)}")
                    loaded = z["x"]
    except ValueError as err:  # object arrays need pickle, which hpcml never loads
        raise UsageError(f"{name}: not a plain numeric NumPy file ({err})") from None
    if loaded.dtype.kind not in "biuf":
        raise UsageError(f"{name}: features must be numeric, got dtype {loaded.dtype}")
    return loaded


# ------------------------------------------------------------------------------------------ output


def _output_format(output: str | Path) -> str:
    text = str(output)
    if "://" in text and not text.startswith("file://"):
        raise UsageError(f"{text}: output goes to a local file (written atomically); copy it afterwards")
    suffix = Path(text).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise UsageError(f"{text}: unknown output type {suffix or '(none)'}; use {', '.join(OUTPUT_FORMATS)}")
    return OUTPUT_FORMATS[suffix]


def _local(path: Any) -> Path | None:
    text = str(path)
    if "://" in text and not text.startswith("file://"):
        return None
    return Path(text.removeprefix("file://")).resolve()


def _refuse_overwriting_input(output: str | Path, data: Any) -> None:
    """The output must not replace the input file, nor land inside an input store (its manifest)."""
    if not isinstance(data, str | Path):
        return
    src, dst = _local(data), _local(output)
    if src is None or dst is None:
        return
    if dst == src or (src.is_dir() and src in dst.parents):
        raise UsageError(
            f"--output {output} would overwrite the input {data}; write the predictions to another file"
        )


def write_output(
    output: str | Path, result: np.ndarray, *, model: Any, probabilities: bool, fmt: str | None = None
) -> Path:
    """`prediction` (+ `prob_<class>`) columns, in input order, written atomically."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fmt = fmt or _output_format(output)
    path = Path(str(output).removeprefix("file://"))
    if model.meta.get("task") == "regression":
        columns = {"prediction": pa.array(result)}
    else:
        index = result.argmax(1) if probabilities else result
        columns = {"prediction": pc.take(pa.array([str(c) for c in model.classes]), pa.array(index))}
        if probabilities:
            columns |= {f"prob_{c}": pa.array(result[:, k]) for k, c in enumerate(model.classes)}
    table = pa.table(columns)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        if fmt == "parquet":
            pq.write_table(table, tmp, compression="zstd")
        else:
            pacsv.write_csv(table, tmp)
    return path
