"""Checkpoints: exact resume, RNG, pruning, corruption fallback, kills mid-write, pickle refusal,
encryption, and write failures. Everything on the CPU with tiny models."""

from __future__ import annotations

import base64
import errno
import json
import os
import pickle
import random
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcml.crypto import decrypt_bytes, encrypt_bytes, key_from_env
from hpcml.errors import HpcmlError, UsageError
from hpcml.training import checkpoint as ckpt
from hpcml.training.checkpoint import (
    CheckpointWarning,
    capture_rng,
    find_checkpoints,
    load_checkpoint,
    load_latest,
    restore_rng,
    save_checkpoint,
)

SRC = Path(__file__).resolve().parents[2] / "src"


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _build(opt_name: str = "adam", sched_name: str | None = None):
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 4))
    if opt_name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    elif opt_name == "adamw_fused":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, foreach=True)
    sched = None
    if sched_name == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20, cycle_momentum=False)
    elif sched_name == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
    return model, opt, sched


def _train(model, opt, sched, steps: int) -> None:
    """Every step draws from torch, numpy and python RNGs, so an unrestored RNG changes the result."""
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 8) + float(np.random.rand()) + random.random()
        y = torch.randint(0, 4, (16,))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()


def _save(root, step: int, **kw) -> Path:
    model, opt, _ = kw.pop("objs", None) or _build()
    return save_checkpoint(root, step=step, model=model, optimizer=opt, **kw)


def _dot_entries(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith(".")]


# ---- exact resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opt_name,sched_name", [("adam", "onecycle"), ("adamw_fused", "cosine"), ("sgd_momentum", "onecycle")]
)
def test_resume_is_bit_identical_to_uninterrupted_run(tmp_path, opt_name, sched_name):
    _seed(0)
    model, opt, sched = _build(opt_name, sched_name)
    _train(model, opt, sched, 5)
    save_checkpoint(tmp_path, step=5, model=model, optimizer=opt, scheduler=sched, epoch=1, batch=2)
    _train(model, opt, sched, 7)

    _seed(123)  # a different init and RNG position: everything must come from the checkpoint
    model2, opt2, sched2 = _build(opt_name, sched_name)
    ck = load_latest(tmp_path)
    assert (ck.step, ck.epoch, ck.batch) == (5, 1, 2)
    ck.restore(model2, opt2, sched2)
    _train(model2, opt2, sched2, 7)

    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i, st in s1["state"].items():
        for k, v in st.items():
            assert torch.equal(v, s2["state"][i][k]), (i, k)
    assert sched.state_dict() == sched2.state_dict()


def test_resume_without_optimizer_state_differs(tmp_path):
    """Control: the comparison above is sensitive enough to notice a lost optimizer state."""
    _seed(0)
    model, opt, sched = _build("adam", "cosine")
    _train(model, opt, sched, 5)
    save_checkpoint(tmp_path, step=5, model=model, optimizer=opt, scheduler=sched)
    _train(model, opt, sched, 3)
    model2, opt2, sched2 = _build("adam", "cosine")
    load_latest(tmp_path).restore(model2, None, sched2)
    _train(model2, opt2, sched2, 3)
    assert not torch.equal(model[0].weight, model2[0].weight)


def test_rng_capture_restore_repeats_draws():
    _seed(7)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    random.gauss(0, 1)
    state = json.loads(json.dumps(capture_rng()))  # proves it is plain JSON

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(4))

    a = draws()
    restore_rng(state)
    b = draws()
    assert a[:3] == b[:3] and torch.equal(a[3], b[3])
    assert a != draws()[:3] + (a[3],)


