"""Parallel predict on Ray: the input split into one contiguous shard per task.

Each task loads the model dir (load_model checks it), sets its thread count and predicts its shard
with `forward` (Model.predict / predict_proba, the one forward path); the shards come back in input
order. The input goes to the tasks once, through Ray's object store (jobs.tasks.Runner.share).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hpcml._system import available_cores
from hpcml.errors import HpcmlError, UsageError
from hpcml.inference.forward import forward, load_runtime
from hpcml.inference.predictor import Predictor
from hpcml.jobs.predict import checked_input
from hpcml.jobs.tasks import Runner, Task, attached

__all__ = ["predict_ray", "predict_shard"]


def predict_ray(model_dir: Any, data: Any, *, workers: int | str, backend: str, address: str | None,
                 trust_code: bool, runtime: str, **kw: Any) -> tuple:  # fmt: skip
    """Shards on Ray tasks (jobs.tasks.Runner): each loads the model dir and predicts its shard."""
    from hpcml.models.io import Model

    if isinstance(model_dir, Model | Predictor):
        raise UsageError("parallel predict needs the model dir (each worker loads it), not a Model")
    why = "requested"
    if workers == "auto":  # auto measures this machine's cores and start-up, not a cluster's
        workers, why = 1, "auto on Ray: 1 task (give --workers N for more)"
    runner = Runner(workers=workers, backend=backend, address=address)  # validates the options
    if runtime == "onnx":
        from hpcml.inference.onnx_runtime import require_onnx

        require_onnx("onnxruntime", "onnx", "onnxscript")  # before any worker starts
    # verified here first: a bad dir fails before any worker starts
    model = load_runtime(model_dir, runtime="torch", trust_code=trust_code, threads=available_cores())
    x, name = checked_input(data, model, kw["probabilities"])
    kw["batch_size"] = model.rows_per_forward(kw["batch_size"])
    where = str(Path(model_dir).absolute())  # workers run elsewhere (Ray has its own cwd)
    result = _predict_sharded(runner, where, x, trust_code=trust_code, runtime=runtime, **kw)
    return model, x, name, result, workers, why


def _predict_sharded(runner: Runner, model_dir: str, x: np.ndarray, **kw: Any) -> np.ndarray:
    # shards of whole batches: each cuts its rows where Model.predict(x) would, so rows equal W=1's
    batches = -(-len(x) // kw["batch_size"])
    bounds = np.minimum(
        np.linspace(0, batches, runner.workers + 1).round().astype(int) * kw["batch_size"], len(x)
    )
    with runner:
        shared = runner.share(np.ascontiguousarray(x))
        tasks = [
            Task(f"shard-{i}", "hpcml.jobs.predict_ray:predict_shard",
                 {"model_dir": model_dir, "data": shared, "start": int(a), "stop": int(b), **kw})
            for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)) if b > a
        ]  # fmt: skip
        outcomes = runner.run(tasks, retries=1)
    failed = [o for o in outcomes.values() if not o.ok]
    if failed:
        raise HpcmlError(f"predict {failed[0].id} failed: {failed[0].error}")
    return np.concatenate([outcomes[t.id].value for t in tasks])


def predict_shard(
    *, model_dir: str, data: Any, start: int, stop: int, batch_size: int, probabilities: bool, threads: int,
    attempt: int, trust_code: bool = False, runtime: str = "torch",
) -> np.ndarray:  # fmt: skip
    """In a Ray worker: load the model, predict rows [start, stop) of the shared input."""
    model = load_runtime(model_dir, runtime=runtime, trust_code=trust_code, threads=threads)
    with attached(data) as arr:
        x = np.array(arr[start:stop])  # a private copy: the shared buffer can be released right away
    return forward(model, x, batch_size=batch_size, probabilities=probabilities)
