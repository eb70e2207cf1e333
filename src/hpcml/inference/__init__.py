"""After training: column matching shared by every predict path, compress (prune, int8), export (ONNX)
and the HTTP prediction service.

Every prediction goes through `Model.predict` / `Model.predict_proba`, the one forward path.
`hpcml serve` (inference/server.py) runs `inference/service.py`'s FastAPI app under uvicorn; FastAPI
and uvicorn are the optional extra `hpcml[serve]`, imported only by the service modules.
"""
