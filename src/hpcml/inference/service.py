"""The prediction service: a FastAPI app around one model dir.

    POST /v1/predict   rows by feature name or as arrays (+ probabilities) -> predictions  [token]
    GET  /v1/model     architecture, task, features, classes, sha256                       [token]
    GET  /metrics      Prometheus text: requests, latency, batch rows, queue depth         [token]
    GET  /health       the process is alive
    GET  /ready        503 until the model is loaded and warmed up (and again while stopping)
    GET  /docs, /openapi.json

The model loads in a thread after the server starts listening, so /health answers at once and /ready
tells a load balancer when to send traffic. Auth is a router dependency; body size and the audit log
are middleware (inference/security.py). Predictions come from `Model.predict`/`predict_proba` through
the batcher, in the units and order `hpcml predict` writes them.
"""

import asyncio
import hmac
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from hpcml.config import ServeConfig
from hpcml.errors import HpcmlError
from hpcml.inference.batcher import Batcher
from hpcml.inference.metrics import Metrics
from hpcml.inference.security import AuditLog, BodyLimit, ResponseStatus, token_id

__all__ = ["create_app", "PredictRequest", "PredictResponse"]

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: list[dict[str, FiniteFloat]] | list[list[FiniteFloat]] = Field(
        ..., min_length=1, description="rows by feature name, or as arrays of the model's inputs"
    )
    probabilities: bool = Field(False, description="also return class probabilities (classification)")
    id: str | None = Field(None, max_length=200, description="echoed back, for the caller's bookkeeping")


class PredictResponse(BaseModel):
    id: str | None
    predictions: list[str] | list[float] = Field(description="class names, or values in the target's units")
    probabilities: list[list[float]] | None = Field(None, description="per row, in the order of `classes`")
    classes: list[str] | None = None


class ModelInfo(BaseModel):
    architecture: str
    task: str
    input_shape: list[int]
    features: list[str] | None
    target: str | None
    classes: list[str] | None
    weights_sha256: str


class Service:
    """What the endpoints share in one worker: the model, its batcher, the metrics, readiness."""

    def __init__(self, cfg: ServeConfig, *, on_fatal: Callable[[str], None]) -> None:
        self.cfg, self.on_fatal = cfg, on_fatal
        self.model: Any = None
        self.batcher: Batcher | None = None
        self.stopping = False
        self.metrics = Metrics(max_batch=cfg.max_batch, queue_depth=self._depth)

    def _depth(self) -> int:
        return 0 if self.batcher is None else self.batcher.queue.qsize() + max(0, self.batcher.arriving)

    @property
    def ready(self) -> bool:
        return self.batcher is not None and not self.stopping

    def _load(self) -> Any:
        """Load, set this worker's threads, and warm up at the largest batch and at one row."""
        import torch

        from hpcml.models.io import load_model

        threads = self.cfg.threads or 1
        torch.set_num_threads(threads)
        if self.cfg.runtime == "onnx":  # the same model dir, exported in memory, run by onnxruntime
            from hpcml.inference.onnx_runtime import load_onnx

            model = load_onnx(self.cfg.model_dir, threads=threads, trust_code=self.cfg.trust_code)
        else:
            model = load_model(self.cfg.model_dir, trust_code=self.cfg.trust_code)
        for rows in (self.cfg.max_batch, 1, 1):
            model.predict(np.zeros((rows, *model.input_shape), np.float32))
        return model

    async def start(self) -> None:
        try:
            self.model = await asyncio.get_running_loop().run_in_executor(None, self._load)
        except Exception as err:  # the server stops and the CLI prints this line
            message = str(err) if isinstance(err, HpcmlError) else f"{type(err).__name__}: {err}"
            self.on_fatal(message)
            return
        batcher = Batcher(
            self.model,
            max_batch=self.cfg.max_batch,
            max_wait_ms=self.cfg.max_wait_ms,
            on_batch=self.metrics.batch_rows.observe,
        )
        batcher.start()
        self.batcher = batcher


