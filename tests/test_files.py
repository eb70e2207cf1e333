"""File helpers: atomic files and folders (old content intact and no temporary left on failure, modes
from the umask); folders written through a temporary sibling get the umask's mode, not mkdtemp's 0700.

Failures are real: a writer callable that writes half and raises, a string that cannot be encoded, a
folder standing where a file should go. No mocks of the file system."""

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest

import hpcml
from hpcml._files import atomic_dir, atomic_file, atomic_write, save_figure, umask
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


# ---- atomic_write / atomic_file ---------------------------------------------------------------------------


class _DiskFull(OSError):
    pass


def _half_then_fail(data: bytes):
    """A writer that opens the temporary itself (like pyarrow or savefig) and dies halfway."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
        raise _DiskFull(28, "No space left on device")

    return write


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_content_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "report.json"
    atomic_write(target, "old")
    atomic_write(target, b"new \xff bytes")
    assert target.read_bytes() == b"new \xff bytes"
    atomic_write(target, "ünïcode\n")
    assert target.read_text(encoding="utf-8") == "ünïcode\n"
    assert _entries(tmp_path) == ["report.json"]


def test_writer_failing_midway_keeps_old_content_and_no_temp_file(tmp_path):
    target = tmp_path / "out.parquet"
    target.write_bytes(b"old content")
    with pytest.raises(_DiskFull), atomic_file(target) as tmp:
        assert (
            tmp.parent == tmp_path and tmp.name.startswith(".out.parquet.tmp-") and tmp.suffix == ".parquet"
        )
        _half_then_fail(b"0123456789" * 100)(tmp)
    assert target.read_bytes() == b"old content"
    assert _entries(tmp_path) == ["out.parquet"]


def test_atomic_write_of_unencodable_text_keeps_old_content(tmp_path):
    target = tmp_path / "config.yaml"
    target.write_text("epochs: 1\n")
    with pytest.raises(UnicodeEncodeError):
        atomic_write(target, "epochs: 2\n\ud800")  # a lone surrogate fails inside the write
    assert target.read_text() == "epochs: 1\n"
    assert _entries(tmp_path) == ["config.yaml"]


def test_failed_rename_removes_the_temp_file(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep").write_text("x")  # a non-empty folder where the file should go: rename fails
    with pytest.raises(OSError):
        atomic_write(target, "data")
    assert _entries(tmp_path) == ["taken"] and _entries(target) == ["keep"]


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_file_mode_follows_the_umask(tmp_path, mask, mode):
    target = tmp_path / "f.txt"
    with _umask(mask):
        atomic_write(target, "a")
        with atomic_file(tmp_path / "g.bin") as tmp:
            tmp.write_bytes(b"b")  # a writer that opens the file itself
    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "g.bin").stat().st_mode) == mode


# ---- atomic_dir -------------------------------------------------------------------------------------------


def _fill(folder: Path, **files: str) -> None:
    for name, text in files.items():
        (folder / name).write_text(text)


def test_atomic_dir_creates_and_replaces_a_folder(tmp_path):
    out = tmp_path / "deep" / "model"
    with atomic_dir(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".model.tmp-")
        _fill(tmp, a="1", b="2")
        (tmp / "sub").mkdir()
        _fill(tmp / "sub", c="3")
    assert _entries(out) == ["a", "b", "sub"] and (out / "sub" / "c").read_text() == "3"
    with atomic_dir(out) as tmp:
        _fill(tmp, z="new")
    assert _entries(out) == ["z"]  # replaced as a whole, nothing of the old folder left
    assert _entries(out.parent) == ["model"]


def test_atomic_dir_failure_leaves_target_untouched_and_no_temp_dir(tmp_path):
    out = tmp_path / "store"
    with atomic_dir(out) as tmp:
        _fill(tmp, old="1")
    with pytest.raises(_DiskFull), atomic_dir(out) as tmp:
        _fill(tmp, shard="x")
        _half_then_fail(b"manifest" * 10)(tmp / "manifest.json")
    assert _entries(out) == ["old"] and (out / "old").read_text() == "1"
    assert _entries(tmp_path) == ["store"]
    with pytest.raises(_DiskFull), atomic_dir(tmp_path / "never") as tmp:
        _half_then_fail(b"x" * 10)(tmp / "f")
    assert _entries(tmp_path) == ["store"]


def test_atomic_dir_refuses_to_replace_a_file(tmp_path):
    out = tmp_path / "model"
    out.write_text("a file, not a model dir")
    with pytest.raises(NotADirectoryError), atomic_dir(out) as tmp:
        _fill(tmp, a="1")
    assert out.read_text() == "a file, not a model dir"
    assert _entries(tmp_path) == ["model"]


def test_atomic_dir_merge_adds_files_and_keeps_others(tmp_path):
    out = tmp_path / "benchmarks"
    out.mkdir()
    _fill(out, **{"old.json": "keep", "run.json": "v1"})
    with atomic_dir(out, merge=True) as tmp:
        assert tmp.parent == out
        _fill(tmp, **{"run.json": "v2", "run.md": "table"})
    assert _entries(out) == ["old.json", "run.json", "run.md"]
    assert (out / "run.json").read_text() == "v2" and (out / "old.json").read_text() == "keep"
    with pytest.raises(_DiskFull), atomic_dir(out, merge=True) as tmp:
        _fill(tmp, **{"run.json": "v3"})
        _half_then_fail(b"png" * 10)(tmp / "run.png")
    assert _entries(out) == ["old.json", "run.json", "run.md"]  # nothing lands unless all was written
    assert (out / "run.json").read_text() == "v2"


@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_atomic_dir_modes_follow_the_umask(tmp_path, mask, dir_mode, file_mode):
    with _umask(mask):
        with atomic_dir(tmp_path / "out") as tmp:
            _fill(tmp, a="1")
            (tmp / "sub").mkdir()
    assert _modes(tmp_path / "out") == ({dir_mode}, {file_mode})


def test_save_figure_writes_png_atomically_and_closes_the_figure(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and _entries(tmp_path) == ["curves.png"]
    assert not plt.fignum_exists(fig.number)
    (tmp_path / "taken.png").mkdir()
    (tmp_path / "taken.png" / "keep").write_text("x")
    fig2, _ = plt.subplots()
    with pytest.raises(OSError):
        save_figure(fig2, tmp_path / "taken.png")
    assert not plt.fignum_exists(fig2.number)
    assert _entries(tmp_path) == ["curves.png", "taken.png"]
