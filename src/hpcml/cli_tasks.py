"""`hpcml sweep` and `hpcml predict`: many jobs at once on the command line. No logic lives here.

Registered in cli.py with `register(app)`. Heavy imports happen inside the commands so `hpcml --help`
stays fast. Progress goes to stderr, so `--json` leaves stdout to the JSON alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from hpcml.errors import HpcmlError, UsageError

__all__ = ["register"]

_JSON = typer.Option("--json", help="Print machine-readable JSON on stdout (and nothing else).")
_BACKEND = typer.Option(help="local (spawned processes on this machine) or ray (pip install 'hpcml[ray]').")
_ADDRESS = typer.Option(
    help="Ray cluster HOST:PORT, ray://HOST:PORT or auto. Default: a local Ray instance on 127.0.0.1."
)

SWEEP_HELP = (
    "Train many configs, in parallel, and rank them: a grid (or --random N of it) of --param values, "
    "each trained --folds times for cross-validation. Writes OUT/results.csv, results.md, best.yaml "
    "(re-runnable with hpcml train --config), METRIC_vs_params.png, sweep.json and one run dir per job "
    "under OUT/runs/. Rerunning the same command skips finished jobs; a failed job is retried --retries "
    "times, then recorded with its error while the others finish (exit code 1 if any job failed).\n\n"
    "A parameter is a config field, dotted (optim.lr, data.rows, model.kwargs.hidden) or short (lr, "
    "batch_size, epochs, model, optimizer, weight_decay, ...). Values: V1,V2,...; with --random also "
    "LO..HI (uniform) or LO..HI:log.\n\n"
    "Examples:\n\n"
    "  hpcml sweep --config base.yaml --param lr=1e-3,1e-2 --param batch_size=64,128 --out sweeps/a\n\n"
    "  hpcml sweep --param lr=1e-3,1e-2 --folds 5 --workers 4 --out sweeps/cv\n\n"
    "  hpcml sweep --param lr=1e-4..1e-1:log --param epochs=10..40 --random 20 --out sweeps/rand\n\n"
    "  hpcml sweep --param lr=1e-3,1e-2 --backend ray --address 10.0.0.1:6379 --out /shared/sweeps/a\n\n"
    "  hpcml sweep --config base.yaml --param lr=1e-4..1e-1:log --random 16 --search tpe --prune median "
    "--out sweeps/tpe   # base.yaml has data.val_fraction\n\n"
    "  hpcml sweep --param lr=1e-3,1e-2 --metric test_loss --json --out sweeps/a > sweep.json"
)

PREDICT_HELP = (
    "Predict every row of a file with a model dir, in parallel where it pays: with --workers N this "
    "process and N-1 helper processes, each loading the model once, share the rows out in chunks; "
    "--workers auto (the default) first times a few chunks here and starts helpers only if they are "
    "estimated to finish sooner, start-up included. The output keeps the input order: a `prediction` "
    "column (class name, or value for regression) and, with --probabilities, one "
    "prob_<class> column per class; .parquet or .csv by the extension, written atomically.\n\n"
    "Input: CSV, Parquet, .npy, .npz (array x) or an hpcml store, local or any fsspec URL. Columns are "
    "matched by name when the model recorded its features, else all numeric columns but the target.\n\n"
    "Examples:\n\n"
    "  hpcml predict runs/demo/model --input data.parquet --output preds.parquet   # --workers auto\n\n"
    "  hpcml predict runs/demo/model --input data.parquet --output preds.parquet --workers 4\n\n"
    "  hpcml predict runs/demo/model --input s3://bucket/x.csv --output preds.csv --probabilities\n\n"
    "  hpcml predict runs/demo/model --input stores/big --output p.parquet --backend ray --json\n\n"
    "  hpcml predict runs/X/small --input x.parquet --output p.parquet --runtime onnx\n\n"
    "  hpcml predict runs/mine/model --input new.csv --output p.parquet --trust-code   # model mynets:build"
)


def register(app: typer.Typer) -> None:
    app.command(name="sweep", help=SWEEP_HELP, no_args_is_help=True)(sweep)
    app.command(name="predict", help=PREDICT_HELP, no_args_is_help=True)(predict)


def _progress(enabled: bool):
    """One line per finished job on stderr; nothing with --json/--quiet."""
    if not enabled:
        return None

    def show(e: dict[str, Any]) -> None:
        what = {"done": "done", "retry": "retry", "failed": "FAILED"}[e["event"]]
        detail = f": {e['error'].splitlines()[0]}" if e.get("error") else ""
        typer.echo(
            f"[{e['done']}/{e['total']}] {what} job {e['id']} (attempt {e['attempt']}, "
            f"{e['seconds']:.1f} s){detail}",
            err=True,
        )

    return show


def sweep(
    out: Annotated[Path, typer.Option(help="Sweep folder (results, best.yaml, runs/); reuse it to resume.")],
    config: Annotated[Path | None, typer.Option(help="Base YAML config (e.g. a run's config.yaml).")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", help="NAME=V1,V2,... or NAME=LO..HI[:log] (repeatable).")
    ] = None,
    random: Annotated[
        int | None, typer.Option(help="Sample N configs instead of the full grid (--search tpe: N trials).")
    ] = None,
    search: Annotated[
        str | None, typer.Option(help="grid, random or tpe (Optuna; study in OUT/optuna.db, resumable).")
    ] = None,
    prune: Annotated[
        str | None, typer.Option(help="Stop trials behind on the validation metric: median or asha.")
    ] = None,
    log: Annotated[
        list[str] | None, typer.Option("--log", "--log-to", help="Log each job to mlflow / tensorboard.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for --random sampling.")] = 0,
    folds: Annotated[int | None, typer.Option(help="K-fold cross-validation on the training split.")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Jobs at once (default: one per core); threads per job = cores / W.")
    ] = None,
    backend: Annotated[str, _BACKEND] = "local",
    address: Annotated[str | None, _ADDRESS] = None,
    retries: Annotated[int, typer.Option(help="Retries of a failed or crashed job.")] = 1,
    metric: Annotated[
        str, typer.Option(help="report.json key to rank by; losses and times rank ascending.")
    ] = "test_accuracy",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines or table.")] = False,
    json_: Annotated[bool, _JSON] = False,
) -> None:
    from hpcml.jobs import sweep_report
    from hpcml.jobs.sweep import sweep as run_sweep

    result = run_sweep(
        config, params=param or [], out=out, random=random, folds=folds, workers=workers, backend=backend,
        address=address, retries=retries, metric=metric, seed=seed, search_kind=search, prune=prune,
        log=[n.strip() for v in log for n in v.split(",")] if log else None,
        on_event=_progress(not (quiet or json_)),
    )  # fmt: skip
    if json_:
        typer.echo(json.dumps(result.summary, indent=2, default=str))
    elif not quiet:
        from rich.console import Console

        params = list(result.summary["params"])
        s = result.summary
        title = (
            f"hpcml sweep: {s['jobs']} job(s), {s['ran']} run, {s['skipped']} already done, "
            f"{s['failed']} failed ({s['wall_seconds']:.1f} s)"
        )
        Console().print(sweep_report.rich_table(result.rows, params, result.metric, title=title))
        for name in result.summary["files"].values():
            typer.echo(f"wrote {out / name}")
    if result.failed:
        first = result.failed[0]
        raise HpcmlError(
            f"{len(result.failed)} of {result.summary['jobs']} job(s) failed (details in "
            f"{out / 'sweep.json'}); first: job {first['id']} {first['params']}: {first['error']}"
        )


def predict(
    model_dir: Annotated[
        Path, typer.Argument(metavar="MODEL_DIR", help="A model dir (model.safetensors + model.json).")
    ],
    input: Annotated[str, typer.Option("--input", help="CSV, Parquet, .npy, .npz or store; path or URL.")],
    output: Annotated[str, typer.Option("--output", help="Predictions file: .parquet or .csv.")],
    workers: Annotated[
        str,
        typer.Option(
            help="Processes predicting: N (this one and N-1 warm helpers, started once for all the "
            "chunks), or auto: measure whether helpers pay (small inputs: 1); the choice and why are "
            "printed."
        ),
    ] = "auto",
    backend: Annotated[str, _BACKEND] = "local",
    address: Annotated[str | None, _ADDRESS] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Rows per forward pass (default: sized to the CPU cache for this model)."),
    ] = None,
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="Add a prob_<class> column per class.")
    ] = False,
    trust_code: Annotated[
        bool,
        typer.Option(
            "--trust-code",
            help="Allow a model dir whose architecture is your own module:function to import that module "
            "(in every worker: on PYTHONPATH or installed). Built-in and plugin models never need this.",
        ),
    ] = False,
    runtime: Annotated[
        str, typer.Option(help="torch, or onnx: ONNX Runtime (pip install 'hpcml[onnx]').")
    ] = "torch",
    json_: Annotated[bool, _JSON] = False,
) -> None:
    from hpcml.jobs.predict import predict_parallel

    if workers != "auto":
        try:
            workers = int(workers)
        except ValueError:
            raise UsageError(f"--workers takes a whole number >= 1 or auto, got {workers!r}") from None
    stats: dict[str, Any] = {}
    predict_parallel(
        model_dir, input, workers=workers, backend=backend, address=address, batch_size=batch_size,
        probabilities=probabilities, output=output, stats=stats, trust_code=trust_code, runtime=runtime,
    )  # fmt: skip
    result = {"model": str(model_dir), "input": stats["source"], "output": str(output),
              "workers": stats["workers"], "workers_requested": workers,
              "workers_reason": stats["workers_reason"], "backend": backend, "rows": stats["rows"],
              "seconds": stats["seconds"], "rows_per_second": stats["rows_per_second"]}  # fmt: skip
    if json_:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(
            f"predicted {result['rows']:,} rows in {result['seconds']:.2f} s "
            f"({result['rows_per_second']:,.0f} rows/s, {result['workers']} worker(s), {backend}) -> {output}"
        )
        typer.echo(f"workers: {result['workers_reason']}", err=True)
