"""The public functions: train (one process, or ranks through the launcher), evaluate and predict."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

import hpcml
from hpcml.config import DataConfig, RayLaunchConfig, TrainConfig, build_config, format_validation_error
from hpcml.distributed.dist import launcher_env
from hpcml.inference.predictor import shared_predictor
from hpcml.models.io import Model, load_model
from hpcml.training.build import ModelSource
from hpcml.training.callbacks import Callback
from hpcml.training.precision import available_cores
from hpcml.training.report import RunDirLock, default_run_dir
from hpcml.training.run import Run, as_config, run_process


def _model(model: Model | str | Path, trust_code: bool) -> Model:
    return model if isinstance(model, Model) else load_model(model, trust_code=trust_code)


def evaluate(
    model: Model | str | Path,
    data: DataConfig | dict | str = "mnist1d",
    *,
    target: str | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Metrics of a model (or model dir) on `data`: the test split of a built-in dataset, or every
    row of a user's file / store (cleaned as at training: rows with missing values are dropped).

    Classification gives test_accuracy and test_loss (cross-entropy); regression test_loss (MSE),
    test_rmse and test_r2. `target` defaults to the column the model was trained on.
    `trust_code=True` allows a model dir whose architecture is a `module:function` spec to import it.
    """
    from hpcml.inference.evaluate import evaluate_model

    m = _model(model, trust_code)
    if isinstance(data, str):
        data = DataConfig(name=data)
    elif isinstance(data, dict):
        data = DataConfig.model_validate(data)
    torch.set_num_threads(available_cores())
    return evaluate_model(m, data, target=target)


def predict(
    model: Model | str | Path,
    x: Any,
    *,
    probabilities: bool = False,
    workers: int | str = "auto",
    backend: str = "local",
    address: str | None = None,
    batch_size: int | None = None,
    output: str | Path | None = None,
    trust_code: bool = False,
) -> np.ndarray:
    """Predicted class indices for each row of `x` (or class probabilities with `probabilities=True`).

    `x` is an array, or a path/URL to CSV, Parquet, NumPy or an hpcml store (columns matched to the
    model). With a model dir, `workers` processes predict: 1 is this process, W > 1 this process and
    W-1 warm helpers, "auto" (the default) measures whether helpers pay (hpcml.inference.predictor);
    the model and its helpers stay loaded for the next call with the same model dir and workers
    (`hpcml.Predictor` holds them under your control instead). `backend="ray"` shards over Ray tasks
    at `address`. The rows come back in input order, identical to `workers=1`. `output` also writes
    them to a .parquet or .csv file (see hpcml.jobs.predict). `trust_code=True` allows a model dir
    whose architecture is a `module:function` spec to import it (in every worker; the module must be
    importable there: PYTHONPATH or installed).
    """
    from hpcml.jobs.predict import predict_parallel

    local = backend == "local"
    if (
        isinstance(model, Model)
        and local
        and workers in (1, "auto")
        and not isinstance(x, str | Path)
        and not output
    ):
        return (
            model.predict_proba(x, batch_size=batch_size)
            if probabilities
            else model.predict(x, batch_size=batch_size)
        )
    if local and not isinstance(model, Model):  # kept loaded (and its helpers warm) for the next call
        model = shared_predictor(model, workers=workers, trust_code=trust_code)
    return predict_parallel(
        model, x, workers=workers, backend=backend, address=address, batch_size=batch_size,
        probabilities=probabilities, output=output, trust_code=trust_code,
    )  # fmt: skip


