"""`hpcml compress` and `hpcml export`: a model dir in, a smaller/faster model dir (or ONNX file) out,
with compress.json saying what it cost: stored values and file size, the test metric and latency at
batch 1 and 1024, before and after.

Every option and the input model are checked before anything is computed, and the output is written
in one atomic step (model dir + compress.json together), so a bad input or a failure leaves nothing.
An encrypted source stays encrypted: the compressed dir is sealed with the same key.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from hpcml._files import atomic_file
from hpcml.config import DataConfig
from hpcml.data.sources import BUILTINS
from hpcml.errors import HpcmlError, UsageError
from hpcml.inference import measure
from hpcml.models.io import Model, load_model, refuse_pickle, save_model

__all__ = ["FORMATS", "QUANTIZE", "compress", "export"]

QUANTIZE = ("int8",)
FORMATS = ("onnx",)
REPORT = "compress.json"


def _check_options(prune: float | None, quantize: str | None, finetune_epochs: int, threads: int) -> None:
    if prune is None and quantize is None:
        raise UsageError("nothing to do: pass --prune FRACTION and/or --quantize int8")
    if prune is not None and not 0 < prune < 1:
        raise UsageError(f"--prune must be a fraction between 0 and 1 (exclusive), got {prune}")
    if quantize is not None and quantize not in QUANTIZE:
        raise UsageError(f"unknown --quantize {quantize!r}; valid: {', '.join(QUANTIZE)}")
    if finetune_epochs < 0 or (finetune_epochs and prune is None):
        raise UsageError("--finetune-epochs is a whole number >= 0, and applies to --prune")
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")


def _source(model_dir: str | Path, out: str | Path, trust_code: bool) -> tuple[Model, bytes | None]:
    """The checked source model and its key (None if it is not encrypted)."""
    from hpcml.crypto import key_from_env

    src, dst = Path(model_dir), Path(out)
    refuse_pickle(src)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise UsageError(f"--out {out} would overwrite the source model dir {model_dir}; pick another path")
    meta_file = src / "model.json"
    encrypted = False
    if meta_file.is_file():  # load_model checks the file properly; this only picks the key to pass
        with open(meta_file, "rb") as f:
            encrypted = b'"encryption"' in f.read(4096)
    key = key_from_env() if encrypted else None
    return load_model(src, key=key, trust_code=trust_code), key  # no key: a one-line error, exit 2


def _data(model: Model, data: str | None) -> DataConfig:
    """The data to measure on: `data`, else the built-in dataset the model was trained on."""
    name = data or (model.meta.get("data") or {}).get("name")
    if not name:
        raise UsageError("pass --data: the model dir does not name the data it was trained on")
    if data is None and name not in BUILTINS:
        raise UsageError(f"pass --data: the model was trained on {name}, which is not a built-in dataset")
    if name in BUILTINS:
        return DataConfig(name=name)
    return DataConfig(name=name, target=model.meta.get("target"))  # a file: the model's label column


def _metric(model: Any, data: DataConfig) -> dict[str, Any]:
    from hpcml.inference.evaluate import evaluate_model

    r = evaluate_model(model, data)
    key = "test_rmse" if r["task"] == "regression" else "test_accuracy"
    return {"metric": key, "value": r[key], "rows": r["rows"], "data": r["data"]}


def _finetune(module, meta: dict, kwargs: dict, data: DataConfig, *, epochs: int, lr: float, threads: int):
    """`module` trained `epochs` more epochs by the trainer (fp32); returns the run's Model."""
    from hpcml.config import build_config
    from hpcml.training.run import run_process

    cfg = build_config(
        {"data": data.model_dump(mode="json"), "model": {"name": meta["architecture"], "kwargs": kwargs},
         "epochs": epochs, "precision": "fp32", "threads": threads, "optim": {"lr": lr},
         "checkpoint": {"every": None}},
        source="compress --finetune-epochs",
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="hpcml-finetune-") as tmp:
        run = run_process(cfg, out=Path(tmp) / "run", quiet=True, model=module)
    return run.model


def _shrink(model: Model, fraction: float, data: DataConfig, *, epochs: int, lr: float, threads: int):
    """(module, meta changes, report section) of the pruned (and fine-tuned) model."""
    from hpcml.inference.prune import prune_module

    meta = model.meta
    p = prune_module(
        model.module, fraction=fraction, architecture=meta["architecture"], kwargs=meta.get("kwargs", {}),
        input_shape=model.input_shape, num_outputs=meta["num_outputs"],
    )  # fmt: skip
    changes: dict[str, Any] = {"kwargs": p.kwargs}
    if p.pruned_widths is not None:
        changes["pruned_widths"] = p.pruned_widths
    section = {"fraction": fraction, "layers": p.layers, "finetune_epochs": epochs}
    module = p.module
    if epochs:
        tuned = _finetune(module, meta, p.kwargs, data, epochs=epochs, lr=lr, threads=threads)
        module, changes["preprocessing"] = tuned.module.cpu().eval(), tuned.meta["preprocessing"]
        section["finetune_lr"] = lr
    return module, changes, section


