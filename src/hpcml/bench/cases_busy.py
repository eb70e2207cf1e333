"""Bench case `busy`: the default run on a machine where another process keeps one core busy.

OpenMP threads wait for each other at every op, so a thread placed on a core another process uses
stalls the whole step. `--threads auto` (the default) counts the cores left free at start. The case
starts a busy-loop process (one core), then trains the default recipe with threads auto, 1 and all
cores, interleaved, and once more with every core free. Goals: busy, auto within 1.3x of the best
fixed count; idle, auto no slower than all cores (what hpcml did before auto).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

from hpcml.bench.cases import Context, goal
from hpcml.bench.timers import interleave, ratio, summarize

_SPIN = "import time\nwhile True:\n    pass\n"


def _contenders(ctx: Context, cores: int) -> dict[str, Callable[[int], dict]]:
    def make(threads: int | None) -> Callable[[int], dict]:
        def run(rep: int) -> dict:
            cfg = {"seed": max(rep, 0), "threads": threads, "device": ctx.device}
            cfg |= {"epochs": 1 if rep < 0 else ctx.suite.throughput_epochs, "checkpoint": {"every": None}}
            r = ctx.train(cfg).report
            return {"train_seconds": r["step_seconds"], "threads": r["threads"], "epochs": r["epochs"]}

        return run

    return {"auto": make(None), "1 thread": make(1), f"{cores} threads": make(cores)}


def busy_case(ctx: Context) -> dict[str, Any]:
    from hpcml.training.precision import available_cores

    cores = available_cores()
    if ctx.device != "cpu" or cores < 2:
        from hpcml.bench.cases import skipped

        return skipped("busy", "one busy core", "needs a CPU run with >= 2 cores")
    idle = interleave(_contenders(ctx, cores), repeats=ctx.repeat)
    spin = subprocess.Popen([sys.executable, "-c", _SPIN])  # one core kept busy by another process
    try:
        busy = interleave(_contenders(ctx, cores), repeats=ctx.repeat)
    finally:
        spin.kill()
        spin.wait()
    contenders = {}
    for label, runs in (("idle", idle), ("busy", busy)):
        for name, rs in runs.items():
            contenders[f"{label}: {name}"] = {
                "summary": summarize([r["train_seconds"] for r in rs]),
                "threads": [r["threads"] for r in rs],
                "epochs_median": rs[0]["epochs"],
                "runs": rs,
            }
            ctx.log(
                f"  {label}: {name}: "
                + ", ".join(f"{r['train_seconds']:.2f} s ({r['threads']}t)" for r in rs)
            )
    med = {k: c["summary"]["median"] for k, c in contenders.items()}
    best_busy = min(med["busy: 1 thread"], med[f"busy: {cores} threads"])
    busy_ratio = ratio(best_busy, med["busy: auto"])  # >= 1/1.3 means within 1.3x of the best
    idle_ratio = ratio(med[f"idle: {cores} threads"], med["idle: auto"])
    return {
        "name": "busy",
        "title": f"Default recipe, {ctx.suite.throughput_epochs} epochs: threads auto vs fixed, idle, busy",
        "status": "ok",
        "metric": "seconds",
        "higher_is_better": False,
        "contenders": contenders,
        "goals": [
            goal("one core busy: auto within 1.3x of the best fixed thread count", busy_ratio, 1 / 1.3,
                 limit="auto samples /proc/stat for 0.1 s at start; a load that starts later is not seen"),
            goal("idle: auto no slower than all cores", idle_ratio, 0.95,
                 limit="auto picks all cores when they are free; the rest is noise"),
        ],
    }  # fmt: skip
