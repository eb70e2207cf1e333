"""Bench cases 4-5: data-parallel training scaling and parallel predict scaling, 1 -> N processes."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from hpcml.bench.cases import Context, goal, skipped
from hpcml.bench.timers import interleave, ratio, summarize
from hpcml.training.precision import available_cores


def counts(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return [*out, n] if n > 1 else [1]


def scaling_config(rows: int, epochs: int, threads: int) -> dict[str, Any]:
    """Compute-bound and the same per rank (batch 512 per rank), so the comparison is of the scaling."""
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


def scaling(ctx: Context) -> dict[str, Any]:
    """Case 4: hpcml data parallel (`hpcml.train(cfg, nproc=n)`, gloo, 1 thread per rank) on CPU.

    efficiency(n) = throughput(n procs x 1 thread) / (n x throughput(1 proc x 1 thread)); also
    n procs against 1 proc with n threads, which is the choice a user actually makes.
    """
    title = "Data-parallel scaling, CPU (gloo), 1 thread per rank (samples/s)"
    cores = available_cores()
    if cores < 2:
        return skipped("scaling", title, f"needs >= 2 cores, this machine has {cores}")
    procs = counts(cores)
    rows, epochs = ctx.suite.scaling_rows, ctx.suite.scaling_epochs

    def make(nproc: int, threads: int):
        def run(rep: int) -> dict:
            if rep < 0:  # warm-up: data generation, imports, first-touch allocation
                ctx.train(scaling_config(4096, 1, threads), nproc=1)
                return {}
            r = ctx.train(scaling_config(rows, epochs, threads), nproc=nproc).report
            return {"samples_per_second": r["samples_per_second"], "world_size": r["world_size"]}

        return run

    contenders = {f"{n} proc{'s' if n > 1 else ''} x 1 thread": make(n, 1) for n in procs}
    contenders[f"1 proc x {cores} threads"] = make(1, cores)
    first = next(iter(contenders))
    runs = interleave(
        {k: v for k, v in contenders.items()},
        repeats=ctx.repeat,
        warmup=True,
        on_result=lambda n, rep, r: ctx.log(
            f"  repeat {rep + 1}: {n}: {r['samples_per_second']:,.0f} samples/s"
        ),
    )
    out = {
        k: {"summary": summarize([r["samples_per_second"] for r in v], higher_is_better=True), "runs": v}
        for k, v in runs.items()
    }
    base = out[first]["summary"]["median"]
    curve = []
    for n, name in zip(procs, contenders, strict=False):
        med = out[name]["summary"]["median"]
        curve.append({"procs": n, "samples_per_second": med, "efficiency": ratio(med, n * base)})
    two = next((c["efficiency"] for c in curve if c["procs"] == 2), None)
    vs_threads = ratio(curve[-1]["samples_per_second"], out[f"1 proc x {cores} threads"]["summary"]["median"])
    comm = communication(ctx)
    first = comm[0]
    slowdown = first.get("compute_slowdown")
    limit = (
        f"2 ranks on the machine's {cores} cores: their steps without any communication take "
        f"{slowdown:.2f}x one process's (shared cores, memory bus and L3; other processes, load "
        f"{first['loadavg']:.1f}), and the gradient exchange adds {first['communication_share']:.0%} "
        f"of the step; a larger per-rank batch reached {_best(comm)}"
        if slowdown is not None
        else "not decomposed"
    )
    return {
        "name": "scaling",
        "title": title,
        "status": "ok",
        "metric": "samples/s",
        "higher_is_better": True,
        "config": scaling_config(rows, epochs, 1),
        "contenders": out,
        "curve": curve,
        f"nproc{cores}_vs_{cores}_threads": vs_threads,
        "communication": comm,
        "batch_for_85": next((c["batch_size"] for c in comm if (c.get("efficiency") or 0) >= 0.85), None),
        "goals": [
            goal("data-parallel efficiency 1 -> 2 processes: >= 85%", two, 0.85, unit="", limit=limit),
            goal(
                f"communication share of the DDP step (batch {first['batch_size']}/rank): <= 15%",
                first.get("communication_share"),
                0.15,
                unit="",
                at_most=True,
                limit=_comm_limit(first, cores),
            ),
        ],
    }


def _comm_limit(r: dict[str, Any], cores: int) -> str:
    """Why the exchange costs what it costs, from the measured figures."""
    alone, exposed = r["all_reduce"]["fp32_seconds"], r["exposed_seconds"]
    small = r["variant_speedups"].get("1 MB buckets")
    text = (
        f"the all-reduce of {r['gradient_bytes'] / 1e6:.1f} MB over gloo (TCP on loopback) takes "
        f"{alone * 1e3:.1f} ms alone; the step exposes {exposed * 1e3:.1f} ms"
    )
    if exposed > alone:
        text += f", {(exposed - alone) * 1e3:.1f} ms of it waiting for the other rank"
    text += f"; backward hid {r['overlap'] or 0:.0%} of the all-reduce"
    if small is not None:
        text += f" and 1 MB buckets (overlap possible) ran at {small:.2f}x one bucket's speed"
    if cores <= 2:
        text += f" (both of the {cores} cores run backward: no core is left to overlap on)"
    return text


def _best(comm: list[dict[str, Any]]) -> str:
    best = max(comm, key=lambda c: c.get("efficiency") or 0)
    return f"{best.get('efficiency') or 0:.0%} at {best['batch_size']}/rank"


COMM_VARIANTS = {"bf16 compression": {"grad_compression": "bf16"}, "1 MB buckets": {"bucket_mb": 1}}


def communication(ctx: Context) -> list[dict[str, Any]]:
    """The DDP step of case 4 on 2 ranks taken apart (bench/comm.py): with and without its all-reduce,
    beside one process, bf16 compression and small buckets, at the suite's per-rank batch sizes."""
    from hpcml.bench import comm
    from hpcml.config import build_config

    batches = ctx.suite.comm_batches
    rows = max(ctx.suite.scaling_rows, 3 * max(batches))  # 2 ranks' batches in the 95% train split
    cfg = build_config(scaling_config(rows, 1, 1))
    # 5 repeats: every variant starts a pass once (comm.time_variants rotates the order)
    results = comm.measure(cfg, world=2, batch_sizes=list(batches), variants=COMM_VARIANTS, repeats=5)
    for r in results:
        ctx.log(
            f"  DDP step, batch {r['batch_size']}/rank: {r['variants']['ddp']['median'] * 1e3:.2f} ms vs 1 "
            f"process {r['variants']['1 process']['median'] * 1e3:.2f} ms: efficiency {r['efficiency']:.0%}, "
            f"communication {r['communication_share']:.0%} of the step (load {r['loadavg']:.1f})"
        )
    return results


