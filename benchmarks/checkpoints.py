"""Checkpoint overhead: save/load time for the default model and a ~100 MB model, and the share of a
default training run spent checkpointing (every epoch, the default interval).

    .venv/bin/python benchmarks/checkpoints.py [--repeats 5]

Writes benchmarks/results/checkpoints-<machine>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import hpcml
from hpcml.models.registry import create_model
from hpcml.training.checkpoint import load_latest, save_checkpoint
from hpcml.training.optim import build_optimizer

RESULTS = Path(__file__).parent / "results"


def _one_step(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.optim.Optimizer:
    opt = build_optimizer(model.parameters(), hpcml.OptimConfig(), device=torch.device("cpu"))
    model(torch.randn(8, *shape)).sum().backward()
    opt.step()  # Adam state exists: the checkpoint holds weights + 2 moments
    return opt


def save_load(name: str, model: torch.nn.Module, shape: tuple[int, ...], repeats: int) -> dict:
    opt = _one_step(model, shape)
    params = sum(p.numel() for p in model.parameters())
    saves, loads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats + 1):  # the first round warms the page cache and allocator; not counted
            t0 = time.perf_counter()
            path = save_checkpoint(tmp, step=i, model=model, optimizer=opt, keep=2)
            t1 = time.perf_counter()
            load_latest(tmp).restore(model, opt)
            t2 = time.perf_counter()
            if i:
                saves.append(t1 - t0)
                loads.append(t2 - t1)
        size = sum(f.stat().st_size for f in path.iterdir())
    return {
        "model": name,
        "parameters": params,
        "weights_mb": params * 4 / 1e6,
        "checkpoint_mb": size / 1e6,
        "save_seconds": statistics.median(saves),
        "load_seconds": statistics.median(loads),
        "save_mb_per_second": size / 1e6 / statistics.median(saves),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    small = create_model("cnn1d", input_shape=(1, 40), num_classes=10)
    big = create_model("mlp", input_shape=(2048,), num_classes=10, hidden=2048, depth=6)
    rows = [
        save_load("cnn1d (default, MNIST-1D)", small, (1, 40), args.repeats),
        save_load("mlp 2048 wide (~100 MB weights)", big, (2048,), args.repeats),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        run = hpcml.train(None, out=Path(tmp) / "run")  # the default run: checkpoint every epoch
    share = run.report["checkpoints"]
    out = {
        "machine": "vm",
        "date": str(date.today()),
        "cpu": run.report["device_name"],
        "torch": torch.__version__,
        "save_load": rows,
        "default_run": {
            "epochs": run.report["epochs"],
            "train_seconds": run.report["train_seconds"],
            "checkpoints_saved": share["saved"],
            "checkpoint_seconds": share["seconds"],
            "share_of_train_time": share["share_of_train_time"],
        },
    }
    stem = RESULTS / f"checkpoints-vm-{date.today()}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    lines = [
        "| model | params | checkpoint | save | load |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['model']} | {r['parameters']:,} | {r['checkpoint_mb']:.1f} MB "
            f"| {r['save_seconds'] * 1e3:.1f} ms | {r['load_seconds'] * 1e3:.1f} ms |"
            for r in rows
        ),
        "",
        f"Default run (`hpcml train`, {out['default_run']['epochs']} epochs, checkpoint every epoch): "
        f"{share['saved']} checkpoints, {share['seconds']:.3f} s of {run.report['train_seconds']:.2f} s "
        f"training = **{share['share_of_train_time']:.1%}**.",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
