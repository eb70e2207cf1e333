"""Gradient compression on the bench's data-parallel case: the loss curve of 2 ranks with the fp32
all-reduce (none, the default) beside bf16 and fp16 compression, epoch by epoch, same seed.

    PYTHONPATH=src python benchmarks/ddp_compression.py [--epochs 10] [--out benchmarks/results]

Config: `hpcml.bench.cases_parallel.scaling_config` (synthetic, 256 features, 10 classes, MLP
256-1024-1024-10, SGD lr 0.01, batch 512 per rank, precision auto). Speed is measured by
`hpcml bench --cases scaling` (bench/comm.py), not here; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import hpcml
from hpcml.bench.cases_parallel import scaling_config

MODES = ("none", "bf16", "fp16")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    load = [os.getloadavg()[0]]
    curves, reports = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            cfg = {**scaling_config(args.rows, args.epochs, 1), "ddp": {"grad_compression": mode}}
            run = hpcml.train(cfg, out=Path(tmp) / mode, nproc=2, quiet=True)
            curves[mode] = [
                {k: m[k] for k in ("epoch", "train_loss", "test_loss", "test_accuracy")} for m in run.metrics
            ]
            reports[mode] = {
                k: run.report[k] for k in ("ddp", "precision", "test_accuracy", "samples_per_second")
            }
            load.append(os.getloadavg()[0])
            print(mode, [f"{r['train_loss']:.5f}" for r in curves[mode]], flush=True)
    diffs = {
        mode: max(
            abs(a[k] - b[k]) / abs(b[k])
            for a, b in zip(curves[mode], curves["none"], strict=True)
            for k in ("train_loss", "test_loss")
        )
        for mode in MODES[1:]
    }
    result = {
        "config": scaling_config(args.rows, args.epochs, 1),
        "world_size": 2,
        "curves": curves,
        "reports": reports,
        "max_relative_loss_difference_vs_none": diffs,
        "loadavg": load,
        "host": platform.node(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    stem = f"ddp-compression-vm-{datetime.now(UTC).date().isoformat()}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# DDP gradient compression: loss curves, 2 gloo ranks",
        "",
        f"Config: the bench's data-parallel case ({args.rows} rows, MLP 256-1024-1024-10, SGD, batch 512 per "
        f"rank, precision {reports['none']['precision']}), {args.epochs} epochs, seed 0. Load average "
        f"{min(load):.1f}-{max(load):.1f} (a shared machine: timings are provisional; losses are not).",
        "",
        "| epoch | " + " | ".join(f"{m} train / test loss" for m in MODES) + " |",
        "|---|" + "---|" * len(MODES),
    ]
    for i in range(args.epochs):
        cells = [f"{curves[m][i]['train_loss']:.5f} / {curves[m][i]['test_loss']:.5f}" for m in MODES]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Largest relative difference from none over all epochs: "
        + ", ".join(f"{m} {d:.2e}" for m, d in diffs.items())
        + "; final test accuracy "
        + ", ".join(f"{m} {reports[m]['test_accuracy']:.4f}" for m in MODES)
        + ".",
        "",
    ]
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
