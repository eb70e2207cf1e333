"""Choose device, precision, compile and threads from the hardware found; say why in the report."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from hpcml.errors import UsageError


@dataclass(frozen=True)
class Hardware:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    precision_reason: str
    compile: bool
    compile_reason: str
    threads: int
    threads_reason: str = "requested"
    channels_last: bool = False
    channels_last_reason: str = "not image data"


from hpcml._system import available_cores, cpu_flags  # noqa: E402,F401  (re-exported)

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_has_native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether a CPU with these /proc/cpuinfo `flags` (default: this machine's) runs bf16 natively."""
    return bool((cpu_flags() if flags is None else flags) & NATIVE_BF16_FLAGS)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def resolve_device(spec: str, *, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device={spec!r} but no CUDA device is available (torch {torch.__version__})")
        if spec == "cuda":
            return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(spec)


# bf16 autocast on a CPU with native bf16 pays only for steps with enough matmul work: measured on a
# Xeon with AMX + avx512_bf16 (2 threads, `hpcml bench --cases precision` and MLP sweeps), bf16 ran
# at 0.78-0.96x fp32's speed at 0.1-0.12 GFLOP per step (the default cnn1d recipe, the batch-100
# MLP), 1.07x at 0.48, 1.77x at 1.9 and 2.3-3.2x from 7.5 GFLOP up, at the same test accuracy.
BF16_MIN_STEP_FLOPS = 1e9


BF16_CONV_CPU = (
    "CPU has native bf16, but image models are convolutions: measured 0.81x fp32's speed "
    "(mobilenet_v2, 64x64, AMX CPU): fp32"
)


def resolve_precision(
    requested: str,
    device: torch.device,
    *,
    flags: frozenset[str] | None = None,
    step_flops: float | None = None,
    images: bool = False,
) -> tuple[str, str]:
    """(precision, reason). `flags` are the CPU's /proc/cpuinfo flags (default: this machine's) and
    `step_flops` one rank's training FLOPs per optimizer step (None: unknown), so the decision can be
    tested for any CPU and model without running them.

    CPU auto: bf16 only with native bf16 (avx512_bf16 / amx) and a step of at least
    BF16_MIN_STEP_FLOPS; below that autocast's casts cost more than the faster matmuls save. AVX2-only
    CPUs emulate bf16: fp32 is faster there."""
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return ("bf16", "CUDA device runs bf16 natively") if bf16 else ("fp16", "CUDA without bf16: fp16")
        if requested == "bf16" and not bf16:
            raise UsageError("precision=bf16 but this CUDA device does not support bf16; use fp16 or fp32")
        return requested, "requested"
    native = cpu_has_native_bf16(flags)
    if requested == "auto":
        if not native:
            return "fp32", "CPU has no native bf16 (e.g. AVX2 only): fp32 is fastest"
        if images:  # convolutions, not matmuls: measured slower in bf16 on CPU
            return "fp32", BF16_CONV_CPU
        if step_flops is None:
            return (
                "fp32",
                "CPU has native bf16, but the step's size is unknown: fp32 (bf16 pays on large steps)",
            )
        gflops = f"{step_flops / 1e9:.2g} GFLOP per step"
        if step_flops >= BF16_MIN_STEP_FLOPS:
            return "bf16", f"CPU has native bf16 (avx512_bf16/amx) and {gflops}: bf16 is faster"
        return "fp32", (
            f"CPU has native bf16, but {gflops} is below {BF16_MIN_STEP_FLOPS / 1e9:g}: bf16's casts cost "
            "more than its matmuls save"
        )
    if requested == "bf16" and not native:
        return "bf16", "requested; this CPU emulates bf16 (slower than fp32)"
    if requested == "fp16":
        return "fp16", "requested; CPU fp16 autocast is emulated"
    return requested, "requested"


def resolve_compile(requested: str, device: torch.device, *, steps: int) -> tuple[bool, str]:
    """auto = compile only where it pays: on CUDA for runs long enough to amortize compilation.

    On CPU, measured on this project's models (small convs and MLPs), torch.compile's 20-60 s of
    compilation exceeds a whole training run and the per-step gain is small, so auto leaves it off.
    """
    if requested == "on":
        return True, "requested"
    if requested == "off":
        return False, "requested"
    if device.type == "cuda" and steps >= 2000:
        return True, f"CUDA and {steps} steps amortize compile time"
    if device.type == "cuda":
        return False, f"only {steps} steps: compile time would not pay back"
    return False, "CPU: compile time exceeds the gain for these model sizes"


def resolve_channels_last(requested: str, device: torch.device, *, images: bool) -> tuple[bool, str]:
    """auto = channels_last (NHWC) for image data: on CUDA cuDNN's convolutions run NHWC kernels, and
    on CPU oneDNN's do too (CHANNELS_LAST_CPU says what it measured)."""
    if not images:
        return False, "not image data"
    if requested in ("on", "off"):
        return requested == "on", "requested"
    if device.type == "cuda":
        return True, "CUDA: NHWC convolution kernels"
    return True, CHANNELS_LAST_CPU


CHANNELS_LAST_CPU = "CPU: measured 1.33x NCHW's images/s (mobilenet_v2, 64x64, fp32, 2 threads)"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def detect(
    *,
    device: str,
    precision: str,
    compile: str,
    threads: int | None,
    steps: int,
    step_flops: float | None = None,
    local_rank: int = 0,
    local_world_size: int = 1,
    channels_last: str = "auto",
    images: bool = False,
) -> Hardware:
    dev = resolve_device(device, local_rank=local_rank)
    nhwc, nhwc_why = resolve_channels_last(channels_last, dev, images=images)
    prec, prec_why = resolve_precision(precision, dev, step_flops=step_flops, images=images)
    comp, comp_why = resolve_compile(compile, dev, steps=steps)
    if threads is not None:
        n_threads, threads_why = threads, "requested"
    elif dev.type == "cuda":
        n_threads = max(1, available_cores() // local_world_size)
        threads_why = f"{available_cores()} cores / {local_world_size} process(es) on this node"
    else:
        n_threads, threads_why = choose_threads(available_cores(), free_cores(), local_world_size)
    return Hardware(dev, prec, prec_why, comp, comp_why, n_threads, threads_why, nhwc, nhwc_why)


def _cpu_times(text: str, cpus: set[int]) -> tuple[float, float]:
    """(busy, total) jiffies of `cpus` from /proc/stat's text (per-CPU lines: cpuN user nice system
    idle iowait irq softirq steal ...); iowait counts as idle."""
    busy = total = 0.0
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [float(v) for v in fields[:8]]
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return busy, total


def free_cores(seconds: float = 0.1) -> float:
    """How many of this process's cores other processes leave free: /proc/stat sampled twice,
    `seconds` apart, before hpcml starts working (Linux; elsewhere all cores count as free)."""
    import time

    try:
        cpus = os.sched_getaffinity(0)
        with open("/proc/stat") as f:
            a = _cpu_times(f.read(), cpus)
        time.sleep(seconds)
        with open("/proc/stat") as f:
            b = _cpu_times(f.read(), cpus)
    except (OSError, AttributeError, ValueError):
        return float(available_cores())
    busy, total = b[0] - a[0], b[1] - a[1]
    if total <= 0:
        return float(len(cpus))
    return len(cpus) * (1.0 - busy / total)


def choose_threads(cores: int, free: float, local_world_size: int = 1) -> tuple[int, str]:
    """Torch threads per process from the cores actually free. OpenMP threads wait for each other at
    every op: a thread on a core another process keeps busy stalls all of them (measured: one busy
    core of 2 made a 2-thread run 3.4-4.7x slower), so busy cores get no thread. A core that is more
    than ~70% free counts as free."""
    usable = min(cores, max(1, int(free + 0.3)))
    n = max(1, usable // max(1, local_world_size))
    why = f"auto: {free:.1f} of {cores} cores free at start"
    if local_world_size > 1:
        why += f", {local_world_size} processes on this node"
    return n, why
