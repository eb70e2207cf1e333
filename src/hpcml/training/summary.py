"""The end of a run on rank 0: model dir, curves, report.json (the contract in DESIGN.md)."""

from __future__ import annotations

import time

import torch

import hpcml
from hpcml.models.io import Model, save_model
from hpcml.training.precision import cpu_name


def _brief(report: dict) -> dict:
    """The cleaning report without per-column lists that can run to thousands (image pixels)."""
    return {k: v for k, v in report.items() if not (isinstance(v, list) and len(v) > 64)}


def write_results(
    *, run_dir, cfg, data, hw, info, module, normalizer, y_scale, rows, steps, train_seconds, step_seconds,
    time_to_target, t_wall, ckpt, point, key, batch_size, global_batch, n_train,
):  # fmt: skip
    """Save the model, plot the curves and write report.json; returns the Run."""
    from hpcml.training.run import Run

    regression = data.task == "regression"
    metric = "r2" if regression else "accuracy"
    full_batch = cfg.optim.name == "gd"
    ddp = info.world_size > 1
    dev = hw.device
    val = data.x_val
    meta = {
        "architecture": cfg.model.name,
        "kwargs": cfg.model.kwargs,
        "input_shape": list(data.input_shape),
        "num_outputs": data.num_outputs,
        "classes": data.classes,
        "task": data.task,
        "features": data.features,
        "target": data.target,
        "target_scale": {"mean": y_scale[0], "std": y_scale[1]} if regression else None,
        "preprocessing": normalizer.to_json(),
        "data": {"name": data.name, "source": data.source},
        "hpcml_version": hpcml.__version__,
    }
    model = Model(module, meta)
    last = rows[-1]
    save_model(run_dir.path / "model", module, meta, key=key)
    run_dir.plot_curves(rows)
    report = {
        "task": data.task,
        f"test_{metric}": last[f"test_{metric}"],
        "test_loss": last["test_loss"],
        f"best_test_{metric}": max(r[f"test_{metric}"] for r in rows),
        f"train_{metric}": last[f"train_{metric}"],
        "train_loss": last["train_loss"],
        "train_seconds": train_seconds,
        "step_seconds": step_seconds,
        "eval_seconds": train_seconds - step_seconds,
        "wall_seconds": time.perf_counter() - t_wall,
        "samples_per_second": len(rows) * n_train / step_seconds,
        "epochs": len(rows),
        "steps": steps,
        "target_accuracy": cfg.target_accuracy,
        "time_to_target_seconds": time_to_target,
        "stopped_early": len(rows) < cfg.epochs,
        "checkpoints": {
            "every": cfg.checkpoint.every,
            "saved": ckpt.saves,
            "seconds": ckpt.seconds + (point.checkpoint_seconds if point else 0.0),
            "share_of_train_time": (ckpt.seconds + (point.checkpoint_seconds if point else 0.0))
            / max(train_seconds, 1e-9),
            "encrypted": key is not None,
            "failures": ckpt.failures,
        },
        "resumed_from_step": point.step if point else None,
        "restarts": point.restarts + 1 if point else 0,
        "world_size": info.world_size,
        "batch_size": batch_size,
        "grad_accum": 1 if full_batch else cfg.grad_accum,
        "global_batch_size": global_batch,
        "full_batch": full_batch,
        "optimizer": cfg.optim.name,
        "schedule": cfg.optim.schedule,
        "model": cfg.model.name,
        "model_parameters": sum(p.numel() for p in module.parameters()),
        "data": {
            "name": data.name,
            "train_rows": n_train,
            "val_rows": 0 if data.x_val is None else len(data.x_val),
            "test_rows": data.test_rows,
            "streamed": data.stream is not None,
            "input_shape": list(data.input_shape),
            "classes": data.num_classes,
            **({"cleaning": _brief(data.report)} if data.report else {}),
        },
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "backend": ("nccl" if dev.type == "cuda" else "gloo") if ddp else None,
        "precision": hw.precision,
        "precision_reason": hw.precision_reason,
        "compile": hw.compile,
        "compile_reason": hw.compile_reason,
        "threads": hw.threads,
        "seed": cfg.seed,
        "hpcml_version": hpcml.__version__,
        "torch_version": torch.__version__,
    }
    if regression:
        report["test_rmse"] = last["test_rmse"]
    if val is not None:
        report["val_loss"], report[f"val_{metric}"] = last["val_loss"], last[f"val_{metric}"]
    run_dir.write_report(report)
    return Run(dir=run_dir.path, report=report, model=model, metrics=rows)
