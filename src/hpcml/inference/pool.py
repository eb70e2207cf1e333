"""Warm predict workers: processes started once that predict chunks of rows until closed.

`WorkerPool(model_dir, workers=W)` predicts on W processes: this one and W-1 spawned helpers. Each
helper sets its thread count, imports torch, loads the model dir once (load_model checks it) and then
serves chunks. Every process predicts with `forward`, which is `Model.predict` / `predict_proba`, the
one forward path (preprocessing and target scale included), so the rows equal what Model.predict
gives in one process.

Why this process takes a share: it would only wait otherwise, and it computes from the first call on
while the helpers start (spawn + import torch + load: about 1 s on a 2-core VM), which hides most of
their start-up. Rows go in chunks from a shared counter, so a helper that starts late or a busy core
just takes fewer of them.

Transport: numpy buffers as raw bytes through the pipe (`send_bytes` / `recv_bytes_into`: the arrays
are never pickled; a small tuple says their dtype and shape), with a feeder thread per helper here so
this process keeps computing meanwhile. Measured on the 2-core VM (load 1.6-2.7), 1M rows x 32 float32
(128 MB) in 32 chunks, round trip to one process: 55-120 ms through a pipe, against 85-100 ms for a
fresh shared-memory segment per call (its page faults) and 20-35 ms for shared-memory slots kept
across calls; at 1-4% of a compute-bound predict of those rows, the simpler pipes won.

A helper that dies (killed, out of memory) ends the call, or the next one, with an HpcmlError naming
it, and the pool closes (a `Predictor` starts a new one on its next call).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from hpcml._system import limit_threads, threads_per_job
from hpcml.errors import HpcmlError, error_message, exit_message
from hpcml.inference.forward import chunk_stop, forward, load_runtime, torch_threads

__all__ = ["WorkerPool"]

CHUNKS_PER_WORKER = 32  # small enough that the last chunk ends close to the others
MIN_CHUNK_ROWS = 1024


def _helper(conn: Any, model_dir: str, runtime: str, trust_code: bool, threads: int) -> None:
    """A helper process: load once, say ready, then predict each chunk sent until told to stop."""
    try:
        limit_threads(threads)  # before torch is imported: OpenMP reads the env var once
        model = load_runtime(model_dir, runtime=runtime, trust_code=trust_code, threads=threads)
    except BaseException as exc:  # noqa: BLE001 - the parent names this helper and raises it
        conn.send(("error", error_message(exc)))
        return
    conn.send(("ready", os.getpid(), time.time()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        dtype, shape, batch_size, probabilities = msg
        x = np.empty(shape, dtype)
        if conn.recv_bytes_into(_bytes(x)) != x.nbytes:  # out of step with the parent: stop here
            conn.send(("error", f"received a chunk of the wrong size for {shape} {dtype}"))
            return
        try:
            y = np.ascontiguousarray(forward(model, x, batch_size=batch_size, probabilities=probabilities))
        except Exception as exc:  # noqa: BLE001 - reported with this helper's name
            conn.send(("error", error_message(exc)))
            continue
        conn.send(("ok", y.dtype.str, y.shape))
        conn.send_bytes(_bytes(y))


def _bytes(a: np.ndarray) -> np.ndarray:
    """A C-contiguous array as flat bytes: Connection's send_bytes and recv_bytes_into size a 2-D
    buffer of 1-byte items (uint8 images) by its first axis, which would cut the message short."""
    return a.reshape(-1).view(np.uint8)


class _Helper:
    """The parent's end of one helper: its process, its pipe, whether it said ready."""

    def __init__(self, ctx: Any, index: int, args: tuple) -> None:
        self.index, self.ready_seconds = index, None
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_helper, args=(child, *args), name=f"hpcml-predict-{index}", daemon=True
        )
        self.started = time.time()
        self.proc.start()
        child.close()  # the helper holds the only other end: EOF as soon as it dies

    @property
    def name(self) -> str:
        return f"predict worker {self.index} (pid {self.proc.pid})"

    def _fail(self, what: str) -> HpcmlError:
        self.proc.join(5)  # the exit code says how it died
        why = exit_message(self.proc.exitcode) if self.proc.exitcode is not None else what
        return HpcmlError(f"{self.name} failed: {why}; its pool is closed")

    def _recv(self) -> tuple:
        try:
            msg = self.conn.recv()
        except (EOFError, OSError):
            raise self._fail("its pipe closed") from None
        if msg[0] == "error":
            raise HpcmlError(f"{self.name}: {msg[1]}")
        return msg

    def check_ready(self) -> bool:
        """Whether it said it is ready, reading that message if it came (never blocks)."""
        if self.ready_seconds is None and self.conn.poll(0):  # poll also wakes on EOF: it died starting
            _, _pid, at = self._recv()
            self.ready_seconds = at - self.started
        return self.ready_seconds is not None

    def wait_ready(self, done: threading.Event) -> bool:
        """Block until ready (True), or until `done` is set first (False)."""
        while not self.check_ready():
            if done.wait(0.02):
                return False
        return True

    def predict(self, x: np.ndarray, out: np.ndarray, *, batch_size: int, probabilities: bool) -> None:
        """Rows x predicted by the helper, written into `out` (same rows)."""
        try:
            self.conn.send((x.dtype.str, x.shape, batch_size, probabilities))
            self.conn.send_bytes(_bytes(x))
        except OSError:  # BrokenPipeError: it died while idle
            raise self._fail("its pipe closed") from None
        _, dtype, shape = self._recv()
        if np.dtype(dtype) != out.dtype or tuple(shape) != out.shape:
            raise HpcmlError(f"{self.name} sent {dtype} {tuple(shape)}, expected {out.dtype} {out.shape}")
        try:
            size = self.conn.recv_bytes_into(_bytes(out))
        except (EOFError, OSError):
            raise self._fail("its pipe closed") from None
        if size != out.nbytes:
            raise HpcmlError(f"{self.name} sent {size} bytes for {out.nbytes}")

    def stop(self) -> None:
        """Ask it to exit once its current chunk is done."""
        try:
            self.conn.send(None)
        except OSError:  # already gone
            pass

    def end(self, wait: float = 5.0) -> None:
        """Wait up to `wait` seconds for it to exit, then terminate it."""
        self.proc.join(wait)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


