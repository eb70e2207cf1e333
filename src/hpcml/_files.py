"""File helpers shared by the model dir, checkpoints and the dataset store. Imports nothing heavy."""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from pathlib import Path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_by_setting()


@functools.cache
def _umask_by_setting() -> int:
    # os.umask can only be read by setting it, process-wide: done once, not on every call, so no other
    # thread creates files under a changed umask more than that one moment.
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh temporary folder in `parent`, to be filled and renamed into place, with the mode a
    plain mkdir would give it (0o777 minus the umask): mkdtemp's private 0o700 would follow the folder
    to its final name and lock out the group a shared store or cluster file system relies on."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~umask())
    return path
