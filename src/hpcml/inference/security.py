"""The service's guards: the bearer token, the body-size limit and the audit log.

The token comes from HPCML_SERVE_TOKEN_FILE (a file only its owner can read) or HPCML_SERVE_TOKEN,
never from a flag; it is compared in constant time (`hmac.compare_digest`). Logs name a token only
by its id, the first 12 hex digits of its sha256. The body limit and the audit log are plain ASGI
middleware: the limit counts the bytes as they arrive, so a body without Content-Length is capped too.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import stat
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hpcml.errors import UsageError

__all__ = ["load_token", "token_id", "BodyLimit", "AuditLog"]

MIN_TOKEN_CHARS = 16
DEFAULT_TOKEN_FILE = Path("~/.hpcml/serve-token")


def token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def load_token(environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(token, where it came from). Neither variable set: the token in ~/.hpcml/serve-token, made
    once (0600) with `secrets.token_urlsafe`, so `hpcml serve DIR` alone is never open."""
    env = os.environ if environ is None else environ
    path, value = env.get("HPCML_SERVE_TOKEN_FILE"), env.get("HPCML_SERVE_TOKEN")
    if path and value:
        raise UsageError("both HPCML_SERVE_TOKEN_FILE and HPCML_SERVE_TOKEN are set; set only one")
    if value:
        return _checked(value.strip(), "HPCML_SERVE_TOKEN"), "HPCML_SERVE_TOKEN"
    p = Path(path) if path else DEFAULT_TOKEN_FILE.expanduser()
    if not path and not p.exists():
        p.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    try:
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o077:
            raise UsageError(
                f"token file {p}: mode {mode:04o} lets other users read the token; run `chmod 600 {p}`"
            )
        text = p.read_text().strip()
    except OSError as err:
        raise UsageError(f"token file {p}: cannot read ({os.strerror(err.errno or 0)})") from None
    return _checked(text, f"token file {p}"), str(p)


def _checked(token: str, source: str) -> str:
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise UsageError(
            f"{source}: a token needs >= {MIN_TOKEN_CHARS} characters and no spaces (make one with: "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


async def _reply(send: Any, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a request body over `limit` bytes, by its Content-Length or by counting what arrives."""

    def __init__(self, app: Any, *, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = f"request body over {self.limit} bytes"
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _reply(send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                return await _reply(send, 413, too_big)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body, done = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ResponseStatus:
    """Wraps an ASGI `send`: records the response's status (500 until one is sent, so a request that
    raised counts as one) and the time since the request started. Shared by the middlewares."""

    def __init__(self, send: Any) -> None:
        self.send, self.code, self.t0 = send, 500, time.perf_counter()

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.code = message["status"]
        await self.send(message)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0


class AuditLog:
    """One JSON line per request: time, client, method, path, token id, rows, status, latency.
    Never the body, the predictions or the token. Endpoints put `token_id` and `rows` in the scope's
    state."""

    def __init__(self, app: Any, *, path: str | None) -> None:
        self.app = app
        self.file = open(path, "a", buffering=1) if path else sys.stderr  # noqa: SIM115 (process-long)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        watch = ResponseStatus(send)
        try:
            await self.app(scope, receive, watch)
        finally:
            client = scope.get("client") or ("-", 0)
            entry = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "client": f"{client[0]}:{client[1]}",
                "method": scope.get("method"),
                "path": scope.get("path"),
                "token_id": state.get("token_id"),
                "rows": state.get("rows"),
                "status": watch.code,
                "latency_ms": round(watch.seconds * 1e3, 3),
            }
            self.file.write(json.dumps(entry) + "\n")
