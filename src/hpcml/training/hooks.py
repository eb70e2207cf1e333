"""What watches a training run from the side: the progress bar, and the tests' fault/trace hooks.

The test hooks read environment variables on purpose: they must reach a rank started by the elastic
launcher or a `hpcml train` subprocess without any flag a user could set by accident.
  HPCML_TEST_FAIL_AT=RANK:STEP[:kill]  raise (or SIGKILL the process) just before that global step
  HPCML_TEST_TRACE=FILE                append the sample ids of every completed step (JSON lines)
"""

from __future__ import annotations

import json
import os
from typing import Any


class Progress:
    """A rich progress bar on a TTY (epoch, loss, accuracy, samples/s); silent otherwise."""

    def __init__(self, enabled: bool, total_steps: int, epochs: int):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task(f"epoch 1/{epochs}", total=total_steps)

    def step(self, _n: int) -> None:
        self.bar.advance(self.task)

    def epoch(self, row: dict[str, Any], epochs: int) -> None:
        if self.bar is not None:
            score = (
                f"test acc {row['test_accuracy']:.4f}"
                if "test_accuracy" in row
                else f"test R2 {row['test_r2']:.4f}"
            )
            self.bar.update(
                self.task,
                description=f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  {score}  "
                f"{row['samples_per_second']:,.0f} samples/s",
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def fail_hook() -> tuple[int, int, str] | None:
    """The failure-injection hook of the tests, "RANK:STEP[:kill]" in HPCML_TEST_FAIL_AT: raise (or
    SIGKILL the process) just before that global step on that rank. Only on a job's first attempt,
    so an elastic restart gets through."""
    raw = os.environ.get("HPCML_TEST_FAIL_AT")
    if not raw or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return None
    rank, step, *mode = raw.split(":")
    return int(rank), int(step), (mode[0] if mode else "raise")


class Trace:
    """Test hook HPCML_TEST_TRACE=FILE: append the sample ids of every completed step (JSON lines)."""

    def __init__(self, rank: int):
        path = os.environ.get("HPCML_TEST_TRACE")
        self.file = open(path, "a") if path else None  # noqa: SIM115 - closed in close()
        self.rank, self.micro = rank, None

    def wrap(self, steps):
        for micro in steps:
            self.micro = micro
            yield micro

    def done(self, step: int) -> None:
        if self.file is not None and self.micro is not None:
            ids = [int(i) for mb in self.micro if mb.index is not None for i in mb.index]
            self.file.write(json.dumps({"rank": self.rank, "step": step, "samples": ids}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
