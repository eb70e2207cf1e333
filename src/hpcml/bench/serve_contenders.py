"""The serve bench's other contenders, each run as its own server process on 127.0.0.1:

    python -m hpcml.bench.serve_contenders naive MODEL_DIR PORT     # one forward per request
    python -m hpcml.bench.serve_contenders litserve MODEL_DIR PORT  # LitServe, batching on

Both load the model with `load_model` and predict with `Model.predict` (the same forward as hpcml
serve), take `{"rows": [[...], ...], "id": ...}` and answer `{"id": ..., "predictions": [...]}`.
The naive one is what users hand-write: a sync FastAPI endpoint, no batching, no auth, no limits.
"""

import sys

import numpy as np

MAX_BATCH, MAX_WAIT_S = 64, 0.005


def naive(model_dir: str, port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    from hpcml.models.io import load_model

    model = load_model(model_dir)
    names = [str(c) for c in model.classes]
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"ok": True}

    @app.post("/predict")
    def predict(body: dict) -> dict:
        out = model.predict(np.asarray(body["rows"], np.float32))
        return {"id": body.get("id"), "predictions": [names[k] for k in out.tolist()]}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _lit_api() -> type:
    """LitServe pickles the API into its worker process: a class at module level, made on demand."""
    import litserve as ls

    from hpcml.models.io import load_model

    class LitModelApi(ls.LitAPI):
        def setup(self, device):
            self.model = load_model(self.model_dir)
            self.names = [str(c) for c in self.model.classes]

        def decode_request(self, request):
            return request.get("id"), np.asarray(request["rows"], np.float32)

        def batch(self, inputs):
            return inputs

        def predict(self, batch):
            out = self.model.predict(np.concatenate([x for _, x in batch]))
            bounds = np.cumsum([0] + [len(x) for _, x in batch])
            return [(i, out[a:b]) for (i, _), a, b in zip(batch, bounds[:-1], bounds[1:], strict=True)]

        def unbatch(self, output):
            return output

        def encode_response(self, output):
            rid, out = output
            return {"id": rid, "predictions": [self.names[k] for k in out.tolist()]}

    LitModelApi.__qualname__ = "LitModelApi"
    return LitModelApi


try:
    LitModelApi = _lit_api()
except ImportError:  # the `compare` extra is not installed: the bench skips LitServe
    LitModelApi = None


def litserve(model_dir: str, port: int) -> None:
    import litserve as ls

    api = LitModelApi(max_batch_size=MAX_BATCH, batch_timeout=MAX_WAIT_S)
    api.model_dir = model_dir
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    kind, model_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"naive": naive, "litserve": litserve}[kind](model_dir, port)
