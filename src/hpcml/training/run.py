"""One training run, start to finish: data -> build -> fit -> run dir. Launches ranks when asked."""

from __future__ import annotations

import contextlib
import gc
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hpcml
from hpcml.config import TrainConfig, build_config, load_config
from hpcml.data.sources import Dataset, load_dataset
from hpcml.models.io import Model
from hpcml.models.registry import default_model_for
from hpcml.parallel import dist as pdist
from hpcml.parallel.dist import DistInfo
from hpcml.training.build import ModelSource, build, seed_everything, step_flops  # noqa: F401  (seed_everything re-exported)
from hpcml.training.callbacks import Callback, EarlyStopping, Progress, TargetAccuracy, from_specs
from hpcml.training.fit import fit
from hpcml.training.precision import detect
from hpcml.training.report import RunDir, RunDirLock, check_out_dir, default_run_dir
from hpcml.training.state import RunState
from hpcml.training.summary import RunDirWriter


@dataclass
class Run:
    """The result of `hpcml.train`: where it was written, what it measured, and the trained model."""

    dir: Path
    report: dict[str, Any]
    model: Model
    metrics: list[dict[str, Any]] = field(default_factory=list)


def as_config(cfg: TrainConfig | dict | str | Path | None) -> TrainConfig:
    if cfg is None:
        return TrainConfig()
    if isinstance(cfg, TrainConfig):
        return cfg
    if isinstance(cfg, dict):
        return build_config(cfg)
    return load_config(cfg)


def resolve_model_name(cfg: TrainConfig, data: Dataset) -> TrainConfig:
    """Replace `model: auto` by the concrete choice so config.yaml records what ran."""
    if cfg.model.name != "auto":
        return cfg
    model = cfg.model.model_copy(update={"name": default_model_for(data.kind)})
    return cfg.model_copy(update={"model": model})


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
    if nproc == 1 and nnodes == 1:
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
                   callbacks=callbacks)  # fmt: skip


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


def _launch(cfg: TrainConfig, *, out, model, callbacks, **kw) -> Run | None:
    from hpcml.models.io import load_model
    from hpcml.parallel.launch import check_launch, launch

    check_launch(cfg, **{k: kw[k] for k in ("nproc", "nnodes", "node_rank", "rdzv_endpoint")})
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
        done = launch(cfg, out=out, **kw)
    if not done:
        return None
    report = json.loads((out / "report.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Run(dir=out, report=report, model=load_model(out / "model", trust_code=True), metrics=metrics)


def run_process(
    cfg: TrainConfig,
    *,
    out: str | Path | None,
    quiet: bool,
    dist: DistInfo | None = None,
    resume: bool | str = False,
    lock: RunDirLock | None = None,
    model: ModelSource = None,
    callbacks: Sequence[Callback] = (),
) -> Run | None:
    """The training run of one process: the whole job, or one rank of a data-parallel job.

    `resume`: True = continue from the newest checkpoint in `out` (an error if there is none),
    "auto" = continue if there is one (an elastic restart), False = a fresh run.
    """
    t_wall = time.perf_counter()
    info = dist or DistInfo()
    if out is not None:
        check_out_dir(Path(out))  # before the data is loaded: a bad --out fails in a second, exit 2
    data = load_dataset(cfg.data)
    cfg = resolve_model_name(cfg, data)
    if out is None:
        out = default_run_dir(cfg, cfg.model.name)
    with contextlib.ExitStack() as stack:
        if lock is None and dist is None:  # a DDP rank's run dir is locked by the process that launched it
            stack.enter_context(RunDirLock(Path(out)))
        per_step = cfg.batch_size * info.world_size * cfg.grad_accum
        steps_per_epoch = 1 if cfg.optim.name == "gd" else -(-data.train_rows // per_step)
        hw = detect(
            device=cfg.device, precision=cfg.precision, compile=cfg.compile, threads=cfg.threads,
            steps=steps_per_epoch * cfg.epochs,  # the compile decision depends on the run's length
            step_flops=step_flops(cfg, data, model, world_size=info.world_size),  # bf16 pays on big steps
            local_rank=info.local_rank, local_world_size=info.local_world_size,
        )  # fmt: skip
        threads_before = torch.get_num_threads()
        torch.set_num_threads(hw.threads)  # restored when the run ends: no process-wide state left behind
        if info.world_size > 1:
            pdist.init_process_group(info, hw.device)
        try:
            result = _run(cfg, data, hw, info, out=Path(out), quiet=quiet, t_wall=t_wall, resume=resume,
                          model=model, callbacks=callbacks)  # fmt: skip
            if info.world_size > 1:
                torch.distributed.barrier()  # rank 0 has written the run dir before anyone tears down
            return result
        finally:
            torch.set_num_threads(threads_before)
            if info.world_size > 1:
                gc.collect()  # free the DDP reducer (and its gloo work) before its process group goes away
                torch.distributed.destroy_process_group()


def _run(cfg, data, hw, info: DistInfo, *, out: Path, quiet, t_wall, resume, model, callbacks) -> Run | None:
    from hpcml.training.crypto import key_from_env
    from hpcml.training.resume import Checkpointer, Checkpoints, find_resume_point, refuse_existing

    run = build(cfg, data, hw, info, model=model)
    key = key_from_env()  # None unless HPCML_KEY_FILE / HPCML_KEY is set; never logged
    ckpt_root = out / "checkpoints"
    point = None
    if resume:
        point = find_resume_point(
            ckpt_root,
            key=key,
            required=resume is True,
            layout=run.layout(),
            config=cfg.model_dump(mode="json"),
        )
    elif info.is_main:
        refuse_existing(ckpt_root)
    if point is not None:  # after the scheduler is built (it rewrites the lr), before the first step
        point.checkpoint.restore(run.module, run.optimizer, run.schedule, run.scaler, rng=True)
    state = RunState.from_point(point, epochs=cfg.epochs)
    ckpt = Checkpointer(
        ckpt_root, cfg.checkpoint, steps_per_epoch=run.steps_per_epoch, main=info.is_main, key=key,
        layout=run.layout(),
    )  # fmt: skip
    # order matters: stop rules decide before the epoch-end checkpoint, which is written before the report
    chain: list[Callback] = []
    if cfg.target_accuracy is not None:
        chain.append(TargetAccuracy(cfg.target_accuracy))
    if cfg.patience is not None:
        chain.append(EarlyStopping(cfg.patience))
    chain.append(Checkpoints(ckpt, key=key))
    writer = RunDirWriter(RunDir(out), ckpt=ckpt, key=key, t_wall=t_wall) if info.is_main else None
    chain += [writer] if writer else []
    chain += [Progress(not quiet), *from_specs(cfg.callbacks), *callbacks]
    fit(run, state, chain)
    return writer.result if writer else None
