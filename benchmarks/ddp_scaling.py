"""Data-parallel scaling on this machine: `--nproc 2` (1 thread each) vs `--nproc 1` (1 thread).

A compute-bound config (synthetic data, MLP width 1024, batch 512 per rank) is trained for a fixed
number of epochs by hpcml itself, once per contender, interleaved over repeats so machine noise hits
all of them. Throughput is report["samples_per_second"] (global samples / time in training steps).

    efficiency = throughput(nproc=2, 1 thread each) / (2 x throughput(nproc=1, 1 thread))

Also reported: `--nproc 2` vs one process with 2 threads, which is what a user compares.

    python benchmarks/ddp_scaling.py [--repeats 3] [--rows 65536] [--epochs 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

import hpcml
from hpcml.training.precision import available_cores, cpu_name

CONTENDERS = {  # name -> (nproc, threads per process)
    "1 proc x 1 thread": (1, 1),
    "2 procs x 1 thread": (2, 1),
    "1 proc x 2 threads": (1, 2),
}


def config(rows: int, epochs: int, threads: int) -> dict:
    return {
        "data": {"name": "synthetic", "rows": rows, "features": 256, "classes": 10, "test_fraction": 0.05},
        "model": {"name": "mlp", "kwargs": {"hidden": 1024, "depth": 2}},
        "optim": {"name": "sgd", "lr": 0.01, "schedule": "constant"},
        "batch_size": 512,
        "epochs": epochs,
        "threads": threads,
        "device": "cpu",
        "label_smoothing": 0.0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=65536)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()

    samples: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    # warm-up (dataset generation, imports, first-touch allocations), not timed
    hpcml.train(config(4096, 1, 1), out=tempfile.mkdtemp(prefix="hpcml-warm-"))
    for rep in range(args.repeats):
        for name, (nproc, threads) in CONTENDERS.items():  # interleaved: noise hits all contenders
            with tempfile.TemporaryDirectory(prefix="hpcml-scale-") as tmp:
                run = hpcml.train(config(args.rows, args.epochs, threads), out=Path(tmp) / "run", nproc=nproc)
                samples[name].append(run.report["samples_per_second"])
            print(f"repeat {rep + 1}: {name}: {samples[name][-1]:,.0f} samples/s", flush=True)

    med = {k: statistics.median(v) for k, v in samples.items()}
    efficiency = med["2 procs x 1 thread"] / (2 * med["1 proc x 1 thread"])
    vs_threads = med["2 procs x 1 thread"] / med["1 proc x 2 threads"]
    result = {
        "benchmark": "ddp_scaling",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": {
            "cpu": cpu_name(),
            "cores": available_cores(),
            "torch": torch.__version__,
            "hpcml": hpcml.__version__,
            "python": platform.python_version(),
        },
        "config": config(args.rows, args.epochs, 1),
        "samples_per_second": {
            k: {"median": med[k], "min": min(v), "max": max(v), "runs": v} for k, v in samples.items()
        },
        "scaling_efficiency_1_to_2": efficiency,
        "nproc2_vs_2_threads": vs_threads,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"ddp_scaling-{platform.node() or 'cpu'}-{datetime.now(UTC):%Y-%m-%d}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = ["| contender | samples/s (median) | min | max |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {med[k]:,.0f} | {min(v):,.0f} | {max(v):,.0f} |" for k, v in samples.items()]
    lines += [
        "",
        f"Scaling efficiency 1 -> 2 processes: **{efficiency:.1%}**; "
        f"2 processes vs 1 process with 2 threads: **{vs_threads:.2f}x**",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
