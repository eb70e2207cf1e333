"""The one forward path for batch predict, in any process: load a model dir for a runtime, predict
rows with Model.predict / predict_proba, cut rows into chunks that give the same bits, set threads.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import numpy as np

__all__ = ["SAME_KERNEL_ROWS", "chunk_stop", "forward", "load_runtime", "torch_threads"]

# BLAS picks its kernel by the number of rows, and a row's result can differ in the last bits between
# kernels (measured here, MLP 32-512-512-10: chunks of < 16 rows). So a chunk is never smaller than
# this unless it is a whole batch of Model.predict(x, batch_size), and never straddles one of those
# batches: every row then goes through the same kind of kernel as in one process, and comes out equal.
SAME_KERNEL_ROWS = 256


def load_runtime(model_dir: Any, *, runtime: str, trust_code: bool, threads: int) -> Any:
    """A Model (torch) or an OnnxModel (onnxruntime session with `threads` threads)."""
    if runtime == "onnx":
        from hpcml.inference.onnx_runtime import load_onnx

        return load_onnx(model_dir, threads=threads, trust_code=trust_code)
    from hpcml.models.io import load_model

    return load_model(model_dir, trust_code=trust_code)


def chunk_stop(start: int, rows: int, n: int, batch_size: int) -> int:
    """The end of a chunk of about `rows` rows from `start` (a batch start, or a previous chunk's
    end), keeping to SAME_KERNEL_ROWS. From a batch start, a chunk of `rows` >= batch_size is whole
    batches (Model.predict cuts it where it would cut x[:n]); otherwise it stays within the batch of
    Model.predict(x[:n], batch_size) that holds `start`, with no smaller piece of that batch left
    before or after it."""
    if start % batch_size == 0 and rows >= batch_size:
        return min(n, start + rows // batch_size * batch_size)
    end = min((start // batch_size + 1) * batch_size, n)
    stop = min(start + max(rows, SAME_KERNEL_ROWS), end)
    return end if end - stop < SAME_KERNEL_ROWS else stop


def forward(model: Any, x: np.ndarray, *, batch_size: int, probabilities: bool) -> np.ndarray:
    """Model.predict / predict_proba: the one forward path (preprocessing, target scale), so every
    process and chunking gives the rows that Model.predict gives."""
    if probabilities:
        return model.predict_proba(x, batch_size=batch_size)
    return model.predict(x, batch_size=batch_size)


@contextmanager
def torch_threads(threads: int):
    """This process's torch threads set to `threads` for a while, then put back."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
