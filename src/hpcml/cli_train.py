"""hpcml train: flags -> TrainConfig -> hpcml.train, and the run's summary. No logic lives here.

Registered in cli.py with `register(app)`; torch is imported inside the command, so `hpcml --help`
stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from hpcml.errors import UsageError

HELP = (
    "Train a model and write a run dir (config.yaml, metrics.jsonl, report.json, curves.png, model/)."
    "\n\n"
    "Examples:\n\n"
    "  hpcml train\n\n"
    "  hpcml train --data digits --model cnn2d --epochs 30\n\n"
    "  hpcml train --optimizer gd --lr 0.5 --epochs 200       # full-batch gradient descent\n\n"
    "  hpcml train --data synthetic --rows 100000 --features 64 --model mlp --model-kw hidden=512\n\n"
    "  hpcml train --data digits --layout flat --model mynets:build --model-kw width=128   # your own\n\n"
    "  hpcml train --data houses.csv --target price --missing median     # regression on your CSV\n\n"
    "  hpcml train --data stores/big --memory-budget 64MB                 # streams a larger store\n\n"
    "  hpcml train --data x.csv --target y --val-fraction 0.1 --patience 3   # early stopping\n\n"
    "  hpcml train --config runs/X/config.yaml                # re-run a past run exactly\n\n"
    "  hpcml train --checkpoint-every 200 --out runs/long     # checkpoint every 200 steps\n\n"
    "  hpcml train --resume runs/long                         # continue after a crash, bit-exact\n\n"
    "  hpcml train --resume runs/long --epochs 60             # more epochs (constant schedule only)\n\n"
    "  hpcml train --nproc 2 --batch-size 50                  # data parallel, 2 ranks x 50 = global 100\n\n"
    "  hpcml train --nproc 2 --grad-compression bf16 --bucket-mb 8   # all-reduce bf16 in 8 MB buckets\n\n"
    "  hpcml train --nnodes 2 --node-rank 0 --rdzv-endpoint 10.0.0.1:29500 --nproc 8   # on each node\n\n"
    "  torchrun --nproc-per-node 2 -m hpcml train --out runs/t    # ranks from torchrun (or srun)\n\n"
    "  hpcml train --backend ray --nproc 4 --address 10.0.0.1:6379 --out /shared/runs/r   # Ray actors\n\n"
    "  hpcml train --log tensorboard --log mlflow            # also log to TensorBoard and MLflow\n\n"
    "  hpcml train --data stores/photos --model mobilenet_v2 --augment flip,crop   # images"
)


def _parse_pairs(pairs: list[str], flag: str) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def _cleaning_line(clean: dict[str, Any], data: dict[str, Any]) -> str:
    """One line of what cleaning did: never silent."""
    parts = [f"{clean.get('rows_read', '?')} rows read"]
    for key, what in (
        ("rows_dropped", "dropped (missing/non-finite)"),
        ("values_imputed", "values imputed"),
        ("duplicate_rows", "duplicates"),
        ("duplicates_dropped", "duplicates dropped"),
        ("constant_column_count", "constant columns"),
    ):
        if clean.get(key):
            parts.append(f"{clean[key]} {what}")
    parts.append(f"train/val/test {data['train_rows']}/{data.get('val_rows', 0)}/{data['test_rows']}")
    return ", ".join(parts)


def _print_summary(report: dict[str, Any], run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="hpcml train", show_header=False, title_justify="left")
    if report.get("task") == "regression":
        t.add_row("test RMSE / R²", f"{report['test_rmse']:.4f} / {report['test_r2']:.4f}")
    else:
        t.add_row("test accuracy", f"{report['test_accuracy']:.4f}")
        t.add_row("test loss", f"{report['test_loss']:.4f}")
    if "val_loss" in report:
        t.add_row("val loss", f"{report['val_loss']:.4f}")
    clean = report["data"].get("cleaning")
    if clean:
        t.add_row("data", _cleaning_line(clean, report["data"]))
    t.add_row("epochs / steps", f"{report['epochs']} / {report['steps']}")
    t.add_row("training time", f"{report['train_seconds']:.2f} s (wall {report['wall_seconds']:.2f} s)")
    if report.get("target_accuracy") is not None:
        ttt = report["time_to_target_seconds"]
        t.add_row(
            f"time to {report['target_accuracy']:.2%}", "not reached" if ttt is None else f"{ttt:.2f} s"
        )
    t.add_row("samples/s", f"{report['samples_per_second']:,.0f}")
    t.add_row("model / data", f"{report['model']} on {report['data']['name']}")
    t.add_row(
        "optimizer",
        f"{report['optimizer']} (batch {report['global_batch_size']}"
        + (", full batch)" if report["full_batch"] else ")"),
    )
    t.add_row(
        "device",
        f"{report['device']} · {report['precision']} · {report['threads']} threads"
        + (" · compiled" if report["compile"] else ""),
    )
    Console().print(t)
    typer.echo(f"run dir: {run_dir}")  # plain, never wrapped: people copy it


def train(
    config: Annotated[
        Path | None, typer.Option(help="YAML config (e.g. a run's config.yaml); flags override it.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="mnist1d, digits, synthetic, or your data: CSV, Parquet, .npz/.npy, an image folder, an "
            "hpcml store; a path or URL (file://, s3://, ...)."
        ),
    ] = None,
    target: Annotated[str | None, typer.Option(help="Label column of a file (NumPy: array name).")] = None,
    missing: Annotated[
        str | None, typer.Option(help="Rows with NaN/Inf or no label: drop, mean, median or error.")
    ] = None,
    task: Annotated[str | None, typer.Option(help="auto, classification or regression.")] = None,
    drop_duplicates: Annotated[
        bool | None, typer.Option("--drop-duplicates", help="Drop repeated rows (always counted).")
    ] = None,
    drop_constant: Annotated[
        bool | None, typer.Option("--drop-constant", help="Drop constant columns (always reported).")
    ] = None,
    test_fraction: Annotated[float | None, typer.Option(help="Share of rows held out for test.")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Share of training rows for validation.")] = None,
    test_data: Annotated[str | None, typer.Option(help="A separate test file/store (no test split).")] = None,
    image_size: Annotated[int | None, typer.Option(help="Image folders: resize to N x N.")] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option(help="Stores larger than this stream from disk (e.g. 64MB; default 25% RAM)."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Model: auto, mlp, convnet1d, cnn1d, cnn2d, an installed plugin (hpcml models), or your own "
            "module:function returning an nn.Module (importable: on PYTHONPATH or installed)."
        ),
    ] = None,
    model_kw: Annotated[
        list[str] | None, typer.Option("--model-kw", help="Model argument KEY=VALUE (repeatable).")
    ] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="sgd, adam, adamw, or gd (full-batch gradient descent).")
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Peak lr (onecycle). Default: the model's recipe (convnet1d 3e-2) or 1e-2."),
    ] = None,
    momentum: Annotated[float | None, typer.Option(help="Momentum for sgd/gd.")] = None,
    nesterov: Annotated[
        bool | None, typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum (sgd).")
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(help="Weight decay.")] = None,
    schedule: Annotated[str | None, typer.Option(help="constant, cosine or onecycle.")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Number of epochs. Default: the model's recipe (convnet1d 8), else 10.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size per process.")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help="Label smoothing in [0, 1).")] = None,
    augment: Annotated[
        str | None,
        typer.Option(help="Images: flip,crop: random flip / padded crop on the device, per batch (seeded)."),
    ] = None,
    crop_padding: Annotated[int | None, typer.Option(help="Zero pixels around images for crop (4).")] = None,
    channels_last: Annotated[
        str | None, typer.Option(help="Images: auto, on or off (NHWC memory format; auto: CUDA).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed: same seed, same weights (CPU).")] = None,
    target_accuracy: Annotated[
        float | None, typer.Option(help="Stop once test accuracy reaches this.")
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(help="Early stopping: stop after N epochs without a better validation metric."),
    ] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32, bf16 or fp16.")] = None,
    compile: Annotated[str | None, typer.Option(help="auto, on or off (torch.compile).")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Torch threads per process (default: auto, the cores other processes leave free at start)."
        ),
    ] = None,
    rows: Annotated[int | None, typer.Option(help="synthetic: rows.")] = None,
    features: Annotated[
        str | None, typer.Option(help="Feature columns of a file, comma-separated (synthetic: a count).")
    ] = None,
    classes: Annotated[int | None, typer.Option(help="synthetic: classes.")] = None,
    layout: Annotated[str | None, typer.Option(help="digits: image (1x8x8) or flat (64 features).")] = None,
    normalize: Annotated[str | None, typer.Option(help="standard, minmax or none (fitted on train).")] = None,
    grad_accum: Annotated[
        int | None, typer.Option(help="Micro-batches per optimizer step (no_sync between).")
    ] = None,
    nproc: Annotated[
        int, typer.Option(help="Data-parallel ranks on this node (torch.distributed, gloo/NCCL).")
    ] = 1,
    grad_compression: Annotated[
        str | None,
        typer.Option(help="DDP: all-reduce gradients as none (fp32, exact; default), bf16 or fp16."),
    ] = None,
    bucket_mb: Annotated[
        str | None, typer.Option(help="DDP: all-reduce bucket size in MB, or auto (from the gradient bytes).")
    ] = None,
    nnodes: Annotated[int, typer.Option(help="Number of nodes (machines) in the job.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's index, 0..nnodes-1.")] = 0,
    rdzv_endpoint: Annotated[
        str | None, typer.Option(help="HOST:PORT of node 0 for multi-node (default 127.0.0.1:free port).")
    ] = None,
    max_restarts: Annotated[
        int,
        typer.Option(
            help="Restart the rank group this often after a failure; it resumes from the newest checkpoint."
        ),
    ] = 0,
    backend: Annotated[
        str,
        typer.Option(
            help="Who runs the --nproc ranks: local (processes on this node) or ray (actors on a Ray "
            "cluster, one placement-group bundle each; the run dir must be on storage all nodes share)."
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(help="--backend ray: cluster HOST:PORT, ray://HOST:PORT or auto (default: local Ray)."),
    ] = None,
    placement: Annotated[
        str, typer.Option(help="--backend ray: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD.")
    ] = "PACK",
    rank_resource: Annotated[
        list[str] | None,
        typer.Option(
            "--rank-resource",
            help="--backend ray: a Ray resource each rank reserves, KEY=N (repeatable; default CPU=threads "
            "or 1, GPU=1 on CUDA).",
        ),
    ] = None,
    checkpoint_every: Annotated[
        str | None,
        typer.Option(
            help="Checkpoint every N steps ('500') or N epochs ('2e'); 'off' = only at the end. Default 1e."
        ),
    ] = None,
    keep_checkpoints: Annotated[int | None, typer.Option(help="Newest checkpoints kept (default 2).")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue RUN_DIR from its newest valid checkpoint, with its own config.yaml."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Any config field, dotted: --set optim.warmup_fraction=0.1"),
    ] = None,
    log: Annotated[
        list[str] | None,
        typer.Option(
            "--log",
            "--log-to",  # under torchrun: its own parser refuses `--log` as an ambiguous --log-dir
            help="Also log to tensorboard (event files in the run dir) or mlflow (repeatable).",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run dir (default runs/<time>-<model>-<data>).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Print report.json on stdout.")] = False,
) -> None:
    from hpcml.config import TrainConfig, build_config, merge

    flags = {
        "data.name": data,
        "data.rows": rows,
        "data.features": int(features) if features and features.strip().isdigit() else None,
        "data.columns": [c.strip() for c in features.split(",")]
        if features and not features.strip().isdigit()
        else None,
        "data.target": target,
        "data.missing": missing,
        "data.task": task,
        "data.drop_duplicates": drop_duplicates,
        "data.drop_constant": drop_constant,
        "data.test_fraction": test_fraction,
        "data.val_fraction": val_fraction,
        "data.test_data": test_data,
        "data.image_size": image_size,
        "data.memory_budget": memory_budget,
        "data.classes": classes,
        "data.layout": layout,
        "data.normalize": normalize,
        "model.name": model,
        "optim.name": optimizer,
        "optim.lr": lr,
        "optim.momentum": momentum,
        "optim.nesterov": nesterov,
        "optim.weight_decay": weight_decay,
        "optim.schedule": schedule,
        "epochs": epochs,
        "batch_size": batch_size,
        "label_smoothing": label_smoothing,
        "augment": [a.strip() for a in augment.split(",") if a.strip()] if augment is not None else None,
        "crop_padding": crop_padding,
        "channels_last": channels_last,
        "seed": seed,
        "target_accuracy": target_accuracy,
        "patience": patience,
        "precision": precision,
        "compile": compile,
        "device": device,
        "threads": threads,
        "grad_accum": grad_accum,
        "ddp.grad_compression": grad_compression,
        "ddp.bucket_mb": bucket_mb,
        "checkpoint.every": checkpoint_every,
        "checkpoint.keep": keep_checkpoints,
        "log": [n.strip() for v in log for n in v.split(",")] if log else None,
    }
    overrides = {k: v for k, v in flags.items() if v is not None}
    if model_kw:
        overrides["model.kwargs"] = _parse_pairs(model_kw, "--model-kw")
    overrides.update(_parse_pairs(set_ or [], "--set"))
    ray = {"backend": backend, "address": address, "placement": placement,
           "rank_resources": _parse_pairs(rank_resource or [], "--rank-resource")}  # fmt: skip
    if resume is not None:
        extend = overrides.pop("epochs", None)  # the one documented extension of a resumed run
        if overrides or config is not None or out is not None:
            given = ", ".join(
                ["--config"] * (config is not None) + ["--out"] * (out is not None) + list(overrides)
            )
            raise UsageError(
                f"--resume continues {resume} with its own config.yaml; drop {given} (a changed config "
                "would not continue the same run; only --epochs may extend a constant-schedule run)"
            )
        from hpcml.api import train as run_train

        run = run_train(
            None, resume=resume, quiet=quiet or json_, nproc=nproc, nnodes=nnodes, node_rank=node_rank,
            rdzv_endpoint=rdzv_endpoint, max_restarts=max_restarts, epochs=extend, **ray,
        )  # fmt: skip
        _show(run, json_=json_, quiet=quiet, node_rank=node_rank)
        return
    if config is not None:
        from hpcml.config import load_config

        base = load_config(config).model_dump(mode="json")
        if "model.name" in overrides and "model.kwargs" not in overrides:
            base["model"]["kwargs"] = {}  # kwargs belong to the model they were written for
    else:
        base = TrainConfig().model_dump(mode="json", exclude_unset=True)
    cfg = build_config(merge(base, overrides), source="config" if config is None else str(config))

    from hpcml.api import train as run_train

    run = run_train(
        cfg,
        out=out,
        quiet=quiet or json_,
        nproc=nproc,
        nnodes=nnodes,
        node_rank=node_rank,
        rdzv_endpoint=rdzv_endpoint,
        max_restarts=max_restarts,
        **ray,
    )
    _show(run, json_=json_, quiet=quiet, node_rank=node_rank)


def _show(run, *, json_: bool, quiet: bool, node_rank: int) -> None:
    if run is None:  # not the process of global rank 0: that one writes the run dir
        who = f"node {node_rank}" if node_rank else "this rank"  # --nnodes node, or torchrun/SLURM rank
        typer.echo(f"{who}: done (the process of global rank 0 writes the run dir)", err=True)
    elif json_:
        typer.echo(json.dumps(run.report, indent=2))
    elif not quiet:
        _print_summary(run.report, run.dir)


def register(app: typer.Typer) -> None:
    """Add the `train` command to the `hpcml` app."""
    app.command("train", help=HELP, no_args_is_help=False)(train)