def test_keeps_newest_k_and_leaves_no_temp_dirs(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step-00000005", "step-00000004"]
    _save(tmp_path, 6, keep=3)
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step-00000006", "step-00000005", "step-00000004"]
    assert _dot_entries(tmp_path) == []
    with pytest.raises(UsageError, match="keep"):
        _save(tmp_path, 7, keep=0)


def test_saving_an_existing_step_replaces_it(tmp_path):
    objs = _build()
    _save(tmp_path, 3, objs=objs)
    with torch.no_grad():
        objs[0][0].weight.fill_(1.5)
    _save(tmp_path, 3, objs=objs)
    assert torch.equal(load_latest(tmp_path).model_state["0.weight"], torch.full((32, 8), 1.5))
    assert _dot_entries(tmp_path) == []


def test_extra_round_trip_and_non_json_extra_refused_before_any_io(tmp_path):
    extra = {"sampler": {"epoch": 2, "batch": 17}, "pair": (1, 2.5), "best": float("inf"), "tags": ["a"]}
    _save(tmp_path, 1, extra=extra)
    assert load_latest(tmp_path).extra == extra
    with pytest.raises(UsageError, match="extra.t"):
        _save(tmp_path / "other", 1, extra={"t": torch.zeros(2)})
    assert not (tmp_path / "other").exists()


def test_tied_weights_are_saved_and_restored(tmp_path):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    save_checkpoint(tmp_path, step=1, model=model)
    model2 = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model2[1].weight = model2[0].weight
    load_latest(tmp_path).restore(model2)
    assert torch.equal(model2[1].weight, model[0].weight)


def test_restore_into_a_different_setup_is_a_clear_error(tmp_path):
    _save(tmp_path, 1)
    ck = load_latest(tmp_path)
    with pytest.raises(HpcmlError, match="does not fit this model"):
        ck.restore(nn.Linear(8, 4))
    model, _, _ = _build()
    with pytest.raises(HpcmlError, match="was a Adam but is now a SGD"):
        ck.restore(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(HpcmlError, match="parameters differ"):
        ck.restore(model, torch.optim.Adam(list(model.parameters())[::-1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kw", [{"fused": True}, {"capturable": True, "foreach": True}])
def test_cuda_resume_is_bit_identical(tmp_path, kw):
    """Fused/capturable Adam keeps `step` as a tensor on the GPU; dropout draws from the CUDA RNG."""

    def build():
        model = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.2), nn.Linear(32, 4)).cuda()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, **kw)

    def train(model, opt, steps):
        for _ in range(steps):
            x, y = torch.randn(16, 8, device="cuda"), torch.randint(0, 4, (16,), device="cuda")
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    _seed(0)
    model, opt = build()
    train(model, opt, 3)
    save_checkpoint(tmp_path, step=3, model=model, optimizer=opt)
    train(model, opt, 4)
    _seed(1)
    model2, opt2 = build()
    load_latest(tmp_path).restore(model2, opt2)
    assert opt2.state[opt2.param_groups[0]["params"][0]]["step"].device.type == "cuda"
    train(model2, opt2, 4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))


# ---- corruption -> fall back -----------------------------------------------------------------------------


def _truncate(d: Path) -> None:
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _flip(d: Path) -> None:
    data = bytearray((d / "optimizer.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (d / "optimizer.safetensors").write_bytes(bytes(data))


def _bad_state_json(d: Path) -> None:
    (d / "state.json").write_text('{"step": 2, ')
    ckpt._write_manifest(d, name=d.name, step=2, files=None, key=None)  # consistent hashes, bad JSON


CORRUPTIONS = {
    "truncated": (_truncate, "model.safetensors: truncated"),
    "bit flip": (_flip, "optimizer.safetensors: sha256 mismatch"),
    "no manifest": (lambda d: (d / "MANIFEST.json").unlink(), "no MANIFEST.json"),
    "bad manifest": (
        lambda d: (d / "MANIFEST.json").write_text("{oops"),
        "MANIFEST.json: unreadable or not valid",
    ),
    "bad state": (_bad_state_json, "state.json: not valid JSON"),
}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_corrupt_newest_falls_back_to_previous_with_warning(tmp_path, kind):
    corrupt, reason = CORRUPTIONS[kind]
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    corrupt(newest)
    with pytest.warns(CheckpointWarning, match=f"skipping checkpoint {newest}.*{reason}"):
        ck = load_latest(tmp_path)
    assert ck.step == 1
    with pytest.raises(HpcmlError, match=reason):
        load_checkpoint(newest)


def test_all_invalid_raises_and_empty_root_is_none(tmp_path):
    assert load_latest(tmp_path / "missing") is None
    assert load_latest(tmp_path) is None
    _truncate(_save(tmp_path, 1))
    with pytest.warns(CheckpointWarning), pytest.raises(HpcmlError, match="none of its 1 checkpoints"):
        load_latest(tmp_path)


# ---- kill during write (a real process, killed with os._exit at a chosen point) -------------------------

_CHILD = textwrap.dedent(
    """
    import os, sys, torch
    from hpcml.training import checkpoint as ck
    root, point = sys.argv[1], sys.argv[2]
    real_write, real_replace, real_rmtree = ck._write_file, os.replace, ck.shutil.rmtree

    def write(path, data, **kw):
        if point == "half:" + path.name:  # a torn write: half the bytes reach the disk, then death
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            os._exit(9)
        if point == "before:" + path.name:
            os._exit(9)
        return real_write(path, data, **kw)

    def replace(src, dst):
        if point == "before_rename":
            os._exit(9)
        real_replace(src, dst)
        if point == "after_rename":
            os._exit(9)

    def rmtree(path, *a, **kw):
        if point == "mid_prune":  # one file of the old checkpoint gone, then death
            os.remove(next(os.scandir(path)).path)
            os._exit(9)
        real_rmtree(path, *a, **kw)

    ck._write_file, ck.os.replace, ck.shutil.rmtree = write, replace, rmtree
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck.save_checkpoint(root, step=2, model=model, optimizer=opt, keep=1)
    os._exit(0)
    """
)

KILL_POINTS = {
    "half:model.safetensors": 1, "before:optimizer.safetensors": 1, "half:state.json": 1,
    "before:MANIFEST.json": 1, "half:MANIFEST.json": 1, "before_rename": 1, "after_rename": 2, "mid_prune": 2,
}  # fmt: skip


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_during_save_keeps_last_good_checkpoint(tmp_path, point):
    _save(tmp_path, 1)
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), point], env=env, capture_output=True)
    assert proc.returncode == 9, proc.stderr.decode()
    for d in find_checkpoints(tmp_path):  # a final name is never a partial folder
        load_checkpoint(d)
    assert load_latest(tmp_path).step == KILL_POINTS[point]
    _save(tmp_path, 3, keep=2)  # the next save works and clears what the killed one left
    assert _dot_entries(tmp_path) == []
    assert load_latest(tmp_path).step == 3


