"""Facts about this machine that every floor needs, without importing torch (limit_threads imports
it when called)."""

from __future__ import annotations

import functools
import os


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity on Linux), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def threads_per_job(workers: int) -> int:
    """Torch threads for each of `workers` processes side by side: cores // workers, at least 1."""
    return max(1, available_cores() // max(1, workers))


def limit_threads(threads: int) -> None:
    """This process's torch (and OpenMP/MKL) thread count."""
    # The env vars only matter before torch is first imported in this process (a fresh spawned
    # worker); set_num_threads covers a process that already imported it (a reused Ray worker).
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
