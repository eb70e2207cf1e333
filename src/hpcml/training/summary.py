"""The end of a run on rank 0: model dir, curves, report.json (the contract in DESIGN.md)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import hpcml
from hpcml.distributed.dist import ddp_summary
from hpcml.models.io import Model, save_model
from hpcml.training.callbacks import Callback
from hpcml.training.precision import cpu_name
from hpcml.training.report import RunDir


def _brief(report: dict) -> dict:
    """The cleaning report without per-column lists that can run to thousands (image pixels)."""
    return {k: v for k, v in report.items() if not (isinstance(v, list) and len(v) > 64)}


@dataclass
class Run:
    """The result of `hpcml.train`: where it was written, what it measured, and the trained model."""

    dir: Path
    report: dict[str, Any]
    model: Model
    metrics: list[dict[str, Any]] = field(default_factory=list)


class RunDirWriter(Callback):
    """Rank 0's run dir: config.yaml at the start, a metrics.jsonl row per epoch, and at the end the
    model dir, curves.png and report.json (`self.result`, a Run)."""

    def __init__(self, run_dir: RunDir, *, ckpt, key: bytes | None, t_wall: float):
        self.run_dir, self.ckpt, self.key, self.t_wall = run_dir, ckpt, key, t_wall
        self.result = None

    def on_train_start(self, run, state) -> None:
        self.run_dir.write_config(run.cfg)
        for row in state.rows:  # metrics.jsonl holds exactly the epochs the checkpoint has seen
            self.run_dir.log_epoch(row)

    def on_epoch_end(self, run, state, row) -> None:
        self.run_dir.log_epoch(row)

    def on_train_end(self, run, state) -> None:
        self.result = write_results(
            run, state, run_dir=self.run_dir, ckpt=self.ckpt, key=self.key, t_wall=self.t_wall
        )

    def close(self) -> None:
        self.run_dir.close()


def model_meta(run) -> dict:
    """model.json's fields (besides format and sha256): the architecture and how to feed it."""
    cfg, data = run.cfg, run.data
    return {
        "architecture": cfg.model.name,
        "kwargs": cfg.model.kwargs,
        "input_shape": list(data.input_shape),
        "num_outputs": data.num_outputs,
        "classes": data.classes,
        "task": data.task,
        "features": data.features,
        "target": data.target,
        "target_scale": {"mean": run.y_scale[0], "std": run.y_scale[1]} if run.regression else None,
        "preprocessing": run.normalizer.to_json(),
        "data": {"name": data.name, "source": data.source},
        "hpcml_version": hpcml.__version__,
    }


def write_results(run, state, *, run_dir, ckpt, key, t_wall):
    """Save the model, plot the curves and write report.json; returns the Run."""
    cfg, data, hw, info, module = run.cfg, run.data, run.hw, run.dist, run.module
    rows, steps, point_ckpt = state.rows, state.step, state.checkpoint_seconds
    train_seconds, step_seconds, time_to_target = state.elapsed(), state.step_seconds, state.time_to_target
    regression, metric = run.regression, run.metric
    full_batch = cfg.optim.name == "gd"
    ddp = info.world_size > 1
    dev = hw.device
    val = data.x_val
    meta = model_meta(run)
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
        "samples_per_second": len(rows) * run.n_train / step_seconds,
        "epochs": len(rows),
        "steps": steps,
        "target_accuracy": cfg.target_accuracy,
        "time_to_target_seconds": time_to_target,
        "stopped_early": len(rows) < cfg.epochs,
        "checkpoints": {
            "every": cfg.checkpoint.every,
            "saved": ckpt.saves,
            "seconds": ckpt.seconds + point_ckpt,
            "share_of_train_time": (ckpt.seconds + point_ckpt) / max(train_seconds, 1e-9),
            "encrypted": key is not None,
            "failures": ckpt.failures,
        },
        "resumed_from_step": state.resumed_from,
        "restarts": state.restarts,
        "stopped_by": state.stop,
        "world_size": info.world_size,
        "batch_size": run.batches.batch_size,
        "grad_accum": 1 if full_batch else cfg.grad_accum,
        "global_batch_size": run.batches.global_batch,
        "full_batch": full_batch,
        "optimizer": cfg.optim.name,
        "schedule": cfg.optim.schedule,
        "model": cfg.model.name,
        "model_parameters": sum(p.numel() for p in module.parameters()),
        "data": {
            "name": data.name,
            "train_rows": run.n_train,
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
        "ddp": ddp_summary(run.step_model, cfg.ddp) if ddp else None,
        "precision": hw.precision,
        "precision_reason": hw.precision_reason,
        "compile": hw.compile,
        "compile_reason": hw.compile_reason,
        "threads": hw.threads,
        "threads_reason": hw.threads_reason,
        "channels_last": hw.channels_last,
        "channels_last_reason": hw.channels_last_reason,
        "augment": cfg.augment,
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
