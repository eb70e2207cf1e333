"""Checkpoints that survive anything: a kill, a full disk, a flipped bit, a wrong key.

Layout (the "Checkpoint dir" contract in DESIGN.md), one folder per save under `root`:

    step-XXXXXXXX/  model.safetensors      model.state_dict()
                    optimizer.safetensors  every tensor of the optimizer (keys `state.<index>.<name>`)
                                           and of the scheduler/scaler state, if any
                    state.json             step, epoch, batch in the epoch, RNG states, optimizer
                                           settings (param_groups, param index -> model name),
                                           scheduler and scaler state, `extra`
                    MANIFEST.json          size + sha256 of the three files above, written last

No pickle anywhere: non-tensor values go to JSON, tensors to safetensors, and a JSON value
`{"__tensor__": key}` points into optimizer.safetensors.

Atomicity (`_files.atomic_dir`): a save writes into `root/.step-XXXXXXXX.tmp-*` (a dot name, never
mistaken for a checkpoint), fsyncs every file and the folder, renames it to its final name (an
existing one is moved aside to `.step-XXXXXXXX.del-*` first) and fsyncs `root`. Only
then are older checkpoints pruned (renamed to a dot name first, then deleted), so a folder with a
final name is always complete, and the last good checkpoint outlives any failed save.

Encryption (optional, `key=`): every data file is AES-256-GCM encrypted with the associated data
`step-XXXXXXXX/<file name>`, so files cannot be swapped between names or checkpoints. MANIFEST.json
stays plain JSON, so steps and sizes can be listed without the key, and carries an HMAC-SHA256 (under
a subkey derived from the key) over its content and a key fingerprint: a modified manifest and a wrong
key are told apart and both refused. A key given for an unencrypted checkpoint is refused too, so
encrypted checkpoints cannot be silently replaced by forged plaintext ones.
"""

from __future__ import annotations

import errno as _errno
import hashlib
import hmac
import json
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hpcml._files import atomic_dir
from hpcml._version import __version__
from hpcml.crypto import decrypt_bytes, encrypt_bytes, key_id, mac
from hpcml.errors import HpcmlError, UsageError
from hpcml.models.io import refuse_pickle
from hpcml.training.state_codec import capture_rng, decode_state, encode_state, restore_rng, unshare_tensors

__all__ = [
    "Checkpoint", "CheckpointWarning", "capture_rng", "find_checkpoints", "load_checkpoint", "load_latest",
    "restore_rng", "save_checkpoint",
]  # fmt: skip

FORMAT = "hpcml.checkpoint/1"
MANIFEST, STATE, MODEL, OPTIM = "MANIFEST.json", "state.json", "model.safetensors", "optimizer.safetensors"
_DATA_FILES = (MODEL, OPTIM, STATE)
_NAME = re.compile(r"step-(\d{8,})")
_STALE = re.compile(r"\.step-\d{8,}\.(tmp|del)-.+")
_MAC_PURPOSE = "checkpoint manifest"


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (and why), or part of the saved state could not be applied."""


class _KeyProblem(HpcmlError):
    """Missing or wrong key: no older checkpoint can fix that, so load_latest raises instead of skipping."""


# ---- save -------------------------------------------------------------------------------------------------


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str | None]:
    """Model name of each parameter in the optimizer's index order, to catch a reordered resume."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p)) for g in optimizer.param_groups for p in g["params"]]


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):
            raise UsageError(f"model state {k!r} is a {type(v).__name__}; only tensors can be checkpointed")
        # note: `.to("cpu")` is a host-device sync for GPU models; a save is a deliberate sync point
        out[k] = v.detach().to("cpu").contiguous()
    return unshare_tensors(out)


