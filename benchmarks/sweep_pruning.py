"""Sweep pruning: one 16-config random sweep trained to the end, then the same 16 configs (same seeds)
with --prune median (and asha). Wall time and best validation accuracy side by side, as ratios.

    PYTHONPATH=src python benchmarks/sweep_pruning.py [--pruners median,asha] [--out benchmarks/results]

Data: scikit-learn's digits written as a CSV (1797 rows, 64 features, 10 classes) with a 20%
validation split; MLP, 20 epochs (--epochs), constant lr; lr log-uniform in 1e-4..0.3, hidden in 16/64/256.
The machine's load average is recorded: on a shared machine the ratio is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import hpcml


def _digits_csv(path: Path) -> Path:
    from sklearn.datasets import load_digits

    d = load_digits()
    lines = [",".join([*(f"p{i}" for i in range(64)), "digit"])]
    lines += [
        ",".join([*(str(int(v)) for v in row), str(y)]) for row, y in zip(d.data, d.target, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _best_val(res) -> float:
    vals = []
    for job in res.summary["job_list"]:
        report = json.loads((Path(job["run_dir"]) / "report.json").read_text())
        vals.append(report["val_accuracy"])
    return max(vals)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pruners", default="median,asha")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hpcml-prune-"))
    base = {
        "data": {"name": str(_digits_csv(work / "digits.csv")), "target": "digit", "val_fraction": 0.2},
        "model": {"name": "mlp"},
        "epochs": args.epochs,
        "batch_size": 64,
        "precision": "fp32",
        "optim": {"schedule": "constant"},
        "checkpoint": {"every": None},
    }
    params = {"lr": "1e-4..0.3:log", "model.kwargs.hidden": [16, 64, 256]}
    results = {"load_before": os.getloadavg(), "machine": platform.node(), "cores": os.cpu_count(),
               "epochs": args.epochs}  # fmt: skip
    for prune in [None, *args.pruners.split(",")]:
        t0 = time.perf_counter()
        res = hpcml.sweep(
            base, params=params, random=16, seed=0, workers=2, prune=prune, out=work / str(prune)
        )
        wall = time.perf_counter() - t0
        epochs = sum(
            len((Path(j["run_dir"]) / "metrics.jsonl").read_text().splitlines())
            for j in res.summary["job_list"]
        )
        results[str(prune)] = {
            "wall_seconds": wall, "best_val_accuracy": _best_val(res), "epochs_trained": epochs,
            "failed": len(res.failed), "load_after": os.getloadavg(),
        }  # fmt: skip
        print(prune, results[str(prune)], flush=True)
    ref = results["None"]
    for p in args.pruners.split(","):
        r = results[p]
        r["speedup"] = ref["wall_seconds"] / r["wall_seconds"]
        r["val_accuracy_delta_points"] = 100 * (r["best_val_accuracy"] - ref["best_val_accuracy"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"sweep-pruning-{args.epochs}ep-{platform.node()}-{time.strftime('%Y-%m-%d')}"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = ["| pruner | wall s | speedup | best val acc | delta (points) | epochs trained | load avg after |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in ["None", *args.pruners.split(",")]:
        r = results[p]
        rows.append(
            f"| {p if p != 'None' else 'none'} | {r['wall_seconds']:.1f} | {r.get('speedup', 1.0):.2f}x | "
            f"{r['best_val_accuracy']:.4f} | {r.get('val_accuracy_delta_points', 0.0):+.2f} | "
            f"{r['epochs_trained']} | {r['load_after'][0]:.2f} |"
        )
    (out / f"{name}.md").write_text(
        f"# Sweep pruning, 16-config random sweep, {args.epochs} epochs, 2 workers ({results['machine']}, "
        f"{results['cores']} cores, load before {results['load_before'][0]:.2f})\n\n" + "\n".join(rows) + "\n"
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
