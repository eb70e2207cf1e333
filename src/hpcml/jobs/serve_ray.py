"""`hpcml serve --backend ray`: the service's FastAPI app on Ray Serve, N replicas behind Serve's proxy.

The app is the one `hpcml serve` runs on uvicorn (inference/service.py: same endpoints, token, limits,
audit log and forward path); jobs/serve_replica.py wraps it as a Ray Serve ingress deployment. Ray is
the local instance hpcml starts (127.0.0.1, token auth, no dashboard: jobs/ray_backend.py) or the
cluster at `--address`. Serve's HTTP proxy listens where `--host/--port` say, through Serve's public
`http_options` (TLS through its ssl_certfile/ssl_keyfile), with the local backend's rules: 127.0.0.1
by default, anything else only with TLS or --insecure-http. SIGTERM/SIGINT delete the application
(Serve lets in-flight requests finish) and stop what hpcml started.

The replicas read the model dir from their own file system: on a cluster it must be on shared storage.
The token travels to the replicas as a deployment argument, inside Ray (token-authenticated).
Ray Serve 2.60 also starts an inter-replica gRPC server in every replica on `[::]:0` (hard-coded, no
public option): Ray's token interceptor guards it, but it is not loopback-only (README: Serving).
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hpcml._system import available_cores
from hpcml.config import ServeConfig
from hpcml.errors import HpcmlError, UsageError
from hpcml.jobs.ray_backend import import_ray, on_loopback, ray_session, start_local_ray

__all__ = ["serve_ray", "APP_NAME"]

APP_NAME = "hpcml-serve"
GRACE_SECONDS = 30  # in-flight requests get this long once the application is deleted


def _import_serve(cfg: ServeConfig) -> Any:
    import_ray(loopback=on_loopback(cfg.address))  # Ray's loopback switch before its import, if any
    try:
        from ray import serve
    except ImportError as err:
        raise UsageError(f"--backend ray needs Ray Serve ({err.name}): pip install 'hpcml[ray]'") from None
    return serve


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, 0))
        except OSError as err:
            raise UsageError(f"cannot listen on {host}: {err.strerror or err}") from None
        return s.getsockname()[1]


def _settings(cfg: ServeConfig) -> ServeConfig:
    """The local backend's checks, plus the ray backend's own: replicas instead of workers, and an
    absolute model dir (a replica's working directory is not this one)."""
    from hpcml.inference.server import check_config, import_serve

    import_serve()
    if cfg.workers != 1:
        raise UsageError("--workers is for the local backend; with --backend ray give --replicas N")
    if cfg.threads is None:  # on this machine: replicas x threads = cores; on a cluster, say --threads
        cfg = cfg.model_copy(
            update={"threads": 1 if cfg.address else max(1, available_cores() // cfg.replicas)}
        )
    cfg = check_config(cfg)
    update: dict[str, Any] = {"model_dir": str(Path(cfg.model_dir).resolve())}
    for key in ("tls_cert", "tls_key", "audit_log"):
        value = getattr(cfg, key)
        update[key] = None if value is None else str(Path(value).resolve())
    if cfg.port == 0:
        if cfg.address is not None:
            raise UsageError("--port 0 picks a free port on this machine; with --address give --port")
        update["port"] = _free_port(cfg.host)
    return cfg.model_copy(update=update)


@contextmanager
def _ray(cfg: ServeConfig) -> Iterator[Any]:
    """Ray, connected: the local instance hpcml starts (sized for the replicas), or the cluster."""
    ray = import_ray(loopback=on_loopback(cfg.address))
    if cfg.address is not None or ray.is_initialized():
        with ray_session(cfg.address) as session:
            yield session
        return
    restore = start_local_ray(num_cpus=max(available_cores(), cfg.replicas * (cfg.threads or 1)))
    try:
        yield ray
    finally:
        ray.shutdown()
        restore()


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


def _deploy(serve: Any, ray: Any, cfg: ServeConfig, token: str) -> None:
    from hpcml.jobs.ray_backend import ray_cpus
    from hpcml.jobs.serve_replica import ServeReplica

    serve.start(
        proxy_location="HeadOnly",
        http_options={
            "host": cfg.host, "port": cfg.port, "ssl_certfile": cfg.tls_cert, "ssl_keyfile": cfg.tls_key,
        },
    )  # fmt: skip
    deployment = serve.deployment(
        ServeReplica,
        name="hpcml",
        num_replicas=cfg.replicas,
        ray_actor_options={"num_cpus": ray_cpus(ray, cfg.threads or 1)},
        max_ongoing_requests=max(256, 4 * cfg.max_batch),  # batching needs many requests per replica
        graceful_shutdown_timeout_s=GRACE_SECONDS,
    )
    try:
        serve.run(deployment.bind(cfg.model_dump_json(), token), name=APP_NAME, route_prefix="/")
    except Exception as err:
        raise HpcmlError(_why(serve, cfg, err)) from None


def _why(serve: Any, cfg: ServeConfig, err: Exception) -> str:
    """serve.run says only that the deployment failed; Serve's status holds the replicas' error (the
    health check's HpcmlError when the model cannot load)."""
    try:
        app = serve.status().applications[APP_NAME]
        text = "\n".join([d.message for d in app.deployments.values()] + [app.message])
    except Exception:
        text = ""
    for line in reversed(f"{text}\n{err}".splitlines()):
        _, found, message = line.partition("HpcmlError: ")
        if found and message.strip():
            return message.strip()
    return f"cannot serve {cfg.model_dir} on Ray Serve: {_first_line(err)}"


def _undeploy(serve: Any, *, started_ray: bool) -> None:
    """Delete the application (Serve drains it). On a cluster, stop Serve itself unless others'
    applications use it; a local instance hpcml started goes down whole with ray.shutdown()."""
    try:
        serve.delete(APP_NAME)
        if not started_ray and not serve.status().applications:
            serve.shutdown()
    except Exception as err:  # the cluster went away: nothing left to stop
        logging.getLogger("hpcml").warning("stopping Ray Serve: %s", _first_line(err))


def serve_ray(cfg: ServeConfig, *, log: Callable[[str], None] = print) -> None:
    """Deploy on Ray Serve and block until SIGTERM/SIGINT; returns after the deployment is deleted."""
    from hpcml.inference.security import load_token, token_id

    serve = _import_serve(cfg)
    cfg = _settings(cfg)
    token, source = load_token()
    for name in ("ray", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    stop = {"signal": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    ray = import_ray(loopback=on_loopback(cfg.address))
    started_ray = cfg.address is None and not ray.is_initialized()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with _ray(cfg) as ray:
            # ray.init installs its own SIGTERM handler (it prints a stack and kills the driver, which
            # would leave Serve's actors behind): take SIGTERM/SIGINT back.
            for s in previous:
                signal.signal(s, on_signal)
            try:
                if not stop["signal"]:
                    _deploy(serve, ray, cfg, token)
                scheme = "https" if cfg.tls_cert else "http"
                host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
                where = cfg.address or "a local Ray instance on 127.0.0.1"
                if stop["signal"]:
                    return
                log(
                    f"hpcml serve: {cfg.model_dir} on {scheme}://{host}:{cfg.port} (Ray Serve on {where}: "
                    f"{cfg.replicas} replica(s) x {cfg.threads} thread(s), batches <= {cfg.max_batch} "
                    f"rows / {cfg.max_wait_ms:g} ms); token {token_id(token)} from {source}"
                )
                while not stop["signal"]:
                    time.sleep(0.2)
            finally:
                _undeploy(serve, started_ray=started_ray)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