# ---- pickle is refused ------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_pickle_files_are_refused_and_never_run(tmp_path):
    control = tmp_path / "CONTROL"
    pickle.loads(pickle.dumps(_Evil(control)))
    assert control.exists()  # the payload is live: unpickling it does run code

    marker = tmp_path / "MARKER"
    payload = pickle.dumps(_Evil(marker))
    for suffix in (".pt", ".pth", ".ckpt", ".pkl"):
        path = tmp_path / f"evil{suffix}"
        path.write_bytes(payload)
        with pytest.raises(UsageError, match="refusing to load a pickle"):
            load_checkpoint(path)
        with pytest.raises(UsageError, match="refusing to load a pickle"):
            load_latest(path)
    # a pickle smuggled in as model.safetensors, with a manifest that matches it
    d = _save(tmp_path / "ckpts", 1)
    (d / "model.safetensors").write_bytes(payload)
    ckpt._write_manifest(d, name=d.name, step=1, files=None, key=None)
    with pytest.raises(HpcmlError, match="not a valid safetensors file"):
        load_checkpoint(d)
    assert not marker.exists()


# ---- encryption -------------------------------------------------------------------------------------------

KEY = bytes(range(32))


def test_encrypted_round_trip_hides_content_and_key(tmp_path):
    _seed(0)
    model, opt, sched = _build("adamw_fused", "cosine")
    _train(model, opt, sched, 3)
    d = save_checkpoint(tmp_path, step=3, model=model, optimizer=opt, scheduler=sched, key=KEY)
    for f in d.iterdir():
        data = f.read_bytes()
        for secret in (KEY, KEY.hex().encode(), base64.b64encode(KEY)):
            assert secret not in data, f.name
        if f.name != "MANIFEST.json":
            assert data.startswith(b"HPCMLAE1") and b"exp_avg" not in data and b'"step"' not in data
    model2, opt2, sched2 = _build("adamw_fused", "cosine")
    load_latest(tmp_path, key=KEY).restore(model2, opt2, sched2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))


