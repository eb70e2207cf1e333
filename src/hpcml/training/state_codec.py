"""State without pickle: state dicts split into JSON + named tensors, and the global RNGs as JSON.

torch's own `state_dict()` objects (optimizers, LR schedules, grad scalers) are nested dicts, lists
and tuples of numbers, strings and tensors; `torch.save` pickles them. `encode_state` instead turns
one into plain JSON in which every tensor is replaced by `{"__tensor__": "<dotted path>"}` and
collected under that path (e.g. `state.0.exp_avg`) for a safetensors file. `decode_state` inverts it
exactly: tuples, int dict keys and non-finite floats are tagged so they come back as they were, and
floats are written with repr(), which round-trips every value bit for bit.
"""

from __future__ import annotations

import base64
import random
import warnings
from typing import Any

import numpy as np
import torch

from hpcml.errors import UsageError

__all__ = ["capture_rng", "decode_state", "encode_state", "restore_rng", "unshare_tensors"]


def encode_state(obj: Any, tensors: dict[str, torch.Tensor] | None, *, path: str = "") -> Any:
    """A JSON-safe copy of `obj`. Tensors (moved to the CPU) go into `tensors`; None refuses them."""
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise UsageError(f"{path}: a tensor is not allowed here; store JSON values only")
        # note: a host-device sync for CUDA tensors; saving state is a deliberate sync point
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):  # inf and nan are not valid JSON
        return obj if np.isfinite(obj) else {"__float__": repr(obj)}

    def sub(k: object) -> str:
        return f"{path}.{k}" if path else str(k)

    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v, tensors, path=sub(i)) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_state(v, tensors, path=sub(i)) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if obj and all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {"__int_keys__": {str(k): encode_state(v, tensors, path=sub(k)) for k, v in obj.items()}}
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_state(v, tensors, path=sub(k)) for k, v in obj.items()}
    raise UsageError(f"{path or 'value'}: cannot store a {type(obj).__name__} without pickle")


def decode_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Invert `encode_state`. Tensors are copies: torch's load_state_dict may alias what it is given."""
    if isinstance(obj, list):
        return [decode_state(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]].clone()
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(decode_state(v, tensors) for v in obj["__tuple__"])
    if "__int_keys__" in obj:
        return {int(k): decode_state(v, tensors) for k, v in obj["__int_keys__"].items()}
    return {k: decode_state(v, tensors) for k, v in obj.items()}


def unshare_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights); give each its own copy."""
    seen: set[tuple[str, int]] = set()
    out = {}
    for k, t in tensors.items():
        ptr = (str(t.device), t.untyped_storage().data_ptr())
        out[k] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    return out


def _pack(values, dtype) -> str:
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode("ascii")


def _unpack(text: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


def capture_rng() -> dict[str, Any]:
    """The global RNG states of python `random`, numpy, torch CPU and every visible CUDA device.

    Plain JSON (state arrays as base64), so it fits in state.json; feed it to `restore_rng`.
    """
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "python": {"version": version, "state_u32": _pack(words, np.uint32), "gauss": gauss},
        "numpy": {
            "bit_generator": name,
            "keys_u32": _pack(keys, np.uint32),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": _pack(torch.get_rng_state().numpy(), np.uint8),
        "cuda": [_pack(s.numpy(), np.uint8) for s in cuda],
    }


def restore_rng(rng: dict[str, Any]) -> None:
    """Set the global RNGs back to a `capture_rng()` result, so the next random draws repeat."""
    py, npr = rng["python"], rng["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in _unpack(py["state_u32"], np.uint32)), py["gauss"]))
    np.random.set_state(
        (
            npr["bit_generator"],
            _unpack(npr["keys_u32"], np.uint32).copy(),
            npr["pos"],
            npr["has_gauss"],
            npr["cached_gaussian"],
        )
    )
    torch.set_rng_state(torch.from_numpy(_unpack(rng["torch"], np.uint8).copy()))
    cuda = rng.get("cuda") or []
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cuda and len(cuda) == visible:
        torch.cuda.set_rng_state_all([torch.from_numpy(_unpack(s, np.uint8).copy()) for s in cuda])
    elif cuda:
        warnings.warn(
            f"saved RNG states of {len(cuda)} CUDA devices but {visible} are visible; CUDA "
            "random draws will differ from the original run",
            stacklevel=2,
        )
