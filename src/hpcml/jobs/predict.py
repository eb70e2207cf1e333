"""Batch inference of a file or array: on this machine's warm worker pool, or sharded over Ray.

Locally, a `Predictor` (hpcml.inference.predictor) predicts on this process and warm helper processes
(or chooses how many with workers="auto"); on Ray, the input is split into one contiguous shard per
task, each loading the model dir. Every process predicts with `Model.predict` /
`Model.predict_proba`, the one forward path (preprocessing and target scale included). The rows come
back in input order and, when asked, are written atomically as Parquet or CSV: a `prediction` column
(class name, or the value for a regression model), plus one `prob_<class>` column per class with
`probabilities=True`.

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
from hpcml.errors import UsageError
from hpcml.inference.columns import choose_columns as _choose
from hpcml.inference.columns import schema_columns
from hpcml.inference.columns import table_matrix as _matrix
from hpcml.inference.predictor import Predictor, check_workers
from hpcml.jobs.tasks import check_backend

__all__ = ["predict_parallel", "checked_input", "read_input", "write_output", "OUTPUT_FORMATS"]

OUTPUT_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
RUNTIMES = ("torch", "onnx")


def predict_parallel(
    model_dir: Any,
    data: Any,
    *,
    workers: int | str = "auto",
    backend: str = "local",
    address: str | None = None,
    batch_size: int | None = None,
    probabilities: bool = False,
    output: str | Path | None = None,
    stats: dict[str, Any] | None = None,
    trust_code: bool = False,
    runtime: str = "torch",
) -> np.ndarray:
    """Predict every row of `data` with the model in `model_dir` on `workers` processes.

    Returns class indices (into `model.classes`), class probabilities (N, C) with `probabilities=True`,
    or the predicted values of a regression model; with `output`, also writes them to that .parquet or
    .csv file. `model_dir` may also be a loaded Model (this process only) or a `Predictor` (its warm
    processes are used, and stay). On the local backend, `workers=1` predicts in this process,
    `workers=W` on this process and W-1 warm helpers started for this call, and "auto" measures which
    pays (hpcml.inference.predictor). `stats`, if given, is filled with rows, seconds,
    rows_per_second, workers (used) and workers_reason. `trust_code=True` lets this process and
    every worker import the `module:function` a model dir names (it must be importable there).
    `runtime="onnx"` predicts with ONNX Runtime (the model dir exported in memory, normalization
    folded in; needs `pip install 'hpcml[onnx]'`) instead of torch.
    """
    t0 = time.perf_counter()
    from hpcml.models.io import check_batch_size  # torch: imported when a predict runs

    check_batch_size(batch_size)  # before any worker starts
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
    check_workers(workers)
    check_backend(backend, address)
    out_fmt = _output_format(output) if output is not None else None
    if output is not None:
        _refuse_overwriting_input(output, data)
    if backend == "local":
        if runtime == "onnx" and not isinstance(model_dir, Predictor):
            from hpcml.inference.onnx_runtime import require_onnx

            require_onnx("onnxruntime", "onnx", "onnxscript")  # before any worker starts
        owned = not isinstance(model_dir, Predictor)
        predictor = (
            Predictor(model_dir, workers=workers, runtime=runtime, trust_code=trust_code)
            if owned
            else model_dir
        )
        try:
            x, name = checked_input(data, predictor.model, probabilities)
            result = predictor.predict(x, batch_size=batch_size, probabilities=probabilities)
        finally:
            if owned:
                predictor.close()
        model, used, why = predictor.model, predictor.decision.workers, predictor.decision.reason
    else:
        from hpcml.jobs.predict_ray import predict_ray

        model, x, name, result, used, why = predict_ray(
            model_dir, data, workers=workers, backend=backend, address=address, batch_size=batch_size,
            probabilities=probabilities, trust_code=trust_code, runtime=runtime,
        )  # fmt: skip
    if output is not None:
        write_output(output, result, model=model, probabilities=probabilities, fmt=out_fmt)
    if stats is not None:
        seconds = time.perf_counter() - t0
        stats.update(rows=len(x), seconds=seconds, rows_per_second=len(x) / seconds, source=name,
                     workers=used, workers_reason=why)  # fmt: skip
    return result


def checked_input(data: Any, model: Any, probabilities: bool) -> tuple[np.ndarray, str]:
    if probabilities and model.meta.get("task") == "regression":
        raise UsageError("probabilities are for classification models; this model is a regression model")
    x, name = read_input(data, model)
    if len(x) == 0:
        raise UsageError(f"{name}: no rows to predict")
    return x, name


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
