"""`hpcml compress` and `hpcml export`: smaller, faster models. No logic lives here (inference/compress.py).

Registered in cli.py with `register(app)`. Heavy imports happen inside the commands so `hpcml --help`
stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["register"]

_JSON = typer.Option("--json", help="Print the compress.json report on stdout (and nothing else).")
_TRUST = typer.Option(
    "--trust-code", help="Allow a model dir whose architecture is your own module:function."
)
_THREADS = typer.Option(help="Threads for the latency measurement (and fine-tuning); set explicitly.")
_DATA = typer.Option(
    help="Data to measure (and fine-tune) on: mnist1d, digits, ... (test split) or a file/store. "
    "Default: the built-in dataset the model was trained on."
)

COMPRESS_HELP = (
    "Make a model dir smaller and faster, and measure what it costs. --prune F removes the share F of "
    "every hidden layer's neurons/channels (lowest weight norm first), giving a smaller dense model "
    "(the new widths are in model.json); --finetune-epochs N then trains it N epochs on --data. "
    "--quantize int8 stores Linear layers as int8 weights + scales (safetensors), where int8 pays. "
    "OUT is a model dir like any other, with compress.json: values and file size, test metric and "
    "latency at batch 1 and 1024, before and after.\n\n"
    "Examples:\n\n"
    "  hpcml compress runs/X/model --prune 0.5 --finetune-epochs 3 --data mnist1d --out runs/X/small\n\n"
    "  hpcml compress runs/X/model --quantize int8 --out runs/X/int8\n\n"
    "  hpcml compress runs/X/model --prune 0.25 --quantize int8 --out runs/X/both --json"
)

EXPORT_HELP = (
    "Export a model dir to ONNX (torch.onnx dynamo exporter): the batch axis is dynamic and the input "
    "normalization is folded in, so the ONNX model takes raw features. The export is checked against "
    "the torch model on held-out rows (max abs difference in the report). Writes OUT and "
    "<stem>.compress.json beside it. Needs pip install 'hpcml[onnx]'.\n\n"
    "Examples:\n\n"
    "  hpcml export runs/X/model --format onnx --out model.onnx\n\n"
    "  hpcml export runs/X/small --out small.onnx --data mnist1d --json"
)


def register(app: typer.Typer) -> None:
    app.command(name="compress", help=COMPRESS_HELP, no_args_is_help=True)(compress)
    app.command(name="export", help=EXPORT_HELP, no_args_is_help=True)(export)


def _summary(report: dict[str, Any]) -> str:
    m, p, f = report["metric"], report["params"], report["file_bytes"]
    lat = report["latency_ms"]
    names = list(lat["batch_1"])
    speed = ", ".join(
        f"batch {b}: {lat[f'batch_{b}'][names[0]]['ms'] / lat[f'batch_{b}'][names[1]]['ms']:.2f}x"
        for b in (1, 1024)
    )
    return (
        f"{report['out']}: {p['before']:,} -> {p['after']:,} values, "
        f"{f['before']:,} -> {f['after']:,} bytes; "
        f"{m['before']['metric']} {m['before']['value']:.4f} -> {m['after']['value']:.4f}; "
        f"speedup ({lat['threads']} thread(s)) {speed}"
    )


def compress(
    model_dir: Annotated[Path, typer.Argument(help="The model dir to compress.")],
    out: Annotated[Path, typer.Option(help="The compressed model dir to write.")],
    prune: Annotated[
        float | None, typer.Option(help="Share of each hidden layer to remove, in (0, 1).")
    ] = None,
    quantize: Annotated[str | None, typer.Option(help="int8: Linear layers as int8 weights.")] = None,
    finetune_epochs: Annotated[int, typer.Option(help="Epochs of fine-tuning after --prune.")] = 0,
    finetune_lr: Annotated[
        float, typer.Option(help="Peak learning rate of the fine-tuning (warm-up + cosine, AdamW).")
    ] = 1e-2,
    data: Annotated[str | None, _DATA] = None,
    threads: Annotated[int, _THREADS] = 1,
    trust_code: Annotated[bool, _TRUST] = False,
    json_: Annotated[bool, _JSON] = False,
) -> None:
    from hpcml.inference.compress import compress as run

    report = run(
        model_dir, out=out, prune=prune, quantize=quantize, finetune_epochs=finetune_epochs,
        finetune_lr=finetune_lr, data=data, threads=threads, trust_code=trust_code,
    )  # fmt: skip
    typer.echo(json.dumps(report, indent=2) if json_ else _summary(report))


def export(
    model_dir: Annotated[Path, typer.Argument(help="The model dir to export.")],
    out: Annotated[Path, typer.Option(help="The .onnx file to write.")],
    format: Annotated[str, typer.Option(help="onnx")] = "onnx",
    data: Annotated[str | None, _DATA] = None,
    threads: Annotated[int, _THREADS] = 1,
    trust_code: Annotated[bool, _TRUST] = False,
    json_: Annotated[bool, _JSON] = False,
) -> None:
    from hpcml.inference.compress import export as run

    report = run(model_dir, out=out, format=format, data=data, threads=threads, trust_code=trust_code)
    if json_:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(_summary(report) + f"; max abs difference vs torch {report['verify']['max_abs_diff']:.2g}")
