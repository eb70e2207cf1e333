"""Many independent jobs at once: a local pool of spawned processes, or Ray.

Both backends run the same `Task`s (a function named 'module:function', importable in a worker, and
its keyword arguments) and return the same `Outcome`s, so a sweep or a parallel predict gives the same
results and files either way.

- `local` (default, embedded): `workers` spawned processes, each running one job at a time. A job
  that dies (SIGKILL, segfault, out of memory) only takes its own worker down: the parent sees the exit
  code, names the signal, starts a new worker and retries that job alone. (A ProcessPoolExecutor
  breaks as a whole when one worker dies, and cannot say which job did it.)
- `ray`: `ray.init(address=...)` connects to a cluster (the address is probed first, so an unreachable
  one fails in seconds instead of Ray's minutes of retries); without an address hpcml starts a local
  instance bound to 127.0.0.1, without dashboard, with Ray's token authentication on.

Each job gets `threads = cores // workers` torch threads (at least 1), set in the job before it runs,
so W jobs side by side don't oversubscribe the cores.
"""

from __future__ import annotations

import importlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hpcml._system import limit_threads, threads_per_job
from hpcml.errors import UsageError, error_message, exit_message

__all__ = ["BACKENDS", "Task", "Outcome", "Runner", "SharedArray", "attached", "check_backend"]

BACKENDS = ("local", "ray")


@dataclass(frozen=True)
class Task:
    """One job: `fn(**kwargs, threads=..., attempt=...)`, where fn is 'module:function'."""

    id: str
    fn: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    id: str
    ok: bool
    value: Any = None
    error: str | None = None  # the last attempt's error
    attempts: int = 0
    seconds: float = 0.0  # all attempts, wall
    errors: list[str] = field(default_factory=list)  # one per failed attempt
    # The last error was invalid input (a UsageError): the same job fails the same way, so it is not
    # retried.
    usage_error: bool = False


Event = Callable[[dict[str, Any]], None]


def check_backend(backend: str, address: str | None) -> None:
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if address is not None and backend != "ray":
        raise UsageError("--address is for the Ray backend; add --backend ray")


def _call(fn: str, kwargs: dict[str, Any], threads: int, attempt: int) -> tuple[str, Any]:
    """Run one attempt in the worker; every error becomes ('error', message), never a traceback, or
    ('usage', message) for invalid input, which fails the same way on every attempt."""
    try:
        limit_threads(threads)
        module, _, name = fn.partition(":")
        func = getattr(importlib.import_module(module), name)
        return "ok", func(**kwargs, threads=threads, attempt=attempt)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides on a retry
        return ("usage" if _is_usage_error(exc) else "error"), error_message(exc)


def _is_usage_error(exc: BaseException) -> bool:
    """A deterministic input error: hpcml's UsageError, or a config that fails pydantic's validation."""
    if isinstance(exc, UsageError):
        return True
    try:
        from pydantic import ValidationError
    except ImportError:
        return False
    return isinstance(exc, ValidationError)


def _ray_call(fn: str, threads: int, attempt: int, **kwargs: Any) -> tuple[str, Any]:
    """The Ray task: kwargs arrive as top-level arguments, so Ray resolves ObjectRefs among them."""
    return _call(fn, kwargs, threads, attempt)


def _worker(conn) -> None:
    """A local worker process: runs one attempt at a time as the parent sends them, until told to stop."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if msg is None:
            return
        result = _call(*msg)
        try:
            conn.send(result)
        except Exception as exc:  # noqa: BLE001 - e.g. a value that cannot be sent
            conn.send(("error", f"the job's result could not be sent back: {error_message(exc)}"))


@dataclass(frozen=True)
class SharedArray:
    """A NumPy array in shared memory, handed to local workers by name instead of copied to each."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@contextmanager
