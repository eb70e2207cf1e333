"""The Ray side of the task runner: connect to a cluster, or start a local instance safely.

- An address is probed first (an HTTP/2 handshake, as Ray's servers speak gRPC), so an unreachable or
  wrong one fails in seconds; ray.init alone retries for minutes.
- A local instance started by hpcml binds 127.0.0.1 only, has no dashboard, and runs with Ray's token
  authentication (RAY_AUTH_MODE=token; the token is generated into ~/.ray/auth_token, kept 0600).
  hpcml refuses to start one with RAY_AUTH_MODE set to anything else.
- A cluster's token comes from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, never from the command line.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hpcml.errors import HpcmlError, UsageError
from hpcml.jobs.tasks import cores

__all__ = ["import_ray", "ray_session", "start_local_ray", "probe"]

RAY_MIN_VERSION = (2, 59)  # token authentication on by default for local instances
PROBE_TIMEOUT = 5.0


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("the ray backend needs Ray: pip install 'hpcml[ray]'") from None
    version = tuple(int(p) for p in ray.__version__.split(".")[:2] if p.isdigit())
    if version < RAY_MIN_VERSION:
        raise UsageError(
            f"Ray {ray.__version__} is too old: hpcml needs Ray >= {'.'.join(map(str, RAY_MIN_VERSION))} "
            "(token authentication); pip install -U 'hpcml[ray]'"
        )
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, connected. An existing session in this process (a notebook's, a test's) is used as is and
    left running; one hpcml opened is shut down at the end."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    restore = _start_local(ray) if address is None else _connect(ray, address)
    try:
        yield ray
    finally:
        ray.shutdown()
        restore()


def start_local_ray(*, num_cpus: int | None = None) -> Callable[[], None]:
    """Start a local Ray instance the way hpcml does (127.0.0.1 only, token auth, no dashboard); returns
    the function that undoes the process-wide settings after `ray.shutdown()`."""
    return _start_local(import_ray(), num_cpus=num_cpus)


def _start_local(ray: Any, *, num_cpus: int | None = None) -> Callable[[], None]:
    from ray._private import ray_constants
    from ray._raylet import AuthenticationMode, get_authentication_mode

    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        raise UsageError(
            f"RAY_AUTH_MODE={mode}: hpcml keeps Ray's token authentication on for the Ray instance it "
            "starts; unset RAY_AUTH_MODE (or set it to 'token')"
        )
    # On Linux Ray resolves 127.0.0.1 to the machine's network address and its servers listen on every
    # interface. Ray's "no cluster" mode (its default on macOS/Windows) keeps them all on loopback;
    # the env var reaches the processes Ray spawns, the constant this already-imported driver.
    saved_env = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    saved_const = ray_constants.ENABLE_RAY_CLUSTER
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False

    def restore() -> None:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        else:
            os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved_env

    try:
        ray.init(
            address="local",  # never attach to some other instance found on this machine
            num_cpus=num_cpus or cores(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    except Exception as err:
        restore()
        raise HpcmlError(f"could not start a local Ray instance: {_first_line(err)}") from None
    if get_authentication_mode() != AuthenticationMode.TOKEN:  # Ray's default changed across versions
        ray.shutdown()
        restore()
        raise HpcmlError("the local Ray instance came up without token authentication; not using it")
    _tighten_token_file()
    return restore


def _tighten_token_file() -> None:
    # Ray writes a generated token to ~/.ray/auth_token with the default umask; it is a secret (0600).
    path = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    try:
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError:
        pass


def _connect(ray: Any, address: str) -> Callable[[], None]:
    if address != "auto":
        probe(address)
    try:
        ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except ray.exceptions.AuthenticationError as err:
        raise HpcmlError(
            f"Ray at {address} refused the connection: {_first_line(err)}. Give the cluster's token in "
            "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (a 0600 file) with RAY_AUTH_MODE=token"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise HpcmlError(f"cannot connect to Ray at {address}: {_first_line(err)}") from None
    return lambda: None


def probe(address: str, *, timeout: float = PROBE_TIMEOUT) -> None:
    """Fail fast unless `address` answers like a gRPC server (Ray's GCS or client server speak HTTP/2).

    ray.init itself retries an unreachable address for minutes; this takes at most ~2 x `timeout`.
    """
    text = address.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, "10001" if address.startswith("ray://") else "6379"
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise UsageError(f"--address must be HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as s:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return  # a TLS server would not answer plaintext HTTP/2: reachability must do
            # HTTP/2 client preface + an empty SETTINGS frame; a server answers with its own SETTINGS.
            s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            head = s.recv(9)
    except socket.gaierror:
        raise HpcmlError(f"cannot connect to Ray at {address}: unknown host {host!r}") from None
    except TimeoutError:
        raise HpcmlError(f"cannot connect to Ray at {address}: no answer within {timeout:g} s") from None
    except OSError as err:
        raise HpcmlError(f"cannot connect to Ray at {address}: {err.strerror or err}") from None
    if len(head) < 9 or head[3] != 0x04:
        raise HpcmlError(f"cannot connect to Ray at {address}: it does not answer like a Ray server")


def ray_cpus(ray: Any, threads: int) -> int:
    """CPUs to reserve per task: its threads, but no more than the largest node has (or it never runs)."""
    largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")), default=0)
    if largest < 1:
        raise HpcmlError("the Ray cluster has no CPUs to run jobs on")
    return int(min(threads, largest))


def ray_error(ray: Any, err: Exception) -> str:
    if isinstance(err, ray.exceptions.WorkerCrashedError | ray.exceptions.NodeDiedError):
        return "Ray worker process died (killed, crashed or out of memory)"
    if isinstance(err, ray.exceptions.TaskCancelledError):
        return "cancelled"
    return f"{type(err).__name__}: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