def train(
    config: TrainConfig | dict | str | Path | None = None,
    *,
    out: str | Path | None = None,
    quiet: bool = True,
    nproc: int = 1,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
    resume: str | Path | None = None,
    epochs: int | None = None,
    model: ModelSource = None,
    callbacks: Sequence[Callback] = (),
    backend: str = "local",
    address: str | None = None,
    placement: str = "PACK",
    rank_resources: dict[str, float] | None = None,
) -> Run | None:
    """Train a model as `config` says and write the run dir. Returns a `Run`.

    `config` is a TrainConfig, a dict of its fields, or a path to a YAML file. `out` is the run dir
    (default `runs/<timestamp>-<model>-<data>`). `quiet=False` shows a progress bar on a TTY.

    `model` replaces `config.model.name`: a factory called as `factory(input_shape=..., num_outputs=...,
    **config.model.kwargs)`, or a ready `nn.Module`. Its `module:qualname` is recorded in config.yaml
    and model.json, so loading the model dir later imports it (with `trust_code=True`).
    `callbacks` are `hpcml.Callback` objects run in this process; callbacks meant for every rank of a
    data-parallel job go in the config (`callbacks: [{spec: module:Class, kwargs: {...}}]`).

    `nproc > 1` (or `nnodes > 1`) trains data-parallel on that many ranks per node through
    torch.distributed's elastic launcher; `batch_size` is per rank. Only the node of rank 0 writes the
    run dir; on the other nodes this returns None.

    `backend="ray"` runs the `nproc` ranks as actors on the Ray cluster at `address` (default: a local
    instance on 127.0.0.1), one placement-group bundle each (`placement`: PACK, SPREAD, STRICT_PACK or
    STRICT_SPREAD; `rank_resources`: the Ray resources each rank reserves, e.g. {"CPU": 2}). The run
    dir must be on storage every node shares (checked). See hpcml.jobs.train_ray.

    Started by torchrun (WORLD_SIZE/RANK/LOCAL_RANK) or SLURM (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
    with MASTER_ADDR/MASTER_PORT), this process joins that job as its rank instead: `out` is then
    required, `nproc`/`nnodes` must stay 1, and only global rank 0 writes the run dir and gets a Run.

    `resume=RUN_DIR` continues that run from its newest valid checkpoint, with its own config.yaml
    (`config` must then be None) and the same layout. An edited config.yaml is refused, naming the
    changed fields; the one extension is more `epochs` (here, or in config.yaml) for a run with a
    constant schedule. With `max_restarts` > 0 a restarted rank group resumes by itself.
    """
    if resume is not None:
        if config is not None:
            raise hpcml.UsageError("resume takes the config from RUN_DIR/config.yaml; pass no config")
        if out is not None and Path(out) != Path(resume):
            raise hpcml.UsageError("resume continues RUN_DIR in place; pass no separate out")
        resume = Path(resume)
        if not (resume / "config.yaml").is_file():
            raise hpcml.UsageError(f"{resume}: not a run dir (no config.yaml), nothing to resume")
        config, out = resume / "config.yaml", resume
    elif epochs is not None:
        raise hpcml.UsageError("epochs= extends a resumed run; for a new run set epochs in the config")
    cfg = as_config(config)
    if epochs is not None:
        cfg = build_config({**cfg.model_dump(mode="json"), "epochs": epochs}, source="epochs")
    if model is not None:
        cfg = _with_model_spec(cfg, model)
    ray = _ray_launch(backend, address, placement, rank_resources, nnodes=nnodes, node_rank=node_rank,
                      rdzv_endpoint=rdzv_endpoint)  # fmt: skip
    joined = launcher_env(os.environ)
    if joined is not None:
        if ray is not None:
            raise hpcml.UsageError(f"{joined[0]} already started this process as a rank; drop --backend ray")
        return _join(cfg, joined, out=out, nproc=nproc, nnodes=nnodes, quiet=quiet, resume=resume is not None,
                     model=model, callbacks=callbacks)  # fmt: skip
    if nproc == 1 and nnodes == 1 and ray is None:
        # with no --out the run dir is named after the data is loaded: run_process locks it then
        with RunDirLock(Path(out)) if out is not None else contextlib.nullcontext() as lock:
            return run_process(
                cfg,
                out=out,
                quiet=quiet,
                resume=resume is not None,
                lock=lock,
                model=model,
                callbacks=callbacks,
            )
    return _launch(cfg, out=out, nproc=nproc, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                   max_restarts=max_restarts, quiet=quiet, resume=resume is not None, model=model,
                   callbacks=callbacks, ray=ray)  # fmt: skip


