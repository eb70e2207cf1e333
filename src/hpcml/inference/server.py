"""`hpcml serve`: checks, then uvicorn on a socket hpcml binds, in 1 or N worker processes.

Security defaults (DESIGN.md): 127.0.0.1 unless told otherwise; a non-loopback host needs TLS
(`tls_cert`/`tls_key`, uvicorn's ssl) or `insecure_http`, which warns; a token always. With N
workers the parent binds the socket once and N spawned processes serve it, each with
cores // N torch threads (workers x threads = cores). SIGTERM stops accepting, lets in-flight
requests finish, and exits 0.
"""

from __future__ import annotations

import ipaddress
import multiprocessing
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcml._system import available_cores
from hpcml.config import ServeConfig
from hpcml.errors import HpcmlError, UsageError

__all__ = ["serve", "check_config", "import_serve"]

GRACE_SECONDS = 30  # in-flight requests get this long after SIGTERM


def import_serve() -> None:
    """FastAPI, uvicorn and prometheus-client are the `serve` extra: say how to get them."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise UsageError(f"hpcml serve needs {err.name}: pip install 'hpcml[serve]'") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_config(cfg: ServeConfig) -> ServeConfig:
    """The flags' rules, checked before anything starts; returns cfg with threads filled in."""
    model_dir = Path(cfg.model_dir)
    if not (model_dir / "model.json").is_file():
        raise UsageError(f"{model_dir}: not a model dir (expected model.json + model.safetensors)")
    for flag, path in (("--tls-cert", cfg.tls_cert), ("--tls-key", cfg.tls_key)):
        if path is not None and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: file not found")
    if not _loopback(cfg.host):
        if cfg.tls_cert is None and not cfg.insecure_http:
            raise UsageError(
                f"--host {cfg.host} is reachable from other machines: give --tls-cert and --tls-key "
                "(or --insecure-http to send tokens and data in plain text)"
            )
        warnings.warn(f"listening on {cfg.host}, not only on this machine (127.0.0.1)", stacklevel=1)
        if cfg.tls_cert is None:
            warnings.warn(
                "--insecure-http: tokens and predictions cross the network unencrypted", stacklevel=1
            )
    if cfg.runtime == "onnx":  # fail now with the exact pip install, not in every worker
        from hpcml.inference.onnx_runtime import require_onnx

        require_onnx("onnxruntime", "onnx", "onnxscript")
    threads = cfg.threads or max(1, available_cores() // cfg.workers)
    return cfg.model_copy(update={"threads": threads})


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {os.strerror(err.errno or 0)}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(cfg: ServeConfig, token: str, fatal: list[str]) -> Any:
    import uvicorn

    from hpcml.inference.service import create_app

    holder: dict[str, Any] = {}

    def on_fatal(message: str) -> None:
        fatal.append(message)
        holder["server"].should_exit = True

    app = create_app(cfg, token, on_fatal=on_fatal)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key,
        timeout_graceful_shutdown=GRACE_SECONDS, server_header=False, lifespan="on",
    )  # fmt: skip
    holder["server"] = uvicorn.Server(config)
    return holder["server"]


def _run_one(cfg: ServeConfig, token: str, sock: socket.socket) -> None:
    """Serve on `sock` in this process until SIGTERM/SIGINT; raise HpcmlError if the model fails."""
    fatal: list[str] = []
    server = _uvicorn_server(cfg, token, fatal)
    # uvicorn re-raises the signal it stopped for once it has drained; SIGTERM then means "done".
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    if fatal:
        raise HpcmlError(f"cannot serve {cfg.model_dir}: {fatal[0]}")


def _child(cfg_json: str, token: str, sock: socket.socket) -> None:
    cfg = ServeConfig.model_validate_json(cfg_json)
    try:
        _run_one(cfg, token, sock)
    except HpcmlError as err:
        print(f"hpcml: error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


def _run_many(cfg: ServeConfig, token: str, sock: socket.socket) -> None:
    ctx = multiprocessing.get_context("spawn")
    children = [
        ctx.Process(target=_child, args=(cfg.model_dump_json(), token, sock), name=f"hpcml-serve-{i}")
        for i in range(cfg.workers)
    ]
    stop = {"signal": False}

    def forward(signum: int, _frame: Any) -> None:
        stop["signal"] = True
        for c in children:
            if c.pid is not None and c.exitcode is None:
                os.kill(c.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for c in children:
            c.start()
        while not stop["signal"] and all(c.exitcode is None for c in children):
            time.sleep(0.2)
        if not stop["signal"]:  # a worker died (it printed why): take the others down too
            forward(signal.SIGTERM, None)
        for c in children:
            c.join()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    failed = [c for c in children if c.exitcode not in (0, -signal.SIGTERM)]
    if failed and not stop["signal"]:
        raise HpcmlError(f"{len(failed)} of {cfg.workers} server worker(s) failed (see above)")


def serve(cfg: ServeConfig, *, log: Callable[[str], None] = print) -> None:
    """Run the service until stopped. Blocks; returns after a graceful stop."""
    from hpcml.inference.security import load_token, token_id

    import_serve()
    cfg = check_config(cfg)
    token, source = load_token()
    if cfg.backend == "ray":  # Ray Serve: hpcml.jobs.serve_ray.serve_ray (jobs/ sits above inference/)
        raise UsageError("--backend ray is served by hpcml.jobs.serve_ray.serve_ray, not this function")
    sock = _bind(cfg.host, cfg.port)
    port = sock.getsockname()[1]
    scheme = "https" if cfg.tls_cert else "http"
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    log(
        f"hpcml serve: {cfg.model_dir} on {scheme}://{host}:{port} ({cfg.workers} worker(s) x "
        f"{cfg.threads} thread(s), batches <= {cfg.max_batch} rows / {cfg.max_wait_ms:g} ms); "
        f"token {token_id(token)} from {source}; /ready says when the model is loaded"
    )
    try:
        if cfg.workers == 1:
            _run_one(cfg, token, sock)
        else:
            _run_many(cfg, token, sock)
    finally:
        sock.close()
