"""What compress/export reports: stored values, file sizes, the test metric and latency.

Latency is the forward pass of raw rows, normalization included (`Folded` for torch, the ONNX graph
for onnxruntime), timed with an explicit thread count. Contenders are interleaved rep by rep, so a
busy machine slows them alike, and each figure is a median (with the spread next to it).

The large batch is 1024 rows, or fewer for a model whose 1024 rows cost more than MAX_BATCH_MACS
(`batches_for`): 1024 rows of ResNet-18 at 224x224 are 1.9 TMACs, minutes per call on one thread,
and each contender is called 10 times or more.
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BATCHES",
    "MAX_BATCH_MACS",
    "batches_for",
    "dir_bytes",
    "latencies",
    "stored_values",
    "threads_set",
    "torch_forward",
    "weights_bytes",
]

BATCHES = (1, 1024)
MAX_BATCH_MACS = 2e9  # ~0.1 s of dense convolutions on one core, ~0.5 s of depthwise ones (MobileNets)


@contextlib.contextmanager
def threads_set(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stored_values(module: torch.nn.Module) -> int:
    """Numbers the model stores (parameters, int8 weights and scales, BatchNorm statistics)."""
    return sum(t.numel() for k, t in module.state_dict().items() if not k.endswith("num_batches_tracked"))


def dir_bytes(path: str | Path) -> int:
    """Size of a model dir's weights file, or of a single file."""
    path = Path(path)
    return os.path.getsize(path / "model.safetensors" if path.is_dir() else path)


def weights_bytes(module: torch.nn.Module) -> int:
    """Size of the module's safetensors file (before any encryption)."""
    from safetensors.torch import save

    return len(save({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}))


def torch_forward(model: Any) -> Callable[[np.ndarray], Any]:
    """Raw rows -> logits through the model's module with its normalization folded in."""
    from hpcml.inference.export import Folded

    folded = Folded(model).eval()

    def run(x: np.ndarray):
        with torch.inference_mode():
            return folded(torch.from_numpy(x))

    return run


def batches_for(module: torch.nn.Module, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """BATCHES, the large one cut to the largest power of two whose forward costs at most
    MAX_BATCH_MACS (counted by FlopCounterMode on one zero row); (1,) when even 2 rows cost more."""
    from hpcml.models.flops import forward_flops

    training = module.training
    try:
        macs = forward_flops(module.eval(), torch.zeros(1, *input_shape)) / 2
    finally:
        module.train(training)
    if macs * BATCHES[-1] <= MAX_BATCH_MACS:
        return BATCHES
    rows = 2 ** int(math.log2(MAX_BATCH_MACS / macs)) if macs <= MAX_BATCH_MACS else 1
    return (1, rows) if rows > 1 else (1,)


def _time(fn: Callable[[np.ndarray], Any], x: np.ndarray, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t0) / calls


def latencies(
    contenders: dict[str, Callable[[np.ndarray], Any]],
    input_shape: tuple[int, ...],
    *,
    threads: int,
    batches: tuple[int, ...] = BATCHES,
    budget_s: float = 0.5,
    reps: int = 7,
) -> dict[str, Any]:
    """{"batch_<n>": {contender: {"ms": median, "spread_ms": [min, max], "samples_ms": [...]}}},
    measured interleaved.

    Each contender is warmed up, then timed in `reps` rounds of `calls` calls (sized from the
    warm-up so a round of all contenders takes about budget_s / reps)."""
    out: dict[str, Any] = {"threads": threads}
    rng = np.random.default_rng(0)
    with threads_set(threads):
        for batch in batches:
            x = rng.standard_normal((batch, *input_shape)).astype(np.float32)
            first = {name: _time(fn, x, 3) for name, fn in contenders.items()}  # warm-up
            calls = max(1, int(budget_s / reps / max(sum(first.values()), 1e-7)))
            samples: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(reps):
                for name, fn in contenders.items():
                    samples[name].append(_time(fn, x, calls) * 1e3)
            out[f"batch_{batch}"] = {
                name: {"ms": statistics.median(s), "spread_ms": [min(s), max(s)], "samples_ms": s}
                for name, s in samples.items()
            }
    return out
