"""`hpcml serve`: the HTTP prediction service on the command line. No logic lives here.

Registered in cli.py with `register(app)`. FastAPI, uvicorn and torch are imported inside the
command, so `hpcml --help` stays fast and works without the `serve` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["register"]

HELP = (
    "Serve a model dir over HTTP: POST /v1/predict (dynamic batching), GET /v1/model, /health, "
    "/ready, /metrics, /docs. A bearer token is always required: HPCML_SERVE_TOKEN_FILE (a 0600 "
    "file) or HPCML_SERVE_TOKEN (default: ~/.hpcml/serve-token, made once). Needs "
    "pip install 'hpcml[serve]'.\n\n"
    "Examples:\n\n"
    "  hpcml serve runs/X/model                        # 127.0.0.1:8000\n\n"
    "  HPCML_SERVE_TOKEN_FILE=~/.hpcml-token hpcml serve runs/X/model --workers 2 --max-batch 64\n\n"
    "  hpcml serve runs/X/model --host 0.0.0.0 --tls-cert cert.pem --tls-key key.pem\n\n"
    "  hpcml serve runs/X/model --backend ray --replicas 2          # on Ray Serve\n\n"
    "  hpcml serve runs/X/small --runtime onnx                      # a compressed dir, on ONNX Runtime\n\n"
    '  curl -H "Authorization: Bearer $TOKEN" -d \'{"rows": [{"f0": 0.1, "f1": 2.0}]}\' '
    "http://127.0.0.1:8000/v1/predict"
)


def register(app: typer.Typer) -> None:
    app.command(name="serve", help=HELP)(serve)


def serve(
    model_dir: Annotated[Path, typer.Argument(help="A model dir (model.safetensors + model.json).")],
    host: Annotated[str, typer.Option(help="Address to listen on; non-loopback needs TLS.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: a free one, printed).")] = 8000,
    workers: Annotated[int, typer.Option(help="Server processes (each loads the model).")] = 1,
    threads: Annotated[
        int | None, typer.Option(help="Torch threads per worker (default cores/workers).")
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Rows per forward pass, at most.")] = 64,
    max_wait_ms: Annotated[
        float, typer.Option(help="Longest wait for more rows while requests arrive.")
    ] = 5.0,
    max_rows: Annotated[int, typer.Option(help="Rows per request, at most (more: 413).")] = 1024,
    max_body_bytes: Annotated[int, typer.Option(help="Request body size, at most (more: 413).")] = 1 << 20,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    insecure_http: Annotated[
        bool, typer.Option("--insecure-http", help="Allow plain HTTP on a non-loopback host (warns).")
    ] = False,
    audit_log: Annotated[
        Path | None, typer.Option(help="JSON-lines audit log file (default stderr).")
    ] = None,
    backend: Annotated[str, typer.Option(help="local (uvicorn) or ray (Ray Serve).")] = "local",
    runtime: Annotated[
        str, typer.Option(help="torch, or onnx (ONNX Runtime; pip install 'hpcml[onnx]').")
    ] = "torch",
    replicas: Annotated[int, typer.Option(help="ray: number of Serve replicas.")] = 1,
    address: Annotated[str | None, typer.Option(help="ray: HOST:PORT of a running cluster.")] = None,
    trust_code: Annotated[
        bool,
        typer.Option(
            "--trust-code",
            help="Allow a model dir whose architecture is your own module:function to import that module.",
        ),
    ] = False,
) -> None:
    from hpcml.config import ServeConfig, format_validation_error
    from hpcml.errors import UsageError
    from hpcml.inference.server import serve as run_local

    values = {
        "model_dir": str(model_dir), "host": host, "port": port, "workers": workers, "threads": threads,
        "max_batch": max_batch, "max_wait_ms": max_wait_ms, "max_rows": max_rows,
        "max_body_bytes": max_body_bytes, "tls_cert": None if tls_cert is None else str(tls_cert),
        "tls_key": None if tls_key is None else str(tls_key), "insecure_http": insecure_http,
        "audit_log": None if audit_log is None else str(audit_log), "backend": backend,
        "replicas": replicas, "address": address, "trust_code": trust_code, "runtime": runtime,
    }  # fmt: skip
    from pydantic import ValidationError

    try:
        cfg = ServeConfig.model_validate(values)
    except ValidationError as err:
        raise UsageError(format_validation_error(err, source="hpcml serve").replace("\n", "; ")) from None
    if cfg.backend == "ray":  # Ray Serve is launched from jobs/ (it uses jobs' Ray helpers)
        from hpcml.jobs.serve_ray import serve_ray as run_serve
    else:
        run_serve = run_local
    run_serve(cfg, log=lambda line: typer.echo(line, err=True))