def _auth(token: str) -> Callable:
    bearer = HTTPBearer(auto_error=False, description="HPCML_SERVE_TOKEN(_FILE) of the server")
    expected = token.encode()

    def require_token(
        request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> None:
        given = creds.credentials.encode() if creds is not None else b""
        if creds is None or not hmac.compare_digest(given, expected):
            raise HTTPException(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        request.state.token_id = token_id(creds.credentials)

    return require_token


def _matrix(rows: list, model: Any) -> np.ndarray:
    """Rows by name are matched to the model's columns as `hpcml predict` matches a file's."""
    from hpcml.errors import UsageError

    if isinstance(rows[0], dict):
        import pyarrow as pa

        from hpcml.inference.columns import choose_columns, schema_columns, table_matrix

        table = pa.Table.from_pylist(rows)
        feats = choose_columns(schema_columns(table.schema), model, "rows")
        return table_matrix(table, feats, "rows")
    need = int(np.prod(model.input_shape))
    for i, row in enumerate(rows):
        if len(row) != need:
            shape = list(model.input_shape)
            raise UsageError(f"rows.{i}: {len(row)} values, the model takes {need} (input shape {shape})")
    return np.asarray(rows, np.float32)


def _router(service: Service, token: str) -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(_auth(token))])

    @router.post("/predict", response_model=PredictResponse, responses={413: {}, 503: {}})
    async def predict(req: PredictRequest, request: Request) -> PredictResponse:
        from hpcml.errors import UsageError

        request.state.rows = len(req.rows)
        if service.batcher is None or service.stopping:
            raise HTTPException(503, "model not ready")
        model, cfg = service.model, service.cfg
        if len(req.rows) > cfg.max_rows:
            raise HTTPException(413, f"{len(req.rows)} rows, at most {cfg.max_rows} per request")
        regression = model.task == "regression"
        if req.probabilities and regression:
            raise HTTPException(422, "probabilities: a regression model predicts values, not classes")
        try:
            x = _matrix(req.rows, model)
        except UsageError as err:
            raise HTTPException(422, str(err)) from None
        if getattr(request.state, "arrival", False):  # counted by _Arrivals: no longer on its way
            request.state.arrival = False
            service.batcher.arriving -= 1
        out = await service.batcher.submit(x, probabilities=req.probabilities)
        if regression:
            return PredictResponse(id=req.id, predictions=out.tolist())
        index = out.argmax(1) if req.probabilities else out
        names = [str(c) for c in model.classes]
        return PredictResponse(
            id=req.id,
            predictions=[names[k] for k in index.tolist()],
            probabilities=out.tolist() if req.probabilities else None,
            classes=names,
        )

    @router.get("/model", response_model=ModelInfo, responses={503: {}})
    async def model_info() -> ModelInfo:
        if service.model is None:
            raise HTTPException(503, "model not ready")
        meta = service.model.meta
        return ModelInfo(
            architecture=str(meta["architecture"]), task=service.model.task,
            input_shape=list(service.model.input_shape), features=meta.get("features"),
            target=meta.get("target"), classes=None if service.model.task == "regression" else
            [str(c) for c in service.model.classes], weights_sha256=meta["weights_sha256"],
        )  # fmt: skip

    return router


class _Arrivals:
    """Counts predict requests from their first byte until the endpoint queues their rows, so the
    batcher knows whether more rows are on their way; and times every request for the metrics."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        counted = scope["path"] == "/v1/predict" and self.service.batcher is not None
        batcher = self.service.batcher
        if counted:
            batcher.arriving += 1
            scope.setdefault("state", {})["arrival"] = True
        watch = ResponseStatus(send)
        try:
            await self.app(scope, receive, watch)
        finally:
            if counted and scope["state"].get("arrival"):
                batcher.arriving -= 1
            self.service.metrics.request(scope["path"], watch.code, watch.seconds)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field, without echoing the input (it may be NaN, which JSON cannot carry,
    and it is the caller's payload)."""
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


def create_app(cfg: ServeConfig, token: str, *, on_fatal: Callable[[str], None]) -> FastAPI:
    """The app for one worker. `on_fatal(message)` is called if the model cannot be loaded."""
    service = Service(cfg, on_fatal=on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.get_running_loop().create_task(service.start())
        yield
        service.stopping = True
        loading.cancel()
        if service.batcher is not None:
            await service.batcher.stop()

    app = FastAPI(title="hpcml serve", version="1", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.state.service = service
    app.include_router(_router(service, token))
    require_token = _auth(token)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "alive"}

    @app.get("/ready", responses={503: {}})
    async def ready() -> JSONResponse:
        ok = service.ready
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=[Depends(require_token)], response_class=Response)
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(_Arrivals, service=service)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    app.add_middleware(AuditLog, path=cfg.audit_log)  # outermost: it sees every answer, 413s too
    return app
