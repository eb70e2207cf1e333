"""`Predictor`: a model dir kept loaded, predicting on as many warm processes as pay.

    with hpcml.Predictor("runs/x/model", workers=2) as p:   # helpers start now, stay warm
        y = p.predict(x)                                     # = load_model(...).predict(x)
        y2 = p.predict(x2)                                   # same processes, no start-up

workers=1 predicts in this process with every core as a torch thread. workers=W > 1 uses a
`WorkerPool`: this process and W-1 helpers. workers="auto" decides per call, by measuring:

1. The first rows are predicted here: 256 on 1 thread (a warm-up), then as workers=1 would (all
   cores) in growing chunks until one takes CALIBRATE_SECONDS: its rows/s give the time left here.
   These rows are part of the answer.
2. As soon as the time left is short next to a pool's start-up (STARTUP_SECONDS + this model's
   load time; 0 for a pool already warm) or MIN_POOL_SECONDS, the rest is predicted here in one
   call: small inputs never pay for processes, nor for more than a chunk or two of measuring.
3. Otherwise one more chunk (about CALIBRATE_SECONDS of work) runs on 1 thread. The pool's
   estimate (`choose_workers`): this process alone until the helpers are ready, then one 1-thread
   process per core, at that rate where the cores are free and at their share of the CPU where
   other processes keep cores busy
   (training.precision.free_cores, sampled only now). The pool is used if it is estimated at least
   1/PAYS times faster than this process with its faster thread count (all cores, or 1 on a busy
   machine, where OpenMP threads stall).

Each call's choice and its reason are in `decision` (and logged on the "hpcml" logger). A helper
that died fails the call with an error naming it; the next call starts a new pool.
`shared_predictor` keeps the predictors `hpcml.predict` uses, keyed by model dir (and its files'
size and mtime, so a rewritten dir is loaded again), workers, runtime and trust_code; they are
closed at exit.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hpcml._system import available_cores
from hpcml.errors import UsageError
from hpcml.inference.forward import chunk_stop, forward, load_runtime, torch_threads
from hpcml.inference.pool import WorkerPool

__all__ = ["Predictor", "Decision", "check_workers", "choose_workers", "shared_predictor", "close_shared"]

# spawn + import torch and hpcml in a helper, measured on the 2-core VM with 1-2 helpers at load ~2.5:
# 1.0-1.2 s; this model's own load time (measured here) is added
STARTUP_SECONDS = 1.2
MIN_POOL_SECONDS = 0.5  # less work than this left: measuring at 1 thread would cost more than it could win
POOL_EFFICIENCY = 0.9  # rows/s of W processes vs W x one: chunk transfer through pipes, the last chunk
PAYS = 0.8  # a pool must be estimated at least 1 / PAYS = 1.25x faster: short timings are noisy
CALIBRATE_SECONDS = 0.05  # a timed chunk; shorter ones are noise on a busy machine


@dataclass(frozen=True)
class Decision:
    """What one predict call ran on: processes, torch threads in each, and why."""

    workers: int
    threads: int
    reason: str


def check_workers(workers: Any) -> None:
    if workers == "auto" or (isinstance(workers, int) and not isinstance(workers, bool) and workers >= 1):
        return
    raise UsageError(f"workers must be a whole number >= 1 or 'auto', got {workers!r}")


class Predictor:
    """A model (dir) ready to predict on `workers` processes (1, W, or "auto": see the module doc)."""

    def __init__(
        self, model: Any, *, workers: int | str = "auto", runtime: str = "torch", trust_code: bool = False
    ):
        from hpcml.models.io import Model

        check_workers(workers)
        self.workers, self.runtime, self.trust_code = workers, runtime, trust_code
        self.decision: Decision | None = None
        self._pool: WorkerPool | None = None
        self._load_seconds = 0.0  # this model's load time here: a helper pays it too
        self._lock = threading.Lock()
        self._dir = None if isinstance(model, Model) else str(Path(model).absolute())
        if self._dir is None:
            if workers not in (1, "auto"):
                raise UsageError("parallel predict needs the model dir (each worker loads it), not a Model")
            if runtime != "torch":
                raise UsageError(f"runtime={runtime!r} needs the model dir, not a loaded Model")
            self.model = model
        elif isinstance(workers, int) and workers > 1:
            self._pool = self._new_pool(workers)
            self.model = self._pool.model
        else:
            t0 = time.perf_counter()
            self.model = load_runtime(
                self._dir, runtime=runtime, trust_code=trust_code, threads=available_cores()
            )
            self._load_seconds = time.perf_counter() - t0

    def _new_pool(self, workers: int, **kw: Any) -> WorkerPool:
        return WorkerPool(self._dir, workers=workers, runtime=self.runtime, trust_code=self.trust_code, **kw)

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def pool(self) -> WorkerPool | None:
        """The warm pool in use, if any (its pids, readiness, rows per process of the last call)."""
        return None if self._pool is None or self._pool.closed else self._pool

    @property
    def pids(self) -> list[int]:
        """The helper processes' pids (empty without a pool)."""
        return [] if self.pool is None else self.pool.pids

    def predict(self, x: Any, *, probabilities: bool = False, batch_size: int | None = None) -> np.ndarray:
        """Every row of x (array or tensor), in order: what Model.predict / predict_proba gives.
        `batch_size`: rows per forward pass (default: the model's `predict_rows`). Calls from several
        threads take turns (they would share the same cores and helpers)."""
        batch_size = self.model.rows_per_forward(batch_size)
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        with self._lock:
            return self._predict(x, {"batch_size": batch_size, "probabilities": probabilities})

    def _predict(self, x: np.ndarray, kw: dict) -> np.ndarray:
        if self.workers == "auto" and self._dir is not None and self.runtime == "torch":
            return self._auto(x, kw)
        if self.workers == 1 or self.workers == "auto":
            why = (
                f"workers={self.workers}" if self.workers == 1 else "auto: 1 worker (a loaded Model or onnx)"
            )
            return self._here(x, available_cores(), why, kw)
        if self.pool is None:  # a helper died last time: start afresh
            self._pool = self._new_pool(self.workers)
            self.model = self._pool.model
        self._decide(self.workers, self._pool.threads, f"workers={self.workers}")
        return self._pool.predict(x, **kw)

    def _decide(self, workers: int, threads: int, reason: str) -> None:
        self.decision = Decision(workers, threads, reason)
        logging.getLogger("hpcml").info("predict: %s", reason)

    def _here(self, x: np.ndarray, threads: int, reason: str, kw: dict) -> np.ndarray:
        self._decide(1, threads, reason)
        with torch_threads(threads):
            return forward(self.model, x, **kw)

    def _auto(self, x: np.ndarray, kw: dict) -> np.ndarray:
        from hpcml.training.precision import free_cores

        cores, n, parts, t0 = available_cores(), len(x), [], time.perf_counter()
        if n == 0:
            return self._here(x, cores, "auto: no rows", kw)
        done = 0  # rows [0, done) are predicted, in parts

        def run(rows: int, threads: int) -> tuple[int, float]:
            """The next chunk of about `rows` rows here, on `threads` threads: (rows, seconds)."""
            nonlocal done
            start, done = done, chunk_stop(done, rows, n, kw["batch_size"])
            with torch_threads(threads):
                t = time.perf_counter()
                parts.append(forward(self.model, x[start:done], **kw))
                return done - start, max(time.perf_counter() - t, 1e-9)

        def finish(workers: int, threads: int, why: str) -> np.ndarray:
            nonlocal done
            if workers > 1:
                parts.append(self._pool.predict(x, start=done, **kw))
                done = n
            while done < n and done % kw["batch_size"]:  # the rest of the batch in progress
                run(kw["batch_size"], threads)
            if done < n:  # then whole batches from a batch start: one call, cut where workers=1 cuts
                with torch_threads(threads):
                    parts.append(forward(self.model, x[done:], **kw))
                done = n
            self._decide(workers, threads, f"auto: {workers} worker{'s' if workers > 1 else ''}: {why}")
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        startup = 0.0 if self.pool is not None and self.pool.ready else STARTUP_SECONDS + self._load_seconds
        # The first chunk on 1 thread: it warms up, and on a busy core it cannot stall on a sibling
        # thread. Small chunks overstate the time left (warm-up, each call's overheads): once even
        # that estimate is too short for a pool, the rest goes in one call, as workers=1 does.
        rows, seconds = run(256, 1)
        while (here := (n - done) * seconds / rows) >= max(startup, MIN_POOL_SECONDS) and cores > 1:
            if seconds >= CALIBRATE_SECONDS and rows > 256:
                break
            rows, seconds = run(2 * rows, cores)
        rows_all, seconds_all = rows, seconds
        if cores < 2 or here < max(startup, MIN_POOL_SECONDS):
            total = time.perf_counter() - t0 + here
            why = "1 core" if cores < 2 else f"{n:,} rows take ~{total:.2f} s here"
            return finish(1, cores, f"{why}; starting workers takes ~{startup:.1f} s")
        # a pool could pay: one chunk on 1 thread, the rate each pool process would have, sized to take
        # about CALIBRATE_SECONDS if one thread does 1/cores of the work (it runs slower than all cores
        # on an idle machine: the same rows as the last chunk cost ~3% of a 1M-row call here)
        rows, seconds = run(max(256, int(rows * CALIBRATE_SECONDS / seconds / cores)), 1)
        warm = None if self.pool is None else self.pool.workers
        workers, threads, why = choose_workers(
            rows=n - done, rate_all=rows_all / seconds_all, rate_one=rows / seconds, cores=cores,
            startup=startup, free=lambda: free_cores(0.05), pool_workers=warm,
        )  # fmt: skip
        if workers > 1 and warm is None:
            self._pool = self._new_pool(workers, threads=1, model=self.model)
        return finish(workers, threads, why)


