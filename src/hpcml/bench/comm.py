"""What data parallelism costs on this machine: a DDP step with and without its all-reduce, the
gradient exchange options side by side, and the all-reduce alone (the link's bandwidth and latency).

Everything is timed in one set of ranks, the variants interleaved over repeats, so the ratios come
from the same run:
- "1 process": rank 0 alone steps a plain copy of the model while the other ranks wait; the same
  rows per rank, so efficiency = t(1 process) / t(ddp);
- "ddp": the config's DDP model, as `hpcml train` builds it (its compression and bucket size);
- "no communication": the same DDP with a hook that sends nothing: the step without its all-reduce;
- named variants: the DDP model with other `DDPConfig` fields (bf16 compression, bucket sizes).

communication share = (t(ddp) - t(no communication)) / t(ddp): what the gradient exchange adds to the
step (see `derived`). Overlap is checked two ways: the share of the all-reduce alone that the step hid,
and DDP with small buckets (whose all-reduces can start during backward) against one bucket.
"""

from __future__ import annotations

import copy
import itertools
import os
import statistics
from typing import Any

import torch

from hpcml.bench.breakdown import on_ranks, prepared, steps_forever
from hpcml.bench.timers import now, ratio, summarize
from hpcml.config import TrainConfig
from hpcml.distributed import dist as pdist
from hpcml.distributed.dist import DistInfo

BASE = ("1 process", "ddp", "no communication")


def measure(
    cfg: TrainConfig,
    *,
    world: int = 2,
    batch_sizes: list[int] | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
    steps: int = 20,
    repeats: int = 5,
) -> list[dict[str, Any]]:
    """`time_variants` on `world` gloo ranks on this machine, for each per-rank batch size in
    `batch_sizes` (default: the config's); one result per batch size (rank 0's). `steps` is for the
    smallest batch; a k times larger one takes k times fewer (at least 5), so each costs about the same."""
    sizes = batch_sizes or [cfg.batch_size]
    return on_ranks(
        _sweep, cfg, world=world, batch_sizes=sizes, variants=variants or {}, steps=steps, repeats=repeats
    )["results"]


