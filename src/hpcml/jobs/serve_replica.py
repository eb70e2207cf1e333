"""One Ray Serve replica of `hpcml serve`: the service's own FastAPI app (inference/service.py).

Imported only by jobs/serve_ray.py (it imports `ray.serve` at the top). The app is built in the
replica (`__serve_build_asgi_app__`), not pickled in the driver, so each replica has its own model,
batcher and metrics, exactly as one `--workers` process has. The app's lifespan is wrapped so that Ray
Serve routes to a replica only once its model is loaded and warmed up, and a model that cannot load
fails its health check with the service's own message (Serve's initial health check runs right
after the constructor, so the deployment fails with that message) instead of answering 503 forever.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import Any

from ray import serve

from hpcml.config import ServeConfig
from hpcml.errors import HpcmlError

__all__ = ["ServeReplica"]


@serve.ingress()
class ServeReplica:
    def __init__(self, cfg_json: str, token: str) -> None:
        self._cfg = ServeConfig.model_validate_json(cfg_json)
        self._token = token
        self._fatal: list[str] = []

    def __serve_build_asgi_app__(self) -> Any:
        from hpcml.inference.service import create_app

        app = create_app(self._cfg, self._token, on_fatal=self._fatal.append)
        service, fatal = app.state.service, self._fatal
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def loaded_first(a: Any):
            async with inner(a) as state:
                while not service.ready and not fatal:  # a failure is raised by the health check,
                    await asyncio.sleep(0.02)  # which Serve runs next and reports with its message
                yield state

        app.router.lifespan_context = loaded_first
        return app

    def check_health(self) -> None:
        if self._fatal:
            raise HpcmlError(f"cannot serve {self._cfg.model_dir}: {self._fatal[0]}")
