"""`hpcml serve --backend ray` for real: the command in a subprocess, on a local Ray instance that
hpcml starts (127.0.0.1, token auth), the same app on Ray Serve with 2 replicas, real HTTP clients.

Predictions are compared with `hpcml predict`'s file, exactly; the token is required; /ready is 200
as soon as the command says where it listens (Serve routes only to replicas whose model is loaded);
SIGTERM deletes the deployment and the command exits 0.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("ray.serve")

TOKEN = "test-token-ray-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FEATURES, CLASSES = 4, 3  # the clf_dir fixture (conftest.py)


def _listening(proc: subprocess.Popen, err: Path) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.search(r"on http://127\.0\.0\.1:(\d+) \(Ray Serve", err.read_text())
        if m:
            return f"http://127.0.0.1:{m.group(1)}"
        if proc.poll() is not None:
            raise AssertionError(f"hpcml serve exited {proc.returncode}: {err.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"hpcml serve --backend ray did not start: {err.read_text()}")


def _outside_address() -> str | None:
    """This machine's address on its default route (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP: nothing is sent
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_ray_backend_two_replicas_same_answers_token_and_clean_stop(clf_dir, tmp_path, cli):
    x = np.random.default_rng(5).normal(size=(29, FEATURES)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "pred.parquet"
    r = cli(
        "predict", str(clf_dir), "--input", str(tmp_path / "x.npy"), "--output", str(out), "--probabilities"
    )
    assert r.returncode == 0, r.stderr
    expected = pq.read_table(out).to_pydict()

    err = tmp_path / "serve.err"
    audit = tmp_path / "audit.jsonl"
    cmd = [sys.executable, "-m", "hpcml.cli", "serve", str(clf_dir), "--backend", "ray", "--replicas", "2"]
    cmd += ["--port", "0", "--threads", "1", "--audit-log", str(audit)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, stderr=f, env={**env, "HPCML_SERVE_TOKEN": TOKEN})
    try:
        url = _listening(proc, err)
        port = int(url.rsplit(":", 1)[1])
        with httpx.Client(timeout=30) as c:
            assert c.get(f"{url}/ready").status_code == 200  # replicas were loaded before it said so
            assert c.get(f"{url}/health").json() == {"status": "alive"}
            p = f"{url}/v1/predict"
            row = {"rows": x[:1].tolist()}
            assert c.post(p, json=row).status_code == 401
            wrong = c.post(p, json=row, headers={"Authorization": "Bearer " + "x" * len(TOKEN)})
            assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
            assert c.get(f"{url}/metrics").status_code == 401
            answers = [
                c.post(p, headers=AUTH, json={"rows": x.tolist(), "probabilities": True}) for _ in range(4)
            ]
            named = [{f"f{j}": float(v) for j, v in enumerate(row)} for row in x]
            by_name = c.post(p, headers=AUTH, json={"rows": named}).json()
            too_many = c.post(p, headers=AUTH, json={"rows": x.tolist() * 40})  # 1160 > 1024 rows
            info = c.get(f"{url}/v1/model", headers=AUTH).json()
        for a in answers:  # whichever replica answered: the rows `hpcml predict` wrote
            assert a.status_code == 200, a.text
            got = a.json()
            assert got["predictions"] == expected["prediction"] == by_name["predictions"]
            for k, name in enumerate(got["classes"]):
                probs = np.float32([q[k] for q in got["probabilities"]])
                assert np.array_equal(probs, np.float32(expected[f"prob_{name}"]))
        assert too_many.status_code == 413
        assert info["architecture"] == "mlp" and info["classes"] == [str(k) for k in range(CLASSES)]
        outside = _outside_address()
        if outside is not None:  # Serve's proxy listens on loopback only
            with pytest.raises(OSError), socket.create_connection((outside, port), timeout=2):
                pass
        lines = audit.read_text().splitlines()
        assert any('"status": 401' in line for line in lines) and TOKEN not in audit.read_text()

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, err.read_text()
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=2):
            pass  # the deployment and its proxy are gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_ray_backend_refuses_workers_and_plain_http_off_loopback(clf_dir, cli):
    r = cli("serve", str(clf_dir), "--backend", "ray", "--workers", "2")
    assert r.returncode != 0 and "--replicas" in r.stderr
    r = cli("serve", str(clf_dir), "--backend", "ray", "--host", "0.0.0.0", "--port", "0")
    assert r.returncode != 0 and "--tls-cert" in r.stderr


@pytest.mark.slow  # Serve tries a failing replica 3 times before it gives up (~30 s)
def test_ray_backend_model_that_cannot_load_fails_with_its_reason(clf_dir, tmp_path, cli, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in clf_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-8:] = bytes(8)
    weights.write_bytes(bytes(blob))
    monkeypatch.setenv("HPCML_SERVE_TOKEN", TOKEN)
    r = cli("serve", str(bad), "--backend", "ray", "--replicas", "1", "--port", "0", timeout=180)
    assert r.returncode == 1 and "sha256 mismatch" in r.stderr, r.stderr