class WorkerPool:
    """`workers` processes predicting with the model dir: this one and `workers - 1` warm helpers.

    with WorkerPool("runs/x/model", workers=2) as pool:
        y = pool.predict(x, probabilities=False)   # = load_model(...).predict(x)

    Each process uses `threads` torch threads (default cores // workers). The helpers start in the
    background when the pool is made; the first call does not wait for them. `model`: this process's
    model, if it already loaded that dir. One call at a time (a `Predictor` makes threads take turns).
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        workers: int,
        threads: int | None = None,
        runtime: str = "torch",
        trust_code: bool = False,
        model: Any = None,
    ):
        if not isinstance(workers, int) or workers < 2:
            raise ValueError(f"a pool has >= 2 workers (this process and helpers), got {workers!r}")
        import multiprocessing as mp

        self.workers, self.threads = workers, threads or threads_per_job(workers)
        where = str(Path(model_dir).absolute())
        ctx = mp.get_context("spawn")  # fresh interpreters: no inherited locks, threads or CUDA state
        # helpers first: they import torch and load while this process loads (and verifies) its copy;
        # a bad dir fails here, and the helpers still starting are stopped at once
        self._helpers = [
            _Helper(ctx, i, (where, runtime, trust_code, self.threads)) for i in range(1, workers)
        ]
        self.closed = False
        self.rows_last_call: list[int] = []  # rows each process predicted (0: this one)
        try:
            self.model = model or load_runtime(
                where, runtime=runtime, trust_code=trust_code, threads=self.threads
            )
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def pids(self) -> list[int]:
        return [h.proc.pid for h in self._helpers]

    @property
    def ready(self) -> bool:
        """Every helper has said it is ready (a helper that died starting: the pool closes, and raises)."""
        try:
            return all([h.check_ready() for h in self._helpers])
        except HpcmlError:
            self.close()
            raise

    @property
    def startup_seconds(self) -> float | None:
        """The slowest helper's time from spawn to ready, once all are ready."""
        return max(h.ready_seconds for h in self._helpers) if self.ready else None

    def close(self) -> None:
        """Stop the helpers and wait for them (a few seconds at most)."""
        if not self.closed:
            self.closed = True
            for h in self._helpers:
                h.stop()
            for h in self._helpers:
                h.end(wait=5.0 if h.ready_seconds is not None else 0.0)  # one still starting: no wait
                h.conn.close()

    def predict(
        self, x: np.ndarray, *, start: int = 0, batch_size: int | None = None, probabilities: bool = False
    ) -> np.ndarray:
        """Rows [start:] of x predicted, in order, in chunks shared out between this process and the
        helpers; equal to Model.predict(x, batch_size)[start:] (see SAME_KERNEL_ROWS)."""
        if self.closed:
            raise HpcmlError("this predict pool is closed")
        for h in self._helpers:  # one that died since the last call: say so now, not maybe never
            if h.ready_seconds is not None and not h.proc.is_alive():
                self.close()
                raise h._fail("it exited")
        x, n = np.ascontiguousarray(x), len(x)
        batch_size = self.model.rows_per_forward(batch_size)  # helpers get the number: same cuts
        self.rows_last_call = [0] * self.workers
        with torch_threads(self.threads):
            # one row first: the output's dtype and shape, and a bad input fails here, before any helper
            first = forward(self.model, x[:1], batch_size=batch_size, probabilities=probabilities)
            out = np.empty((n - start, *first.shape[1:]), first.dtype)
            chunk = max(MIN_CHUNK_ROWS, -(-(n - start) // (self.workers * CHUNKS_PER_WORKER)))
            lock, done, failures, cursor = threading.Lock(), threading.Event(), [], [start]

            def take(who: int) -> tuple[slice, slice] | None:
                """The next chunk for process `who`: (rows of x, the same rows of out)."""
                with lock:
                    a = cursor[0]
                    if done.is_set() or a >= n:
                        return None
                    cursor[0] = b = chunk_stop(a, chunk, n, batch_size)
                    self.rows_last_call[who] += b - a
                return slice(a, b), slice(a - start, b - start)

            def feed(h: _Helper) -> None:
                try:
                    if h.wait_ready(done):
                        while (rows := take(h.index)) is not None:
                            h.predict(
                                x[rows[0]], out[rows[1]], batch_size=batch_size, probabilities=probabilities
                            )
                except BaseException as exc:  # noqa: BLE001 - raised by the caller's thread below
                    failures.append(exc)
                    done.set()

            feeders = [threading.Thread(target=feed, args=(h,), daemon=True) for h in self._helpers]
            for t in feeders:
                t.start()
            try:
                while (rows := take(0)) is not None:
                    out[rows[1]] = forward(
                        self.model, x[rows[0]], batch_size=batch_size, probabilities=probabilities
                    )
            except BaseException:  # e.g. KeyboardInterrupt: feeders waiting on a helper see it die
                done.set()
                for h in self._helpers:
                    h.end(wait=0)
                for t in feeders:
                    t.join()
                self.close()
                raise
            done.set()  # no more chunks; helpers still starting stay so for the next call
            for t in feeders:
                t.join()
        if failures:
            self.close()
            raise failures[0]
        return out