def _write_file(path: Path, data: bytes, *, key: bytes | None, aad: str) -> dict[str, Any]:
    if key is not None:
        data = encrypt_bytes(data, key, aad=aad.encode())
    with open(path, "wb") as f:  # fsynced by atomic_dir with the rest of the folder
        f.write(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(
        {k: v for k, v in manifest.items() if k != "hmac"}, sort_keys=True, separators=(",", ":")
    ).encode()


def _write_manifest(
    folder: Path, *, name: str, step: int, files: dict[str, Any] | None, key: bytes | None
) -> None:
    """MANIFEST.json, the commit record of a checkpoint; `files=None` hashes what is on disk."""
    if files is None:
        files = {}
        for f in _DATA_FILES:
            data = (folder / f).read_bytes()
            files[f] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest: dict[str, Any] = {"format": FORMAT, "step": step, "files": files, "encryption": None}
    if key is not None:
        manifest["encryption"] = {
            "cipher": "AES-256-GCM",
            "aad": f"{name}/<file name>",
            "key_id": key_id(key),
        }
        manifest["hmac"] = mac(key, _canonical(manifest), purpose=_MAC_PURPOSE)
    _write_file(folder / MANIFEST, json.dumps(manifest, indent=1).encode(), key=None, aad="")


def _errtext(err: OSError) -> str:
    what = os.strerror(err.errno) if err.errno else str(err)
    code = _errno.errorcode.get(err.errno or 0, "")
    return f"{what}{f' ({code})' if code else ''}{f' at {err.filename}' if err.filename else ''}"


def save_checkpoint(
    root: str | Path,
    *,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    epoch: int = 0,
    batch: int = 0,
    extra: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
    keep: int = 2,
    key: bytes | None = None,
) -> Path:
    """Write `root/step-XXXXXXXX/` atomically, then keep only the newest `keep` checkpoints.

    `model` is the plain module (not the torch.compile or DDP wrapper); `epoch` and `batch` say where
    the next step starts (batch index inside `epoch`); `extra` is any JSON data for the caller;
    `rng` defaults to `capture_rng()` now. Saving an existing step replaces it. Raises HpcmlError if
    the disk fails (e.g. ENOSPC); the previous checkpoints are then untouched and no temp folder
    stays behind. One writer per `root` (rank 0 under DDP).
    """
    if step < 0 or epoch < 0 or batch < 0:
        raise UsageError(f"step, epoch and batch must be >= 0, got {step}, {epoch}, {batch}")
    if keep < 1:
        raise UsageError(f"keep must be >= 1 (the newest checkpoint is always kept), got {keep}")
    from safetensors.torch import save as st_save

    root = Path(root)
    final = root / f"step-{step:08d}"
    tensors: dict[str, torch.Tensor] = {}  # filled by encode_state, for optimizer.safetensors

    def part(obj: Any, prefix: str) -> dict[str, Any] | None:
        if obj is None:
            return None
        return {
            "class": type(obj).__name__,
            "state_dict": encode_state(obj.state_dict(), tensors, path=prefix),
        }

    state = {
        "format": FORMAT, "step": step, "epoch": epoch, "batch": batch,
        "rng": capture_rng() if rng is None else rng,
        "optimizer": part(optimizer, ""), "scheduler": part(scheduler, "scheduler"),
        "scaler": part(scaler, "scaler"),
        "extra": encode_state(dict(extra or {}), None, path="extra"),
        "saved_at": time.time(), "hpcml_version": __version__, "torch_version": torch.__version__,
    }  # fmt: skip
    if optimizer is not None:
        state["optimizer"]["param_names"] = _param_names(model, optimizer)
    parts: list[tuple[str, Callable[[], bytes]]] = [
        (MODEL, lambda: st_save(_model_tensors(model), {"format": FORMAT})),
        (OPTIM, lambda: st_save(unshare_tensors(tensors), {"format": FORMAT})),
        (STATE, lambda: json.dumps(state, indent=1).encode()),
    ]
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove_stale(root)
        with atomic_dir(final) as tmp:  # fsyncs every file and the folder, replaces an existing step
            files = {
                name: _write_file(tmp / name, make(), key=key, aad=f"{final.name}/{name}")
                for name, make in parts
            }
            _write_manifest(tmp, name=final.name, step=step, files=files, key=key)
    except OSError as err:
        raise HpcmlError(
            f"{final}: could not write the checkpoint: {_errtext(err)}; "
            "the previous checkpoints are untouched"
        ) from err
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep`; rename first, so no partly deleted folder keeps a final name."""
    for old in find_checkpoints(root)[keep:]:
        try:
            trash = old.with_name(f".{old.name}.del-{uuid.uuid4().hex[:8]}")
            os.replace(old, trash)
            shutil.rmtree(trash)
        except OSError as err:
            warnings.warn(
                f"could not delete old checkpoint {old}: {_errtext(err)}", CheckpointWarning, stacklevel=3
            )


def _remove_stale(root: Path) -> None:
    """Temp and trash folders left by a killed save or prune: never checkpoints, safe to delete."""
    for p in root.iterdir():
        if _STALE.fullmatch(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


# ---- load -------------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Checkpoint:
    """A verified checkpoint in memory: where the run was, and the tensors to put back."""

    path: Path
    step: int
    epoch: int
    batch: int
    extra: dict[str, Any]
    state: dict[str, Any]  # state.json as written (rng, optimizer settings, versions)
    model_state: dict[str, torch.Tensor] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # optimizer.safetensors

    def __repr__(self) -> str:
        return f"Checkpoint({self.path}, step={self.step}, epoch={self.epoch}, batch={self.batch})"

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        scaler: Any = None,
        *,
        rng: bool = True,
    ) -> None:
        """Load the saved state into freshly built objects (built exactly as in the original run).

        Call it after the scheduler is constructed (its constructor rewrites the lr) and before the
        first step. `rng=True` also restores the global RNGs, which makes dropout and any other
        random draw repeat the uninterrupted run.
        """
        try:
            model.load_state_dict(self.model_state)
        except RuntimeError as err:
            raise HpcmlError(f"{self.path / MODEL}: does not fit this model: {err}") from None
        for obj, name in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
            if obj is None:
                continue
            saved = self.state.get(name)
            if saved is None:
                raise HpcmlError(f"{self.path / STATE}: no {name} state was saved in this checkpoint")
            if saved["class"] != type(obj).__name__:
                raise HpcmlError(
                    f"{self.path / STATE}: the {name} was a {saved['class']} but is now a "
                    f"{type(obj).__name__}; resume with the same configuration"
                )
            if name == "optimizer" and (now := _param_names(model, obj)) != saved["param_names"]:
                raise HpcmlError(
                    f"{self.path / STATE}: the optimizer's parameters differ from the saved "
                    f"ones ({_first_diff(saved['param_names'], now)}); the model changed"
                )
            try:
                obj.load_state_dict(decode_state(saved["state_dict"], self.tensors))
            except (ValueError, KeyError, RuntimeError) as err:
                raise HpcmlError(f"{self.path}: cannot restore the {name}: {err}") from None
            if name == "optimizer":
                _match_layouts(obj)
        if rng:
            restore_rng(self.state["rng"])


def _match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give restored per-parameter state (Adam's moments) its parameter's memory layout. Saved state
    comes back contiguous; a channels_last parameter's fused update would then run on moments laid
    out differently, and a resumed run would no longer equal the uninterrupted one."""
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def _first_diff(saved: list, now: list) -> str:
    if len(saved) != len(now):
        return f"{len(saved)} saved, {len(now)} now"
    i = next(i for i, (a, b) in enumerate(zip(saved, now, strict=True)) if a != b)
    return f"index {i} was {saved[i]!r}, is now {now[i]!r}"


def find_checkpoints(root: str | Path) -> list[Path]:
    """Folders named `step-XXXXXXXX` under `root`, newest step first. Not yet verified: see load_*."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, key=lambda sp: sp[0], reverse=True)]


def _check_manifest(folder: Path, manifest: Any, key: bytes | None) -> dict[str, Any]:
    where = folder / MANIFEST
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise HpcmlError(f"{where}: not an hpcml checkpoint manifest (format {FORMAT!r} expected)")
    enc = manifest.get("encryption")
    if enc is None and key is not None:
        raise _KeyProblem(
            f"{where}: this checkpoint is not encrypted but a key was given; refusing it, "
            "since anyone could have written it (unset HPCML_KEY/HPCML_KEY_FILE to load it)"
        )
    if enc is not None and key is None:
        raise _KeyProblem(f"{where}: this checkpoint is encrypted; set HPCML_KEY_FILE or HPCML_KEY")
    if enc is not None:
        if not isinstance(enc, dict) or enc.get("key_id") != key_id(key):
            raise _KeyProblem(f"{where}: this checkpoint was encrypted with a different key")
        if not hmac.compare_digest(
            str(manifest.get("hmac", "")), mac(key, _canonical(manifest), purpose=_MAC_PURPOSE)
        ):
            raise HpcmlError(
                f"{where}: manifest authentication failed (HMAC mismatch): the manifest was "
                "modified or corrupted"
            )
    files = manifest.get("files")
    if (
        not isinstance(files, dict)
        or set(files) != set(_DATA_FILES)
        or not all(
            isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
            for e in files.values()
        )
    ):
        raise HpcmlError(f"{where}: malformed 'files' entry (expected {', '.join(_DATA_FILES)})")
    m = _NAME.fullmatch(folder.name)
    if m is None or int(m.group(1)) != manifest.get("step"):
        raise HpcmlError(f"{where}: says step {manifest.get('step')!r} but the folder is {folder.name!r}")
    return files


def _read_file(folder: Path, name: str, entry: dict[str, Any], key: bytes | None) -> bytes:
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as err:
        raise HpcmlError(f"{path}: cannot read: {_errtext(err)}") from None
    if len(data) != entry["bytes"]:
        raise HpcmlError(
            f"{path}: truncated or altered: {len(data)} bytes, the manifest says {entry['bytes']}"
        )
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise HpcmlError(f"{path}: sha256 mismatch with the manifest: the file is corrupt or was modified")
    if key is not None:
        data = decrypt_bytes(data, key, aad=f"{folder.name}/{name}".encode(), name=str(path))
    return data


def _load_tensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise HpcmlError(f"{path}: not a valid safetensors file ({err})") from None


def load_checkpoint(path: str | Path, *, key: bytes | None = None) -> Checkpoint:
    """Verify and load one checkpoint folder. Any problem raises HpcmlError naming the file and why."""
    path = Path(path)
    refuse_pickle(path)
    if not path.is_dir():
        raise UsageError(f"{path}: not a checkpoint folder (expected {MANIFEST} + safetensors + JSON)")
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise HpcmlError(f"{path}: no {MANIFEST}, so the save never finished; not a checkpoint") from None
    except (OSError, ValueError) as err:
        raise HpcmlError(f"{path / MANIFEST}: unreadable or not valid JSON ({err})") from None
    files = _check_manifest(path, manifest, key)
    blobs = {name: _read_file(path, name, files[name], key) for name in _DATA_FILES}
    try:
        state = json.loads(blobs[STATE])
    except ValueError as err:
        raise HpcmlError(f"{path / STATE}: not valid JSON ({err})") from None
    if (
        not isinstance(state, dict)
        or state.get("format") != FORMAT
        or state.get("step") != manifest["step"]
        or not {"epoch", "batch", "rng", "extra", "optimizer", "scheduler", "scaler"} <= state.keys()
    ):
        raise HpcmlError(f"{path / STATE}: not the state of this checkpoint (format, step or fields differ)")
    return Checkpoint(
        path=path,
        step=state["step"],
        epoch=state["epoch"],
        batch=state["batch"],
        extra=decode_state(state["extra"], {}),
        state=state,
        model_state=_load_tensors(blobs[MODEL], path / MODEL),
        tensors=_load_tensors(blobs[OPTIM], path / OPTIM),
    )


def load_latest(root: str | Path, *, key: bytes | None = None) -> Checkpoint | None:
    """The newest valid checkpoint under `root`, or None if there is none at all.

    An invalid one (no/bad manifest, hash mismatch, truncated file, bad JSON) is skipped with a
    CheckpointWarning saying which and why, falling back to the one before. A missing or wrong key
    raises at once (older checkpoints would not fix it), and so does a root whose checkpoints are all
    invalid: starting over would later prune them, and nothing may be lost silently.
    """
    root = Path(root)
    refuse_pickle(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"{root}: expected a folder of step-XXXXXXXX checkpoints, got a file")
    candidates = find_checkpoints(root)
    reasons = []
    for path in candidates:
        try:
            return load_checkpoint(path, key=key)
        except _KeyProblem:
            raise
        except HpcmlError as err:
            warnings.warn(f"skipping checkpoint {path}: {err}", CheckpointWarning, stacklevel=2)
            reasons.append(str(err))
    if candidates:
        raise HpcmlError(
            f"{root}: none of its {len(candidates)} checkpoints is valid: {'; '.join(reasons)}. "
            "Move them away to start over."
        )
    return None
