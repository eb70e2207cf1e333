"""Step-time breakdown (case 6 and the doctor): data, forward, backward, optimizer, communication.

Each phase of N training steps of a config is timed between synchronized timestamps, with hpcml's
own pieces (DeviceBatches, the registry model, its optimizer, schedule and precision). The per-phase
syncs stop a GPU from overlapping phases, so the same N steps are also run through hpcml's real loop
(`training.loop.train_epoch`, no syncs inside) and that step time is reported beside the sum. With
several ranks, gradients are all-reduced explicitly after backward (DDP overlaps this with backward,
so the "communication" share here is the un-overlapped cost, an upper bound of what DDP exposes).
"""

from __future__ import annotations

import gc
import itertools
import json
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hpcml.bench.flops import train_step_flops
from hpcml.bench.timers import now
from hpcml.config import TrainConfig
from hpcml.distributed.dist import DistInfo

if TYPE_CHECKING:
    from hpcml.training.build import Components

PHASES = ("data", "forward", "backward", "optimizer", "communication")


@contextmanager
def prepared(cfg: TrainConfig, *, steps: int, dist: DistInfo | None = None) -> Iterator[Components]:
    """`cfg` built as `hpcml train` builds it (training.build.build), but eager: the phases of a
    compiled graph cannot be timed apart. Torch threads are set as the run would set them while the
    block runs. The process group of a `dist` of several ranks is already initialized."""
    from hpcml.data.sources import load_dataset
    from hpcml.training.build import build, step_flops
    from hpcml.training.precision import detect
    from hpcml.training.run import resolve_defaults

    info = dist or DistInfo()
    data = load_dataset(cfg.data)
    cfg = resolve_defaults(cfg, data)
    hw = detect(
        device=cfg.device,
        precision=cfg.precision,
        compile="off",
        threads=cfg.threads,
        steps=steps,
        step_flops=step_flops(cfg, data, world_size=info.world_size),
        local_rank=info.local_rank,
        local_world_size=info.local_world_size,
        channels_last=cfg.channels_last,
        images=data.kind == "image",
    )
    threads_before = torch.get_num_threads()
    torch.set_num_threads(hw.threads)
    try:
        yield build(cfg, data, hw, info)  # the parts `hpcml train` builds, from the same function
    finally:
        torch.set_num_threads(threads_before)


def measure(cfg: TrainConfig, *, steps: int, warmup: int = 3, dist: DistInfo | None = None) -> dict[str, Any]:
    """Time `steps` training steps of `cfg` phase by phase (after `warmup` untimed steps)."""
    from hpcml.training import loop

    info = dist or DistInfo()
    with prepared(cfg, steps=steps, dist=info) as run:
        cfg, hw, data = run.cfg, run.hw, run.data
        dev, module, batches, amp = hw.device, run.module, run.batches, run.amp
        optimizer, schedule, loss_fn = run.optimizer, run.schedule, run.train_loss
        params = [p for p in module.parameters() if p.requires_grad]
        first = next(iter(batches.epoch(0)))[0]
        flops = train_step_flops(module, first.x, first.y, loss_fn) * cfg.grad_accum

        totals = dict.fromkeys(PHASES, 0.0)
        it = steps_forever(batches)
        for i in range(warmup + steps):
            t0 = now(dev)
            micro = next(it)
            t1 = now(dev)
            fwd = bwd = 0.0
            for mb in micro:
                a = now(dev)
                with amp:
                    loss = loss_fn(module(mb.x), mb.y)
                b = now(dev)
                (loss if mb.weight == 1.0 else loss * mb.weight).backward()
                fwd, bwd = fwd + b - a, bwd + now(dev) - b
            t2 = t3 = now(dev)
            if info.world_size > 1:
                _all_reduce_grads(params, info.world_size)
                t3 = now(dev)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if schedule is not None:
                schedule.step()
            t4 = now(dev)
            if i >= warmup:
                for k, v in zip(PHASES, (t1 - t0, fwd, bwd, t4 - t3, t3 - t2), strict=True):
                    totals[k] += v

        # the same number of steps through hpcml's real loop: no syncs inside the step
        stats = loop.EpochStats(dev)
        syncs: list = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if dev.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")  # every implicit host sync warns: count them
            t0 = now(dev)
            try:
                loop.train_epoch(
                    run.step_model,  # DDP-wrapped with several ranks: overlapped, as in training
                    itertools.islice(it, steps),
                    optimizer=optimizer,
                    loss_fn=loss_fn,
                    autocast=amp,
                    schedule=schedule,
                    stats=stats,
                )
            finally:
                if dev.type == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
            loop_seconds = now(dev) - t0
            syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]

    phase_sum = sum(totals.values())
    per_step = loop_seconds / steps
    return {
        "model": cfg.model.name,
        "data": data.name,
        "batch_size": batches.batch_size,
        "grad_accum": cfg.grad_accum,
        "world_size": info.world_size,
        "device": str(dev),
        "device_type": dev.type,
        "precision": hw.precision,
        "threads": hw.threads,
        "steps": steps,
        "phases": {
            k: {"seconds_per_step": v / steps, "fraction": v / phase_sum if phase_sum else 0.0}
            for k, v in totals.items()
        },
        "phase_sum_seconds_per_step": phase_sum / steps,
        "loop_seconds_per_step": per_step,
        "samples_per_second": batches.global_batch / per_step,
        "flops_per_step": flops,
        "loop_flops_per_second": flops * info.world_size / per_step,
        # host syncs are only observable (and only cost anything) on a GPU
        "syncs_per_step": len(syncs) / steps if dev.type == "cuda" else None,
    }


