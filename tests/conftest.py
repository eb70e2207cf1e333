"""Shared test setup: a per-session dataset cache, small configs, a CLI runner in a real process."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # the test kit's callbacks (hpcml_testkit.py) must import in every process a test starts
    here = str(Path(__file__).parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, here)
    # Ray reads its loopback switch when first imported, and tests import Ray before hpcml starts its
    # local instance (which sets it itself when it imports Ray first: tests/jobs/test_sweep.py checks)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # HPCML_TEST_CPU_FLAGS=avx2 (or avx512_bf16): every process of the run sees that CPU, so one machine
    # runs the suite on the other CPU's precision paths too (see cpu_override/sitecustomize.py).
    if os.environ.get("HPCML_TEST_CPU_FLAGS"):
        here = str(Path(__file__).parent / "cpu_override")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        runpy.run_path(f"{here}/sitecustomize.py")  # this process: patched as the subprocesses will be
        import torch

        from hpcml.training.precision import resolve_precision

        print(
            f"hpcml tests: CPU flags {os.environ['HPCML_TEST_CPU_FLAGS']!r}: precision auto = "
            f"{resolve_precision('auto', torch.device('cpu'))[0]}"
        )


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # Generated datasets (MNIST-1D takes a few seconds) are cached once per session, not in $HOME.
    path = os.environ.get("HPCML_TEST_CACHE") or str(tmp_path_factory.mktemp("hpcml-cache"))
    os.environ["HPCML_CACHE_DIR"] = path
    yield path


@pytest.fixture
def one_thread():
    """torch at 1 thread for the test: for many small convolutions on a busy machine a second OpenMP
    thread mostly waits for its descheduled sibling (several times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_cfg() -> dict:
    """A tiny, fast classification run (synthetic tabular data, MLP)."""
    return {
        "data": {"name": "synthetic", "rows": 600, "features": 8, "classes": 3},
        "model": {"name": "mlp", "kwargs": {"hidden": 32}},
        "epochs": 3,
        "batch_size": 64,
        "threads": 1,
        "precision": "fp32",  # numerics are compared: never the CPU-dependent auto choice
    }


def _run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpcml.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture
def cli():
    """Run the real `hpcml` console entry point in a fresh process: cli("train", "--json")."""
    return _run_cli
