"""RunState: where a run is (step, epoch, position in the epoch) and what it has measured so far.

The checkpoint stores it (`to_extra`, JSON) and a resume restores it in one place (`from_point`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hpcml.training.loop import EpochStats


@dataclass
class RunState:
    step: int = 0  # optimizer steps taken, over the whole run
    epoch: int = 0  # the epoch being trained (0-based); after the last one, the number of epochs done
    batch: int = 0  # steps of `epoch` already taken (a mid-epoch resume starts there)
    rows: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl, one row per epoch
    step_seconds: float = 0.0  # training steps only, all epochs
    prior_seconds: float = 0.0  # train_seconds of earlier attempts (a resumed run)
    checkpoint_seconds: float = 0.0  # of earlier attempts; the Checkpointer adds this attempt's
    time_to_target: float | None = None
    restarts: int = 0
    finished: bool = False  # nothing left to train (a finished run that was resumed)
    resumed_from: int | None = None  # the step of the checkpoint this attempt started from
    partial: list[float] | None = None  # sums of a half-done epoch from the checkpoint (all ranks)
    # this attempt only, never checkpointed
    stop: str | None = None  # why a callback asked the loop to stop (target reached, patience)
    stats: EpochStats | None = None  # the running epoch's sums
    t_loop: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Training time of the whole run so far (earlier attempts included), evaluation included."""
        return self.prior_seconds + time.perf_counter() - self.t_loop

    def to_extra(self, *, stats: list[float] | None, done: bool, checkpoint_seconds: float) -> dict[str, Any]:
        """What a checkpoint stores besides the tensors."""
        return {
            "rows": self.rows,
            "stats": stats,
            "train_seconds": self.elapsed(),
            "step_seconds": self.step_seconds,
            "checkpoint_seconds": self.checkpoint_seconds + checkpoint_seconds,
            "time_to_target": self.time_to_target,
            "finished": done,
            "restarts": self.restarts,
        }

    @classmethod
    def from_point(cls, point: Any | None, *, epochs: int) -> RunState:
        """A fresh state, or the state a resume point (training/resume.py) carries."""
        if point is None:
            return cls()
        return cls(
            step=point.step,
            epoch=point.epoch,
            batch=point.batch,
            rows=list(point.rows),
            step_seconds=point.step_seconds,
            prior_seconds=point.train_seconds,
            checkpoint_seconds=point.checkpoint_seconds,
            time_to_target=point.time_to_target,
            restarts=point.restarts + 1,
            finished=point.done(epochs),
            resumed_from=point.step,
            partial=point.stats,
        )
