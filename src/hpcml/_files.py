"""File helpers: the one implementation of atomic writes (a file, a folder) and sha256. Imports nothing
heavy.

Atomic means: a reader, or a crash at any moment, sees either the old target or the complete new
one. Everything is written under a hidden temporary name next to the target (same file system, so
the rename is atomic), fsynced, renamed with `os.replace`, and the parent folder is fsynced so the
rename itself survives a power loss. On any exception the temporary is removed and the target is
untouched. New files and folders get the mode a plain `open`/`mkdir` would give (the umask's).
"""

from __future__ import annotations

import functools
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_dir", "atomic_file", "atomic_write", "fsync_dir", "fsync_file", "make_temp_dir", "save_figure",
    "sha256_file", "umask",
]  # fmt: skip


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


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


def _temp_name(path: Path) -> Path:
    # pid + random token: two processes (or threads) writing one target never share a temporary; the
    # target's suffix stays last, for writers that pick the format from it (savefig, np.savez).
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path` for a writer that opens the file itself (pyarrow,
    savefig, np.savez); when the block ends without an exception the file is fsynced and renamed to
    `path`, then the folder is fsynced. On an exception the temporary is removed, `path` untouched."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` atomically and durably (see the module docstring)."""
    with atomic_file(path) as tmp:
        if isinstance(data, str):
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(data)
        else:
            with open(tmp, "wb") as f:
                f.write(data)


def save_figure(fig: Any, path: Path, *, dpi: int = 100) -> Path:
    """Lay out a matplotlib figure, render it to `path` atomically (the format from the suffix) and
    close it, also on failure."""
    import matplotlib.pyplot as plt  # lazy: only callers that draw pay for matplotlib

    try:
        fig.tight_layout()
        with atomic_file(path) as tmp:  # the temporary keeps the suffix savefig reads the format from
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path


def _fsync_tree(root: Path) -> None:
    """Every file and folder under `root`, then `root`: deepest first, so each folder's entries are
    durable before the folder itself."""
    for folder, dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(folder, name))
        for name in dirs:
            fsync_dir(Path(folder, name))
    fsync_dir(root)


def _swap(tmp: Path, path: Path) -> None:
    """Rename `tmp` to `path`; an existing folder there is renamed aside first (put back if the second
    rename fails), then deleted, so no partly deleted folder ever carries the final name."""
    if not path.is_dir() or path.is_symlink():
        os.replace(tmp, path)  # a file in the way is an error (NotADirectoryError), never replaced
        return
    aside = path.with_name(f".{path.name}.del-{secrets.token_hex(4)}")
    os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _merge(tmp: Path, path: Path) -> None:
    """Rename each entry of `tmp` into `path`, replacing files of the same name (each rename is atomic;
    the set is not, but it only starts once every entry is complete and durable)."""
    for entry in sorted(tmp.iterdir()):
        os.replace(entry, path / entry.name)


@contextmanager
def atomic_dir(path: str | Path, *, merge: bool = False) -> Iterator[Path]:
    """Yield a temporary folder for the caller to fill; when the block ends without an exception every
    file and folder in it is fsynced, and it is moved into place, then the parent is fsynced.

    Default: the folder becomes `path` (a sibling temporary `.<name>.tmp-*`, renamed); an existing
    folder at `path` is replaced (moved aside `.<name>.del-*`, then deleted). `merge=True`: `path` is a
    shared folder (a results folder) and the temporary's entries are renamed into it one by one.
    On an exception the temporary folder is removed and `path` is untouched.
    """
    path = Path(path)
    if merge:
        path.mkdir(parents=True, exist_ok=True)
        tmp, parent = make_temp_dir(path, ".tmp-"), path
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, parent = make_temp_dir(path.parent, f".{path.name}.tmp-"), path.parent
    try:
        yield tmp
        _fsync_tree(tmp)
        (_merge if merge else _swap)(tmp, path)
        fsync_dir(parent)
    finally:
        if tmp.exists():  # gone after a successful swap; an emptied leftover after a merge
            shutil.rmtree(tmp, ignore_errors=True)
