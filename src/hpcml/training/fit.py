"""fit(components, state, callbacks): the epoch loop. Steps (loop.py), evaluation, one metrics row
per epoch, and the callbacks around them; nothing else."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from hpcml.errors import HpcmlError
from hpcml.training import loop
from hpcml.training.build import Components
from hpcml.training.callbacks import Callback
from hpcml.training.state import RunState


def fit(run: Components, state: RunState, callbacks: Sequence[Callback] = ()) -> RunState:
    """Train `run` from `state` to `run.cfg.epochs` (or until a callback sets state.stop)."""
    state.t_loop = time.perf_counter()
    try:
        for cb in callbacks:
            cb.on_train_start(run, state)
        while not state.finished and state.epoch < run.cfg.epochs and state.stop is None:
            row = _epoch(run, state, callbacks)
            state.rows.append(row)
            for cb in callbacks:
                cb.on_epoch_end(run, state, row)
            if not np.isfinite(row["train_loss"]):  # identical on every rank: the values were all-reduced
                raise HpcmlError(
                    f"training diverged at epoch {row['epoch']} (train loss {row['train_loss']}); lower "
                    f"optim.lr (now {run.cfg.optim.lr})"
                )
            state.epoch, state.batch = state.epoch + 1, 0
        for cb in callbacks:
            cb.on_train_end(run, state)
    finally:
        for cb in callbacks:
            cb.close()
    return state


def _epoch(run: Components, state: RunState, callbacks: Sequence[Callback]) -> dict[str, Any]:
    start = state.batch
    stats = state.stats = loop.EpochStats(run.hw.device, y_scale=run.y_scale)
    if start and state.partial is not None and run.dist.is_main:
        stats.load(state.partial)  # the half-done epoch's sums, over all ranks, added once
    side = [0.0]  # seconds spent in callbacks during the epoch's steps (checkpoints): not training

    def on_step(n: int, micro) -> None:
        t = time.perf_counter()
        state.step, state.batch = state.step + 1, start + n
        for cb in callbacks:
            cb.on_step_end(run, state, micro)
        side[0] += time.perf_counter() - t

    t0 = time.perf_counter()
    loop.train_epoch(
        run.step_model,
        run.batches.epoch(state.epoch, start=start),
        optimizer=run.optimizer,
        loss_fn=run.train_loss,
        autocast=run.amp,
        schedule=run.schedule,
        scaler=run.scaler,
        stats=stats,
        on_step=on_step,
    )
    tr_loss, tr_acc = stats.read(run.reduce)  # the epoch's one sync; the timestamp below follows it
    epoch_seconds = time.perf_counter() - t0 - side[0]
    state.step_seconds += epoch_seconds
    metric = run.metric
    te_loss, te_acc = score(run, run.test)
    row = {
        "epoch": state.epoch + 1,
        "step": state.step,
        "train_loss": tr_loss,
        f"train_{metric}": tr_acc,
        "test_loss": te_loss,
        f"test_{metric}": te_acc,
        "lr": run.optimizer.param_groups[0]["lr"],
        "epoch_seconds": epoch_seconds,
        "elapsed_seconds": state.elapsed(),
        "samples_per_second": run.n_train
        * (run.steps_per_epoch - start)
        / run.steps_per_epoch
        / epoch_seconds,
    }
    if run.regression:
        row["test_rmse"] = float(np.sqrt(te_loss))
    if run.val is not None:
        row["val_loss"], row[f"val_{metric}"] = score(run, run.val)
    state.partial = None
    return row


def score(run: Components, split) -> tuple[float, float]:
    """(loss, accuracy | R²) over an EvalSplit, summed over ranks."""
    stats = loop.EpochStats(run.hw.device, y_scale=run.y_scale)
    for x, y in split.chunks():
        loop.evaluate(
            run.step_model, x, y, batch_size=run.cfg.eval_batch_size, autocast=run.amp, loss_fn=run.eval_loss,
            stats=stats,
        )  # fmt: skip
    return stats.read(run.reduce)