def test_encrypted_tampering_and_wrong_keys_are_clear_errors(tmp_path):
    one = _save(tmp_path, 1, key=KEY)
    two = _save(tmp_path, 2, key=KEY)
    other = bytes(32)

    with pytest.raises(HpcmlError, match="encrypted with a different key") as err:
        load_latest(tmp_path, key=other)  # a wrong key raises at once: no silent fallback
    assert other.hex() not in str(err.value) and KEY.hex() not in str(err.value)
    with pytest.raises(HpcmlError, match="is encrypted; set HPCML_KEY_FILE or HPCML_KEY"):
        load_latest(tmp_path)

    manifest = json.loads((two / "MANIFEST.json").read_text())
    manifest["files"]["state.json"]["bytes"] += 1
    (two / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(HpcmlError, match="MANIFEST.json: manifest authentication failed"):
        load_checkpoint(two, key=KEY)

    blob = bytearray((two / "optimizer.safetensors").read_bytes())
    blob[-20] ^= 0x80
    (two / "optimizer.safetensors").write_bytes(bytes(blob))
    ckpt._write_manifest(two, name=two.name, step=2, files=None, key=KEY)  # re-sealed: only AES-GCM can tell
    with pytest.raises(HpcmlError, match="optimizer.safetensors: decryption failed"):
        load_checkpoint(two, key=KEY)

    (two / "optimizer.safetensors").write_bytes((one / "optimizer.safetensors").read_bytes())
    ckpt._write_manifest(two, name=two.name, step=2, files=None, key=KEY)  # swapped in from step 1
    with pytest.raises(HpcmlError, match="optimizer.safetensors: decryption failed"):
        load_checkpoint(two, key=KEY)
    with pytest.warns(CheckpointWarning, match="decryption failed"):
        assert load_latest(tmp_path, key=KEY).step == 1


def test_key_for_unencrypted_checkpoint_is_refused(tmp_path):
    _save(tmp_path, 1)
    with pytest.raises(HpcmlError, match="not encrypted but a key was given"):
        load_latest(tmp_path, key=KEY)


def test_encrypt_bytes_binds_the_name():
    blob = encrypt_bytes(b"weights", KEY, aad=b"a.safetensors")
    assert decrypt_bytes(blob, KEY, aad=b"a.safetensors", name="a") == b"weights"
    assert encrypt_bytes(b"weights", KEY, aad=b"a.safetensors") != blob  # fresh nonce per call
    with pytest.raises(HpcmlError, match="b.safetensors: decryption failed"):
        decrypt_bytes(blob, KEY, aad=b"b.safetensors", name="b.safetensors")
    with pytest.raises(HpcmlError, match="not an hpcml-encrypted file"):
        decrypt_bytes(b"plain", KEY, aad=b"", name="x")


def test_key_from_env(tmp_path):
    assert key_from_env({}) is None
    assert key_from_env({"HPCML_KEY": KEY.hex()}) == KEY
    assert key_from_env({"HPCML_KEY": base64.b64encode(KEY).decode()}) == KEY
    secret = "not-a-key-" * 3
    with pytest.raises(UsageError, match="HPCML_KEY: not a 32-byte key") as err:
        key_from_env({"HPCML_KEY": secret})
    assert secret not in str(err.value)

    f = tmp_path / "key"
    f.write_text(KEY.hex() + "\n")
    f.chmod(0o644)
    with pytest.raises(UsageError, match="mode 0644.*chmod 600"):
        key_from_env({"HPCML_KEY_FILE": str(f)})
    f.chmod(0o600)
    assert key_from_env({"HPCML_KEY_FILE": str(f)}) == KEY
    f.write_bytes(KEY)  # raw bytes work too
    assert key_from_env({"HPCML_KEY_FILE": str(f)}) == KEY
    with pytest.raises(UsageError, match="only one"):
        key_from_env({"HPCML_KEY_FILE": str(f), "HPCML_KEY": KEY.hex()})


# ---- write failures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["write", "fsync", "replace"])
def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch, target):
    _save(tmp_path, 1, keep=1)

    def enospc(*_a, **_kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def half_then_enospc(path, data, **_kw):  # the disk fills up in the middle of a file
        path.write_bytes(data[: len(data) // 2])
        enospc()

    if target == "write":
        monkeypatch.setattr(ckpt, "_write_file", half_then_enospc)
    else:
        monkeypatch.setattr(os, target, enospc)
    with pytest.raises(HpcmlError, match=r"step-00000002: could not write the checkpoint: No space left"):
        _save(tmp_path, 2, keep=1)
    monkeypatch.undo()
    assert [p.name for p in find_checkpoints(tmp_path)] == ["step-00000001"]
    assert _dot_entries(tmp_path) == []
    assert load_latest(tmp_path).step == 1
