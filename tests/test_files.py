"""File helpers: folders written through a temporary sibling get the umask's mode, not mkdtemp's 0700."""

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

import hpcml
from hpcml._files import umask
from hpcml.data import store


@contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _modes(root: Path) -> tuple[set[int], set[int]]:
    """(modes of root and every folder in it, modes of every file in it)."""
    dirs, files = {stat.S_IMODE(root.stat().st_mode)}, set()
    for p in root.rglob("*"):
        (dirs if p.is_dir() else files).add(stat.S_IMODE(p.stat().st_mode))
    return dirs, files


@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_model_checkpoint_and_store_modes_follow_the_umask(tmp_path, small_cfg, mask, dir_mode, file_mode):
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,label\n" + "".join(f"{i},{i * 2},{i % 2}\n" for i in range(40)))
    with _umask(mask):
        assert umask() == mask
        run = hpcml.train({**small_cfg, "epochs": 1, "precision": "fp32"}, out=tmp_path / "run")
        store.pack(csv, tmp_path / "store", target="label", shard_rows=10)
    checkpoints = sorted((run.dir / "checkpoints").glob("step-*"))
    assert checkpoints
    for folder in (run.dir / "model", checkpoints[-1], tmp_path / "store"):
        dirs, files = _modes(folder)
        assert dirs == {dir_mode} and files == {file_mode}, folder
