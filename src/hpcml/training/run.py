"""One training run, start to finish: data -> model -> epochs -> run dir. Drives the loop in loop.py."""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import hpcml
from hpcml.config import TrainConfig, build_config, load_config
from hpcml.data.loader import DeviceBatches
from hpcml.data.preprocess import Normalizer
from hpcml.data.sources import Dataset, load_dataset
from hpcml.models.io import Model, save_model
from hpcml.models.registry import create_model, default_model_for
from hpcml.training import loop
from hpcml.training.optim import build_optimizer, build_schedule
from hpcml.training.precision import autocast, cpu_name, detect
from hpcml.training.report import RunDir, default_run_dir


@dataclass
class Run:
    """The result of `hpcml.train`: where it was written, what it measured, and the trained model."""

    dir: Path
    report: dict[str, Any]
    model: Model
    metrics: list[dict[str, Any]] = field(default_factory=list)


def as_config(cfg: TrainConfig | dict | str | Path | None) -> TrainConfig:
    if cfg is None:
        return TrainConfig()
    if isinstance(cfg, TrainConfig):
        return cfg
    if isinstance(cfg, dict):
        return build_config(cfg)
    return load_config(cfg)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_model_name(cfg: TrainConfig, data: Dataset) -> TrainConfig:
    """Replace `model: auto` by the concrete choice so config.yaml records what ran."""
    if cfg.model.name != "auto":
        return cfg
    model = cfg.model.model_copy(update={"name": default_model_for(data.kind)})
    return cfg.model_copy(update={"model": model})