def _sweep(
    cfg: TrainConfig, *, dist: DistInfo, batch_sizes: list[int], steps: int, **kw: Any
) -> dict[str, Any]:
    smallest = min(batch_sizes)
    results = [
        time_variants(
            cfg.model_copy(update={"batch_size": b}), dist=dist, steps=max(5, steps * smallest // b), **kw
        )
        for b in batch_sizes
    ]
    return {"results": results}


def time_variants(
    cfg: TrainConfig,
    *,
    dist: DistInfo | None = None,
    variants: dict[str, dict[str, Any]] | None = None,
    steps: int = 20,
    repeats: int = 5,
) -> dict[str, Any]:
    """Seconds per step of each variant (see the module doc), medians over `repeats` interleaved
    passes of `steps` steps (in rotated order) after one untimed pass; with one rank, only "1 process"."""
    import torch.distributed as tdist

    from hpcml.training.optim import build_optimizer

    info = dist or DistInfo()
    several = info.world_size > 1
    with prepared(cfg, steps=steps, dist=info) as run:
        dev, module = run.hw.device, run.module
        models: dict[str, torch.nn.Module] = {"1 process": copy.deepcopy(module)}
        if several:
            models["ddp"] = run.step_model
            models["no communication"] = pdist.wrap_ddp(
                copy.deepcopy(module), dev, run.cfg.ddp, no_communication=True
            )
            for name, fields in (variants or {}).items():
                models[name] = pdist.wrap_ddp(
                    copy.deepcopy(module), dev, run.cfg.ddp.model_copy(update=fields)
                )
        optimizers = {
            k: build_optimizer(m.parameters(), run.cfg.optim, device=dev) for k, m in models.items()
        }
        batches = steps_forever(run.batches)
        seconds: dict[str, list[float]] = {k: [] for k in models}
        names = list(models)
        for rep in range(-1, repeats):  # -1: untimed (allocation, DDP's bucket rebuild at step 2)
            # each pass starts one variant later, so none always runs first or last in a pass
            for name in names[max(rep, 0) % len(names) :] + names[: max(rep, 0) % len(names)]:
                model, alone = models[name], name == "1 process"
                t = _timed(run, model, optimizers[name], batches, steps, skip=alone and not info.is_main)
                if several:
                    tdist.barrier()  # the next variant starts on every rank together
                if rep >= 0 and t is not None:
                    seconds[name].append(t / steps)
        link = (
            _all_reduce_link(pdist.gradient_bytes(module), repeats=max(5, 3 * repeats)) if several else None
        )
        result = {
            "model": run.cfg.model.name,
            "world_size": info.world_size,
            "batch_size": run.batches.batch_size,
            "device": str(dev),
            "precision": run.hw.precision,
            "threads": run.hw.threads,
            "steps": steps,
            "repeats": repeats,
            "gradient_bytes": pdist.gradient_bytes(module),
            "ddp": pdist.ddp_summary(run.step_model, run.cfg.ddp) if several else None,
            "variants": {k: summarize(v) for k, v in seconds.items()},
            "all_reduce": link,
            "loadavg": os.getloadavg()[0],  # the 1-minute average as the measurement ends
        }
    return {**result, **derived(result)}


def _timed(run, model, optimizer, batches, steps: int, *, skip: bool) -> float | None:
    """Seconds for `steps` steps of hpcml's own loop (`training.loop.train_epoch`); None if skipped."""
    from hpcml.training import loop

    if skip:
        return None
    dev = run.hw.device
    t0 = now(dev)
    loop.train_epoch(
        model, itertools.islice(batches, steps), optimizer=optimizer, loss_fn=run.train_loss,
        autocast=run.amp, stats=loop.EpochStats(dev),
    )  # fmt: skip
    return now(dev) - t0


def _all_reduce_link(grad_bytes: int, *, repeats: int) -> dict[str, Any]:
    """The all-reduce alone, on this process group: 4 bytes (the latency) and the gradient bytes as
    fp32 and bf16 (medians of `repeats`, each started together after a barrier). The effective link,
    from t = 2(N-1)/N * bytes / bandwidth + latency * log2 N, is what the plan projects with."""
    import math

    import torch.distributed as tdist

    world = tdist.get_world_size()

    def seconds(numel: int, dtype: torch.dtype) -> float:
        t = torch.zeros(max(1, numel), dtype=dtype)
        tdist.all_reduce(t)  # warm-up: connections, buffers
        runs = []
        for _ in range(repeats):
            tdist.barrier()
            t0 = now()
            tdist.all_reduce(t)
            runs.append(now() - t0)
        return statistics.median(runs)

    small = seconds(1, torch.float32)
    fp32 = seconds(grad_bytes // 4, torch.float32)
    bf16 = seconds(grad_bytes // 4, torch.bfloat16)
    latency = small / math.log2(world)
    moved = 2 * (world - 1) / world * grad_bytes
    bandwidth = moved / (fp32 - small) if fp32 > small else None
    return {
        "bytes": grad_bytes,
        "fp32_seconds": fp32,
        "bf16_seconds": bf16,
        "latency_seconds": latency,
        "bandwidth_bytes_per_second": bandwidth,
        "repeats": repeats,
    }


def derived(r: dict[str, Any]) -> dict[str, Any]:
    """Efficiency, communication share and overlap from a `time_variants` result.

    exposed = t(ddp) - t(no communication): what the gradient exchange adds to a step. Beyond the
    all-reduce alone it holds the wait for the slower rank (the no-communication ranks never wait for
    each other), which grows with the step on a machine whose cores other processes also use. overlap
    = the share of the all-reduce alone that the step hid (0 when the step exposed all of it or more).
    """
    v = {k: s["median"] for k, s in r["variants"].items()}
    one, ddp, quiet = v.get("1 process"), v.get("ddp"), v.get("no communication")
    if ddp is None or quiet is None:
        return {}
    exposed = ddp - quiet
    link = r["all_reduce"] or {}
    compressed = (r.get("ddp") or {}).get("grad_compression") in ("bf16", "fp16")
    alone = link.get("bf16_seconds" if compressed else "fp32_seconds")
    return {
        "efficiency": ratio(one, ddp),
        "communication_share": exposed / ddp,
        "exposed_seconds": exposed,
        "beyond_all_reduce_seconds": max(0.0, exposed - alone) if alone else None,
        "compute_slowdown": ratio(quiet, one),  # ranks sharing cores, memory and caches, no traffic
        "all_reduce_share": ratio(alone, ddp),  # the all-reduce alone, if nothing overlapped it
        "overlap": min(1.0, max(0.0, 1 - exposed / alone)) if alone else None,
        "variant_speedups": {k: ratio(ddp, s) for k, s in v.items() if k not in BASE},
    }
