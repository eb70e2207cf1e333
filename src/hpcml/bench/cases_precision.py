"""Bench case `precision`: is bf16 worth being the default on this CPU (or GPU)?

The default recipe (cnn1d on MNIST-1D, 30 epochs) and the throughput MLP each train in fp32 and in bf16,
interleaved, same seeds. `--precision auto` picks bf16 on CPUs with native bf16 (avx512_bf16 / amx);
this case checks that choice where it is made: bf16 must be faster at no accuracy cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hpcml.bench.cases import Context, goal
from hpcml.bench.timers import interleave, ratio, summarize

PRECISIONS = ("fp32", "bf16")
ACCURACY_SLACK = 0.005  # bf16 may lose at most half a point of test accuracy against fp32


def _models(ctx: Context) -> dict[str, dict[str, Any]]:
    """The runs compared: the default recipe as `hpcml train` runs it, and the throughput MLP."""
    epochs = 30 if ctx.suite.name == "full" else 10
    return {
        "default recipe (cnn1d)": {"model": {"name": "cnn1d"}, "epochs": epochs},
        "MLP, batch 100": {
            "model": {"name": "mlp"},
            "epochs": ctx.suite.throughput_epochs,
            "batch_size": 100,
        },
    }


def precision_case(ctx: Context) -> dict[str, Any]:
    from hpcml.training.precision import cpu_has_native_bf16

    native = ctx.device == "cuda" or cpu_has_native_bf16()
    contenders: dict[str, Any] = {}
    goals = []
    for label, base in _models(ctx).items():

        def make(precision: str, base=base) -> Callable[[int], dict]:
            def run(rep: int) -> dict:
                cfg = {**base, "precision": precision, "seed": max(rep, 0), "threads": ctx.threads}
                cfg |= {"device": ctx.device, "checkpoint": {"every": None}}
                if rep < 0:  # warm-up: one untimed epoch
                    cfg["epochs"] = 1
                r = ctx.train(cfg).report
                return {
                    "train_seconds": r["step_seconds"],
                    "test_accuracy": r["test_accuracy"],
                    "epochs": r["epochs"],
                }

            return run

        runs = interleave({p: make(p) for p in PRECISIONS}, repeats=ctx.repeat)
        for p in PRECISIONS:
            ctx.log(
                f"  {label} {p}: "
                + ", ".join(f"{r['train_seconds']:.2f} s / acc {r['test_accuracy']:.4f}" for r in runs[p])
            )
        summary = {p: summarize([r["train_seconds"] for r in runs[p]]) for p in PRECISIONS}
        acc = {p: summarize([r["test_accuracy"] for r in runs[p]], higher_is_better=True) for p in PRECISIONS}
        for p in PRECISIONS:
            contenders[f"{label}, {p}"] = {
                "summary": summary[p],
                "test_accuracy": acc[p],
                "epochs_median": runs[p][0]["epochs"],
                "runs": runs[p],
            }
        speed = ratio(summary["fp32"]["median"], summary["bf16"]["median"])
        loss = acc["fp32"]["median"] - acc["bf16"]["median"]
        contenders[f"{label}, bf16"]["speedup_vs_fp32"] = speed
        contenders[f"{label}, bf16"]["accuracy_change"] = -loss
        limit = (
            f"this CPU {'has' if native else 'has no'} native bf16; bf16 accuracy "
            f"{acc['bf16']['median']:.4f} vs fp32 {acc['fp32']['median']:.4f}"
        )
        if native:  # the goal applies where auto picks bf16
            g = goal(f"{label}: bf16 (auto's pick here) >= 1x fp32", speed, 1.0, limit=limit)
            if label.startswith("default") and loss > ACCURACY_SLACK:  # faster, but a worse model
                g["met"] = False
                g["note"] = (
                    f"bf16 loses {loss:.1%} test accuracy (> {ACCURACY_SLACK:.1%} allowed); " + g["note"]
                )
            goals.append(g)
    return {
        "name": "precision",
        "title": "fp32 vs bf16 training time (training steps only) and test accuracy, same seeds",
        "status": "ok",
        "metric": "seconds",
        "higher_is_better": False,
        "native_bf16": native,
        "auto_picks": "bf16" if native else "fp32",
        "config": {"models": _models(ctx), "accuracy_slack": ACCURACY_SLACK},
        "contenders": contenders,
        "goals": goals,
    }
