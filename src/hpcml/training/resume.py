"""When a run checkpoints, and how it picks up again: the policy around checkpoint.py's format.

A checkpoint records where the *next* step starts (epoch, batch inside the epoch) and the global step.
The data order is a pure function of (seed, epoch) (data/loader.py), so resuming at (epoch, batch)
replays exactly the steps the uninterrupted run would have taken, and the restored RNG, optimizer and
schedule states make those steps compute the same numbers: the final weights are `torch.equal`.

Besides the tensors, a checkpoint carries (as JSON `extra`) what the run dir needs to continue as if
nothing happened: the metrics rows so far, the time spent, the partial sums of a half-done epoch
(all-reduced over ranks, so rank 0 alone restores them), and the layout (world size, global batch),
which must match on resume: a different layout would change the data order.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hpcml.config import CheckpointConfig, TrainConfig
from hpcml.errors import HpcmlError, UsageError
from hpcml.training.callbacks import Callback
from hpcml.training.checkpoint import (
    Checkpoint,
    CheckpointWarning,
    find_checkpoints,
    load_latest,
    save_checkpoint,
)

__all__ = ["Checkpointer", "Checkpoints", "ResumePoint", "find_resume_point"]


@dataclass
class ResumePoint:
    """Where a resumed run starts and what it carries over."""

    checkpoint: Checkpoint
    step: int
    epoch: int
    batch: int
    rows: list[dict[str, Any]]
    stats: list[float] | None  # [loss sum, correct, count] of the half-done epoch, over all ranks
    train_seconds: float
    step_seconds: float
    checkpoint_seconds: float
    time_to_target: float | None
    finished: bool
    restarts: int = field(default=0)
    planned_epochs: int | None = None  # the epochs of the config it was trained with

    def done(self, epochs: int) -> bool:
        """Whether nothing is left to train: a finished run, unless it is extended to more epochs."""
        return self.finished and (self.planned_epochs is None or epochs <= self.planned_epochs)


# Fields that change nothing the run computes: they may differ between a checkpoint and its resume.
_FREE_TO_CHANGE = ("checkpoint.", "threads", "eval_batch_size", "callbacks")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "kwargs":
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_config_unchanged(saved: dict[str, Any] | None, now: dict[str, Any], *, where: Path) -> None:
    """Refuse to resume with a config that differs from the one the checkpoint was trained with.

    The one documented extension: more `epochs` with `optim.schedule: constant` (the added epochs
    run at the same lr). A cosine or onecycle schedule is fixed to the step count the run started
    with: stretching it mid-run would raise the lr again, so extending those is refused.
    """
    if saved is None:  # a checkpoint from before hpcml recorded its config: nothing to compare
        return
    a, b = _flat(saved), _flat(now)
    # a field added to the config after the checkpoint was written counts as unchanged at its default
    defaults = _flat(TrainConfig().model_dump(mode="json"))
    a.update({k: defaults[k] for k in b.keys() - a.keys() if k in defaults})
    changed = [
        k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k) and not k.startswith(_FREE_TO_CHANGE)
    ]
    extension = changed == ["epochs"] and b["epochs"] > a["epochs"] and b.get("optim.schedule") == "constant"
    if not changed or extension:
        return
    diff = ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in changed)
    hint = ""
    if "epochs" in changed and b.get("optim.schedule") != "constant":
        hint = (
            f" More epochs extend only a constant-schedule run: the {b.get('optim.schedule')} schedule was "
            "fixed to the original number of steps, and stretching it would raise the lr again."
        )
    raise UsageError(
        f"{where}: config.yaml differs from the config this run was trained with ({diff}); a resumed run "
        f"continues the same computation, so it refuses the change.{hint} Undo the edit, or start a new "
        "run: hpcml train --config RUN/config.yaml --out NEW_DIR"
    )


def find_resume_point(
    root: Path, *, key: bytes | None, required: bool, layout: dict[str, int], config: dict[str, Any]
) -> ResumePoint | None:
    """The newest valid checkpoint under `root` as a ResumePoint; None when there is none and
    `required` is False. Checkpoints that fail verification are skipped with a warning (load_latest).
    `config` (the run's config, as JSON) must match the checkpoint's (check_config_unchanged)."""
    ckpt = load_latest(root, key=key)
    if ckpt is None:
        if required:
            raise UsageError(f"{root}: no checkpoint to resume from (was the run started with checkpoints?)")
        return None
    extra = ckpt.extra
    saved = extra.get("layout", {})
    if saved != layout:
        diff = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in layout.items() if saved.get(k) != v)
        raise UsageError(
            f"{ckpt.path}: written by a run with a different layout ({diff}); resume with the same "
            "--nproc/--nnodes and batch settings, so the data order stays the same"
        )
    check_config_unchanged(extra.get("config"), config, where=root.parent / "config.yaml")
    return ResumePoint(
        checkpoint=ckpt,
        step=ckpt.step,
        epoch=ckpt.epoch,
        batch=ckpt.batch,
        rows=list(extra.get("rows", [])),
        stats=extra.get("stats"),
        train_seconds=float(extra.get("train_seconds", 0.0)),
        step_seconds=float(extra.get("step_seconds", 0.0)),
        checkpoint_seconds=float(extra.get("checkpoint_seconds", 0.0)),
        time_to_target=extra.get("time_to_target"),
        finished=bool(extra.get("finished", False)),
        restarts=int(extra.get("restarts", 0)),
        planned_epochs=(extra.get("config") or {}).get("epochs"),
    )


def refuse_existing(root: Path) -> None:
    """A fresh run must not adopt (and later prune) another run's checkpoints."""
    if find_checkpoints(root):
        run_dir = root.parent
        raise UsageError(
            f"{run_dir} already has checkpoints; continue it with `hpcml train --resume {run_dir}` "
            "or train into a new --out"
        )


class Checkpointer:
    """Decides when to save and writes the checkpoint (rank 0); times every save for the report."""

    def __init__(
        self,
        root: Path,
        cfg: CheckpointConfig,
        *,
        steps_per_epoch: int,
        main: bool,
        key: bytes | None,
        layout: dict[str, int],
    ):
        self.root, self.cfg, self.main, self.key, self.layout = root, cfg, main, key, layout
        self.steps_per_epoch = steps_per_epoch
        self.interval = cfg.interval()
        self.seconds = 0.0  # total time spent saving, this process
        self.saves = 0
        self.failures: list[str] = []
        self.last_step: int | None = None

    def due_mid_epoch(self, step: int, batch: int) -> bool:
        """After global step `step`, with `batch` steps of the epoch done (the end of an epoch is
        handled by due_epoch_end, after the epoch's evaluation)."""
        return (
            self.interval is not None
            and self.interval[1] == "step"
            and step % self.interval[0] == 0
            and batch < self.steps_per_epoch
        )

    def due_epoch_end(self, step: int, epochs_done: int) -> bool:
        if self.interval is None:
            return False
        n, unit = self.interval
        return epochs_done % n == 0 if unit == "epoch" else step % n == 0

    def save(
        self,
        *,
        step: int,
        epoch: int,
        batch: int,
        module: torch.nn.Module,
        optimizer: Any,
        schedule: Any,
        scaler: Any,
        extra: dict[str, Any],
    ) -> None:
        """Write a checkpoint on rank 0. On an I/O failure the previous checkpoints stay intact; the
        policy `on_error` then stops the run (HpcmlError) or warns and goes on."""
        self.last_step = step
        if not self.main:
            return
        t0 = time.perf_counter()
        try:
            save_checkpoint(
                self.root,
                step=step,
                model=module,
                optimizer=optimizer,
                scheduler=schedule,
                scaler=scaler,
                epoch=epoch,
                batch=batch,
                extra={**extra, "layout": self.layout},
                keep=self.cfg.keep,
                key=self.key,
            )
            self.saves += 1
        except HpcmlError as err:
            if self.cfg.on_error == "stop":
                raise HpcmlError(
                    f"checkpoint at step {step} failed, so the run stops (checkpoint.on_error=stop); "
                    f"the previous checkpoints are intact: {err}"
                ) from None
            self.failures.append(f"step {step}: {err}")
            warnings.warn(
                f"checkpoint at step {step} failed; training goes on (checkpoint.on_error=continue): {err}",
                CheckpointWarning,
                stacklevel=2,
            )
        finally:
            self.seconds += time.perf_counter() - t0


class Checkpoints(Callback):
    """The checkpoint policy as a callback: mid-epoch saves every N steps (with the half-done epoch's
    sums, reduced over ranks: every rank takes part), epoch-end saves, and the final save, marked
    finished. Rank 0 writes; a resumed finished run is not saved again."""

    def __init__(self, ckpt: Checkpointer, *, key: bytes | None):
        self.ckpt, self.key = ckpt, key

    def _save(self, run, state, *, epoch: int, batch: int, stats: list[float] | None, done: bool) -> None:
        extra = state.to_extra(stats=stats, done=done, checkpoint_seconds=self.ckpt.seconds)
        extra["config"] = run.cfg.model_dump(mode="json")  # a resume refuses an edited config.yaml
        self.ckpt.save(
            step=state.step, epoch=epoch, batch=batch, module=run.module, optimizer=run.optimizer,
            schedule=run.schedule, scaler=run.scaler, extra=extra,
        )  # fmt: skip

    def on_step_end(self, run, state, micro) -> None:
        if self.ckpt.due_mid_epoch(state.step, state.batch):
            totals = state.stats.totals(run.reduce)  # a sync, on every rank: the sums over all ranks
            self._save(run, state, epoch=state.epoch, batch=state.batch, stats=totals, done=False)

    def on_epoch_end(self, run, state, row) -> None:
        done = state.epoch + 1
        if state.stop is None and done < run.cfg.epochs and self.ckpt.due_epoch_end(state.step, done):
            self._save(run, state, epoch=done, batch=0, stats=None, done=False)

    def on_train_end(self, run, state) -> None:
        if not state.finished:  # the final checkpoint: resuming it only rewrites the report
            self._save(run, state, epoch=len(state.rows), batch=0, stats=None, done=True)
