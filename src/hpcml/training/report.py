"""The run dir: config.yaml, metrics.jsonl (one object per epoch), report.json, curves.png."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from hpcml._files import atomic_write, save_figure
from hpcml.config import TrainConfig, dump_config
from hpcml.errors import UsageError


def default_run_dir(cfg: TrainConfig, model_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    data = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.data.name.rstrip("/").rsplit("/", 1)[-1]) or "data"
    return Path("runs") / f"{stamp}-{model_name}-{data}"


def write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


def check_out_dir(path: Path) -> Path:
    """Refuse an --out that cannot become a run dir before any data is loaded (exit 2)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path}: exists and is not a folder; choose another --out")
    parent = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: {parent} is not writable by this user; choose another --out")
    return path


class RunDirLock:
    """One process writes a run dir at a time: an exclusive `flock` on `<run dir>/.lock`.

    The OS releases the lock when its holder exits, however it exits, so a killed run never blocks a
    later `--resume`. The holder's pid is written into the file for the message of the one refused.
    """

    def __init__(self, path: Path):
        self.path = check_out_dir(path)
        self.created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / ".lock"
        self._fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise UsageError(
                f"run dir {self.path} in use by pid {holder} (another hpcml run writes it); wait for it "
                "to end or choose another --out"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = -1

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None and self.created and [p.name for p in self.path.iterdir()] == [".lock"]:
            (self.path / ".lock").unlink()  # a run that failed before writing anything leaves no dir
            self.path.rmdir()
        self.release()


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "w")

    def write_config(self, cfg: TrainConfig) -> None:
        atomic_write(self.path / "config.yaml", dump_config(cfg))

    def log_epoch(self, row: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()

    def write_report(self, report: dict[str, Any]) -> None:
        write_json_atomic(self.path / "report.json", report)

    def close(self) -> None:
        self._metrics.close()

    def plot_curves(self, rows: list[dict[str, Any]]) -> Path | None:
        return plot_curves(rows, self.path / "curves.png")


def plot_curves(rows: list[dict[str, Any]], out: Path) -> Path | None:
    """Train/(val)/test loss and accuracy (R² for regression) per epoch, side by side."""
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    metric = "accuracy" if "test_accuracy" in rows[0] else "r2"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", ":"), ("test", "--")):
        if f"{split}_loss" not in rows[0]:
            continue
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in rows], style, marker=".", label=split)
        ax_acc.plot(epochs, [r[f"{split}_{metric}"] for r in rows], style, marker=".", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss" if metric == "accuracy" else "MSE", title="loss")
    ax_acc.set(xlabel="epoch", ylabel=metric, title=metric if metric == "accuracy" else "R²")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, out)