def choose_workers(
    *, rows: int, rate_all: float, rate_one: float, cores: int, startup: float,
    free: Callable[[], float], pool_workers: int | None = None,
) -> tuple[int, int, str]:  # fmt: skip
    """(processes, torch threads each, why) for `rows` rows, from the rows/s measured here on all
    `cores` threads and on 1 thread, a pool's `startup` seconds on an idle machine (0: warm) and its
    size if one is started. `free()` (the cores other processes leave free) is asked only if a pool
    would pay on an idle machine, its best case.

    Busy cores: the other processes' `cores - free` cores of demand share the CPU with ours, each
    runnable process getting an equal part (Linux CFS). 1-thread processes never wait for each other,
    so a pool still gains on a busy machine, only less (and its helpers start slower); threads in one
    process are the ones that stall, which is why `here` takes the faster of its two measured rates."""
    threads, rate = (1, rate_one) if rate_one > rate_all else (cores, rate_all)
    here = rows / rate
    workers = pool_workers or cores

    def estimate(busy: float) -> tuple[float, str]:
        # the cores' worth k of our busy processes get; rate_one was measured with 1 of them
        def share(k: int) -> float:
            return min(k, cores * k / (k + busy))

        each = rate_one / share(1) * share(workers) / workers  # rows/s of one of W processes
        pool = _pool_seconds(rows, each, workers, startup * rate_one / each)
        return pool, (
            f"~{here:.2f} s left here at {threads} thread(s) ({rate:,.0f} rows/s; {rate_one:,.0f} at "
            f"1 thread), ~{pool:.2f} s on {workers} processes (start-up ~{startup:.1f} s idle)"
        )

    pool, why = estimate(busy=0.0)  # the best case: if even that does not pay, stop here
    if pool > PAYS * here:
        return 1, threads, why
    cores_free = free()
    pool, why = estimate(busy=max(0.0, cores - cores_free))
    why += f"; {cores_free:.1f} of {cores} cores free"
    return (workers, 1, why) if pool <= PAYS * here else (1, threads, why)


