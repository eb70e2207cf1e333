"""One training run, start to finish: data -> model -> epochs -> run dir. Drives the loop in loop.py."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import hpcml
from hpcml.config import TrainConfig, build_config, load_config
from hpcml.data.loader import DeviceBatches
from hpcml.data.preprocess import Normalizer
from hpcml.data.sources import Dataset, load_dataset
from hpcml.models.io import Model
from hpcml.models.registry import create_model, default_model_for
from hpcml.parallel import dist as pdist
from hpcml.parallel.dist import DistInfo
from hpcml.training import loop
from hpcml.training.hooks import Progress, Trace, fail_hook
from hpcml.training.optim import build_optimizer, build_schedule
from hpcml.training.precision import autocast, detect
from hpcml.training.report import RunDir, RunDirLock, check_out_dir, default_run_dir
from hpcml.training.summary import write_results


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
) -> Run | None:
    """Train a model as `config` says and write the run dir. Returns a `Run`.

    `config` is a TrainConfig, a dict of its fields, or a path to a YAML file. `out` is the run dir
    (default `runs/<timestamp>-<model>-<data>`). `quiet=False` shows a progress bar on a TTY.
    `nproc > 1` (or `nnodes > 1`) trains data-parallel on that many ranks per node through
    torch.distributed's elastic launcher; `batch_size` is per rank. Only the node of rank 0 writes the
    run dir; on the other nodes this returns None.

    `resume=RUN_DIR` continues that run from its newest valid checkpoint, with its own config.yaml
    (`config` must then be None) and the same layout. An edited config.yaml is refused, naming the
    changed fields; the one extension is more `epochs` (here, or in config.yaml) for a run with a
    constant schedule. With `max_restarts` > 0 a restarted rank group
    resumes from the newest checkpoint by itself.
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
    if nproc == 1 and nnodes == 1:
        # with no --out the run dir is named after the data is loaded: run_process locks it then
        with RunDirLock(Path(out)) if out is not None else contextlib.nullcontext() as lock:
            return run_process(cfg, out=out, quiet=quiet, resume=resume is not None, lock=lock)
    from hpcml.models.io import load_model
    from hpcml.parallel.launch import launch

    if out is None:
        out = default_run_dir(cfg, cfg.model.name)
    out = Path(out)
    with RunDirLock(out):  # held by the launching process for all ranks and restarts
        done = launch(
            cfg,
            out=out,
            nproc=nproc,
            nnodes=nnodes,
            node_rank=node_rank,
            rdzv_endpoint=rdzv_endpoint,
            max_restarts=max_restarts,
            quiet=quiet,
            resume=resume is not None,
        )
    if not done:
        return None
    report = json.loads((out / "report.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Run(dir=out, report=report, model=load_model(out / "model"), metrics=metrics)


def run_process(
    cfg: TrainConfig,
    *,
    out: str | Path | None,
    quiet: bool,
    dist: DistInfo | None = None,
    resume: bool | str = False,
    lock: RunDirLock | None = None,
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
        return _run_locked(cfg, data, info, out=out, quiet=quiet, resume=resume, t_wall=t_wall)


def _run_locked(cfg, data, info: DistInfo, *, out, quiet, resume, t_wall) -> Run | None:
    ddp = info.world_size > 1

    # the compile decision depends on how many optimizer steps the run takes
    per_step = cfg.batch_size * info.world_size * cfg.grad_accum
    steps_per_epoch = 1 if cfg.optim.name == "gd" else -(-data.train_rows // per_step)
    hw = detect(
        device=cfg.device,
        precision=cfg.precision,
        compile=cfg.compile,
        threads=cfg.threads,
        steps=steps_per_epoch * cfg.epochs,
        local_rank=info.local_rank,
        local_world_size=info.local_world_size,
    )
    threads_before = torch.get_num_threads()
    torch.set_num_threads(hw.threads)  # restored when the run ends: no process-wide state left behind
    if ddp:
        pdist.init_process_group(info, hw.device)
    try:
        run = _run(
            cfg,
            data,
            hw,
            info,
            out=out,
            quiet=quiet,
            t_wall=t_wall,
            resume=resume,
        )
        if ddp:
            torch.distributed.barrier()  # rank 0 has written the run dir before anyone tears down
        return run
    finally:
        torch.set_num_threads(threads_before)
        if ddp:
            gc.collect()  # free the DDP reducer (and its gloo work) before its process group goes away
            torch.distributed.destroy_process_group()


def _stream_setup(cfg, data, info: DistInfo, dev):
    """(normalizer, StreamBatches, test chunk factory) for a store streamed from disk."""
    from hpcml.data.stream import StreamBatches, fit_normalizer_stream, iter_eval_chunks

    st = data.stream
    if cfg.optim.name == "gd":
        raise hpcml.UsageError(
            "the gd optimizer needs the whole training set in memory; raise --memory-budget"
        )
    common = {"target": st["target"], "features": st["features"], "missing": cfg.data.missing}
    normalizer = fit_normalizer_stream(
        st["store"],
        method=cfg.data.normalize,
        shards=st["train"],
        per_feature=data.kind == "tabular",
        **common,
    )
    batches = StreamBatches(
        st["store"], shards=st["train"], batch_size=cfg.batch_size, seed=cfg.seed, rank=info.rank,
        world_size=info.world_size, accum=cfg.grad_accum, transform=normalizer, device=dev, **common,
    )  # fmt: skip
    mine = st["test"][info.rank :: info.world_size]  # each rank scores its share; the sums are all-reduced

    def test_chunks():
        return iter_eval_chunks(
            st["store"], shards=mine, rows=cfg.eval_batch_size, transform=normalizer, device=dev, **common
        )

    return normalizer, batches, test_chunks


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out[:, 0].float(), y)


def _run(cfg, data, hw, info: DistInfo, *, out, quiet, t_wall, resume) -> Run | None:
    from hpcml.training.crypto import key_from_env
    from hpcml.training.resume import Checkpointer, find_resume_point, refuse_existing

    full_batch = cfg.optim.name == "gd"
    ddp = info.world_size > 1
    reduce = pdist.all_reduce_sum if ddp else None
    dev = hw.device
    regression = data.task == "regression"
    metric = "r2" if regression else "accuracy"
    if regression and cfg.target_accuracy is not None:
        raise hpcml.UsageError("target_accuracy applies to classification; this data is a regression task")
    # regression trains on standardized targets (fitted on train); metrics are in the target's units
    y_scale = (float(data.y_train.mean()), float(data.y_train.std()) or 1.0) if regression else None

    def targets(y: np.ndarray) -> torch.Tensor:
        y = ((y - y_scale[0]) / y_scale[1]).astype(np.float32) if regression else y
        return torch.from_numpy(y).to(dev)

    def eval_shard(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        # each rank evaluates a contiguous shard; the sums are all-reduced
        part = np.array_split(np.arange(len(x)), info.world_size)[info.rank]
        return torch.from_numpy(normalizer(x[part])).to(dev), targets(y[part])

    if data.stream is not None:  # a store larger than the memory budget: shards stream from disk
        normalizer, batches, test_set = _stream_setup(cfg, data, info, dev)
        n_train, val = len(batches) * batches.global_batch, None
    else:
        normalizer = Normalizer.fit(
            data.x_train, method=cfg.data.normalize, per_feature=data.kind == "tabular"
        )
        n_train = len(data.x_train)
        x_train = torch.from_numpy(normalizer(data.x_train)).to(dev)
        y_train = targets(data.y_train)
        test_set = eval_shard(data.x_test, data.y_test)
        val = eval_shard(data.x_val, data.y_val) if data.x_val is not None else None
        batches = DeviceBatches(
            x_train,
            y_train,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            rank=info.rank,
            world_size=info.world_size,
            accum=cfg.grad_accum,
        )
    steps_per_epoch = 1 if full_batch else len(batches)
    total_steps = steps_per_epoch * cfg.epochs
    if full_batch:  # each rank holds a contiguous shard of the training set
        shard = torch.tensor_split(torch.arange(n_train), info.world_size)[info.rank].to(dev)
        x_full, y_full = x_train.index_select(0, shard), y_train.index_select(0, shard)

    seed_everything(cfg.seed)  # same seed on every rank: identical initial weights
    module = create_model(
        cfg.model.name, input_shape=data.input_shape, num_outputs=data.num_outputs, trust_code=True,
        **cfg.model.kwargs,
    ).to(dev)  # trust_code: the user named the model in their own config or command line
    step_model: nn.Module = pdist.wrap_ddp(module, dev) if ddp else module
    if hw.compile:
        step_model = torch.compile(step_model)
    optimizer = build_optimizer(module.parameters(), cfg.optim, device=dev)
    schedule = build_schedule(optimizer, cfg.optim, total_steps=total_steps)
    scaler = torch.amp.GradScaler(dev.type) if hw.precision == "fp16" and dev.type == "cuda" else None
    amp = autocast(hw.precision, dev)
    if regression:
        train_loss = eval_loss = _mse
    else:
        train_loss = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        eval_loss = nn.CrossEntropyLoss()

    main = info.is_main
    ckpt_root = Path(out) / "checkpoints"
    key = key_from_env()  # None unless HPCML_KEY_FILE / HPCML_KEY is set; never logged
    global_batch = n_train if full_batch else batches.global_batch
    layout = {"world_size": info.world_size, "global_batch": global_batch, "steps_per_epoch": steps_per_epoch}
    point = None
    if resume:
        point = find_resume_point(
            ckpt_root, key=key, required=resume is True, layout=layout, config=cfg.model_dump(mode="json")
        )
    elif main:
        refuse_existing(ckpt_root)
    if point is not None:  # after the scheduler is built (it rewrites the lr), before the first step
        point.checkpoint.restore(module, optimizer, schedule, scaler, rng=True)
    ckpt = Checkpointer(
        ckpt_root, cfg.checkpoint, steps_per_epoch=steps_per_epoch, main=main, key=key, layout=layout
    )
    run_dir = RunDir(Path(out)) if main else None
    rows: list[dict[str, Any]] = list(point.rows) if point else []
    if main:
        run_dir.write_config(cfg)
        for row in rows:  # metrics.jsonl holds exactly the epochs the checkpoint has seen
            run_dir.log_epoch(row)
    progress = Progress(main and not quiet and sys.stderr.isatty(), total_steps, cfg.epochs)
    hook = fail_hook()
    trace = Trace(info.rank)

    def before_step(i: int) -> None:  # test hook: fail on a chosen rank and global step
        if hook[0] == info.rank and steps + i == hook[1]:
            if hook[2] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected failure at step {hook[1]}")

    steps = point.step if point else 0
    step_seconds = point.step_seconds if point else 0.0
    time_to_target = point.time_to_target if point else None
    prior_seconds = point.train_seconds if point else 0.0
    start_epoch = point.epoch if point else 0
    finished = bool(point and point.done(cfg.epochs))

    def state(*, stats: list[float] | None = None, done: bool = False) -> dict[str, Any]:
        return {
            "rows": rows,
            "stats": stats,
            "train_seconds": prior_seconds + time.perf_counter() - t_loop,
            "step_seconds": step_seconds,
            "checkpoint_seconds": (point.checkpoint_seconds if point else 0.0) + ckpt.seconds,
            "time_to_target": time_to_target,
            "finished": done,
            "restarts": (point.restarts + 1) if point else 0,
            "config": cfg.model_dump(mode="json"),  # a resume refuses an edited config.yaml
        }

    def save(step: int, epoch: int, batch: int, **kw) -> None:
        ckpt.save(
            step=step, epoch=epoch, batch=batch, module=module, optimizer=optimizer, schedule=schedule,
            scaler=scaler, extra=state(**kw),
        )  # fmt: skip

    def score(split) -> tuple[float, float]:
        """(loss, accuracy | R²) over a split: (x, y) tensors, or a factory of streamed chunks."""
        stats = loop.EpochStats(dev, y_scale=y_scale)
        for x, y in [split] if isinstance(split, tuple) else split():
            loop.evaluate(
                step_model, x, y, batch_size=cfg.eval_batch_size, autocast=amp, loss_fn=eval_loss, stats=stats
            )
        return stats.read(reduce)

    t_loop = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.epochs if not finished else start_epoch):
            start = point.batch if (point and epoch == point.epoch) else 0
            t0 = time.perf_counter()
            ckpt_before = ckpt.seconds
            stats = loop.EpochStats(dev, y_scale=y_scale)
            if start and point.stats is not None and main:
                stats.load(point.stats)  # the half-done epoch's sums, over all ranks, added once

            def after_step(n: int, epoch=epoch, start=start, stats=stats, base=steps) -> None:
                trace.done(base + n - 1)
                if progress.bar is not None:
                    progress.step(n)
                if ckpt.due_mid_epoch(base + n, start + n):
                    save(base + n, epoch, start + n, stats=stats.totals(reduce))  # all ranks reduce

            if full_batch:
                if hook is not None:
                    before_step(0)
                steps += loop.full_batch_step(
                    step_model,
                    x_full,
                    y_full,
                    optimizer=optimizer,
                    loss_fn=train_loss,
                    autocast=amp,
                    schedule=schedule,
                    stats=stats,
                    total=n_train,
                    world_size=info.world_size,
                )
                if progress.bar is not None:
                    progress.step(1)
            else:
                steps += loop.train_epoch(
                    step_model,
                    trace.wrap(batches.epoch(epoch, start=start)),
                    optimizer=optimizer,
                    loss_fn=train_loss,
                    autocast=amp,
                    schedule=schedule,
                    scaler=scaler,
                    stats=stats,
                    on_step=after_step,
                    before_step=before_step if hook is not None else None,
                )
            tr_loss, tr_acc = stats.read(reduce)  # the epoch's one sync; the timestamp below follows it
            epoch_seconds = time.perf_counter() - t0 - (ckpt.seconds - ckpt_before)
            step_seconds += epoch_seconds

            te_loss, te_acc = score(test_set)
            elapsed = prior_seconds + time.perf_counter() - t_loop
            row = {
                "epoch": epoch + 1,
                "step": steps,
                "train_loss": tr_loss,
                f"train_{metric}": tr_acc,
                "test_loss": te_loss,
                f"test_{metric}": te_acc,
                "lr": optimizer.param_groups[0]["lr"],
                "epoch_seconds": epoch_seconds,
                "elapsed_seconds": elapsed,
                "samples_per_second": n_train * (steps_per_epoch - start) / steps_per_epoch / epoch_seconds,
            }
            if regression:
                row["test_rmse"] = float(np.sqrt(te_loss))
            if val is not None:
                row["val_loss"], row[f"val_{metric}"] = score(val)
            rows.append(row)
            if main:
                run_dir.log_epoch(row)
            progress.epoch(row, cfg.epochs)
            if not np.isfinite(tr_loss):  # identical on every rank: the values were all-reduced
                raise hpcml.HpcmlError(
                    f"training diverged at epoch {epoch + 1} (train loss {tr_loss}); lower optim.lr "
                    f"(now {cfg.optim.lr})"
                )
            if cfg.target_accuracy is not None and te_acc >= cfg.target_accuracy:
                time_to_target = elapsed
                break
            if ckpt.due_epoch_end(steps, epoch + 1) and epoch + 1 < cfg.epochs:
                save(steps, epoch + 1, 0)
        if not finished:  # the final checkpoint, marked finished: resuming it only rewrites the report
            save(steps, len(rows), 0, done=True)
        train_seconds = prior_seconds + time.perf_counter() - t_loop
    finally:
        progress.close()
        trace.close()
        if main:
            run_dir.close()

    if not main:
        return None
    return write_results(
        run_dir=run_dir, cfg=cfg, data=data, hw=hw, info=info, module=module, normalizer=normalizer,
        y_scale=y_scale, rows=rows, steps=steps, train_seconds=train_seconds, step_seconds=step_seconds,
        time_to_target=time_to_target, t_wall=t_wall, ckpt=ckpt, point=point, key=key,
        batch_size=(n_train // info.world_size) if full_batch else batches.batch_size,
        global_batch=global_batch, n_train=n_train,
    )  # fmt: skip
