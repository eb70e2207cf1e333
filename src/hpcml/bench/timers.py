"""Timing helpers: synchronized timestamps, warm-up, interleaved repeats, median and spread.

Every timestamp that ends GPU work is taken after `torch.cuda.synchronize`: kernels launch
asynchronously, so an unsynchronized clock would time the launches, not the work.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def sync(device: Any = None) -> None:
    """Wait for queued work on `device` (a torch.device or str) to finish; a no-op on the CPU."""
    if device is None:
        return
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)  # note: a host-device sync, on purpose: the timestamp follows it


def now(device: Any = None) -> float:
    """A timestamp taken after the device has finished its queued work."""
    sync(device)
    return time.perf_counter()


def summarize(values: Sequence[float | None], *, higher_is_better: bool = False) -> dict[str, Any]:
    """Median, min and max of repeated measurements.

    None (e.g. a target never reached) ranks below every real result rather than being dropped, so
    with half the runs failing the median itself is None instead of a flattering median of survivors.
    """
    if not values:
        return {"median": None, "min": None, "max": None, "ok": 0, "runs": 0}
    bad = -math.inf if higher_is_better else math.inf
    keyed = [bad if v is None else float(v) for v in values]

    def finite(v: float) -> float | None:
        return None if math.isinf(v) else v

    return {
        "median": finite(statistics.median(keyed)),  # (x + inf) / 2 is inf: a miss pulls it down
        "min": finite(min(keyed)),
        "max": finite(max(keyed)),
        "ok": sum(v is not None for v in values),
        "runs": len(values),
    }


def ratio(num: float | None, den: float | None) -> float | None:
    """num / den, or None when either is missing (or den is zero)."""
    return num / den if num is not None and den else None


def interleave(
    contenders: dict[str, Callable[[int], dict]],
    *,
    repeats: int,
    warmup: bool = True,
    on_result: Callable[[str, int, dict], None] | None = None,
) -> dict[str, list[dict]]:
    """Run every contender once per repeat, in turn (A, B, C, A, B, C, ...), so a slow spell of a
    shared machine hits all of them rather than all repeats of one. `contenders[name](repeat)` runs
    one measurement; repeat -1 is the untimed warm-up (imports, allocator, caches), discarded."""
    if warmup:
        for fn in contenders.values():
            fn(-1)
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for rep in range(repeats):
        for name, fn in contenders.items():
            result = fn(rep)
            runs[name].append(result)
            if on_result is not None:
                on_result(name, rep, result)
    return runs
