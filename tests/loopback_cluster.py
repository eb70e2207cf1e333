"""A real two-node Ray cluster on 127.0.0.1, for tests: `ray start --head` plus `ray start --address`,
each with `--node-ip-address 127.0.0.1` and resources of its own, then the given commands against it.

Why a namespace: on Linux, Ray 2.60's `ray start` rewrites 127.0.0.1 in `--address` and in
`--node-ip-address` to the machine's network address (the address its route to 8.8.8.8 leaves from),
and its loopback switch RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which prevents that, also makes a non-head
`ray start` refuse to run. A node whose address is not 127.0.0.1 listens on all interfaces. On a machine
whose only network is loopback, Ray finds 127.0.0.1 itself, so the documented commands work unchanged;
`run_cluster` gives them one: new network and PID namespaces (`unshare`), which also guarantee that
nothing the cluster starts outlives it (the kernel ends a PID namespace's processes with its first).

`run_cluster(commands, ...)` runs this file as that namespace's first process. It starts both nodes
(token authentication on), waits for both to join, runs each command ("{address}" is replaced by the
head's), records every listening socket in the namespace while they run, stops the nodes, and returns
{"runs": [{"rc", "stdout", "stderr"}], "listening": [[ip, port, process name], ...]}.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PORT = 6379  # the namespace is private: Ray's defaults cannot clash with another cluster's
_NS = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
_WAIT_NODES = """
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + 90
while sum(n["Alive"] for n in ray.nodes()) < 2:
    assert time.monotonic() < deadline, ray.nodes()
    time.sleep(0.5)
"""


def namespace_command() -> list[str] | None:
    """The unshare prefix that works here (root, or an unprivileged user namespace), or None."""
    for prefix in (_NS, [*_NS[:1], "--user", "--map-root-user", *_NS[1:]]):
        try:
            if subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0:
                return prefix
        except (OSError, subprocess.TimeoutExpired):
            return None
    return None


def run_cluster(
    commands: list[list[str]], *, work: Path, timeout: float, unshared: Path | None = None
) -> dict:
    """Run `commands` against the cluster. `unshared`: a folder the second node does not see (its own
    empty one is mounted there), as if the nodes did not share that storage."""
    prefix = namespace_command()
    assert prefix is not None, "no network namespace available (unshare)"
    spec, result = work / "cluster-spec.json", work / "cluster-result.json"
    spec.write_text(json.dumps({"commands": commands, "unshared": unshared and str(unshared)}))
    proc = subprocess.run(
        [*prefix, sys.executable, __file__, str(spec), str(result)], capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(result.read_text())


def _loopback_up() -> None:
    # the namespace's `lo` starts down: SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0))[:18])[1]
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))


def _ray_start(
    args: list[str], env: dict[str, str], log: Path, *, hide: str | None = None
) -> subprocess.Popen:
    ray = [str(Path(sys.executable).with_name("ray"))]
    if hide:  # a mount namespace of its own, with an empty tmpfs over `hide`
        mount = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
        ray = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, hide, *ray]
    common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
              "--include-log-monitor", "false"]  # fmt: skip
    with open(log, "w") as f:
        return subprocess.Popen(
            [*ray, "start", *args, *common], env=env, stdout=f, stderr=f, start_new_session=True
        )


def _wait_port(port: int, head: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while head.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"the head node did not listen on {port} (exit code {head.poll()})")


def _listening(seen: set[tuple[str, int, str]]) -> None:
    import psutil

    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and c.laddr):
            try:
                name = psutil.Process(c.pid).name() if c.pid else "?"
            except psutil.Error:
                name = "?"
            seen.add((c.laddr.ip, c.laddr.port, name))


def _run(command: list[str], env: dict[str, str], seen: set) -> dict:
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        while proc.poll() is None:
            _listening(seen)
            time.sleep(0.5)
        out.seek(0), err.seek(0)
        seconds = round(time.monotonic() - t0, 1)
        return {
            "rc": proc.returncode,
            "stdout": out.read()[-20000:],
            "stderr": err.read()[-5000:],
            "seconds": seconds,
        }


def _end_all_but_me() -> None:
    """SIGKILL every other process of this PID namespace: they are all the cluster's (its graceful stop
    takes Ray 10-20 s on a busy machine, and nothing it would clean up outlives the namespace)."""
    import psutil

    others = [p for p in psutil.process_iter() if p.pid != os.getpid()]
    for p in others:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(others, timeout=10)


def main(spec_path: str, result_path: str) -> None:
    _loopback_up()
    spec = json.loads(Path(spec_path).read_text())
    tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    address = f"127.0.0.1:{PORT}"
    head_args = ["--head", "--port", str(PORT), "--include-dashboard", "false"]
    slot = ["--resources", '{"slot": 1}']  # a custom resource on each node: the test puts a rank on each
    nodes = [_ray_start([*head_args, *slot, "--temp-dir", f"{tmp}/h"], env, tmp / "h.log")]
    seen: set[tuple[str, int, str]] = set()
    t0 = time.monotonic()
    try:
        _wait_port(PORT, nodes[0])  # the head's GCS answers: now a node can join
        worker = ["--address", address, *slot, "--temp-dir", f"{tmp}/w"]
        nodes.append(_ray_start(worker, env, tmp / "w.log", hide=spec["unshared"]))
        subprocess.run([sys.executable, "-c", _WAIT_NODES, address], env=env, check=True, timeout=120)
        startup = round(time.monotonic() - t0, 1)
        runs = [_run([a.replace("{address}", address) for a in c], env, seen) for c in spec["commands"]]
    except BaseException:
        for log in (tmp / "h.log", tmp / "w.log"):
            if log.exists():
                print(f"--- {log.name}\n{log.read_text()[-3000:]}", file=sys.stderr)
        raise
    finally:
        _end_all_but_me()
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"runs": runs, "listening": sorted(seen), "startup_seconds": startup}
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
    # the namespace ends with this process: whatever the cluster left behind is ended by the kernel