class _Progress:
    """A rich progress bar on a TTY (epoch, loss, accuracy, samples/s); silent otherwise."""

    def __init__(self, enabled: bool, total_steps: int, epochs: int):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task(f"epoch 1/{epochs}", total=total_steps)

    def step(self, _n: int) -> None:
        self.bar.advance(self.task)

    def epoch(self, row: dict[str, Any], epochs: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=(
                f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  "
                f"test acc {row['test_accuracy']:.4f}  {row['samples_per_second']:,.0f} samples/s"
            ))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def train(
    config: TrainConfig | dict | str | Path | None = None,
    *,
    out: str | Path | None = None,
    quiet: bool = True,
) -> Run:
    """Train a model as `config` says and write the run dir. Returns a `Run`.

    `config` is a TrainConfig, a dict of its fields, or a path to a YAML file. `out` is the run dir
    (default `runs/<timestamp>-<model>-<data>`). `quiet=False` shows a progress bar on a TTY.
    """
    t_wall = time.perf_counter()
    cfg = as_config(config)
    data = load_dataset(cfg.data)
    cfg = resolve_model_name(cfg, data)

    full_batch = cfg.optim.name == "gd"
    n_train = len(data.x_train)
    steps_per_epoch = 1 if full_batch else -(-n_train // min(cfg.batch_size, n_train))
    total_steps = steps_per_epoch * cfg.epochs
    hw = detect(device=cfg.device, precision=cfg.precision, compile=cfg.compile, threads=cfg.threads,
                steps=total_steps)
    torch.set_num_threads(hw.threads)

    normalizer = Normalizer.fit(data.x_train, method=cfg.data.normalize, per_feature=data.kind == "tabular")
    dev = hw.device
    x_train = torch.from_numpy(normalizer(data.x_train)).to(dev)
    y_train = torch.from_numpy(data.y_train).to(dev)
    x_test = torch.from_numpy(normalizer(data.x_test)).to(dev)
    y_test = torch.from_numpy(data.y_test).to(dev)

    seed_everything(cfg.seed)
    module = create_model(cfg.model.name, input_shape=data.input_shape, num_classes=data.num_classes,
                          **cfg.model.kwargs).to(dev)
    step_model: nn.Module = torch.compile(module) if hw.compile else module
    optimizer = build_optimizer(module.parameters(), cfg.optim, device=dev)
    schedule = build_schedule(optimizer, cfg.optim, total_steps=total_steps)
    scaler = torch.amp.GradScaler(dev.type) if hw.precision == "fp16" and dev.type == "cuda" else None
    amp = autocast(hw.precision, dev)
    train_loss = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()
    batches = DeviceBatches(x_train, y_train, batch_size=cfg.batch_size, seed=cfg.seed)

    run_dir = RunDir(Path(out) if out else default_run_dir(cfg, cfg.model.name))
    run_dir.write_config(cfg)
    progress = _Progress(not quiet and sys.stderr.isatty(), total_steps, cfg.epochs)
    rows: list[dict[str, Any]] = []
    steps = 0
    step_seconds = 0.0
    time_to_target = None
    t_loop = time.perf_counter()
    try:
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            stats = loop.EpochStats(dev)
            if full_batch:
                steps += loop.full_batch_step(step_model, x_train, y_train, optimizer=optimizer,
                                              loss_fn=train_loss, autocast=amp, schedule=schedule, stats=stats)
                if progress.bar is not None:
                    progress.step(n_train)
            else:
                steps += loop.train_epoch(
                    step_model, batches.epoch(epoch), optimizer=optimizer, loss_fn=train_loss, autocast=amp,
                    schedule=schedule, scaler=scaler, stats=stats,
                    on_step=progress.step if progress.bar is not None else None,
                )
            tr_loss, tr_acc = stats.read()  # the epoch's one sync; the timestamp below follows it
            epoch_seconds = time.perf_counter() - t0
            step_seconds += epoch_seconds
            te_loss, te_acc = loop.evaluate(step_model, x_test, y_test, batch_size=cfg.eval_batch_size,
                                            autocast=amp, loss_fn=eval_loss).read()
            elapsed = time.perf_counter() - t_loop
            row = {
                "epoch": epoch + 1, "step": steps, "train_loss": tr_loss, "train_accuracy": tr_acc,
                "test_loss": te_loss, "test_accuracy": te_acc, "lr": optimizer.param_groups[0]["lr"],
                "epoch_seconds": epoch_seconds, "elapsed_seconds": elapsed,
                "samples_per_second": n_train / epoch_seconds,
            }
            rows.append(row)
            run_dir.log_epoch(row)
            progress.epoch(row, cfg.epochs)
            if not np.isfinite(tr_loss):
                raise hpcml.HpcmlError(
                    f"training diverged at epoch {epoch + 1} (train loss {tr_loss}); lower optim.lr "
                    f"(now {cfg.optim.lr})"
                )
            if cfg.target_accuracy is not None and te_acc >= cfg.target_accuracy:
                time_to_target = elapsed
                break
        train_seconds = time.perf_counter() - t_loop
    finally:
        progress.close()
        run_dir.close()

    last = rows[-1]
    meta = {
        "architecture": cfg.model.name,
        "kwargs": cfg.model.kwargs,
        "input_shape": list(data.input_shape),
        "num_outputs": data.num_classes,
        "classes": data.classes,
        "task": "classification",
        "preprocessing": normalizer.to_json(),
        "data": {"name": data.name, "source": data.source},
        "hpcml_version": hpcml.__version__,
    }
    model = Model(module, meta)
    save_model(run_dir.path / "model", module, meta)
    run_dir.plot_curves(rows)
    report = {
        "test_accuracy": last["test_accuracy"],
        "test_loss": last["test_loss"],
        "best_test_accuracy": max(r["test_accuracy"] for r in rows),
        "train_accuracy": last["train_accuracy"],
        "train_loss": last["train_loss"],
        "train_seconds": train_seconds,
        "step_seconds": step_seconds,
        "wall_seconds": time.perf_counter() - t_wall,
        "samples_per_second": len(rows) * n_train / step_seconds,
        "epochs": len(rows),
        "steps": steps,
        "target_accuracy": cfg.target_accuracy,
        "time_to_target_seconds": time_to_target,
        "stopped_early": len(rows) < cfg.epochs,
        "world_size": 1,
        "batch_size": n_train if full_batch else batches.batch_size,
        "global_batch_size": n_train if full_batch else batches.batch_size,
        "full_batch": full_batch,
        "optimizer": cfg.optim.name,
        "schedule": cfg.optim.schedule,
        "model": cfg.model.name,
        "model_parameters": sum(p.numel() for p in module.parameters()),
        "data": {"name": data.name, "train_rows": n_train, "test_rows": len(data.x_test),
                 "input_shape": list(data.input_shape), "classes": data.num_classes},
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name(),
        "precision": hw.precision,
        "precision_reason": hw.precision_reason,
        "compile": hw.compile,
        "compile_reason": hw.compile_reason,
        "threads": hw.threads,
        "seed": cfg.seed,
        "hpcml_version": hpcml.__version__,
        "torch_version": torch.__version__,
    }
    run_dir.write_report(report)
    return Run(dir=run_dir.path, report=report, model=model, metrics=rows)
