"""The model dir: `model.safetensors` + `model.json`. No pickle; code named in model.json (a
`module:function` architecture) is imported only with `trust_code=True`.

model.json holds the architecture name and kwargs, input shape, classes, preprocessing stats and the
sha256 of the weights file, which is checked on every load. A model dir is untrusted input: load_model
reads only regular files of bounded size, validates model.json as a schema (models/schema.py) and
compares the weights' header with the architecture built on the meta device (models/weights.py)
before it allocates the module.

Encrypted model dirs (`key=`, or HPCML_KEY_FILE / HPCML_KEY at train time): model.safetensors is an
AES-256-GCM blob (associated data `model/model.safetensors`), and model.json keeps only the format,
the cipher, the key fingerprint, the weights' sha256 and the metadata as another AES-GCM blob, with an
HMAC over it all: a wrong key, a modified model.json and modified weights are each a clear error.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcml._files import atomic_dir
from hpcml.data.preprocess import Normalizer
from hpcml.errors import HpcmlError, UsageError
from hpcml.models.registry import check_trust, create_model
from hpcml.models.schema import FORMAT, MAX_META_BYTES, ModelMeta, validate_meta, validate_sealed
from hpcml.models.weights import (
    apply_compression,
    bounded_state,
    check_header,
    declared_limit,
    expected_state,
    read_regular,
    weights_limit,
)

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin")

# Rows per forward pass when a caller gives no batch size: on a CPU, as many rows as keep the widest
# activation within PREDICT_CACHE_BYTES (about one core's L2 cache), between 64 and 65,536 rows; on a
# GPU 65,536. Measured on a 2-core Xeon (2 MiB L2 per core), MLP 32-512-512-10, 1M rows, 2 threads:
# 475k rows/s at 512-2,048 rows per forward against 246k rows/s at 65,536 (activations of 128 MB
# that stream through memory at every layer).
PREDICT_CACHE_BYTES = 2 << 20
PREDICT_ROWS_RANGE = (64, 65536)


def check_batch_size(batch_size: Any) -> None:
    """A predict batch size: a whole number >= 1, or None (the model's `predict_rows`)."""
    if batch_size is None or (
        isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1
    ):
        return
    raise UsageError(
        f"batch_size must be a whole number >= 1 (or None: the model's default), got {batch_size!r}"
    )


class Model:
    """A trained model ready to predict: the module, its preprocessing, and its metadata."""

    def __init__(self, module: nn.Module, meta: dict[str, Any]):
        self.module = module.eval()
        self.meta = meta
        self.normalizer = Normalizer.from_json(meta["preprocessing"])
        self.classes: list[str] = list(meta["classes"])
        self.input_shape: tuple[int, ...] = tuple(meta["input_shape"])

    def __repr__(self) -> str:
        return (
            f"Model({self.meta['architecture']}, input_shape={self.input_shape}, classes={len(self.classes)})"
        )

    def _prepare(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.normalizer(self._rows(x))

    def _rows(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """x as float32 rows of the input shape (raw features: not normalized yet)."""
        x = x.cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if x.shape[1:] != self.input_shape:
            flat = int(np.prod(self.input_shape))
            if x.ndim >= 2 and int(np.prod(x.shape[1:])) == flat:
                x = x.reshape(len(x), *self.input_shape)
            else:
                raise UsageError(
                    f"input has shape {x.shape[1:]} per row but the model expects {self.input_shape}"
                )
        if not np.issubdtype(x.dtype, np.number):
            raise UsageError(f"input must be numeric, got dtype {x.dtype}")
        return x.astype(np.float32, copy=False)

    @property
    def device(self) -> torch.device:
        # an int8 model may hold buffers only
        return next(itertools.chain(self.module.parameters(), self.module.buffers())).device

    @functools.cached_property
    def predict_rows(self) -> int:
        """Rows per forward pass by default (see PREDICT_CACHE_BYTES): from the widest output of any
        layer on one row of zeros. The same model gives the same number in every process, so
        parallel predict cuts the rows where one process would."""
        lo, hi = PREDICT_ROWS_RANGE  # cached: a model moved to another device keeps its number
        if self.device.type != "cpu":
            return hi
        widest = [1]

        def hook(_module: nn.Module, _inputs: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                widest[0] = max(widest[0], out[0].numel() if out.dim() else 1)

        handles = [m.register_forward_hook(hook) for m in self.module.modules()]
        try:
            with torch.inference_mode():
                self.module(torch.zeros(1, *self.input_shape, device=self.device))
        except Exception:  # noqa: BLE001 - a forward that cannot take zeros: predict still works
            return 1024
        finally:
            for h in handles:
                h.remove()
        return int(min(hi, max(lo, PREDICT_CACHE_BYTES // (4 * widest[0]))))

    def rows_per_forward(self, batch_size: int | None) -> int:
        """`batch_size` checked, or `predict_rows` for None: the one place a default is resolved."""
        check_batch_size(batch_size)
        return self.predict_rows if batch_size is None else batch_size

    @torch.inference_mode()
    def logits(self, x, *, batch_size: int | None = None) -> torch.Tensor:
        """Raw outputs for each row of x, `batch_size` rows per forward (default `predict_rows`)."""
        xs = torch.from_numpy(self._prepare(x))
        device, batch_size = self.device, self.rows_per_forward(batch_size)
        out = [
            self.module(xs[i : i + batch_size].to(device)).float().cpu()
            for i in range(0, len(xs), batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0, self.meta.get("num_outputs", len(self.classes)))

    @property
    def task(self) -> str:
        return self.meta.get("task", "classification")

    def predict_proba(self, x, *, batch_size: int | None = None) -> np.ndarray:
        if self.task == "regression":
            raise UsageError("a regression model predicts values; it has no class probabilities")
        return torch.softmax(self.logits(x, batch_size=batch_size), dim=1).numpy()

    def predict(self, x, *, batch_size: int | None = None) -> np.ndarray:
        """Class indices (into `self.classes`) for each row of x; for a regression model, the
        predicted values (float32, in the target's units)."""
        out = self.logits(x, batch_size=batch_size)
        if self.task == "regression":
            scale = self.meta["target_scale"]  # the model outputs standardized targets
            return (out[:, 0].double() * scale["std"] + scale["mean"]).float().numpy()
        return out.argmax(1).numpy()


def _canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in doc.items() if k != "hmac"}, sort_keys=True).encode()


def _seal(meta: dict[str, Any], blob: bytes, key: bytes) -> tuple[dict[str, Any], bytes]:
    """(model.json document, weights bytes) of an encrypted model dir."""
    import base64

    from hpcml.crypto import encrypt_bytes, key_id, mac

    weights = encrypt_bytes(blob, key, aad=b"model/model.safetensors")
    sealed = encrypt_bytes(json.dumps(meta).encode(), key, aad=b"model/model.json")
    doc = {
        "format": FORMAT,
        "encryption": {"cipher": "AES-256-GCM", "key_id": key_id(key)},
        "sealed_meta": base64.b64encode(sealed).decode(),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    doc["hmac"] = mac(key, _canonical(doc), purpose="model manifest")
    return doc, weights


def _unseal(doc: dict[str, Any], meta_path: Path, key: bytes | None) -> tuple[dict[str, Any], bytes]:
    """Check an encrypted model.json (key fingerprint, HMAC); return (meta, key)."""
    import base64
    import hmac as _hmac

    from hpcml.crypto import decrypt_bytes, key_from_env, key_id, mac

    key = key if key is not None else key_from_env()
    if key is None:
        raise UsageError(
            f"{meta_path.parent}: the model dir is encrypted; set HPCML_KEY_FILE (a 0600 file) or HPCML_KEY"
        )
    if doc["encryption"].get("key_id") != key_id(key):
        raise HpcmlError(f"{meta_path.parent}: wrong key (this model dir was encrypted with another key)")
    if not _hmac.compare_digest(
        str(doc.get("hmac", "")), mac(key, _canonical(doc), purpose="model manifest")
    ):
        raise HpcmlError(f"{meta_path}: authentication failed: model.json was modified")
    plain = decrypt_bytes(
        base64.b64decode(doc["sealed_meta"]), key, aad=b"model/model.json", name=str(meta_path)
    )
    meta = json.loads(plain)
    if not isinstance(meta, dict):
        raise HpcmlError(f"{meta_path}: the sealed metadata is not a JSON object")
    return {**meta, "weights_sha256": doc["weights_sha256"]}, key


def save_model(
    out: str | Path,
    module: nn.Module,
    meta: dict[str, Any],
    *,
    key: bytes | None = None,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write the model dir atomically: a temporary sibling folder, fsynced, renamed into place.

    A crash at any point leaves either no `out` or a complete one, never a half-written dir. With a
    `key` (32 bytes) the dir is encrypted (see the module docstring). `extra` files (name -> text,
    e.g. compress.json) are written in the same atomic step; the loader reads none of them.
    """
    from safetensors.torch import save

    out = Path(out)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    blob = save(state, metadata={"format": FORMAT})
    if key is None:
        doc = {"format": FORMAT, **meta, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    else:
        doc, blob = _seal({"format": FORMAT, **meta}, blob, key)
    with atomic_dir(out) as tmp:  # an existing model dir at `out` is replaced
        (tmp / "model.safetensors").write_bytes(blob)
        (tmp / "model.json").write_text(json.dumps(doc, indent=2))
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return out


def refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UsageError(
            f"{path}: refusing to load a pickle-based file ({path.suffix}). Unpickling can run arbitrary "
            "code, so hpcml never does it. If you trust this file, convert it yourself in a separate, "
            "trusted session, e.g. `safetensors.torch.save_file(torch.load(path, weights_only=True), "
            "'model.safetensors')`, and load that instead."
        )


def load_model(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    key: bytes | None = None,
    trust_code: bool = False,
) -> Model:
    """Load a model dir, verifying the weights' sha256 against model.json. An encrypted dir needs
    `key` or HPCML_KEY_FILE / HPCML_KEY in the environment.

    Nothing the dir declares is allocated before it is checked: model.json is read only if it is a
    regular file of at most 4 MiB and validated as a schema (models/schema.py); the architecture is
    built on the meta device and compared with the weights' header (models/weights.py).

    An architecture that is a `module:function` spec names code outside hpcml: it is imported only
    with `trust_code=True`; without it the load fails, naming the module, before anything is imported.
    Built-in and installed plugin architectures need no trust."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path)
    refuse_pickle(path)
    meta_path, weights = path / "model.json", path / "model.safetensors"
    if not path.is_dir():
        raise UsageError(f"{path}: not a model dir (expected a folder with model.json + model.safetensors)")
    for f in (meta_path, weights):
        if not f.exists():
            raise HpcmlError(f"{path}: incomplete model dir, {f.name} is missing")
    meta, key = _read_meta(meta_path, key)
    spec = validate_meta(meta, meta_path)
    check_trust(spec.architecture, trust_code, what=str(meta_path))
    blob, expected = _read_weights(spec, weights, key, trust_code=trust_code)
    try:
        state = load(blob)
    except SafetensorError as err:
        raise HpcmlError(f"{weights}: unreadable safetensors file ({err})") from None
    try:
        module = create_model(
            spec.architecture, input_shape=tuple(spec.input_shape), num_outputs=spec.num_outputs,
            trust_code=trust_code, **spec.kwargs,
        )  # fmt: skip
    except UsageError as err:  # a user model that fails on the CPU too
        raise UsageError(f"{meta_path}: {err}") from None
    apply_compression(module, spec, meta_path)
    if expected is None:  # not buildable on meta: compared now, the file already bounded by its header
        check_header(blob, bounded_state(module, spec, meta_path), weights)
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise HpcmlError(f"{weights}: weights do not fit {spec.architecture}: {err}") from None
    return Model(module.to(device), meta)


def _read_weights(
    spec: ModelMeta, weights: Path, key: bytes | None, *, trust_code: bool
) -> tuple[bytes, dict[str, torch.Tensor] | None]:
    """(the decrypted safetensors bytes, the architecture's meta state or None if it cannot be built
    on meta). The file is read only up to the size the architecture (or else its header) allows,
    its sha256 checked, and its header compared with the meta state when there is one."""
    where = weights.parent / "model.json"
    expected = expected_state(spec, where, trust_code=trust_code)
    if expected is not None:
        limit = weights_limit(expected, encrypted=key is not None)
        why = "the size the architecture in model.json needs"
    else:
        limit = declared_limit(weights, encrypted=key is not None)
        why = "the size its own header declares"
    blob = read_regular(weights, limit=limit, why=why)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != spec.weights_sha256:
        raise HpcmlError(
            f"{weights}: sha256 mismatch (file {digest[:12]}..., model.json says "
            f"{spec.weights_sha256[:12]}...): the weights are corrupt or were modified"
        )
    if key is not None:
        from hpcml.crypto import decrypt_bytes

        blob = decrypt_bytes(blob, key, aad=b"model/model.safetensors", name=str(weights))
    if expected is not None:
        check_header(blob, expected, weights)
    return blob, expected


def _read_meta(meta_path: Path, key: bytes | None) -> tuple[dict[str, Any], bytes | None]:
    """(model.json's fields, the key if the dir is encrypted else None), the file size-capped."""
    raw = read_regular(meta_path, limit=MAX_META_BYTES, why="the most a model.json may have")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as err:  # RecursionError: [[[[...]]]] nested too deep
        raise HpcmlError(f"{meta_path}: not valid JSON ({str(err) or type(err).__name__})") from None
    if isinstance(doc, dict) and "encryption" in doc:
        return _unseal(validate_sealed(doc, meta_path).model_dump(), meta_path, key)
    return doc, None
