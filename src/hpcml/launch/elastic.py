"""Start N ranks per node with torch.distributed's elastic launcher (the machinery behind torchrun).

Each rank is a fresh `python -m hpcml.launch.worker` process; the launcher's agent watches them and,
when one fails, stops the others (and restarts the group up to `max_restarts` times), so a crashed
rank ends the job promptly instead of leaving its peers hanging in a collective.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hpcml.config import TrainConfig, dump_config
from hpcml.errors import HpcmlError, UsageError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--rdzv-endpoint must be HOST:PORT, got {endpoint!r}")
    return host, int(port)


def _failed_at(failure) -> int:
    """When a rank failed, in ns: the worker's own clock from its error file (torch keeps whole seconds
    only, which ties when the first failure makes its peers fail within the same second)."""
    try:
        return int(failure.message["extraInfo"]["hpcml_time_ns"])  # the error file's message, as read
    except (ValueError, KeyError, TypeError):
        return int(failure.timestamp) * 10**9 + 999_999_999  # no error file: after any same-second one


def _failure_message(err) -> str:
    """Name the rank that failed first and its own error message (from the worker's error file)."""
    failures = sorted(err.failures.items(), key=lambda kv: _failed_at(kv[1]))
    rank, f = failures[0]
    msg = f.message.get("message", json.dumps(f.message)) if isinstance(f.message, dict) else str(f.message)
    if not msg or msg.startswith("To enable traceback") or f.exitcode < 0:
        msg = f"exited with code {f.exitcode}" if f.exitcode >= 0 else f"killed by signal {-f.exitcode}"
    others = f" ({len(failures) - 1} other rank(s) stopped)" if len(failures) > 1 else ""
    return f"rank {rank} failed: {msg}{others}"


def check_nproc(nproc: int, *, device: str, cores: int, gpus: int) -> None:
    """Refuse more ranks on this node than it has CPU cores (CPU) or GPUs (CUDA), before anything starts.

    Every rank is a process of its own: on the CPU, ranks beyond the cores only take turns on them (and
    `--nproc 1000` starts a thousand interpreters); on CUDA every rank needs a GPU of its own (NCCL
    refuses two ranks on one). `cores` is what this process may run on (its affinity), `gpus` the
    CUDA devices visible (0 without CUDA); `device` is the config's (auto, cpu, cuda, cuda:N).
    """
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cpu":
        if nproc > cores:
            raise UsageError(
                f"--nproc {nproc} is more than the {cores} CPU core(s) this process may use; each rank is "
                f"a process with at least one core: use --nproc {cores} or fewer"
            )
        return
    if gpus == 0:
        raise UsageError(f"device={device!r} but no CUDA device is available")
    if device != "cuda" and nproc > 1:
        raise UsageError(
            f"device={device!r} would put all {nproc} ranks on one GPU; use device=cuda (one GPU per rank)"
        )
    if nproc > gpus:
        raise UsageError(
            f"--nproc {nproc} is more than the {gpus} GPU(s) found; one rank per GPU: "
            f"use --nproc {gpus} or fewer"
        )


def _check_hardware(nproc: int, device: str) -> None:
    import torch

    from hpcml._system import available_cores

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_nproc(nproc, device=device, cores=available_cores(), gpus=gpus)


# Loggers the elastic launcher writes through (their children too: some set their own level).
_ELASTIC_LOGGERS = ("torch.distributed.elastic", "torch.distributed.launcher")


@contextmanager
def _elastic_log_level(level: int) -> Iterator[None]:
    """The elastic agent logs every start at INFO (log dirs, signal handlers, stores): hpcml reports
    the outcome itself. Set its loggers to `level` for the launch and put them back after."""
    names = [
        n for n in [*_ELASTIC_LOGGERS, *logging.Logger.manager.loggerDict]
        if any(n == p or n.startswith(p + ".") for p in _ELASTIC_LOGGERS)
    ]  # fmt: skip
    loggers = [logging.getLogger(n) for n in dict.fromkeys(names)]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved, strict=True):
            lg.setLevel(old)


def check_launch(
    cfg: TrainConfig, *, nproc: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None
) -> None:
    """Refuse a launch that cannot work before anything starts or is written (exit 2)."""
    if nproc < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise UsageError(
            f"need nproc >= 1, nnodes >= 1 and 0 <= node_rank < nnodes "
            f"(got nproc={nproc}, nnodes={nnodes}, node_rank={node_rank})"
        )
    if nnodes > 1 and rdzv_endpoint is None:
        raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address, reachable by all)")
    _check_hardware(nproc, cfg.device)


def launch(
    cfg: TrainConfig,
    *,
    out: Path,
    nproc: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    max_restarts: int = 0,
    quiet: bool = True,
    resume: bool = False,
) -> bool:
    """Run `cfg` on nproc ranks on this node (and nnodes nodes in all). True where the run dir was written."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    check_launch(cfg, nproc=nproc, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
    if rdzv_endpoint is None:
        host, port = "127.0.0.1", free_port()
    else:
        host, port = _parse_endpoint(rdzv_endpoint)
    level = logging.CRITICAL if quiet else logging.WARNING
    # The agent's log dir (error files, redirected output) lives in the launch's temp dir, removed at the
    # end; by default torch makes a /tmp/torchelastic_* per run and leaves it behind.
    with tempfile.TemporaryDirectory(prefix="hpcml-launch-") as tmp, _elastic_log_level(level):
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(dump_config(cfg))
        lc = LaunchConfig(
            min_nodes=nnodes,
            max_nodes=nnodes,
            nproc_per_node=nproc,
            run_id=f"hpcml-{port}" if nnodes > 1 else f"hpcml-{uuid.uuid4().hex[:8]}",
            # one node: static ranks on a private port. Several: c10d rendezvous, hosted by the node
            # whose address is the endpoint (node ranks are assigned in joining order).
            rdzv_backend="static" if nnodes == 1 else "c10d",
            rdzv_endpoint=f"{host}:{port}",
            rdzv_configs={"rank": node_rank} if nnodes == 1 else {"join_timeout": 120},
            max_restarts=max_restarts,
            monitor_interval=0.2,
            start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=str(Path(tmp) / "elastic")),
        )
        args = [
            "-m", "hpcml.launch.worker", str(cfg_path), str(out), "--quiet" if quiet else "--progress",
            "--resume" if resume else "--fresh",
        ]  # fmt: skip
        try:
            elastic_launch(lc, sys.executable)(*args)
        except ChildFailedError as err:
            raise HpcmlError(_failure_message(err)) from None
    return (out / "report.json").exists()  # written by rank 0, wherever it ran
