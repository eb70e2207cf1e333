"""Bench case `precision`: does `--precision auto` pick the faster precision on this machine?

Three configs train in fp32 and in bf16, interleaved, same seeds: the default recipe (convnet1d on
MNIST-1D), the throughput MLP (batch 100) and the compute-bound MLP of the MFU case. On a CPU, auto
picks bf16 only with native bf16 and a step of at least BF16_MIN_STEP_FLOPS (precision.py). The
goal, per config: auto's pick is at least as fast as the other precision, at no accuracy cost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hpcml.bench.cases import Context, goal
from hpcml.bench.timers import interleave, ratio, summarize

PRECISIONS = ("fp32", "bf16")
ACCURACY_SLACK = 0.005  # bf16 may lose at most half a point of test accuracy against fp32


def _models(ctx: Context) -> dict[str, dict[str, Any]]:
    """The runs compared: the default recipe as `hpcml train` runs it, the throughput MLP, and the
    compute-bound MLP of the MFU case (fewer rows)."""
    from hpcml.bench.cases import mfu_config
    from hpcml.models.registry import recipe_for

    epochs = recipe_for("convnet1d")["epochs"] if ctx.suite.name == "full" else 4
    big = mfu_config(ctx, rows=4096 if ctx.suite.name == "full" else 2048, epochs=1)
    big.pop("threads", None), big.pop("device", None), big.pop("seed", None)
    return {
        "default recipe (convnet1d)": {"epochs": epochs},
        "MLP, batch 100": {
            "model": {"name": "mlp"},
            "epochs": ctx.suite.throughput_epochs,
            "batch_size": 100,
        },
        "compute-bound MLP": big,
    }


def _auto_pick(ctx: Context, cfg: dict[str, Any]) -> tuple[str, str]:
    from hpcml.config import build_config
    from hpcml.data.sources import load_dataset
    from hpcml.training.build import step_flops
    from hpcml.training.precision import resolve_device, resolve_precision

    c = build_config({**cfg, "device": ctx.device})
    flops = step_flops(c, load_dataset(c.data))
    return resolve_precision("auto", resolve_device(ctx.device), step_flops=flops)


def precision_case(ctx: Context) -> dict[str, Any]:
    contenders: dict[str, Any] = {}
    goals = []
    picks = {}
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
        speed = ratio(summary["fp32"]["median"], summary["bf16"]["median"])  # > 1: bf16 is faster
        loss = acc["fp32"]["median"] - acc["bf16"]["median"]
        contenders[f"{label}, bf16"]["speedup_vs_fp32"] = speed
        contenders[f"{label}, bf16"]["accuracy_change"] = -loss
        pick, why = _auto_pick(ctx, base)
        picks[label] = {"precision": pick, "reason": why}
        other = "fp32" if pick == "bf16" else "bf16"
        value = speed if pick == "bf16" else ratio(summary["bf16"]["median"], summary["fp32"]["median"])
        limit = (
            f"auto picked {pick} ({why}); bf16 accuracy {acc['bf16']['median']:.4f} vs fp32 "
            f"{acc['fp32']['median']:.4f}"
        )
        g = goal(f"{label}: auto's {pick} >= 1x {other}'s speed", value, 1.0, limit=limit)
        if pick == "bf16" and label.startswith("default") and loss > ACCURACY_SLACK:  # faster, worse model
            g["met"] = False
            g["note"] = f"bf16 loses {loss:.1%} test accuracy (> {ACCURACY_SLACK:.1%} allowed); " + g["note"]
        goals.append(g)
    return {
        "name": "precision",
        "title": "fp32 vs bf16 training time (training steps only) and test accuracy; auto's pick",
        "status": "ok",
        "metric": "seconds",
        "higher_is_better": False,
        "auto_picks": picks,
        "config": {"models": _models(ctx), "accuracy_slack": ACCURACY_SLACK},
        "contenders": contenders,
        "goals": goals,
    }
