"""Inference: column matching shared by every predict path, and the HTTP prediction service.

`hpcml serve` (inference/server.py) runs `inference/service.py`'s FastAPI app under uvicorn; every
prediction goes through `Model.predict` / `Model.predict_proba`, the one forward path. FastAPI and
uvicorn are the optional extra `hpcml[serve]`, imported only by the service modules.
"""
