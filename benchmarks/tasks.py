"""Many jobs at once: parallel predict and sweep wall time, side by side in one process (CPU).

1. Predict throughput (rows/s) on N >= 1,000,000 rows (an in-memory float32 array) with a trained MLP:
   - `hpcml.predict` in this process (W=1, all cores as intra-op threads);
   - `predict_parallel(workers=2)` on the local backend, end to end: this process and a helper
     spawned for the call, each loading the model dir (sha256-verified), sharing the rows in chunks,
     gathering (`hpcml bench --cases predict` has the warm pool and workers=auto too);
   - the same on Ray (if installed), warm: the Ray instance and its worker processes already up;
   - a naive per-row loop (`model.predict(x[i:i+1])` for each row), measured on a subset and
     extrapolated as rows/s (it would take far too long on all rows).
   Every contender is checked to give the same predictions as W=1.
2. Sweep wall time for 4 jobs (a 2x2 grid) with W=1 and W=2 on the local backend, each in a fresh
   output folder (nothing skipped), from the call to the written table.

Contenders are interleaved per repeat (W=1, W=2, ... then again) so a slow spell of a shared machine
hits all of them; the median and the spread are reported.

    python benchmarks/tasks.py [--rows 1000000] [--repeats 3] [--out benchmarks/results] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import hpcml
from hpcml.jobs.predict import predict_parallel
from hpcml.training.precision import available_cores, cpu_name

FEATURES, CLASSES = 32, 10
MODEL_CFG = {
    "data": {"name": "synthetic", "rows": 20_000, "features": FEATURES, "classes": CLASSES},
    "model": {"name": "mlp", "kwargs": {"hidden": 256}},
    "epochs": 2,
    "batch_size": 256,
    "device": "cpu",
}
SWEEP_BASE = {
    "data": {"name": "synthetic", "rows": 20_000, "features": FEATURES, "classes": 4},
    "model": {"name": "mlp", "kwargs": {"hidden": 128}},
    "epochs": 4,
    "batch_size": 100,
    "device": "cpu",
}
SWEEP_GRID = ["lr=1e-3,1e-2", "batch_size=100,200"]
NAIVE_ROWS = 2_000


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_predict(model_dir: Path, x: np.ndarray, repeats: int, ray) -> dict:
    model = hpcml.load_model(model_dir)
    hpcml.predict(model, x[:50_000])  # warm-up: allocator, kernels
    contenders = {
        "W=1 (in process)": lambda: hpcml.predict(model_dir, x, workers=1),  # not auto: the baseline
        "W=2 local (spawned)": lambda: predict_parallel(model_dir, x, workers=2),
    }
    if ray is not None:
        predict_parallel(model_dir, x[:10_000], workers=2, backend="ray")  # warm the Ray workers
        contenders["W=2 ray (warm)"] = lambda: predict_parallel(model_dir, x, workers=2, backend="ray")
    seconds: dict[str, list[float]] = {k: [] for k in contenders}
    ref = None
    for _ in range(repeats):
        for name, fn in contenders.items():
            s, pred = timed(fn)
            seconds[name].append(s)
            if ref is None:
                ref = pred
            assert np.array_equal(pred, ref), f"{name} gave different predictions"
    torch.set_num_threads(available_cores())
    sub = x[:NAIVE_ROWS]
    s, naive = timed(lambda: np.concatenate([model.predict(sub[i : i + 1]) for i in range(len(sub))]))
    assert np.array_equal(naive, ref[:NAIVE_ROWS]), "per-row loop gave different predictions"
    rows = {name: spread([len(x) / v for v in vals]) for name, vals in seconds.items()}
    rows["naive per-row loop (extrapolated)"] = spread([NAIVE_ROWS / s])
    return {"rows": len(x), "rows_per_second": rows, "seconds": {k: spread(v) for k, v in seconds.items()}}


def bench_sweep(repeats: int) -> dict:
    seconds: dict[str, list[float]] = {"W=1": [], "W=2": []}
    for _ in range(repeats):
        for name, w in (("W=1", 1), ("W=2", 2)):
            with tempfile.TemporaryDirectory(prefix="hpcml-bench-sweep-") as tmp:
                s, res = timed(
                    lambda w=w, tmp=tmp: hpcml.sweep(SWEEP_BASE, params=SWEEP_GRID, workers=w, out=tmp)
                )
                assert res.ran == 4 and not res.failed, res.failed
            seconds[name].append(s)
    return {"jobs": 4, "seconds": {k: spread(v) for k, v in seconds.items()}}


def table_rows(results: dict) -> list[list[str]]:
    p, sw = results["predict"], results["sweep"]
    base = p["rows_per_second"]["W=1 (in process)"]["median"]
    rows = [
        ["predict rows/s", name, f"{v['median']:,.0f}", f"{min(v['runs']):,.0f}", f"{max(v['runs']):,.0f}",
         f"{v['median'] / base:.2f}x"]
        for name, v in p["rows_per_second"].items()
    ]  # fmt: skip
    t1 = sw["seconds"]["W=1"]["median"]
    rows += [
        ["sweep wall s (4 jobs)", name, f"{v['median']:.1f}", f"{v['min']:.1f}", f"{v['max']:.1f}",
         f"{t1 / v['median']:.2f}x"]
        for name, v in sw["seconds"].items()
    ]  # fmt: skip
    return rows


HEADER = ["case", "contender", "median", "min", "max", "vs W=1"]


def write_outputs(results: dict, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9-]+", "-", platform.node()).strip("-") or "cpu"
    stem = out / f"tasks-{host}-{datetime.now(UTC).date().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    env, cfg = results["environment"], results["config"]
    lines = [
        "# Many jobs at once: parallel predict and sweeps",
        "",
        f"{env['cpu']}, {env['cores']} cores, torch {env['torch']}, hpcml {env['hpcml']}, ray "
        f"{env['ray'] or 'not installed'}, {env['date']}. Predict: {cfg['rows']:,} rows x {FEATURES} "
        f"features, MLP hidden 256 (2 layers), {CLASSES} classes, batch 65,536; {cfg['repeats']} repeat(s). "
        f"Sweep: 2x2 grid ({', '.join(SWEEP_GRID)}), synthetic 20,000 rows, MLP hidden 128, 4 epochs.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---|" * len(HEADER),
        *("| " + " | ".join(r) + " |" for r in table_rows(results)),
        "",
        "Predict W=2 local is end to end: spawning 2 workers (Python + torch imports), loading and verifying",
        "the model in each, sharing the input, gathering the output. Ray is warm (instance and workers up).",
        f"The per-row loop ran on the first {NAIVE_ROWS:,} rows and is extrapolated as rows/s.",
        "Every contender gave the same predictions as W=1 (checked). Sweep wall: call to written table.",
        f"1-minute load average at the end: {env.get('load_average_1m_at_end', float('nan')):.1f} on "
        f"{env['cores']} cores (other work on a shared machine makes absolute numbers noisy).",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000, help="predict rows (>= 1,000,000 for the record)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray contender even if Ray is installed")
    p.add_argument("--quick", action="store_true", help="smoke run: 100,000 rows, 1 repeat")
    args = p.parse_args()
    rows, repeats = (100_000, 1) if args.quick else (args.rows, args.repeats)
    try:
        import ray
    except ImportError:
        ray = None
    ray = None if args.no_ray else ray
    console = Console(width=None if sys.stdout.isatty() else 120)
    with tempfile.TemporaryDirectory(prefix="hpcml-bench-tasks-") as tmp:
        model_dir = hpcml.train(MODEL_CFG, out=Path(tmp) / "run").dir / "model"
        x = np.random.default_rng(0).normal(size=(rows, FEATURES)).astype(np.float32)
        restore = None
        if ray is not None:
            from hpcml.jobs.ray_backend import start_local_ray

            restore = start_local_ray()
        try:
            console.print(f"predict: {rows:,} rows ...")
            predict = bench_predict(model_dir, x, repeats, ray)
        finally:
            if ray is not None:
                ray.shutdown()
                restore()
    console.print("sweep: 4 jobs, W=1 vs W=2 ...")
    sweep = bench_sweep(repeats)
    results = {
        "environment": {
            "cpu": cpu_name(), "cores": available_cores(), "torch": torch.__version__,
            "hpcml": hpcml.__version__, "ray": getattr(ray, "__version__", None),
            "python": platform.python_version(), "host": platform.node(),
            "load_average_1m_at_end": os.getloadavg()[0],  # a shared machine: other work skews timings
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
        },
        "config": {"rows": rows, "repeats": repeats, "naive_rows": NAIVE_ROWS, "model": MODEL_CFG,
                   "sweep_base": SWEEP_BASE, "sweep_grid": SWEEP_GRID, "quick": args.quick},
        "predict": predict,
        "sweep": sweep,
    }  # fmt: skip
    table = Table(title=f"hpcml many jobs ({results['environment']['cpu']}, {available_cores()} cores)")
    for h in HEADER:
        table.add_column(h, justify="left" if h in ("case", "contender") else "right")
    for row in table_rows(results):
        table.add_row(*row)
    console.print(table)
    for path in write_outputs(results, args.out):
        console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
