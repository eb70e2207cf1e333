"""One process's training run, start to finish: data -> build -> fit -> run dir (the whole job, or one
rank of a data-parallel job; `hpcml.train` in api.py decides which and launches ranks)."""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from hpcml.config import TrainConfig, build_config, load_config
from hpcml.data.sources import Dataset, load_dataset
from hpcml.distributed import dist as pdist
from hpcml.distributed.dist import DistInfo
from hpcml.models.registry import default_model_for, recipe_for
from hpcml.training.build import ModelSource, build, seed_everything, step_flops  # noqa: F401  (seed_everything re-exported)
from hpcml.training.callbacks import Callback, EarlyStopping, Progress, TargetAccuracy, from_specs
from hpcml.training.fit import fit
from hpcml.training.precision import detect
from hpcml.training.report import RunDir, RunDirLock, check_out_dir, default_run_dir
from hpcml.training.state import RunState
from hpcml.training.summary import Run, RunDirWriter  # noqa: F401  (Run re-exported)
from hpcml.training.tracking import check_available, loggers


def as_config(cfg: TrainConfig | dict | str | Path | None) -> TrainConfig:
    if cfg is None:
        return TrainConfig()
    if isinstance(cfg, TrainConfig):
        return cfg
    if isinstance(cfg, dict):
        return build_config(cfg)
    return load_config(cfg)


def resolve_defaults(cfg: TrainConfig, data: Dataset) -> TrainConfig:
    """Replace `model: auto` by the concrete choice, and `optim.lr: null` / `epochs: null` by that
    model's recipe (models/registry.py), so config.yaml records what ran."""
    if cfg.model.name == "auto":
        model = cfg.model.model_copy(update={"name": default_model_for(data.kind)})
        cfg = cfg.model_copy(update={"model": model})
    recipe = recipe_for(cfg.model.name, optimizer=cfg.optim.name, schedule=cfg.optim.schedule)
    if cfg.optim.lr is None:
        cfg = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": recipe["lr"]})})
    if cfg.epochs is None:
        cfg = cfg.model_copy(update={"epochs": recipe["epochs"]})
    return cfg


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
    parent_run: str | None = None,
) -> Run | None:
    """The training run of one process: the whole job, or one rank of a data-parallel job.

    `resume`: True = continue from the newest checkpoint in `out` (an error if there is none),
    "auto" = continue if there is one (an elastic restart), False = a fresh run.
    `parent_run`: the MLflow run (a sweep's) this run's MLflow run is nested under.
    """
    t_wall = time.perf_counter()
    info = dist or DistInfo()
    if out is not None:
        check_out_dir(Path(out))  # before the data is loaded: a bad --out fails in a second, exit 2
    if info.is_main:
        check_available(cfg.log)  # a missing extra fails now, not after training
    data = load_dataset(cfg.data)
    cfg = resolve_defaults(cfg, data)
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
            channels_last=cfg.channels_last, images=data.kind == "image",
        )  # fmt: skip
        threads_before = torch.get_num_threads()
        torch.set_num_threads(hw.threads)  # restored when the run ends: no process-wide state left behind
        if info.world_size > 1:
            pdist.init_process_group(info, hw.device)
        try:
            result = _run(cfg, data, hw, info, out=Path(out), quiet=quiet, t_wall=t_wall, resume=resume,
                          model=model, callbacks=callbacks, parent_run=parent_run)  # fmt: skip
            if info.world_size > 1:
                torch.distributed.barrier()  # rank 0 has written the run dir before anyone tears down
            return result
        finally:
            torch.set_num_threads(threads_before)
            if info.world_size > 1:
                gc.collect()  # free the DDP reducer (and its gloo work) before its process group goes away
                torch.distributed.destroy_process_group()


def _run(
    cfg, data, hw, info: DistInfo, *, out: Path, quiet, t_wall, resume, model, callbacks, parent_run
) -> Run | None:
    from hpcml.crypto import key_from_env
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
    chain += loggers(cfg.log, out, is_main=info.is_main, parent_run=parent_run)  # after the report is written
    chain += [Progress(not quiet), *from_specs(cfg.callbacks), *callbacks]
    fit(run, state, chain)
    return writer.result if writer else None
