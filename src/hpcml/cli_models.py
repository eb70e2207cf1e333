"""`hpcml models`: the architectures `--model` accepts, with their keyword arguments. No logic here.

Registered in cli.py with `register(app)`. torch and the plugins are imported inside the command, so
`hpcml --help` and `hpcml models --help` stay fast. `--shape` adds each built-in's parameters and
multiply-adds at that input shape, counted on torch's `meta` device (nothing allocated).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any

import typer

__all__ = ["register"]

MODELS_HELP = (
    "List the models --model accepts: the built-ins and the installed plugins (entry points in group "
    "hpcml.models), each with its keyword arguments (--model-kw KEY=VALUE) and their defaults. A plugin "
    "that fails to import is listed as broken, with its error.\n\n"
    "Your own network needs no registration: --model module:function names any callable "
    "f(input_shape, num_outputs, **kwargs) returning a torch.nn.Module, importable from PYTHONPATH; "
    "evaluate/predict then need --trust-code to import it.\n\n"
    "Examples:\n\n"
    "  hpcml models\n\n"
    "  hpcml models --json\n\n"
    "  hpcml models --shape 3,224,224 --classes 1000   # + params and MACs of each built-in\n\n"
    "  hpcml models --shape 3,32,32 --classes 10 --model-kw stem=cifar\n\n"
    "  hpcml train --data digits --layout flat --model mynets:build --model-kw width=128"
)


def register(app: typer.Typer) -> None:
    app.command(name="models", help=MODELS_HELP)(models)


def _kwargs_text(kwargs: dict[str, dict[str, Any]]) -> str:
    parts = []
    for name, info in kwargs.items():
        typ = f": {info['type']}" if "type" in info else ""
        parts.append(
            f"{name}{typ} (required)" if info.get("required") else f"{name}{typ}={info['default']!r}"
        )
    return ", ".join(parts) or "-"


def _shape(text: str) -> tuple[int, ...]:
    """'3,224,224' -> (3, 224, 224)."""
    from hpcml.errors import UsageError

    try:
        shape = tuple(int(p) for p in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise UsageError(f"--shape {text!r}: give the input shape as positive sizes, e.g. 3,224,224 (C,H,W)")
    return shape


def _macs_text(macs: int) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if macs >= scale:
            return f"{macs / scale:.3g} {unit}"
    return str(macs)


def models(
    json_: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")] = False,
    shape: Annotated[
        str | None,
        typer.Option(
            help="Input shape C,H,W (or any model's input sizes): adds each built-in's "
            "parameters and multiply-adds of one forward at batch 1."
        ),
    ] = None,
    classes: Annotated[int, typer.Option(min=1, help="Outputs of the head, with --shape.")] = 1000,
    model_kw: Annotated[
        list[str] | None,
        typer.Option(
            "--model-kw",
            help="KEY=VALUE kwargs for the count (e.g. stem=cifar), with --shape; "
            "a built-in that does not take one is counted without it.",
        ),
    ] = None,
) -> None:
    from hpcml.models.registry import describe_models

    rows = describe_models()
    costs: dict[str, dict[str, Any]] = {}
    if shape is not None:
        from hpcml.cli_train import _parse_pairs
        from hpcml.models.flops import builtin_costs

        costs = builtin_costs(_shape(shape), classes, _parse_pairs(model_kw or [], "--model-kw"))
    if json_:
        out = [
            {**dataclasses.asdict(r), **({"cost": costs[r.name]} if r.name in costs else {})} for r in rows
        ]
        extra = {"shape": list(_shape(shape)), "classes": classes} if shape is not None else {}
        typer.echo(json.dumps({**extra, "models": out}, indent=2, default=repr))
        return
    from rich.console import Console
    from rich.table import Table

    title = "hpcml models"
    if shape is not None:
        title += f" at input {shape}, {classes} outputs" + "".join(f", {kv}" for kv in model_kw or [])
    table = Table(title=title, title_justify="left")
    columns = ["name", "kind", "target", "kwargs (default)"] if shape is None else [
        "name", "kind", "params", "MACs", "kwargs (default)"
    ]  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right" if column in ("params", "MACs") else "left")
    notes = []
    for r in rows:
        kind = r.kind if r.kind == "built-in" else f"plugin ({r.source})"
        what = f"BROKEN: {r.error}" if r.error else _kwargs_text(r.kwargs)
        if shape is None:
            table.add_row(r.name, kind, r.target, what)
            continue
        c = costs.get(r.name, {"error": f"model {r.name}: plugins are not counted"})
        if "error" in c:
            notes.append(c["error"])
        size = ["-", "-"] if "error" in c else [f"{c['params']:,}", _macs_text(c["macs"])]
        table.add_row(r.name, kind, *size, what)
    Console().print(table)
    for note in notes:
        typer.echo(f"  - {note}")
    typer.echo("your own: --model module:function (e.g. mynets:build); see hpcml models --help")