def attached(data: Any) -> Iterator[Any]:
    """In a worker: the array behind a `SharedArray` (read-only use), or `data` itself."""
    if not isinstance(data, SharedArray):
        yield data
        return
    from multiprocessing import shared_memory

    import numpy as np

    shm = shared_memory.SharedMemory(name=data.name)
    try:
        view = np.ndarray(data.shape, np.dtype(data.dtype), buffer=shm.buf)
        yield view
        del view  # the buffer must have no exports left when it is closed
    finally:
        shm.close()


class Runner:
    """Run `Task`s on `workers` processes of a backend. Use as a context manager:

    with Runner(workers=2, backend="local") as r:
        outcomes = r.run(tasks, retries=1)
    """

    def __init__(self, *, workers: int = 1, backend: str = "local", address: str | None = None):
        check_backend(backend, address)
        if not isinstance(workers, int) or workers < 1:
            raise UsageError(f"workers must be a whole number >= 1, got {workers!r}")
        self.workers, self.backend, self.address = workers, backend, address
        self.threads = threads_per_job(workers)
        self._shared: list[Any] = []
        self._ray: Any = None
        self._ray_session: Any = None

    def __enter__(self) -> Runner:
        if self.backend == "ray":
            from hpcml.jobs.ray_backend import ray_session

            self._ray_session = ray_session(self.address)
            self._ray = self._ray_session.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for shm in self._shared:
            shm.close()
            shm.unlink()
        self._shared.clear()
        if self._ray_session is not None:
            self._ray_session.__exit__(*exc)
            self._ray = self._ray_session = None

    def share(self, x: Any) -> Any:
        """Put an array where every worker can read it once: shared memory (local) or Ray's store."""
        if self._ray is not None:
            return self._ray.put(x)
        from multiprocessing import shared_memory

        import numpy as np

        shm = shared_memory.SharedMemory(create=True, size=max(1, x.nbytes))
        self._shared.append(shm)
        np.ndarray(x.shape, x.dtype, buffer=shm.buf)[...] = x
        return SharedArray(shm.name, tuple(x.shape), x.dtype.str)

    def run(
        self,
        tasks: list[Task],
        *,
        retries: int = 0,
        on_event: Event | None = None,
        more: Callable[[Outcome], list[Task]] | None = None,
    ) -> dict[str, Outcome]:
        """Run every task, each retried up to `retries` times after a failure; {task id: Outcome}.

        A UsageError (invalid input, e.g. a config value the model cannot take) is not retried: it
        would fail the same way again. Its Outcome says so (`usage_error`). `more(outcome)`, called as
        each task ends, may return new tasks to run (a search that picks its next trial from results)."""
        if retries < 0:
            raise UsageError(f"retries must be >= 0, got {retries}")
        if len({t.id for t in tasks}) != len(tasks):
            raise ValueError("task ids must be unique")
        book = _Book(tasks, retries, on_event or (lambda e: None), more)
        if not tasks:
            return {}
        if self.backend == "ray":
            self._run_ray(book)
        else:
            self._run_local(book)
        return book.outcomes

    def _run_local(self, book: _Book) -> None:
        """Up to `workers` processes, each running one attempt at a time, so a death is always
        attributed to the one job it was running. A worker is reused for the next job (its imports are
        most of a small job's cost; every job sets its own seeds and threads); a dead one is replaced."""
        import multiprocessing as mp
        from multiprocessing.connection import wait

        ctx = mp.get_context("spawn")  # fresh interpreters: no inherited locks, threads or CUDA state
        idle: list[tuple[Any, Any]] = []
        busy: dict[Any, tuple[Any, Task, int]] = {}  # conn -> (process, task, attempt)

        def spawn() -> tuple[Any, Any]:
            conn, child = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(child,), name="hpcml-worker")
            proc.start()
            child.close()  # the worker holds the only other end: EOF as soon as it dies
            return proc, conn

        def retire(proc: Any, conn: Any) -> None:
            try:
                conn.send(None)
            except OSError:
                pass
            conn.close()
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
                proc.join()

        try:
            while book.queue or busy:
                while book.queue and len(busy) < self.workers:
                    task, attempt = book.queue.popleft()
                    proc, conn = idle.pop() if idle else spawn()
                    try:
                        conn.send((task.fn, task.kwargs, self.threads, attempt))
                    except OSError:  # it died while idle: start another
                        retire(proc, conn)
                        proc, conn = spawn()
                        conn.send((task.fn, task.kwargs, self.threads, attempt))
                    busy[conn] = (proc, task, attempt)
                    book.started(task, attempt)
                for conn in wait(list(busy)):
                    proc, task, attempt = busy.pop(conn)
                    try:
                        status, payload = conn.recv()
                    except (EOFError, OSError):  # died without a word: killed, crashed, os._exit
                        proc.join()
                        status, payload = "error", exit_message(proc.exitcode)
                    if proc.is_alive() and not conn.closed:
                        idle.append((proc, conn))
                    else:
                        retire(proc, conn)
                    book.finished(task, attempt, status, payload)
        finally:
            for proc, conn in idle:
                retire(proc, conn)
            for conn, (proc, _, _) in busy.items():  # interrupted: leave no orphans behind
                proc.terminate()
                proc.join(5)
                conn.close()

    def _run_ray(self, book: _Book) -> None:
        from hpcml.jobs.ray_backend import ray_cpus, ray_error

        ray = self._ray
        remote = ray.remote(_ray_call).options(num_cpus=ray_cpus(ray, self.threads), max_retries=0)
        running: dict[Any, tuple[Task, int]] = {}
        try:
            while book.queue or running:
                while book.queue and len(running) < self.workers:
                    task, attempt = book.queue.popleft()
                    ref = remote.remote(task.fn, self.threads, attempt, **task.kwargs)
                    running[ref] = (task, attempt)
                    book.started(task, attempt)
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    task, attempt = running.pop(ref)
                    try:
                        status, payload = ray.get(ref)
                    except ray.exceptions.RayError as err:
                        status, payload = "error", ray_error(ray, err)
                    book.finished(task, attempt, status, payload)
        finally:
            for ref in running:
                ray.cancel(ref, force=True)


