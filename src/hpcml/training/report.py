"""The run dir: config.yaml, metrics.jsonl (one object per epoch), report.json, curves.png."""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from hpcml.config import TrainConfig, dump_config


def default_run_dir(cfg: TrainConfig, model_name: str) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    data = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.data.name.rstrip("/").rsplit("/", 1)[-1]) or "data"
    return Path("runs") / f"{stamp}-{model_name}-{data}"


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "w")

    def write_config(self, cfg: TrainConfig) -> None:
        (self.path / "config.yaml").write_text(dump_config(cfg))

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
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
