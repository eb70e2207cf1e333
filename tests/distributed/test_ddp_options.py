"""DDP gradient exchange options (ddp.grad_compression, ddp.bucket_mb), the bench's communication
measurement and the plan's local check, with real gloo ranks on 127.0.0.1."""

import pytest
import torch
from safetensors.torch import load_file

import hpcml
from hpcml.config import DDPConfig, build_config
from hpcml.distributed.dist import bucket_mb

BASE = {
    "data": {"name": "synthetic", "rows": 1000, "features": 8, "classes": 3},
    "model": {"name": "mlp", "kwargs": {"hidden": 32}},
    "epochs": 5,
    "threads": 1,
    "precision": "fp32",
    "optim": {"name": "sgd", "lr": 0.05},
    "batch_size": 32,
}
# bf16 keeps 8 bits of mantissa: each averaged gradient is off by up to 2^-9 relative. Over 5 epochs
# the losses moved by 5e-5 relative when measured; 1e-3 is the stated tolerance.
BF16_LOSS_RTOL = 1e-3


def test_compression_and_bucket_config_errors_name_the_field(cli):
    with pytest.raises(hpcml.UsageError, match=r"ddp\.grad_compression: Input should be 'none', 'bf16'"):
        build_config({"ddp": {"grad_compression": "int8"}})
    for bad in (0, -2, "big", 4096, True):
        with pytest.raises(hpcml.UsageError, match=r"ddp\.bucket_mb: expected auto or a size in MB"):
            build_config({"ddp": {"bucket_mb": bad}})
    assert build_config({"ddp": {"bucket_mb": "8"}}).ddp.bucket_mb == 8.0
    r = cli("train", "--grad-compression", "zip", "--bucket-mb", "-1", "-q")
    assert r.returncode == 2
    assert "ddp.grad_compression" in r.stderr and "ddp.bucket_mb" in r.stderr and "Traceback" not in r.stderr


def test_bucket_auto_is_one_bucket_for_a_small_model():
    mib = 2**20
    assert bucket_mb(DDPConfig(), 5_292_072) == 6  # the bench's MLP: 5.05 MiB -> one 6 MiB bucket
    assert bucket_mb(DDPConfig(), 1000) == 1
    assert bucket_mb(DDPConfig(), 400 * mib) is None  # large models keep DDP's default buckets
    assert bucket_mb(DDPConfig(), 5_292_072, "cuda") is None  # NCCL overlaps: DDP's default there
    assert bucket_mb(DDPConfig(bucket_mb=2.5), 400 * mib) == 2.5


def test_bf16_compression_keeps_the_loss_curve(tmp_path):
    exact = hpcml.train(BASE, out=tmp_path / "none", nproc=2)
    bf16 = hpcml.train({**BASE, "ddp": {"grad_compression": "bf16"}}, out=tmp_path / "bf16", nproc=2)
    curves = {
        name: [(m["train_loss"], m["test_loss"]) for m in run.metrics]
        for name, run in (("none", exact), ("bf16", bf16))
    }
    assert len(curves["bf16"]) == len(curves["none"]) == 5
    for (a_train, a_test), (b_train, b_test) in zip(curves["bf16"], curves["none"], strict=True):
        assert a_train == pytest.approx(b_train, rel=BF16_LOSS_RTOL), curves
        assert a_test == pytest.approx(b_test, rel=BF16_LOSS_RTOL), curves
    # the hook ran: the weights are not those of the exact run
    w_exact = load_file(str(exact.dir / "model" / "model.safetensors"))
    w_bf16 = load_file(str(bf16.dir / "model" / "model.safetensors"))
    assert any(not torch.equal(w_exact[k], w_bf16[k]) for k in w_exact)
    assert exact.report["ddp"]["grad_compression"] == "none"
    assert bf16.report["ddp"]["grad_compression"] == "bf16"
    assert exact.report["ddp"]["buckets"] == 1 and exact.report["ddp"]["bucket_mb_setting"] == "auto"
    one = hpcml.train({**BASE, "epochs": 1, "batch_size": 64}, out=tmp_path / "one")
    assert one.report["ddp"] is None  # one process: no gradient exchange to record


def test_plan_local_check_measures_two_ranks_beside_the_projection():
    from hpcml.bench import plan

    res = plan(BASE, steps=3, repeats=1, max_ranks=4)
    c = res["local_check"]
    assert "skipped" not in c, c
    m = c["measured"]
    v = {k: s["median"] for k, s in m["variants"].items()}
    assert set(v) == {"1 process", "ddp", "no communication"} and all(t > 0 for t in v.values())
    assert m["communication_share"] == pytest.approx((v["ddp"] - v["no communication"]) / v["ddp"])
    assert c["measured_efficiency"] == pytest.approx(v["1 process"] / v["ddp"])
    link = c["link"]
    assert link["source"] == "measured" and link["bandwidth"] > 0 and link["latency"] > 0
    # the projection of 2 ranks on the measured link, recomputed: t_c + 1 * bytes / bw + latency * 1
    comm = res["wire_bytes"] / link["bandwidth"] + link["latency"]
    assert c["projected_step_seconds"] == pytest.approx(v["1 process"] + comm)
    assert c["projected_from_2_ranks_compute_seconds"] == pytest.approx(v["no communication"] + comm)
