"""Whole runs that die and resume: SIGKILL mid-epoch, a corrupt newest checkpoint, elastic restarts,
encryption of the model dir. Each is compared with an uninterrupted run (torch.equal)."""

from __future__ import annotations

import json
import signal

import pytest
import torch
import yaml
from hpcml_testkit import TraceSamples, spec
from safetensors.torch import load_file

import hpcml

KEY = "11" * 32  # a test key (hex); real keys come from a 0600 file


@pytest.fixture
def cfg(small_cfg):
    # 480 train rows / batch 64 = 8 steps per epoch; checkpoints every 5 steps fall mid-epoch
    return {**small_cfg, "epochs": 3, "checkpoint": {"every": "5", "keep": 2}}


def _weights(run_dir):
    return load_file(str(run_dir / "model" / "model.safetensors"))


def _assert_equal_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def _trace(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _set_trace(run_dir, path):
    """Point the TraceSamples callback in a run's config.yaml to another file (callbacks may change
    between a checkpoint and its resume: they do not change what the run computes)."""
    doc = yaml.safe_load((run_dir / "config.yaml").read_text())
    for c in doc["callbacks"]:
        if c["spec"].endswith(":TraceSamples"):
            c["kwargs"]["path"] = str(path)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(doc))


def _write_cfg(tmp_path, cfg):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_sigkill_mid_epoch_then_resume_is_bit_exact(tmp_path, cfg, cli):
    ref = hpcml.train(cfg, out=tmp_path / "ref", callbacks=[TraceSamples(str(tmp_path / "trace-ref.jsonl"))])

    run = tmp_path / "run"
    faulty = {**cfg, "callbacks": [
        spec("TraceSamples", path=str(tmp_path / "trace-a.jsonl")),
        spec("FailAt", rank=0, step=13, mode="kill"),  # SIGKILL just before step 13 (epoch 2)
    ]}  # fmt: skip
    killed = cli("train", "--config", str(_write_cfg(tmp_path, faulty)), "--out", str(run), "--quiet")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (run / "report.json").exists() and not (run / "model").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000005", "step-00000010"]

    # the resumed run takes the same config.yaml (callbacks included); FailAt fires on a fresh start only
    _set_trace(run, tmp_path / "trace-b.jsonl")
    resumed = cli("train", "--resume", str(run), "--json")
    assert resumed.returncode == 0, resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["resumed_from_step"] == 10 and report["restarts"] == 1
    assert report["steps"] == ref.report["steps"] == 24 and report["epochs"] == 3
    _assert_equal_weights(run, ref.dir)
    # metrics: the resumed run's epochs equal the uninterrupted run's, epoch 2 included (half of it
    # was trained before the kill: its partial sums came back from the checkpoint)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for got, want in zip(rows, ref.metrics, strict=True):
        assert got["test_accuracy"] == want["test_accuracy"]
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-6)

    # samples: failed run up to its checkpoint + resumed run == uninterrupted run, no repeats or skips
    failed, after, whole = (_trace(tmp_path / f"trace-{n}.jsonl") for n in ("a", "b", "ref"))
    assert [t["step"] for t in failed] == list(range(13))  # steps 0..12 ran before the kill
    assert after[0]["step"] == 10
    seen = [t["samples"] for t in failed if t["step"] < 10] + [t["samples"] for t in after]
    assert seen == [t["samples"] for t in whole]
    per_epoch = [sorted(s for batch in seen[e * 8 : (e + 1) * 8] for s in batch) for e in range(3)]
    assert all(ids == list(range(480)) for ids in per_epoch)


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, cfg, cli):
    ref = hpcml.train(cfg, out=tmp_path / "ref")
    run = tmp_path / "run"
    faulty = {**cfg, "callbacks": [spec("FailAt", rank=0, step=18)]}
    failed = cli("train", "--config", str(_write_cfg(tmp_path, faulty)), "--out", str(run), "--quiet")
    assert failed.returncode == 1 and "injected failure at step 18" in failed.stderr
    # checkpoints at steps 10 and 15 remain; flip a byte in the newest one's weights
    newest = run / "checkpoints" / "step-00000015" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    resumed = cli("train", "--resume", str(run), "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping checkpoint" in resumed.stderr and "step-00000015" in resumed.stderr
    assert "sha256" in resumed.stderr
    assert json.loads(resumed.stdout)["resumed_from_step"] == 10
    _assert_equal_weights(run, ref.dir)


def test_resume_refusals(tmp_path, cfg, cli):
    run = hpcml.train(cfg, out=tmp_path / "run").dir
    again = cli("train", "--config", str(run / "config.yaml"), "--out", str(run))
    assert again.returncode == 2 and "already has checkpoints" in again.stderr and "--resume" in again.stderr
    changed = cli("train", "--resume", str(run), "--lr", "0.5")
    assert changed.returncode == 2 and "drop optim.lr" in changed.stderr
    nothing = cli("train", "--resume", str(tmp_path / "nope"))
    assert nothing.returncode == 2 and "not a run dir" in nothing.stderr
    # a finished run resumes to the same report without training again
    done = cli("train", "--resume", str(run), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == 24


def test_checkpoint_write_failure_policy(tmp_path, cfg, monkeypatch):
    from hpcml.training import checkpoint

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_manifest", full_disk)
    with pytest.raises(hpcml.HpcmlError, match="checkpoint at step 5 failed, so the run stops.*No space"):
        hpcml.train(cfg, out=tmp_path / "stop")
    assert not (tmp_path / "stop" / "report.json").exists()
    assert not list((tmp_path / "stop" / "checkpoints").iterdir())  # no partial folder left

    cont = {**cfg, "checkpoint": {**cfg["checkpoint"], "on_error": "continue"}}
    with pytest.warns(UserWarning, match="training goes on"):
        run = hpcml.train(cont, out=tmp_path / "go")
    assert run.report["steps"] == 24
    assert len(run.report["checkpoints"]["failures"]) == 5  # steps 5, 10, 15, 20 and the final one


def test_encrypted_model_dir_and_checkpoints(tmp_path, cfg, monkeypatch, cli):
    monkeypatch.setenv("HPCML_KEY", KEY)
    run = hpcml.train(cfg, out=tmp_path / "enc")
    assert run.report["checkpoints"]["encrypted"] is True
    text = (run.dir / "model" / "model.json").read_text()
    assert KEY not in text and "architecture" not in text and "preprocessing" not in text
    assert KEY not in (run.dir / "report.json").read_text() + (run.dir / "config.yaml").read_text()
    with pytest.raises(Exception):  # noqa: B017 - ciphertext is not a safetensors file
        load_file(str(run.dir / "model" / "model.safetensors"))
    model = hpcml.load_model(run.dir / "model")
    x = torch.randn(5, 8).numpy()
    assert (model.predict(x) == run.model.predict(x)).all()

    monkeypatch.delenv("HPCML_KEY")
    with pytest.raises(hpcml.UsageError, match="encrypted; set HPCML_KEY_FILE"):
        hpcml.load_model(run.dir / "model")
    monkeypatch.setenv("HPCML_KEY", "22" * 32)
    with pytest.raises(hpcml.HpcmlError, match="wrong key"):
        hpcml.load_model(run.dir / "model")
    resumed = cli("train", "--resume", str(run.dir))
    assert resumed.returncode == 1 and "key" in resumed.stderr and "22" * 32 not in resumed.stderr

    monkeypatch.setenv("HPCML_KEY", KEY)
    doc = json.loads(text)
    doc["weights_sha256"] = "0" * 64
    (run.dir / "model" / "model.json").write_text(json.dumps(doc))
    with pytest.raises(hpcml.HpcmlError, match="model.json was modified"):
        hpcml.load_model(run.dir / "model")


def test_elastic_restart_resumes_and_matches_uninterrupted(tmp_path, cfg):
    cfg = {**cfg, "batch_size": 32}  # 2 ranks x 32 = global 64, the same 8 steps per epoch
    ref = hpcml.train(cfg, out=tmp_path / "ref", nproc=2)
    kill = {**cfg, "callbacks": [spec("FailAt", rank=1, step=13, mode="kill")]}  # before step 13
    run = hpcml.train(kill, out=tmp_path / "run", nproc=2, max_restarts=1)
    assert run.report["resumed_from_step"] == 10 and run.report["restarts"] == 1
    assert run.report["steps"] == 24 and run.report["world_size"] == 2
    _assert_equal_weights(run.dir, ref.dir)


def test_a_config_field_added_after_the_checkpoint_counts_at_its_default(tmp_path):
    """A checkpoint written before `ddp.*` existed resumes when those fields are at their defaults."""
    from hpcml.config import TrainConfig
    from hpcml.training.resume import check_config_unchanged

    now = TrainConfig().model_dump(mode="json")
    saved = {k: v for k, v in now.items() if k != "ddp"}
    check_config_unchanged(saved, now, where=tmp_path / "config.yaml")
    changed = {**now, "ddp": {**now["ddp"], "grad_compression": "bf16"}}
    with pytest.raises(hpcml.UsageError, match=r"ddp\.grad_compression 'none' -> 'bf16'"):
        check_config_unchanged(saved, changed, where=tmp_path / "config.yaml")
