"""`hpcml bench --doctor CONFIG`: the step-time breakdown of a user's own config, with one-line hints
where a known cause of slowness shows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DATA_SHARE = 0.30  # data loading above this share of a step is worth fixing
LOW_MFU = 0.25  # a step below this share of the matmul peak ...
SMALL_BATCH = 512  # ... at a batch below this is dominated by fixed per-step cost


def hints(b: dict[str, Any], env: dict[str, Any]) -> list[dict[str, str]]:
    """The known causes that show in a breakdown `b` (see `breakdown.measure`) on machine `env`."""
    out: list[dict[str, str]] = []

    def add(cause: str, hint: str) -> None:
        out.append({"cause": cause, "hint": hint})

    step_ms = b["phase_sum_seconds_per_step"] * 1e3
    data = b["phases"]["data"]
    if data["fraction"] >= DATA_SHARE:
        ms = data["seconds_per_step"] * 1e3
        add(
            "data loading dominates",
            f"data loading takes {data['fraction']:.0%} of the step ({ms:.2f} of {step_ms:.2f} ms): keep "
            "the data on the device as one tensor (hpcml does when it fits), or raise batch_size so each "
            "fetch carries more work",
        )
    if b.get("syncs_per_step"):
        add(
            "host syncs per step",
            f"{b['syncs_per_step']:.1f} host-device syncs per step: something reads a GPU value on the host "
            "every step (.item(), .tolist(), a Python `if` on a tensor); accumulate on the device and "
            "read once per epoch",
        )
    procs, cores, threads = env.get("nproc", 1), env["cores"], b["threads"]
    if threads * procs > cores:
        add(
            "threads oversubscribed",
            f"{threads} threads x {procs} process(es) on {cores} cores: threads wait for each other at "
            f"every op; set threads: {max(1, cores // procs)} (cores / processes)",
        )
    elif env.get("loadavg") is not None and env["loadavg"] >= cores:
        add(
            "threads oversubscribed",
            f"the machine is busy (load average {env['loadavg']:.1f} on {cores} cores): other processes "
            f"take the cores this run's {threads} threads expect; measure on an idle machine or use fewer "
            "threads",
        )
    if b["device_type"] == "cpu" and b["precision"] in ("bf16", "fp16") and not env.get("native_bf16"):
        add(
            "precision not native",
            f"precision {b['precision']} is emulated on this CPU (no avx512_bf16/amx): fp32 is faster "
            "here; set precision: auto",
        )
    if b["device_type"] == "cuda" and b["precision"] == "fp32" and env.get("cuda_bf16"):
        add(
            "precision not native",
            "precision fp32 on a GPU with bf16 tensor cores: set precision: auto (bf16) for several times "
            "the matmul rate",
        )
    mfu = b.get("mfu")
    if mfu is not None and mfu < LOW_MFU and b["batch_size"] < SMALL_BATCH:
        ms = b["loop_seconds_per_step"] * 1e3
        bigger = min(SMALL_BATCH, b["batch_size"] * 4)
        add(
            "batch too small for the hardware",
            f"batch {b['batch_size']} is small for this hardware: the step runs at {mfu:.1%} of the matmul "
            f"peak ({ms:.2f} ms/step, mostly fixed per-step cost); try batch_size {bigger} (scale lr with "
            "it) if accuracy allows",
        )
    return out


def doctor(config: Any, *, steps: int = 30, nproc: int = 1) -> dict[str, Any]:
    """Break down the step time of `config` (a run config YAML path, dict or TrainConfig) and hint.

    `nproc` is the number of processes the config is meant to run with (threads are checked against
    cores / nproc); the breakdown itself runs in this one process.
    """
    import torch

    from hpcml.bench.breakdown import measure
    from hpcml.bench.flops import measured_matmul_peak
    from hpcml.distributed.dist import DistInfo
    from hpcml.errors import UsageError
    from hpcml.training.precision import available_cores, cpu_has_native_bf16
    from hpcml.training.run import as_config

    if isinstance(config, str | Path) and not Path(config).is_file():
        raise UsageError(f"--doctor: no such config file: {config}")
    if steps < 1 or nproc < 1:
        raise UsageError(f"--steps and --nproc must be >= 1 (got {steps}, {nproc})")
    cfg = as_config(config)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # before we add our own load
    b = measure(cfg, steps=steps, dist=DistInfo(0, 1, 0, nproc))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(b["precision"], torch.float32)
    peak = measured_matmul_peak(device=b["device"], threads=b["threads"], dtype=dtype)
    b["peak_flops"] = peak["flops_per_second"]
    b["mfu"] = b["loop_flops_per_second"] / peak["flops_per_second"]
    cuda = b["device_type"] == "cuda"
    env = {
        "cores": available_cores(),
        "nproc": nproc,
        "loadavg": load,
        "native_bf16": cpu_has_native_bf16(),
        "cuda_bf16": cuda and torch.cuda.is_bf16_supported(),
    }
    return {
        "config": str(config) if isinstance(config, str | Path) else None,
        "breakdown": b,
        "environment": env,
        "hints": hints(b, env),
    }