def _all_reduce_grads(params: list[torch.Tensor], world: int) -> None:
    """Average gradients across ranks as one flat buffer (what DDP's buckets do, without overlap)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def steps_forever(batches):
    """The steps of epoch 0, 1, 2, ... without end (timing loops take as many as they need)."""
    for epoch in itertools.count():
        yield from batches.epoch(epoch)


def _rank_main(rank: int, world: int, port: int, fn: Callable, cfg_json: str, kwargs: dict, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = TrainConfig.model_validate_json(cfg_json)
        result = fn(cfg, dist=DistInfo(rank, world, rank, world), **kwargs)
        dist.barrier()  # no rank tears down while the other still exchanges
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        # free every DDP reducer (and its gloo work) while its process group exists, as run.py does:
        # one collected at interpreter exit, after the group is gone, aborted the rank (SIGABRT,
        # "terminate called without an active exception") in CI
        gc.collect()
        dist.destroy_process_group()


def on_ranks(fn: Callable, cfg: TrainConfig, *, world: int, **kwargs: Any) -> dict[str, Any]:
    """`fn(cfg, dist=DistInfo, **kwargs)` on `world` gloo ranks on this machine (127.0.0.1, spawned
    processes; `fn` a module-level function returning JSON); rank 0's result."""
    import torch.multiprocessing as mp

    from hpcml.launch.elastic import free_port

    with tempfile.TemporaryDirectory(prefix="hpcml-ranks-") as tmp:
        args = (world, free_port(), fn, cfg.model_dump_json(), kwargs, tmp)
        try:
            mp.spawn(_rank_main, args=args, nprocs=world)
        except mp.ProcessExitedException as err:
            # every rank wrote its result and passed the final barrier: the crash came while tearing
            # down (gloo's threads); the measurement stands, and the warning says what happened
            if not all(Path(tmp, f"rank{r}.json").exists() for r in range(world)):
                raise
            warnings.warn(f"a bench rank crashed after its measurement was complete: {err}", stacklevel=2)
        return json.loads(Path(tmp, "rank0.json").read_text())


def measure_ddp(cfg: TrainConfig, *, steps: int, world: int) -> dict[str, Any]:
    """`measure` on `world` gloo ranks on this machine (127.0.0.1); rank 0's result."""
    return on_ranks(measure, cfg, world=world, steps=steps)


def breakdown_case(ctx) -> dict[str, Any]:
    """Case 6: where a step's time goes, for the default recipe, the MLP of case 2, the compute-bound
    MLP of case 3 and (with >= 2 cores) the data-parallel config of case 4 on 2 ranks."""
    from hpcml.bench.cases import mfu_config
    from hpcml.bench.cases_parallel import scaling_config
    from hpcml.config import build_config
    from hpcml.training.precision import available_cores

    steps = ctx.suite.breakdown_steps
    base = {"threads": ctx.threads, "device": ctx.device}
    configs = {
        "convnet1d, MNIST-1D, batch 100 (default recipe)": ({**base}, steps),
        "MLP, MNIST-1D, batch 100 (case 2)": ({"model": {"name": "mlp"}, **base}, steps),
        # ~0.3 s a step on 2 CPU cores: few steps suffice, its per-step overheads are negligible
        "compute-bound MLP (case 3)": (mfu_config(ctx, rows=4096, epochs=1), max(3, steps // 8)),
    }
    out: dict[str, Any] = {}
    for name, (cfg, n) in configs.items():
        out[name] = measure(build_config(cfg), steps=n, warmup=min(3, max(1, n // 4)))
        ctx.log(f"  {name}: {out[name]['loop_seconds_per_step'] * 1e3:.2f} ms/step")
    if available_cores() >= 2:
        name = "DDP 2 ranks x 1 thread, gloo (case 4)"
        cfg = build_config(scaling_config(8192, 1, 1))
        out[name] = measure_ddp(cfg, steps=max(5, steps // 4), world=2)
        ctx.log(f"  {name}: {out[name]['loop_seconds_per_step'] * 1e3:.2f} ms/step")
    return {
        "name": "breakdown",
        "title": "Step-time breakdown (share of a step, phases timed between syncs)",
        "status": "ok",
        "metric": "seconds/step",
        "higher_is_better": False,
        "configs": out,
        "goals": [],
    }
