"""FLOPs and peaks for MFU: counted FLOPs (FlopCounterMode), a measured matmul peak, GPU datasheets.

MFU = counted model FLOPs per second / peak FLOPs per second. The count is torch's own
(`torch.utils.flop_counter.FlopCounterMode`: matmuls and convolutions, forward and backward), so
elementwise ops and the optimizer are not counted, as in the usual definition of MFU.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hpcml.bench.timers import sync
from hpcml.models.flops import forward_flops, train_step_flops  # noqa: F401  (re-exported)

# Dense (no sparsity) peak TFLOP/s from the vendors' datasheets. Matched by substring of
# torch.cuda.get_device_name(), first match wins, so the more specific names come first.
GPU_PEAKS_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0, "fp16": 835.0}),
    ("H100", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),  # SXM
    ("GH200", {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}),
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}),
    ("A10G", {"fp32": 31.2, "tf32": 35.0, "bf16": 70.0, "fp16": 70.0}),
    ("A10", {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "fp16": 125.0}),
    ("L40S", {"fp32": 91.6, "tf32": 183.0, "bf16": 362.0, "fp16": 362.0}),
    ("L4", {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}),
    ("RTX 4090", {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}),
    ("V100", {"fp32": 15.7, "fp16": 125.0}),
    ("T4", {"fp32": 8.1, "fp16": 65.0}),
)


def datasheet_peak(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of a GPU by name for a precision (fp32, tf32, bf16, fp16); None if unknown."""
    for key, peaks in GPU_PEAKS_TFLOPS:
        if key.lower() in device_name.lower():
            tflops = peaks.get(precision)
            return None if tflops is None else tflops * 1e12
    return None


def measured_matmul_peak(
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    dtype: torch.dtype = torch.float32,
    n: int | None = None,
    repeats: int = 5,
) -> dict[str, Any]:
    """The best rate of a large square matmul (2 n^3 FLOPs), on `threads` torch threads.

    The best of `repeats` (after one warm-up) estimates what the hardware can do for this dtype; on a
    shared machine the median would measure the neighbours. Threads are restored afterwards.
    """
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        c = torch.empty(n, n, device=dev, dtype=dtype)
        torch.mm(a, b, out=c)  # warm-up: kernel selection, page faults
        best = float("inf")
        for _ in range(repeats):
            sync(dev)
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            sync(dev)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return {
        "flops_per_second": 2 * n**3 / best,
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": best,
        "threads": threads or before,
        "device": str(dev),
    }
