"""What a fresh install gives a user: own-data dependencies, `python -m hpcml`, typing marker, license,
and extras that say exactly what to install."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import requires
from pathlib import Path

import pytest

from hpcml.config import TrainConfig, merge

REPO = Path(__file__).resolve().parents[1]


def _core_requirements() -> set[str]:
    names = set()
    for req in requires("hpcml") or []:
        if "extra ==" not in req:
            names.add(req.split(";")[0].split(">")[0].split("=")[0].split("[")[0].strip().lower())
    return names


def test_own_data_dependencies_are_core():
    # `hpcml train --data houses.csv` right after `make demo` must not need an extra
    assert {"pyarrow", "fsspec", "pillow"} <= _core_requirements()


def test_python_dash_m_hpcml_is_the_cli():
    r = subprocess.run(
        [sys.executable, "-m", "hpcml", "--version"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.startswith("hpcml ")


def test_wheel_ships_py_typed_license_and_main(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(REPO),
         "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob("hpcml-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hpcml/py.typed" in names and "hpcml/__main__.py" in names
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "Apache License" in (REPO / "LICENSE").read_text()


def test_merge_leaves_the_base_config_alone():
    base = TrainConfig(model={"name": "mlp", "kwargs": {"hidden": 32}}).model_dump(mode="json")
    kwargs = {"depth": 3}
    merged = merge(base, {"model.kwargs.hidden": 64, "optim.lr": 0.5, "data.columns": ["a"]})
    assert base["model"]["kwargs"] == {"hidden": 32} and base["optim"]["lr"] is None
    assert merged["model"]["kwargs"] == {"hidden": 64} and merged["optim"]["lr"] == 0.5
    merged2 = merge(base, {"model.kwargs": kwargs})
    merged2["model"]["kwargs"]["depth"] = 9
    assert kwargs == {"depth": 3}


_BLOCKED = "import sys; sys.modules[{mod!r}] = None; from hpcml.cli import main; sys.exit(main({argv!r}))"


@pytest.mark.parametrize(
    ("module", "argv", "extra", "env"),
    [
        ("ray", ["sweep", "--param", "lr=0.1", "--backend", "ray", "--out", "{tmp}/s"], "ray", {}),
        ("cryptography", ["train", "--epochs", "1", "--out", "{tmp}/r"], "crypto", {"HPCML_KEY": "ab" * 32}),
    ],
)
def test_a_missing_extra_names_the_exact_pip_install(tmp_path, module, argv, extra, env):
    import os

    argv = [a.format(tmp=tmp_path) for a in argv]
    r = subprocess.run(
        [sys.executable, "-c", _BLOCKED.format(mod=module, argv=argv)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, **env},
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert f"pip install 'hpcml[{extra}]'" in r.stderr and "Traceback" not in r.stderr
