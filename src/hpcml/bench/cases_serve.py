"""Bench case `serve`: hpcml serve against a hand-written FastAPI endpoint (one forward per request)
and LitServe with batching on (when installed), same model, same machine, same run.

Each contender is its own server process on 127.0.0.1; the load comes from `hpcml.bench.loadgen`
in another process, 1-row requests at concurrency 1, 8 and 64, contenders interleaved per repeat.
Goals (issue 13): >= 2x the naive endpoint's requests/s at concurrency 64 with p99 <= max-wait +
3 x one full batch's forward; at concurrency 1, p50 within 1.2x of the naive endpoint's.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from hpcml.bench.cases import Context, goal
from hpcml.bench.timers import interleave, ratio, summarize

FEATURES, HIDDEN, DEPTH = 64, 2048, 3  # 1-row forwards read ~50 MB of weights: batching pays
LEVELS = {"quick": {1: 100, 8: 200, 64: 400}, "full": {1: 300, 8: 600, 64: 1500}}  # concurrency: requests
MAX_BATCH, MAX_WAIT_MS = 64, 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, err: Path, timeout: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {err.read_text()[-500:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout:.0f} s: {err.read_text()[-500:]}")


@contextmanager
def _server(cmd: list[str], ready_path: str, scratch: Path, name: str, env: dict, port: int | None):
    """Start a server process; yields its base URL once `ready_path` answers 200."""
    err = scratch / f"{name}.err"
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f, env=env, start_new_session=True)
    try:
        if port is None:  # hpcml serve --port 0 prints the port it bound
            deadline = time.monotonic() + 60
            while not (m := re.search(r"on http://127\.0\.0\.1:(\d+)", err.read_text())):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start: {err.read_text()[-500:]}")
                time.sleep(0.05)
            port = int(m.group(1))
        url = f"http://127.0.0.1:{port}"
        _wait(url + ready_path, proc, err)
        yield url
    finally:
        _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's whole process group, then SIGKILL to whatever is left of it: LitServe's
    and uvicorn's own worker processes outlive a parent that exits on SIGTERM alone."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def _forward_ms(model_dir: Path, threads: int) -> float:
    """Median time of one full batch's forward (Model.predict on MAX_BATCH rows), in ms."""
    import numpy as np
    import torch

    from hpcml.models.io import load_model

    torch.set_num_threads(threads)
    model = load_model(model_dir)
    x = np.random.default_rng(0).normal(size=(MAX_BATCH, FEATURES)).astype(np.float32)
    times = []
    for i in range(25):
        t0 = time.perf_counter()
        model.predict(x)
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def _load(url: str, concurrency: int, requests: int, env: dict) -> dict:
    cmd = [sys.executable, "-m", "hpcml.bench.loadgen", url, "--concurrency", str(concurrency),
           "--requests", str(requests), "--features", str(FEATURES)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"load generator failed: {r.stderr[-500:]}")
    return json.loads(r.stdout)


def _servers(ctx: Context, model_dir: Path, env: dict, stack: ExitStack) -> tuple[dict, dict]:
    """{contender: predict URL} for those that started, {contender: why skipped} for the rest."""
    py, scratch = sys.executable, ctx.scratch
    urls: dict[str, str] = {}
    serve = [py, "-m", "hpcml.cli", "serve", str(model_dir), "--port", "0", "--max-batch", str(MAX_BATCH),
             "--max-wait-ms", str(MAX_WAIT_MS), "--audit-log", str(scratch / "audit.jsonl")]  # fmt: skip
    urls["hpcml serve"] = stack.enter_context(_server(serve, "/ready", scratch, "hpcml", env, None))
    urls["hpcml serve"] += "/v1/predict"
    port = _free_port()
    naive = [py, "-m", "hpcml.bench.serve_contenders", "naive", str(model_dir), str(port)]
    urls["naive FastAPI"] = stack.enter_context(_server(naive, "/health", scratch, "naive", env, port))
    urls["naive FastAPI"] += "/predict"
    skips = {}
    try:
        import litserve  # noqa: F401
    except ImportError:
        skips["LitServe (batching on)"] = "litserve not installed (pip install 'hpcml[compare]')"
    else:
        port = _free_port()
        lit = [py, "-m", "hpcml.bench.serve_contenders", "litserve", str(model_dir), str(port)]
        url = stack.enter_context(_server(lit, "/health", scratch, "litserve", env, port))
        urls["LitServe (batching on)"] = url + "/predict"
    return urls, skips