def compress(
    model_dir: str | Path,
    *,
    out: str | Path,
    prune: float | None = None,
    quantize: str | None = None,
    finetune_epochs: int = 0,
    finetune_lr: float = 1e-2,
    data: str | None = None,
    threads: int = 1,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Prune (`prune` = share of each hidden layer's neurons/channels removed, then optionally
    `finetune_epochs` on `data`) and/or quantize (`quantize="int8"`) the model dir into `out`.
    Returns the compress.json report (also written into `out`)."""
    _check_options(prune, quantize, finetune_epochs, threads)
    if Path(out).exists() and not (Path(out) / "model.json").is_file():
        raise UsageError(f"--out {out} exists and is not a model dir; refusing to replace it")
    model, key = _source(model_dir, out, trust_code)
    if model.meta.get("quantization"):
        raise UsageError(f"{model_dir}: already int8; compress the float model dir instead")
    if prune is not None:
        from hpcml.inference.prune import check_prunable

        check_prunable(model.meta["architecture"])
    data_cfg = _data(model, data)
    before = _metric(model, data_cfg)
    module, meta, report = model.module, {k: v for k, v in model.meta.items() if k != "weights_sha256"}, {}
    if prune is not None:
        module, changes, report["prune"] = _shrink(
            model, prune, data_cfg, epochs=finetune_epochs, lr=finetune_lr, threads=threads
        )
        meta.update(changes)
    if quantize is not None:
        from hpcml.inference.quantize import SCHEME, quantize_int8

        module, layers, chosen, used = quantize_int8(module)
        meta["quantization"] = {"scheme": SCHEME, "layers": chosen}
        report["quantization"] = {"scheme": SCHEME, "quantizer": used, "layers": layers}
    meta.pop("format", None)
    new = Model(module.cpu().eval(), meta)
    contenders = {"before": measure.torch_forward(model), "after": measure.torch_forward(new)}
    report = {
        "kind": "compress", "source": str(model_dir), "out": str(out), **report,
        "params": {"before": measure.stored_values(model.module), "after": measure.stored_values(module)},
        "metric": {"before": before, "after": _metric(new, data_cfg)},
        "latency_ms": measure.latencies(contenders, model.input_shape, threads=threads,
                                        batches=measure.batches_for(model.module, model.input_shape)),
    }  # fmt: skip
    report["file_bytes"] = {"before": measure.dir_bytes(model_dir), "after": measure.weights_bytes(module)}
    save_model(out, module, meta, key=key, extra={REPORT: json.dumps(report, indent=2)})
    try:
        load_model(out, key=key, trust_code=trust_code)  # what was written loads (schema, header, sha256)
    except HpcmlError:
        shutil.rmtree(out, ignore_errors=True)  # never leave a dir that does not load
        raise
    return report


def _onnx_out(out: str | Path) -> tuple[Path, Path]:
    path = Path(out)
    if path.suffix.lower() != ".onnx":
        raise UsageError(f"--out {out}: an ONNX file name ends in .onnx")
    if path.is_dir():
        raise UsageError(f"--out {out} is a folder; give the .onnx file to write")
    return path, path.with_name(path.stem + ".compress.json")


def export(
    model_dir: str | Path,
    *,
    out: str | Path,
    format: str = "onnx",
    data: str | None = None,
    threads: int = 1,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Export the model dir to an ONNX file at `out` (normalization folded in, batch axis dynamic),
    verified against eager on the held-out rows of `data` (default: the model's own test split).
    Writes `out` and `<stem>.compress.json` beside it; returns the report."""
    from hpcml.inference.export import OPSET, to_onnx
    from hpcml.inference.onnx_runtime import OnnxModel, require_onnx

    if format not in FORMATS:
        raise UsageError(f"unknown --format {format!r}; valid: {', '.join(FORMATS)}")
    if threads < 1:
        raise UsageError(f"--threads must be >= 1, got {threads}")
    require_onnx("onnx", "onnxscript", "onnxruntime")
    path, report_path = _onnx_out(out)
    model, key = _source(model_dir, path, trust_code)
    if key is not None:
        warnings.warn(f"{model_dir} is encrypted; the ONNX file {path} is written unencrypted", stacklevel=2)
    data_cfg = _data(model, data)
    blob = to_onnx(model)
    onnx_model = OnnxModel(model, blob, threads=threads)
    from hpcml.inference.evaluate import eval_rows

    x = eval_rows(model, data_cfg)[0]
    eager, ort = model.logits(x), onnx_model.logits(x)
    diff = float((eager - ort).abs().max()) if len(x) else 0.0
    if diff > 1e-4 * max(1.0, float(eager.abs().max())):
        raise HpcmlError(f"ONNX export does not match eager: max abs difference {diff:.3g} on {len(x)} rows")
    contenders = {"eager": measure.torch_forward(model), "onnxruntime": _ort_forward(onnx_model)}
    values = measure.stored_values(model.module)
    report = {
        "kind": "export", "format": format, "source": str(model_dir), "out": str(path), "opset": OPSET,
        "verify": {"rows": len(x), "max_abs_diff": diff, "data": data_cfg.name},
        "params": {"before": values, "after": values},  # the same numbers, in another file format
        "file_bytes": {"before": measure.dir_bytes(model_dir), "after": len(blob)},
        "metric": {"before": _metric(model, data_cfg), "after": _metric(onnx_model, data_cfg)},
        "latency_ms": measure.latencies(contenders, model.input_shape, threads=threads,
                                        batches=measure.batches_for(model.module, model.input_shape)),
    }  # fmt: skip
    with atomic_file(path) as tmp:
        Path(tmp).write_bytes(blob)
    with atomic_file(report_path) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=2))
    return report


def _ort_forward(onnx_model: Any):
    sess, name = onnx_model.session, onnx_model.session.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})