def predict_scaling(ctx: Context) -> dict[str, Any]:
    """Case 5: `hpcml.jobs.predict.predict_parallel` rows/s with 1 -> W workers, checked to give
    the same predictions as 1 worker."""
    title = "Parallel predict throughput, 1 -> W workers (rows/s)"
    try:
        from hpcml.jobs.predict import predict_parallel
    except ImportError as err:
        return skipped("predict", title, f"hpcml.jobs.predict is not available yet ({err})")
    cores = available_cores()
    workers = counts(cores)
    trained = ctx.train({"model": {"name": "mlp"}, "epochs": 1, "threads": ctx.threads, "device": "cpu"})
    model_dir = ctx.scratch / "predict-model"
    if not model_dir.exists():
        from hpcml.models.io import save_model

        save_model(model_dir, trained.model.module, trained.model.meta)
    x_test = ctx.mnist1d()[2].numpy()  # already normalized, normalized again by the model: same cost
    reps = -(-ctx.suite.predict_rows // len(x_test))
    x = np.tile(x_test, (reps,) + (1,) * (x_test.ndim - 1))[: ctx.suite.predict_rows]
    batch = 8192
    reference: dict[str, np.ndarray] = {}

    def make(w: int):
        def run(rep: int) -> dict:
            rows = x[:batch] if rep < 0 else x
            t0 = time.perf_counter()
            pred = np.asarray(predict_parallel(model_dir, rows, workers=w, batch_size=batch))
            seconds = time.perf_counter() - t0
            if rep < 0:
                return {}
            if w == 1:
                reference.setdefault("1", pred)  # workers=1 runs first in every repeat
            same = bool(np.array_equal(pred, reference["1"])) if "1" in reference else None
            return {"rows_per_second": len(rows) / seconds, "seconds": seconds, "matches_1_worker": same}

        return run

    contenders = {f"{w} worker{'s' if w > 1 else ''}": make(w) for w in workers}
    runs = interleave(
        contenders,
        repeats=ctx.repeat,
        on_result=lambda n, rep, r: ctx.log(f"  repeat {rep + 1}: {n}: {r['rows_per_second']:,.0f} rows/s"),
    )
    out = {
        k: {"summary": summarize([r["rows_per_second"] for r in v], higher_is_better=True), "runs": v}
        for k, v in runs.items()
    }
    base = out[next(iter(out))]["summary"]["median"]
    curve = [
        {
            "workers": w,
            "rows_per_second": out[n]["summary"]["median"],
            "efficiency": ratio(out[n]["summary"]["median"], w * base),
        }
        for w, n in zip(workers, out, strict=True)
    ]
    return {
        "name": "predict",
        "title": title,
        "status": "ok",
        "metric": "rows/s",
        "higher_is_better": True,
        "config": {"rows": len(x), "batch_size": batch, "model": "mlp", "workers": workers},
        "contenders": out,
        "curve": curve,
        "consistent": all(r.get("matches_1_worker") is not False for v in runs.values() for r in v),
        "goals": [],
    }
