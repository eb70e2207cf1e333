"""An HTTP load generator for the serve bench, run in its own process so it does not share an
event loop (or a GIL) with the server it measures:

    python -m hpcml.bench.loadgen URL --concurrency 64 --requests 1000 --features 64 [--rows 1]

A bearer token, if any, comes from HPCML_SERVE_TOKEN. Every request carries a unique id; the JSON
on stdout gives requests/s, rows/s, p50/p99 latency, errors, and whether every id came back once.
"""

import argparse
import asyncio
import json
import os
import time

import numpy as np


async def _aiohttp_users(url, headers, x, queue, concurrency, record) -> None:
    import aiohttp

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(headers=headers, connector=conn) as session:

        async def user() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                t0 = time.perf_counter()
                async with session.post(url, json={"id": f"r{i}", "rows": x[i]}) as r:
                    body = await r.json() if r.status == 200 else None
                record(time.perf_counter() - t0, r.status, body)

        await asyncio.gather(*(user() for _ in range(concurrency)))


async def _httpx_users(url, headers, x, queue, concurrency, record) -> None:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, timeout=60, limits=limits) as client:

        async def user() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                t0 = time.perf_counter()
                r = await client.post(url, json={"id": f"r{i}", "rows": x[i]})
                record(time.perf_counter() - t0, r.status_code, r.json() if r.status_code == 200 else None)

        await asyncio.gather(*(user() for _ in range(concurrency)))


async def _run(url: str, *, concurrency: int, requests: int, features: int, rows: int) -> dict:
    """aiohttp when installed (a lighter client: the load generator shares the cores), else httpx."""
    try:
        import aiohttp  # noqa: F401

        users, client = _aiohttp_users, "aiohttp"
    except ImportError:
        users, client = _httpx_users, "httpx"
    token = os.environ.get("HPCML_SERVE_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    x = np.random.default_rng(0).normal(size=(requests, rows, features)).round(4).tolist()
    latencies: list[float] = []
    ids: list[str] = []
    errors = 0

    def record(seconds: float, status: int, body: dict | None) -> None:
        nonlocal errors
        latencies.append(seconds)
        if status == 200 and body is not None:
            ids.append(body["id"])
        else:
            errors += 1

    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    t0 = time.perf_counter()
    await users(url, headers, x, queue, concurrency, record)
    seconds = time.perf_counter() - t0
    lat = np.array(latencies) * 1e3
    return {
        "client": client, "concurrency": concurrency, "requests": requests, "rows_per_request": rows,
        "seconds": seconds, "requests_per_second": requests / seconds,
        "rows_per_second": requests * rows / seconds,
        "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
        "errors": errors, "ids_once": sorted(ids) == sorted(f"r{i}" for i in range(requests)),
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m hpcml.bench.loadgen")
    p.add_argument("url")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--features", type=int, required=True)
    p.add_argument("--rows", type=int, default=1)
    a = p.parse_args()
    out = asyncio.run(
        _run(a.url, concurrency=a.concurrency, requests=a.requests, features=a.features, rows=a.rows)
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