def _pool_seconds(rows: int, each: float, workers: int, startup: float) -> float:
    """This process alone until the helpers are ready, then `workers` processes at `each` rows/s."""
    alone = startup * each
    if rows <= alone:
        return rows / each
    return startup + (rows - alone) / (workers * each * POOL_EFFICIENCY)


# ---------------------------------------------------------------------------------- shared predictors

_SHARED: OrderedDict[tuple, tuple[tuple, Predictor]] = OrderedDict()  # key -> (files' signature, it)
SHARED_MAX = 2  # predictors kept (each may hold helper processes); the least recently used goes


def _signature(model_dir: Path) -> tuple:
    out = []
    for name in ("model.json", "model.safetensors"):
        try:
            st = (model_dir / name).stat()
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


def shared_predictor(
    model_dir: Any, *, workers: int | str, runtime: str = "torch", trust_code: bool = False
) -> Predictor:
    """The Predictor for these settings that this process keeps for repeated calls (closed at exit)."""
    check_workers(workers)
    path = Path(model_dir).absolute()
    key, sig = (str(path), workers, runtime, trust_code), _signature(path)
    held_sig, held = _SHARED.pop(key, (None, None))
    if held is not None and held_sig != sig:  # the dir was rewritten: load it again
        held.close()
        held = None
    if held is None:
        held = Predictor(path, workers=workers, runtime=runtime, trust_code=trust_code)
    _SHARED[key] = (sig, held)
    while len(_SHARED) > SHARED_MAX:
        _SHARED.popitem(last=False)[1][1].close()
    return held


@atexit.register
def close_shared() -> None:
    """Close every shared predictor (their helper processes end)."""
    while _SHARED:
        _SHARED.popitem()[1][1].close()
