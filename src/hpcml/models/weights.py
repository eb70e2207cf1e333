"""Reading an untrusted model dir without letting it size our allocations.

Files are read only when they are regular files (never a device, FIFO or directory, even through a
symlink) and only up to a limit known beforehand. The architecture in model.json is built on the
`meta` device (shapes, no memory), its parameter count bounded, and the weights' safetensors header
(8-byte little-endian length, JSON: dtype, shape, data_offsets per tensor) is compared with it tensor
by tensor before the real module is allocated. A plugin or `module:function` model that cannot be
built on `meta` is compared after its CPU build instead, its weights file first bounded by the size
its own header declares (and the same caps).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

import torch

from hpcml.errors import HpcmlError, UsageError
from hpcml.models.int8 import swap_int8
from hpcml.models.registry import MODEL_NAMES, ModelBuildError, create_model
from hpcml.models.schema import ModelMeta

MAX_PARAMETERS = 1 << 32  # 16 GiB of float32: far above any model hpcml trains, far below "all memory"
MAX_HEADER_BYTES = 16 << 20  # tensor names and shapes of ~60,000 tensors; only when not built on meta
ENCRYPTION_OVERHEAD = 64  # magic + nonce + tag of crypto.encrypt_bytes (36 bytes), rounded up

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
)


def _refuse_irregular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((word for test, word in _KINDS if test(mode)), "not a plain file")
    via = " (through a symlink)" if path.is_symlink() else ""
    raise HpcmlError(f"{path}: not a regular file: {kind}{via}; refusing to read it")


def _open_regular(path: Path):
    """An open binary file of `path` if it is a regular file (a symlink to one is followed)."""
    try:
        _refuse_irregular(path, os.stat(path).st_mode)
        # O_NONBLOCK: a FIFO swapped in after the stat cannot block the open; fstat then refuses it
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise HpcmlError(f"{path.parent}: incomplete model dir, {path.name} is missing") from None
    except PermissionError as err:
        raise HpcmlError(f"{path}: cannot read it ({err.strerror})") from None
    f = os.fdopen(fd, "rb")
    try:
        _refuse_irregular(path, os.fstat(f.fileno()).st_mode)
    except BaseException:
        f.close()
        raise
    return f


def read_regular(path: Path, *, limit: int, why: str) -> bytes:
    """The bytes of `path` if it is a regular file of at most `limit` bytes (`why` explains the
    limit in the error). A symlink to a regular file is followed; to anything else, refused."""
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise HpcmlError(f"{path}: {size:,} bytes, more than {limit:,} ({why})")
        data = f.read(limit + 1)
    if len(data) > limit:  # it grew after the fstat
        raise HpcmlError(f"{path}: more than {limit:,} bytes ({why})")
    return data


def expected_state(
    meta: ModelMeta, where: Path, *, trust_code: bool = False
) -> dict[str, torch.Tensor] | None:
    """The architecture's state_dict as meta tensors (shapes and dtypes, no storage), built from
    model.json; its parameter count bounded. None when a plugin or spec model cannot be built on
    the meta device: the caller then bounds the weights by their own header (`declared_limit`) and
    compares them with the model after building it on the CPU."""
    try:
        with torch.device("meta"):
            module = create_model(
                meta.architecture,
                input_shape=tuple(meta.input_shape),
                num_outputs=meta.num_outputs,
                trust_code=trust_code,
                **meta.kwargs,
            )
            apply_compression(module, meta, where)
    except ModelBuildError:  # the user's factory needs real tensors (e.g. it computes with them)
        return None
    except UsageError as err:
        if meta.architecture in MODEL_NAMES:
            raise HpcmlError(f"{where}: kwargs: {err}") from None
        raise UsageError(f"{where}: {err}") from None
    return bounded_state(module, meta, where)


def apply_compression(module: torch.nn.Module, meta: ModelMeta, where: Path) -> torch.nn.Module:
    """The compressed form model.json records, applied to the freshly built architecture: a pruned
    user chain's layer widths (built-ins record theirs as kwargs), then the int8 layers (whose header
    entries are int8 weights + float32 scales)."""
    if meta.pruned_widths:
        from hpcml.models.chain import resize

        resize(module, meta.pruned_widths, where=where)
    if meta.quantization is not None:
        swap_int8(module, meta.quantization.layers, where=where)
    return module


def bounded_state(module: torch.nn.Module, meta: ModelMeta, where: Path) -> dict[str, torch.Tensor]:
    """module.state_dict(), refused if it has more than MAX_PARAMETERS values."""
    state = dict(module.state_dict())
    total = sum(t.numel() for t in state.values())
    if total > MAX_PARAMETERS:
        raise HpcmlError(
            f"{where}: {meta.architecture} with kwargs {meta.kwargs} and input_shape {meta.input_shape} "
            f"has {total:,} parameters, more than the {MAX_PARAMETERS:,} hpcml loads"
        )
    return state


def declared_limit(path: Path, *, encrypted: bool) -> int:
    """The most bytes to read of a weights file whose architecture could not be built on `meta`:
    what its own header declares (header at most MAX_HEADER_BYTES, data at most MAX_PARAMETERS
    values). An encrypted file's header is only readable after decryption, and its sha256 is
    authenticated by the key: it is bounded by the caps alone."""
    if encrypted:
        return 8 + MAX_HEADER_BYTES + 8 * MAX_PARAMETERS + ENCRYPTION_OVERHEAD
    with _open_regular(path) as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES:
            raise HpcmlError(
                f"{path}: the safetensors header claims {n:,} bytes, more than {MAX_HEADER_BYTES:,}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise HpcmlError(f"{path}: unreadable safetensors header ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise HpcmlError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    values = end = 0
    for name, info in header.items():
        info = info if isinstance(info, dict) else {}
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (_ints(shape) and _ints(offsets) and len(offsets) == 2):
            raise HpcmlError(f"{path}: tensor {name!r}: malformed header entry")
        values, end = values + math.prod(shape), max(end, offsets[1])
    if values > MAX_PARAMETERS or end > 8 * MAX_PARAMETERS:
        raise HpcmlError(
            f"{path}: the header declares {values:,} values, more than the {MAX_PARAMETERS:,} hpcml loads"
        )
    return 8 + n + end


def weights_limit(state: dict[str, torch.Tensor], *, encrypted: bool) -> int:
    """The most bytes a weights file for `state` can have: data + a header for its tensor names."""
    data = sum(t.numel() * t.element_size() for t in state.values())
    return data + 8 + _header_limit(state) + (ENCRYPTION_OVERHEAD if encrypted else 0)


def _header_limit(state: dict[str, torch.Tensor]) -> int:
    return 64 * 1024 + sum(256 + len(name) for name in state)


def check_header(blob: bytes, state: dict[str, torch.Tensor], where: Path) -> None:
    """Raise HpcmlError naming the first tensor whose name, dtype, shape or byte range in the
    safetensors `blob` differs from `state`, or a header that does not account for every byte."""
    if len(blob) < 8:
        raise HpcmlError(f"{where}: {len(blob)} bytes, too short for a safetensors file")
    n = int.from_bytes(blob[:8], "little")
    if n > _header_limit(state) or 8 + n > len(blob):
        raise HpcmlError(
            f"{where}: the safetensors header claims {n:,} bytes; the file has {len(blob):,} and the "
            f"model needs at most {_header_limit(state):,}"
        )
    try:
        header = json.loads(blob[8 : 8 + n])
    except (ValueError, RecursionError) as err:
        raise HpcmlError(f"{where}: unreadable safetensors header ({type(err).__name__})") from None
    if not isinstance(header, dict):
        raise HpcmlError(f"{where}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    extra = sorted(set(header) - set(state))
    if extra:
        raise HpcmlError(f"{where}: tensor {extra[0]!r} is not part of the architecture in model.json")
    spans = [_check_tensor(header.get(name), name, t, where) for name, t in state.items()]
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise HpcmlError(f"{where}: tensor data overlaps or leaves a gap at byte {begin:,}")
        end = stop
    if end != len(blob) - 8 - n:
        raise HpcmlError(
            f"{where}: the header accounts for {end:,} bytes of tensor data; the file holds "
            f"{len(blob) - 8 - n:,}"
        )


def _check_tensor(info: Any, name: str, want: torch.Tensor, where: Path) -> tuple[int, int]:
    """(begin, end) of tensor `name`'s data, after checking its entry against `want`."""
    if info is None:
        raise HpcmlError(f"{where}: tensor {name!r}, which the architecture in model.json has, is missing")
    info = info if isinstance(info, dict) else {}
    shape, dtype, offsets = info.get("shape"), info.get("dtype"), info.get("data_offsets")
    if not (_ints(shape) and _ints(offsets) and len(offsets) == 2 and isinstance(dtype, str)):
        raise HpcmlError(f"{where}: tensor {name!r}: malformed header entry")
    if shape != list(want.shape):
        raise HpcmlError(
            f"{where}: tensor {name!r} has shape {shape}, but the architecture in model.json "
            f"(kwargs, input_shape, num_outputs) gives {list(want.shape)}"
        )
    if dtype != _DTYPES.get(want.dtype):
        need = _DTYPES.get(want.dtype)
        raise HpcmlError(f"{where}: tensor {name!r} is {dtype}; the architecture in model.json needs {need}")
    begin, end = offsets
    if end - begin != math.prod(shape) * want.element_size():
        raise HpcmlError(f"{where}: tensor {name!r}: data_offsets {offsets} do not match its shape {shape}")
    return begin, end


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