def serve_case(ctx: Context) -> dict[str, Any]:
    title = "HTTP serving, 1-row requests (requests/s); load from a separate process"
    cfg = {
        "data": {"name": "synthetic", "rows": 2000, "features": FEATURES, "classes": 10},
        "model": {"name": "mlp", "kwargs": {"hidden": HIDDEN, "depth": DEPTH}},
        "epochs": 1, "threads": ctx.threads, "device": "cpu", "precision": "fp32",
    }  # fmt: skip
    model_dir = ctx.scratch / "serve-model"
    if not model_dir.exists():
        from hpcml.models.io import save_model

        trained = ctx.train(cfg)
        save_model(model_dir, trained.model.module, trained.model.meta)
    forward_ms = _forward_ms(model_dir, ctx.threads)
    env = {**os.environ, "HPCML_SERVE_TOKEN": secrets.token_urlsafe(24)}
    load_start = os.getloadavg()[0]
    levels = LEVELS.get(ctx.suite.name, LEVELS["quick"])
    with ExitStack() as stack:
        urls, skips = _servers(ctx, model_dir, env, stack)
        runs: dict[str, list[dict]] = {}
        for conc, n in levels.items():
            contenders = {
                f"{name} c={conc}": (lambda rep, u=url, c=conc, k=n: _load(u, c, k if rep >= 0 else 50, env))
                for name, url in urls.items()
            }
            runs |= interleave(
                contenders, repeats=ctx.repeat,
                on_result=lambda name, rep, r: ctx.log(
                    f"  {name}: {r['requests_per_second']:,.0f} req/s, p50 {r['p50_ms']:.1f} ms, "
                    f"p99 {r['p99_ms']:.1f} ms, errors {r['errors']}"
                ),
            )  # fmt: skip
    return _result(title, {**cfg, "levels": levels}, runs, skips, forward_ms, load_start)


def _result(title, cfg, runs, skips, forward_ms, load_start) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, rs in runs.items():
        med = lambda key, rs=rs: summarize([r[key] for r in rs])["median"]  # noqa: E731
        out[name] = {
            "summary": summarize([r["requests_per_second"] for r in rs], higher_is_better=True),
            "rows_per_second": med("rows_per_second"), "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"),
            "errors": sum(r["errors"] for r in rs), "ids_once": all(r["ids_once"] for r in rs),
            "runs": rs,
        }  # fmt: skip
        out[name]["note"] = f"p50 {out[name]['p50_ms']:.1f} ms, p99 {out[name]['p99_ms']:.1f} ms"
    for name, why in skips.items():
        out[name] = {"skipped": why}

    def get(name: str, key: str) -> float | None:
        c = out.get(name, {})
        return c["summary"]["median"] if key == "rps" and "summary" in c else c.get(key)

    speedups = {}
    for conc in cfg["levels"]:
        for other in ("naive FastAPI", "LitServe (batching on)"):
            speedups[f"vs {other} c={conc}"] = ratio(
                get(f"hpcml serve c={conc}", "rps"), get(f"{other} c={conc}", "rps")
            )
        out[f"hpcml serve c={conc}"]["note"] += f"; {speedups[f'vs naive FastAPI c={conc}'] or 0:.2f}x naive"
        lit = speedups[f"vs LitServe (batching on) c={conc}"]
        if lit is not None:
            out[f"hpcml serve c={conc}"]["note"] += f", {lit:.2f}x LitServe"
    p99, bound = get("hpcml serve c=64", "p99_ms"), MAX_WAIT_MS + 3 * forward_ms
    p50_1 = ratio(get("naive FastAPI c=1", "p50_ms"), get("hpcml serve c=1", "p50_ms"))
    busy = f"load average {load_start:.1f} on {os.cpu_count()} cores; the load generator shares them"
    return {
        "name": "serve", "title": title, "status": "ok", "metric": "requests/s", "higher_is_better": True,
        "config": {**cfg, "max_batch": MAX_BATCH, "max_wait_ms": MAX_WAIT_MS},
        "contenders": out, "hpcml_vs": speedups, "forward_ms_full_batch": forward_ms,
        "p99_bound_ms": bound, "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0],
        "goals": [
            goal("requests/s at concurrency 64: >= 2x the naive endpoint", speedups["vs naive FastAPI c=64"],
                 2.0, limit=f"HTTP + JSON per request, not the forward, dominate 1-row requests; {busy}"),
            goal(f"p99 at concurrency 64 <= max-wait + 3 x full-batch forward ({bound:.1f} ms)",
                 ratio(bound, p99), 1.0, unit="x (bound/p99)",
                 limit=f"64 requests queue behind one event loop; {busy}"),
            goal("p50 at concurrency 1 within 1.2x of the naive endpoint (naive/hpcml >= 0.83)", p50_1,
                 1 / 1.2, limit=f"auth, limits, audit log and metrics on every request; {busy}"),
        ],
    }  # fmt: skip
