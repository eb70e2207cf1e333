"""`hpcml models`: the architectures `--model` accepts, with their keyword arguments. No logic here.

Registered in cli.py with `register(app)`. torch and the plugins are imported inside the command, so
`hpcml --help` and `hpcml models --help` stay fast.
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


def models(
    json_: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")] = False,
) -> None:
    from hpcml.models.registry import describe_models

    rows = describe_models()
    if json_:
        typer.echo(json.dumps({"models": [dataclasses.asdict(r) for r in rows]}, indent=2, default=repr))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="hpcml models", title_justify="left")
    for column in ("name", "kind", "target", "kwargs (default)"):
        table.add_column(column)
    for r in rows:
        kind = r.kind if r.kind == "built-in" else f"plugin ({r.source})"
        what = f"BROKEN: {r.error}" if r.error else _kwargs_text(r.kwargs)
        table.add_row(r.name, kind, r.target, what)
    Console().print(table)
    typer.echo("your own: --model module:function (e.g. mynets:build); see hpcml models --help")