class _Book:
    """The queue of (task, attempt) and what happened to each task; shared by both backends."""

    def __init__(self, tasks: list[Task], retries: int, on_event: Event, more=None):
        self.queue: deque[tuple[Task, int]] = deque((t, 0) for t in tasks)
        self.retries, self.on_event, self.total, self.more = retries, on_event, len(tasks), more
        self.outcomes: dict[str, Outcome] = {}
        self._errors: dict[str, list[str]] = {t.id: [] for t in tasks}
        self._t0: dict[str, float] = {}

    def _ended(self, outcome: Outcome) -> None:
        self.outcomes[outcome.id] = outcome
        for task in self.more(outcome) if self.more else []:
            if task.id in self._errors:
                raise ValueError(f"task id {task.id} was already run")
            self.queue.append((task, 0))
            self._errors[task.id] = []
            self.total += 1

    def started(self, task: Task, attempt: int) -> None:
        self._t0.setdefault(task.id, time.perf_counter())

    def finished(self, task: Task, attempt: int, status: str, payload: Any) -> None:
        seconds = time.perf_counter() - self._t0[task.id]
        event = {"id": task.id, "attempt": attempt + 1, "seconds": seconds, "total": self.total}
        if status == "ok":
            self._ended(Outcome(task.id, True, payload, None, attempt + 1, seconds, self._errors[task.id]))
            self.on_event({**event, "event": "done", "value": payload, "done": len(self.outcomes)})
            return
        self._errors[task.id].append(payload)
        if attempt < self.retries and status != "usage":
            self.queue.append((task, attempt + 1))  # to the back: a crash from memory pressure may pass
            self.on_event({**event, "event": "retry", "error": payload, "done": len(self.outcomes)})
            return
        self._ended(Outcome(
            task.id, False, None, payload, attempt + 1, seconds, self._errors[task.id], status == "usage"
        ))  # fmt: skip
        self.on_event({**event, "event": "failed", "error": payload, "done": len(self.outcomes)})
