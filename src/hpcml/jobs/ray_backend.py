"""The Ray side of the task runner: connect to a cluster, or start a local instance safely.

- An address is probed first (an HTTP/2 handshake, as Ray's servers speak gRPC), so an unreachable or
  wrong one fails in seconds; ray.init alone retries for minutes.
- A local instance started by hpcml listens on 127.0.0.1 only, through Ray's public means: its
  environment switch RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, set before Ray is imported, makes loopback this
  node's address (checked with ray.util.get_node_ip_address() before anything starts; no private
  constant or argument is touched). It has no dashboard and runs with Ray's token authentication
  (RAY_AUTH_MODE=token; the token is generated into ~/.ray/auth_token, kept 0600). hpcml refuses to
  start one with RAY_AUTH_MODE set to anything else. The tested Ray range is pinned in pyproject.toml
  and tests/jobs checks that every listening socket of the instance is on loopback.
- The same switch is set before connecting to a cluster at a loopback --address (127.0.0.1:PORT):
  on Linux Ray otherwise rewrites 127.0.0.1 in an address to the machine's network address.
- A cluster's token comes from RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, never from the command line.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hpcml._system import available_cores
from hpcml.errors import HpcmlError, UsageError

__all__ = ["import_ray", "on_loopback", "ray_session", "start_local_ray", "probe"]

RAY_MIN_VERSION = (2, 59)  # token authentication on by default for local instances
# Ray's own switch for "a cluster of one machine, on loopback" (its default on macOS and Windows), read
# when Ray is imported
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_LOOPBACK = ("127.0.0.1", "::1")
RAY_TESTED_BELOW = (2, 61)  # the range whose loopback-only listeners tests/jobs check (2.59, 2.60)
PROBE_TIMEOUT = 5.0


def on_loopback(address: str | None) -> bool:
    """Whether `address` (None: the local instance hpcml starts) is on this machine's loopback."""
    if address is None:
        return True
    text = address.removeprefix("ray://")
    if text.startswith("["):  # [IPv6]:PORT
        host = text[1 : text.find("]")]
    else:
        host = text.partition(":")[0] if text.count(":") == 1 else text  # HOST:PORT, HOST or bare IPv6
    return host in ("localhost", "::1") or host.startswith("127.")


def import_ray(*, loopback: bool = False) -> Any:
    """Ray, checked for the tested range. `loopback=True` (hpcml is about to start a local instance, or
    to connect to a cluster on 127.0.0.1): if Ray is not imported yet, its documented switch
    LOOPBACK_ENV=0 goes into the environment first, so Ray takes 127.0.0.1 as this node's address, every
    server it starts listens there, and an address on 127.0.0.1 stays there (on Linux Ray otherwise
    takes the machine's network address). It stays set for this process and its children."""
    if loopback and "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_ENV, "0")
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
    if version >= RAY_TESTED_BELOW:
        logging.getLogger("hpcml").warning(
            "Ray %s is newer than the range hpcml is tested with (< %s): that its local instance listens on "
            "127.0.0.1 only is not checked for it",
            ray.__version__,
            ".".join(map(str, RAY_TESTED_BELOW)),
        )
    return ray


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray, connected. An existing session in this process (a notebook's, a test's) is used as is and
    left running; one hpcml opened is shut down at the end."""
    ray = import_ray(loopback=on_loopback(address))
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
    the function to call after `ray.shutdown()` (nothing is left to undo: kept for callers)."""
    return _start_local(import_ray(loopback=True), num_cpus=num_cpus)


def _start_local(ray: Any, *, num_cpus: int | None = None) -> Callable[[], None]:
    from ray._raylet import AuthenticationMode, get_authentication_mode

    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None and mode.lower() != "token":
        raise UsageError(
            f"RAY_AUTH_MODE={mode}: hpcml keeps Ray's token authentication on for the Ray instance it "
            "starts; unset RAY_AUTH_MODE (or set it to 'token')"
        )
    node_ip = ray.util.get_node_ip_address()  # the address Ray's servers would listen on
    if node_ip not in _LOOPBACK:
        raise HpcmlError(
            f"Ray was imported before hpcml could keep its local instance on 127.0.0.1 (it would listen on "
            f"{node_ip}); set {LOOPBACK_ENV}=0 before Ray is imported, or start Ray yourself "
            "(ray start --head --node-ip-address 127.0.0.1) and pass its --address"
        )
    try:
        ray.init(
            address="local",  # never attach to some other instance found on this machine
            num_cpus=num_cpus or available_cores(),
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
        )
    except Exception as err:
        raise HpcmlError(f"could not start a local Ray instance: {first_line(err)}") from None
    if get_authentication_mode() != AuthenticationMode.TOKEN:  # Ray's default changed across versions
        ray.shutdown()
        raise HpcmlError("the local Ray instance came up without token authentication; not using it")
    _tighten_token_file()
    return lambda: None


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
            f"Ray at {address} refused the connection: {first_line(err)}. Give the cluster's token in "
            "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (a 0600 file) with RAY_AUTH_MODE=token"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise HpcmlError(f"cannot connect to Ray at {address}: {first_line(err)}") from None
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
    return f"{type(err).__name__}: {first_line(err)}"


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
