"""The contenders hpcml is measured against: the loops people write by hand.

- `plain`: the idiomatic PyTorch loop: TensorDataset + DataLoader(shuffle=True), Adam, CrossEntropyLoss,
  `zero_grad(); loss.backward(); step()`, test accuracy after every epoch.
- `plain tuned`: the same loop with a recipe someone can tune in an afternoon (TUNED): five 3-wide
  convolutions with BatchNorm and GELU, two max-pools, 32 channels (~16k parameters), AdamW 3e-3 with
  OneCycle over 600 steps (15 epochs of 40 batches of 100). It reaches 98.5%+ on MNIST-1D, where the
  paper's CNN plateaus near 94-96%. Its net is written here as a user writes it (`plain_convnet1d`:
  nn.Sequential of nn.Conv1d, nn.BatchNorm1d, nn.GELU, nn.MaxPool1d), not taken from hpcml: it is
  the same function as hpcml's `convnet1d`, with the same initial weights after the same seed
  (tests/bench/test_baselines.py), so hpcml's faster layers (models/cnn.py PairMaxPool1d) are
  measured, not shared.
- `lightning`: the same model, data loaders and optimizer in a LightningModule, run by
  `Trainer.fit` with its defaults (progress bar, logger and checkpoints off: they would only cost it
  time), stopped at the target by `EarlyStopping(stopping_threshold=...)`. Skipped, with the reason,
  when neither `lightning` nor `pytorch_lightning` is installed (`pip install 'hpcml[compare]'`).

Both take identical arrays and identically initialised models (`create_model` after the same seed),
and the same thread count. On the CPU every op is synchronous, so `perf_counter` needs no sync; on a
GPU the timestamps are synchronized (`timers.now`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from hpcml.bench.timers import now
from hpcml.models.registry import create_model

BATCH = 100
LR = 1e-2
TUNED = {"model": "plain convnet1d", "optimizer": "adamw", "lr": 3e-3, "onecycle": True, "epochs": 15}


def plain_convnet1d(input_shape: tuple[int, ...], classes: int, channels: int = 32) -> nn.Module:
    """The tuned contender's net, in plain torch layers: five 3-wide convolutions with BatchNorm and
    GELU, max-pooled twice, and a linear head. `input_shape`: (C, L), or (L,) for one channel."""
    c_in, length = (1, input_shape[0]) if len(input_shape) == 1 else input_shape
    first = [nn.Unflatten(1, (1, length))] if len(input_shape) == 1 else []

    def block(c_in: int) -> list[nn.Module]:
        return [nn.Conv1d(c_in, channels, 3, padding=1, bias=False), nn.BatchNorm1d(channels), nn.GELU()]

    return nn.Sequential(
        *first,
        *block(c_in), *block(channels), nn.MaxPool1d(2),
        *block(channels), *block(channels), nn.MaxPool1d(2),
        *block(channels), nn.Flatten(),
        nn.Linear(channels * (length // 4), classes),
    )  # fmt: skip


def lightning() -> tuple[Any, str | None]:
    """(the lightning.pytorch module, None) or (None, why it is missing)."""
    try:
        import lightning.pytorch as pl

        return pl, None
    except ImportError:
        pass
    try:
        import pytorch_lightning as pl

        return pl, None
    except ImportError:
        return None, "Lightning is not installed (pip install 'hpcml[compare]')"


def run_tuned(
    data: tuple[torch.Tensor, ...], *, seed: int, threads: int, device: str = "cpu", warmup: bool = False
):
    """The hand-tuned plain loop (TUNED), run to its end: time to each target comes from its curve."""
    kw = {k: v for k, v in TUNED.items() if k not in ("model", "epochs")}
    epochs = 1 if warmup else TUNED["epochs"]
    return run_plain(
        TUNED["model"], data, seed=seed, epochs=epochs, threads=threads, target=None, device=device, **kw
    )


def run_plain(
    model_name: str,
    data: tuple[torch.Tensor, ...],
    *,
    seed: int,
    epochs: int,
    threads: int,
    target: float | None,
    batch_size: int = BATCH,
    device: str = "cpu",
    optimizer: str = "adam",
    lr: float = LR,
    onecycle: bool = False,
) -> dict[str, Any]:
    """Train with the plain loop. Time to target counts the loop from its start to the end of the
    epoch whose test evaluation reached the target (evaluation included, as for hpcml)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    x_tr, y_tr, x_te, y_te = (t.to(dev) for t in data)
    torch.manual_seed(seed)
    if model_name == "plain convnet1d":
        model = plain_convnet1d(tuple(x_tr.shape[1:]), 10).to(dev)
    else:
        model = create_model(model_name, input_shape=tuple(x_tr.shape[1:]), num_outputs=10).to(dev)
    opt_cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True)
    sched = (
        torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(loader))
        if onecycle
        else None
    )
    step_seconds, time_to_target, acc = 0.0, None, 0.0
    curve: list[list[float]] = []
    t_loop = now(dev)
    for _ in range(epochs):
        t0 = now(dev)
        model.train()
        for xb, yb in loader:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
            if sched is not None:
                sched.step()
        step_seconds += now(dev) - t0
        model.eval()
        with torch.no_grad():
            acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        elapsed = now(dev) - t_loop
        curve.append([elapsed, acc])
        if target is not None and acc >= target:
            time_to_target = elapsed
            break
    return {
        "time_to_target": time_to_target,
        "epochs": len(curve),
        "test_accuracy": acc,
        "samples_per_second": len(curve) * len(x_tr) / step_seconds,
        "train_seconds": curve[-1][0],
        "threads": torch.get_num_threads(),
        "curve": curve,
    }


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning logs its setup (GPU available: False, ...) and warns about DataLoader workers."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "pytorch_lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def run_lightning(
    model_name: str,
    data: tuple[torch.Tensor, ...],
    *,
    seed: int,
    epochs: int,
    threads: int,
    target: float | None,
    batch_size: int = BATCH,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train with Lightning's Trainer. With no target, validation is off and only training epochs
    are timed (the throughput case); with a target, validation runs every epoch and stops the fit."""
    pl, why = lightning()
    if pl is None:
        raise RuntimeError(why)
    dev = torch.device(device)
    torch.set_num_threads(threads)
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    net = create_model(model_name, input_shape=tuple(x_tr.shape[1:]), num_outputs=10)

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, _idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, _idx):
            x, y = batch
            self.log("val_acc", (self.net(x).argmax(1) == y).float().mean(), prog_bar=False)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=LR)

    class Clock(pl.Callback):
        def __init__(self):
            self.curve: list[list[float]] = []
            self.step_seconds = 0.0
            self.epochs = 0

        def on_train_start(self, trainer, module):
            self.t_loop = now(dev)

        def on_train_epoch_start(self, trainer, module):
            self.t0 = now(dev)

        def on_train_epoch_end(self, trainer, module):
            self.step_seconds += now(dev) - self.t0
            self.epochs += 1

        def on_validation_epoch_end(self, trainer, module):
            acc = float(trainer.callback_metrics["val_acc"])
            self.curve.append([now(dev) - self.t_loop, acc])

    clock = Clock()
    callbacks: list = [clock]
    if target is not None:
        callbacks.append(
            pl.callbacks.EarlyStopping(
                monitor="val_acc", mode="max", stopping_threshold=target, patience=epochs
            )
        )
    train_loader = DataLoader(TensorDataset(x_tr, y_tr), batch_size=batch_size, shuffle=True)
    val_loader = DataLoader(TensorDataset(x_te, y_te), batch_size=1000)
    with _quiet_lightning():
        trainer = pl.Trainer(
            accelerator="gpu" if dev.type == "cuda" else "cpu",
            devices=1,
            max_epochs=epochs,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=1.0 if target is not None else 0,
        )
        trainer.fit(Classifier(), train_loader, val_loader if target is not None else None)
    hit = [t for t, acc in clock.curve if target is not None and acc >= target]
    return {
        "time_to_target": hit[0] if hit else None,
        "epochs": clock.epochs,
        "test_accuracy": clock.curve[-1][1] if clock.curve else None,
        "samples_per_second": clock.epochs * len(x_tr) / clock.step_seconds,
        "train_seconds": now(dev) - clock.t_loop,
        "threads": torch.get_num_threads(),
        "curve": clock.curve,
    }