def _ray_launch(backend, address, placement, rank_resources, **elastic) -> RayLaunchConfig | None:
    """The Ray placement of the ranks (backend 'ray'), or None for hpcml's own launcher ('local')."""
    if backend not in ("local", "ray"):
        raise hpcml.UsageError(f"backend must be local or ray, got {backend!r}")
    values = {"address": address, "placement": placement, "rank_resources": rank_resources or {}}
    if backend == "local":
        if values != {"address": None, "placement": "PACK", "rank_resources": {}}:
            raise hpcml.UsageError(
                "--address, --placement and --rank-resource place ranks on Ray: add --backend ray"
            )
        return None
    if elastic != {"nnodes": 1, "node_rank": 0, "rdzv_endpoint": None}:
        raise hpcml.UsageError(
            "with --backend ray, Ray places the ranks on its nodes: drop --nnodes/--node-rank/--rdzv-endpoint"
        )
    try:
        return RayLaunchConfig.model_validate(values)
    except ValidationError as err:
        raise hpcml.UsageError(format_validation_error(err, source="--backend ray")) from None


def _with_model_spec(cfg: TrainConfig, model: ModelSource) -> TrainConfig:
    """config.yaml and model.json name the factory (or the module's class) the caller passed."""
    target = type(model) if isinstance(model, nn.Module) else model
    if not callable(target) or not hasattr(target, "__qualname__"):
        raise hpcml.UsageError(
            f"model= takes an nn.Module or a factory returning one, got {type(model).__name__}"
        )
    spec = f"{target.__module__}:{target.__qualname__}"
    values = cfg.model_dump(mode="json")
    values["model"]["name"] = spec
    return build_config(values, source="model=")


def _join(cfg: TrainConfig, joined, *, out, nproc, nnodes, quiet, resume, model, callbacks) -> Run | None:
    """One rank of a job that torchrun or SLURM started: join its process group and train as one job."""
    launcher, info = joined
    if nproc != 1 or nnodes != 1:
        raise hpcml.UsageError(
            f"{launcher} already started this process as rank {info.rank} of {info.world_size}; drop "
            "--nproc/--nnodes (they start hpcml's own launcher)"
        )
    if out is None:
        raise hpcml.UsageError(
            f"under {launcher} give --out: every rank must name the same run dir (rank 0 writes it)"
        )
    out = Path(out)
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0  # torchrun --max-restarts
    # global rank 0 alone writes the run dir, so it alone holds the lock (other nodes may share it)
    with RunDirLock(out) if info.is_main else contextlib.nullcontext():
        return run_process(
            cfg, out=out, quiet=quiet, dist=info, resume="auto" if restarted else resume, model=model,
            callbacks=callbacks,
        )  # fmt: skip


def _launch(cfg: TrainConfig, *, out, model, callbacks, ray: RayLaunchConfig | None, **kw) -> Run | None:
    from hpcml.launch.elastic import check_launch, launch
    from hpcml.models.io import load_model

    if ray is None:
        check_launch(cfg, **{k: kw[k] for k in ("nproc", "nnodes", "node_rank", "rdzv_endpoint")})
    elif kw["nproc"] < 1:
        raise hpcml.UsageError(f"need nproc >= 1, got {kw['nproc']}")
    if callbacks:
        raise hpcml.UsageError(
            "callbacks= objects live in this process; for data-parallel ranks put them in the config "
            "(callbacks: [{spec: module:Class, kwargs: {...}}]) so every rank builds its own"
        )
    if model is not None and ("<locals>" in cfg.model.name or cfg.model.name.startswith("__main__:")):
        raise hpcml.UsageError(
            f"model={cfg.model.name} cannot be imported by the ranks; define it in an importable module "
            "(or pass its module:function spec as the config's model name)"
        )
    if out is None:
        out = default_run_dir(cfg, cfg.model.name)
    out = Path(out)
    # held by the launching process of node 0 (the node that writes the run dir) for all ranks and
    # restarts; other nodes may share the folder (shared storage) and never write it
    with RunDirLock(out) if kw["node_rank"] == 0 else contextlib.nullcontext():
        if ray is None:
            done = launch(cfg, out=out, **kw)
        else:
            from hpcml.jobs.train_ray import launch_ray

            done = launch_ray(cfg, out=out, nproc=kw["nproc"], launch=ray, max_restarts=kw["max_restarts"],
                              resume=kw["resume"])  # fmt: skip
    if not done:
        return None
    report = json.loads((out / "report.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Run(dir=out, report=report, model=load_model(out / "model", trust_code=True), metrics=metrics)
