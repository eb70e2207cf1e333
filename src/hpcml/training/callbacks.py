"""Callbacks: what watches and steers a run from the side of the loop (fit.py).

Every callback runs on every rank, in order: built-ins first (checkpoints, run-dir writer, progress,
stop rules), then the user's. A callback that needs rank 0 only checks `run.dist.is_main` itself.
Stop rules set `state.stop` to a reason; the loop ends after the current epoch.

A callback may be given as an object (`hpcml.train(cfg, callbacks=[...])`, this process only) or as a
spec in the config (`callbacks: [{spec: module:Class, kwargs: {...}}]`), which reaches every rank of a
data-parallel job and every job of a sweep.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from hpcml.errors import UsageError

if TYPE_CHECKING:
    from hpcml.data.loader import Micro
    from hpcml.training.build import Components
    from hpcml.training.state import RunState

__all__ = ["Callback", "Progress", "TargetAccuracy", "EarlyStopping", "from_specs"]


class Callback:
    """Override what you need; every hook gets the run's Components and its RunState."""

    def on_train_start(self, run: Components, state: RunState) -> None: ...

    def on_step_end(self, run: Components, state: RunState, micro: list[Micro]) -> None:
        """After each optimizer step (state.step and state.batch already count it). `micro` holds the
        step's micro-batches (x, y, weight, count, index)."""

    def on_epoch_end(self, run: Components, state: RunState, row: dict[str, Any]) -> None:
        """After each epoch's evaluation; `row` is the epoch's metrics.jsonl row."""

    def on_checkpoint(self, run: Components, state: RunState, step: int) -> None:
        """After a checkpoint was written at `step` (rank 0 writes, every rank is told)."""

    def on_train_end(self, run: Components, state: RunState) -> None:
        """After the last epoch (or a stop rule), also when resuming a finished run."""

    def close(self) -> None:
        """Always called at the end, also after a failure: release what the callback holds."""


class Progress(Callback):
    """A rich progress bar on a TTY (epoch, loss, accuracy, samples/s), rank 0 only."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def on_train_start(self, run, state) -> None:
        if not (self.enabled and run.dist.is_main and sys.stderr.isatty()):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        self.bar = Bar(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.description}"), transient=False,
        )  # fmt: skip
        self.bar.start()
        total = run.steps_per_epoch * run.cfg.epochs
        self.task = self.bar.add_task(
            f"epoch {state.epoch + 1}/{run.cfg.epochs}", total=total, completed=state.step
        )

    def on_step_end(self, run, state, micro) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def on_epoch_end(self, run, state, row) -> None:
        if self.bar is None:
            return
        score = (
            f"test acc {row['test_accuracy']:.4f}"
            if "test_accuracy" in row
            else f"test R2 {row['test_r2']:.4f}"
        )
        self.bar.update(
            self.task,
            description=f"epoch {row['epoch']}/{run.cfg.epochs}  loss {row['train_loss']:.4f}  {score}  "
            f"{row['samples_per_second']:,.0f} samples/s",
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class TargetAccuracy(Callback):
    """`target_accuracy`: stop once test accuracy reaches it, recording the time it took."""

    def __init__(self, target: float):
        self.target = target

    def on_epoch_end(self, run, state, row) -> None:
        if row["test_accuracy"] >= self.target:
            state.time_to_target = row["elapsed_seconds"]
            state.stop = f"test accuracy {row['test_accuracy']:.4f} reached the target {self.target}"


class EarlyStopping(Callback):
    """`patience`: stop after N epochs in which the validation metric did not improve on its best."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, run, state, row) -> None:
        key = f"val_{run.metric}"
        history = [r[key] for r in state.rows]  # the resumed epochs count too: the rule is the run's
        best = max(range(len(history)), key=history.__getitem__)
        if len(history) - 1 - best >= self.patience:
            state.stop = (
                f"{key} has not improved for {self.patience} epoch(s) "
                f"(best {history[best]:.4f} at epoch {best + 1})"
            )


def from_specs(specs: list[Any]) -> list[Callback]:
    """Build the config's callbacks (`module:Class` + kwargs). The config names this code: its author
    chose to run it, as with a model spec given to `hpcml train`."""
    out = []
    for spec in specs:
        module, _, attr = spec.spec.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except ImportError as err:
            raise UsageError(f"callback {spec.spec}: cannot import {module} ({err})") from None
        except AttributeError:
            raise UsageError(f"callback {spec.spec}: {module} has no {attr}") from None
        try:
            out.append(obj(**spec.kwargs))
        except TypeError as err:
            raise UsageError(f"callback {spec.spec}: {err}") from None
    return out
