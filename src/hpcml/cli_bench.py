"""`hpcml bench`: the benchmark suite and the doctor on the command line. No logic lives here.

Registered in cli.py with `register(app)`. torch is imported inside the command, so `hpcml --help`
stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]

HELP = (
    "Measure hpcml side by side with plain PyTorch (and Lightning when installed): time to 94% on "
    "MNIST-1D, MLP throughput, MFU, data-parallel and parallel-predict scaling, step-time breakdown. "
    "Writes <stem>.json, <stem>.md and plots under --out; ratios > 1 favour hpcml.\n\n"
    "Examples:\n\n"
    "  hpcml bench                         # quick suite: < 3 min on 2 cores\n\n"
    "  hpcml bench --suite full --out benchmarks/results\n\n"
    "  hpcml bench --cases images             # image training vs an ImageFolder + DataLoader loop\n\n"
    "  hpcml bench --cases time-to-accuracy,mfu --repeat 5 --json\n\n"
    "  hpcml bench --cases serve               # hpcml serve vs a naive FastAPI endpoint (+ LitServe)\n\n"
    "  hpcml bench --doctor runs/X/config.yaml     # where does the step time go?\n\n"
    "  hpcml bench --plan                      # DDP at 2..1024 ranks: the bench's data-parallel MLP\n\n"
    "  hpcml bench --plan --config runs/X/config.yaml --link ib=200Gb/s@2us --overlap 0.5"
)


def _bench(
    suite: Annotated[str, typer.Option(help="quick (< 3 min on 2 cores) or full (~10 min).")] = "quick",
    cases: Annotated[
        list[str] | None,
        typer.Option(
            "--cases",
            help="Cases to run, comma-separated or repeated: time-to-accuracy, throughput, mfu, "
            "scaling, predict, breakdown, precision, serve (default: all).",
        ),
    ] = None,
    repeat: Annotated[
        int | None, typer.Option(help="Repeats per contender (default: suite's; --plan: 3).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder for the JSON, Markdown and plots.")] = Path("runs/bench"),
    stem: Annotated[str | None, typer.Option(help="File name stem (default bench-<host>-<date>).")] = None,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: all available cores).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    doctor: Annotated[
        Path | None,
        typer.Option(help="Instead of the suite: break down the step time of this run config (YAML)."),
    ] = None,
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="Instead of the suite: measure a config's compute per step and gradient bytes, and "
            "project data-parallel step time and efficiency at 2..--max-ranks ranks for each --link.",
        ),
    ] = False,
    config: Annotated[
        Path | None, typer.Option(help="--plan: the run config (YAML; default: the bench's DDP case).")
    ] = None,
    link: Annotated[
        list[str] | None,
        typer.Option(
            help="--plan: NAME=BANDWIDTH@LATENCY (repeatable, replaces the defaults 10GbE, 25GbE, "
            "100GbE RDMA, NVLink), e.g. ib=200Gb/s@2us or nvlink=300GB/s@5us (Gb bits, GB bytes).",
        ),
    ] = None,
    overlap: Annotated[
        float, typer.Option(help="--plan: share of the compute that hides communication, 0 (none) to 1.")
    ] = 0.0,
    max_ranks: Annotated[int, typer.Option(help="--plan: project 2, 4, ... up to this many ranks.")] = 1024,
    check_local: Annotated[
        bool,
        typer.Option(help="--plan: also run 2 gloo ranks here and compare with the projection."),
    ] = True,
    steps: Annotated[int, typer.Option(help="--doctor, --plan: steps to time.")] = 30,
    nproc: Annotated[int, typer.Option(help="--doctor: processes the config runs with.")] = 1,
    json_: Annotated[
        bool, typer.Option("--json", help="Print the result JSON on stdout (only that).")
    ] = False,
) -> None:
    from rich.console import Console

    err = Console(stderr=True)
    if plan:
        from hpcml.bench import plan as run_plan
        from hpcml.bench.planner import parse_link

        links = [parse_link(spec) for spec in link] if link else None
        result = run_plan(
            config, links=links, overlap=overlap, max_ranks=max_ranks, steps=steps, repeats=repeat or 3,
            check_local=check_local,
        )  # fmt: skip
        _show_plan(result, out=out, stem=stem, json_=json_)
        return
    if doctor is not None:
        from hpcml.bench import doctor as run_doctor

        result = run_doctor(doctor, steps=steps, nproc=nproc)
        if json_:
            typer.echo(json.dumps(result, indent=2))
        else:
            _print_doctor(result, Console())
        return

    from hpcml.bench import bench, parse_cases

    parse_cases(cases)  # a bad name fails before anything runs
    log = (
        (lambda msg: err.print(msg, highlight=False, markup=False))
        if not json_
        else (lambda msg: typer.echo(msg, err=True))
    )
    result = bench(
        suite=suite, cases=cases, repeat=repeat, out=out, threads=threads, device=device, stem=stem, log=log
    )
    if json_:
        typer.echo(json.dumps(result, indent=2))
        return
    from hpcml.bench.report import console_table

    console = Console(width=None if Console().is_terminal else 160)
    console_table(result, console)
    for f in result.get("files", []):
        typer.echo(f"wrote {f}")


def _show_plan(result: dict, *, out: Path, stem: str | None, json_: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from hpcml.bench import default_stem
    from hpcml.bench.planner import summary_lines, table, write

    files = write(result, out, stem or default_stem("plan"))
    if json_:
        typer.echo(json.dumps(result, indent=2))
        return
    console = Console(width=None if Console().is_terminal else 160)
    header, rows = table(result)
    t = Table(title=Text("hpcml bench --plan: data-parallel projection"), title_justify="left")
    for h in header:
        t.add_column(h, justify="right")
    for row in rows:
        t.add_row(*map(Text, row))
    console.print(t)
    for line in summary_lines(result):
        console.print(Text(line))
    for f in files:
        typer.echo(f"wrote {f}")


def _print_doctor(result: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text

    b = result["breakdown"]
    t = Table(
        title=Text(  # Text, not markup: a data name or path may hold "[...]"
            f"step-time breakdown: {b['model']} on {b['data']}, batch {b['batch_size']}, {b['device']}, "
            f"{b['precision']}, {b['threads']} threads ({b['steps']} steps)"
        ),
        title_justify="left",
    )
    for h in ("phase", "ms/step", "share"):
        t.add_column(h, justify="left" if h == "phase" else "right")
    for k, v in b["phases"].items():
        t.add_row(k, f"{v['seconds_per_step'] * 1e3:.3f}", f"{v['fraction']:.0%}")
    t.add_row("sum of phases (synchronized)", f"{b['phase_sum_seconds_per_step'] * 1e3:.3f}", "")
    t.add_row("hpcml loop (no syncs)", f"{b['loop_seconds_per_step'] * 1e3:.3f}", "")
    console.print(t)
    console.print(
        f"{b['samples_per_second']:,.0f} samples/s, {b['loop_flops_per_second'] / 1e9:,.2f} GFLOP/s = "
        f"{b['mfu']:.1%} of the measured matmul peak ({b['peak_flops'] / 1e9:,.1f} GFLOP/s)",
        highlight=False,
        markup=False,
    )
    if not result["hints"]:
        console.print("no known cause of slowness shows", highlight=False, markup=False)
    for h in result["hints"]:
        console.print(f"hint ({h['cause']}): {h['hint']}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add the `bench` command to the `hpcml` app."""
    app.command("bench", help=HELP, no_args_is_help=False)(_bench)
