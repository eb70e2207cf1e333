"""Callbacks the tests inject into real runs: failures, sample traces, sweep-job faults.

They reach CLI subprocesses, DDP ranks and sweep workers the way a user's callbacks do: as specs in
the config (`callbacks: [{spec: hpcml_testkit:FailAt, kwargs: {...}}]`). tests/conftest.py puts this
folder on PYTHONPATH so every process of a test run can import them. Production code knows nothing
of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

from hpcml.training.callbacks import Callback


def spec(name: str, **kwargs: Any) -> dict[str, Any]:
    """A config entry for one of these callbacks."""
    return {"spec": f"hpcml_testkit:{name}", "kwargs": kwargs}


def _first_attempt(state) -> bool:
    # a resumed run (or an elastic restart) gets through: the failure happens on the first try only
    return state.resumed_from is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0


class FailAt(Callback):
    """Raise (or SIGKILL the process) on `rank` once `step` optimizer steps are done, i.e. just before
    global step `step` (0-based) would run. First attempt only."""

    def __init__(self, rank: int, step: int, mode: str = "raise"):
        self.rank, self.step, self.mode = rank, step, mode

    def on_step_end(self, run, state, micro) -> None:
        if run.dist.rank == self.rank and state.step == self.step and _first_attempt(state):
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {self.step}")


class TraceSamples(Callback):
    """Append the sample ids of every completed step to `path` (JSON lines: rank, step, samples)."""

    def __init__(self, path: str):
        self.path = path
        self.file = None

    def on_step_end(self, run, state, micro) -> None:
        if self.file is None:
            self.file = open(self.path, "a")  # noqa: SIM115 - closed in close()
        ids = [int(i) for mb in micro if mb.index is not None for i in mb.index]
        self.file.write(json.dumps({"rank": run.dist.rank, "step": state.step - 1, "samples": ids}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class JobFault(Callback):
    """For sweep jobs whose config has every `match` value (dotted keys): `kill-first` SIGKILLs the
    first attempt (a marker in `marker_dir` remembers it), `kill-always` every attempt, `fail-always`
    raises."""

    def __init__(self, match: dict[str, Any], action: str, marker_dir: str):
        self.match, self.action, self.marker_dir = match, action, Path(marker_dir)

    def on_train_start(self, run, state) -> None:
        values = run.cfg.model_dump(mode="json")
        for key, want in self.match.items():
            node: Any = values
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node != want:
                return
        marker = self.marker_dir / hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()
        if self.action == "kill-always" or (self.action == "kill-first" and not marker.exists()):
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "fail-always":
            raise RuntimeError("injected job failure")


class RecordPlacement(Callback):
    """Append where each rank trains to `path` (JSON lines: rank, attempt, Ray node id, pid)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, run, state) -> None:
        import ray

        row = {
            "rank": run.dist.rank,
            "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
