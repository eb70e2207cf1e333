"""hpcml bench: FLOP counts, timing statistics, doctor hints, CLI errors, and one quick-suite smoke run.

No timing assertions: speed targets live in the bench output, not in tests.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from hpcml.bench import parse_cases
from hpcml.bench.cases import goal
from hpcml.bench.doctor import hints
from hpcml.bench.flops import datasheet_peak, forward_flops, measured_matmul_peak, train_step_flops
from hpcml.bench.timers import interleave, ratio, summarize
from hpcml.errors import UsageError
from hpcml.models.registry import create_model
from hpcml.training.precision import available_cores

CASES = [
    "time-to-accuracy",
    "throughput",
    "mfu",
    "scaling",
    "predict",
    "breakdown",
    "precision",
    "busy",
    "compress",
    "serve",
]  # the quick suite; the full suite adds "images"


# --- FLOPs ---------------------------------------------------------------------------------------


def test_linear_flops_are_2mnk_forward_and_3x_with_backward():
    m, k, n = 32, 64, 48
    layer = nn.Linear(k, n, bias=False)
    x = torch.randn(m, k, requires_grad=True)  # input grad too: backward is two matmuls
    assert forward_flops(layer, x) == 2 * m * n * k
    step = train_step_flops(nn.Sequential(layer), x, torch.randint(0, n, (m,)))
    assert step == 3 * 2 * m * n * k
    assert layer.weight.grad is None  # counting leaves no gradients behind


def test_mlp_flops_match_the_analytic_count():
    m, d0, h, c = 16, 40, 128, 10
    model = create_model("mlp", input_shape=(d0,), num_outputs=c, hidden=h, depth=2)
    x, y = torch.randn(m, d0), torch.randint(0, c, (m,))
    layers = [(d0, h), (h, h), (h, c)]
    fwd = sum(2 * m * a * b for a, b in layers)
    # backward: weight grads for every layer, input grads for all but the first (x needs none)
    bwd = sum(2 * m * a * b for a, b in layers) + sum(2 * m * a * b for a, b in layers[1:])
    assert forward_flops(model, x) == fwd
    assert train_step_flops(model, x, y) == fwd + bwd


def test_datasheet_peaks_by_device_name():
    assert datasheet_peak("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert datasheet_peak("NVIDIA H100 PCIe", "fp32") == pytest.approx(51.2e12)
    assert datasheet_peak("NVIDIA A100-SXM4-40GB", "tf32") == pytest.approx(156e12)
    assert datasheet_peak("Tesla T4", "bf16") is None  # no bf16 on Turing
    assert datasheet_peak("Some Future GPU", "fp32") is None


def test_measured_matmul_peak_restores_threads():
    before = torch.get_num_threads()
    p = measured_matmul_peak(threads=1, n=256, repeats=2)
    assert p["flops_per_second"] > 0 and p["n"] == 256 and p["threads"] == 1
    assert p["flops_per_second"] == pytest.approx(2 * 256**3 / p["seconds"])
    assert torch.get_num_threads() == before


# --- timing statistics -----------------------------------------------------------------------------


def test_summarize_median_min_max():
    assert summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "ok": 3, "runs": 3}
    assert summarize([4.0, 1.0])["median"] == 2.5


def test_summarize_ranks_a_miss_below_every_result():
    s = summarize([1.0, None])  # time to target: None = never reached = worst
    assert (s["median"], s["min"], s["max"], s["ok"]) == (None, 1.0, None, 1)
    assert summarize([1.0, 2.0, None])["median"] == 2.0
    s = summarize([None, 5.0, 7.0], higher_is_better=True)
    assert (s["median"], s["min"], s["max"]) == (5.0, None, 7.0)
    assert summarize([])["median"] is None


def test_interleave_warms_up_then_alternates():
    calls = []
    runs = interleave(
        {
            "a": lambda r: calls.append(("a", r)) or {"v": r},
            "b": lambda r: calls.append(("b", r)) or {"v": r},
        },
        repeats=2,
    )
    assert calls == [("a", -1), ("b", -1), ("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert runs == {"a": [{"v": 0}, {"v": 1}], "b": [{"v": 0}, {"v": 1}]}


def test_ratio_and_goal_notes():
    assert ratio(3.0, 2.0) == 1.5 and ratio(None, 2.0) is None and ratio(1.0, 0.0) is None
    hit = goal("x", 2.5, 2.0, limit="L")
    assert hit["met"] is True and hit["note"].startswith("met")
    miss = goal("x", 1.5, 2.0, limit="the kernels")
    assert miss["met"] is False and "missed by 25%" in miss["note"] and "the kernels" in miss["note"]
    assert goal("x", None, 2.0, limit="L")["met"] is None


def test_parse_cases():
    assert parse_cases(None, "quick") == CASES and parse_cases(None) == [*CASES, "images"]
    assert parse_cases(["mfu,time_to_accuracy", "scaling"]) == ["time-to-accuracy", "mfu", "scaling"]
    with pytest.raises(UsageError, match="valid: time-to-accuracy, throughput"):
        parse_cases(["mfu,nope"])


# --- doctor ------------------------------------------------------------------------------------------


def _breakdown(**over):
    phases = {k: {"seconds_per_step": 0.001, "fraction": 0.0} for k in ("data", "communication")}
    phases |= {
        "forward": {"seconds_per_step": 0.004, "fraction": 0.4},
        "backward": {"seconds_per_step": 0.005, "fraction": 0.5},
        "optimizer": {"seconds_per_step": 0.001, "fraction": 0.1},
    }
    b = {
        "phases": phases,
        "phase_sum_seconds_per_step": 0.01,
        "loop_seconds_per_step": 0.01,
        "syncs_per_step": None,
        "threads": 2,
        "device_type": "cpu",
        "precision": "fp32",
        "batch_size": 1024,
        "mfu": 0.7,
    }
    return b | over


ENV = {"cores": 2, "nproc": 1, "loadavg": 0.5, "native_bf16": False, "cuda_bf16": False}


def _causes(b, env=ENV):
    return {h["cause"] for h in hints(b, env)}


def test_doctor_is_quiet_on_a_healthy_step():
    assert _causes(_breakdown()) == set()


def test_doctor_hints_fire_on_their_causes():
    b = _breakdown()
    b["phases"]["data"] = {"seconds_per_step": 0.006, "fraction": 0.6}
    assert _causes(b) == {"data loading dominates"}
    assert _causes(_breakdown(device_type="cuda", syncs_per_step=2.0)) == {"host syncs per step"}
    assert _causes(_breakdown(threads=4)) == {"threads oversubscribed"}
    assert _causes(_breakdown(), ENV | {"nproc": 2}) == {"threads oversubscribed"}
    assert _causes(_breakdown(), ENV | {"loadavg": 3.5}) == {"threads oversubscribed"}
    assert _causes(_breakdown(precision="bf16")) == {"precision not native"}
    assert _causes(_breakdown(precision="bf16"), ENV | {"native_bf16": True}) == set()
    assert _causes(_breakdown(device_type="cuda"), ENV | {"cuda_bf16": True}) == {"precision not native"}
    assert _causes(_breakdown(batch_size=8, mfu=0.02)) == {"batch too small for the hardware"}
    assert _causes(_breakdown(batch_size=8, mfu=0.5)) == set()


def test_doctor_cli_breaks_down_a_run_config(cli, tmp_path, small_cfg):
    from hpcml.config import build_config, dump_config

    cfg = small_cfg | {"batch_size": 4, "threads": available_cores() + 2}
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(build_config(cfg)))
    r = cli("bench", "--doctor", str(path), "--steps", "10", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    b = out["breakdown"]
    assert set(b["phases"]) == {"data", "forward", "backward", "optimizer", "communication"}
    assert sum(p["fraction"] for p in b["phases"].values()) == pytest.approx(1.0)
    assert b["phases"]["communication"]["fraction"] == 0.0 and b["world_size"] == 1
    assert b["batch_size"] == 4 and b["flops_per_step"] > 0
    causes = {h["cause"] for h in out["hints"]}
    assert {"threads oversubscribed", "batch too small for the hardware"} <= causes


def test_doctor_missing_config_is_a_usage_error(cli, tmp_path):
    r = cli("bench", "--doctor", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2
    assert "nope.yaml" in r.stderr and "Traceback" not in r.stderr


# --- CLI ---------------------------------------------------------------------------------------------


def test_bad_case_name_exits_2_listing_valid_names(cli, tmp_path):
    r = cli("bench", "--cases", "mfu,warp-speed", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "warp-speed" in r.stderr and "valid: " + ", ".join([*CASES, "images"]) in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_predict_case_is_skipped_with_the_reason_when_the_module_is_missing(monkeypatch, tmp_path):
    from hpcml.bench.cases import SUITES, Context
    from hpcml.bench.cases_parallel import predict_scaling

    monkeypatch.setitem(sys.modules, "hpcml.jobs.predict", None)  # import now raises ImportError
    case = predict_scaling(Context(SUITES["quick"], 1, 1, "cpu", tmp_path))
    assert case["status"] == "skipped" and "hpcml.jobs.predict" in case["reason"]


def test_missing_lightning_hint_keeps_its_extra_in_the_table(cli, tmp_path):
    """The printed table says `pip install 'hpcml[compare]'`; rich markup used to eat "[compare]"."""
    from hpcml.bench.baselines import lightning

    if lightning()[0] is not None:
        pytest.skip("Lightning is installed: the bench prints no install hint")
    r = cli("bench", "--cases", "throughput", "--repeat", "1", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped: Lightning is not installed (pip install 'hpcml[compare]')" in r.stdout, r.stdout
    assert "'hpcml')" not in r.stdout


def test_quick_suite_smoke(cli, tmp_path):
    """The whole quick suite through the real CLI, once: it runs and writes its files."""
    out = tmp_path / "bench"
    r = cli("bench", "--suite", "quick", "--out", str(out), "--stem", "b", "--json", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)  # stdout holds the JSON and nothing else
    assert json.loads((out / "b.json").read_text())["cases_run"] == CASES
    assert result["suite"] == "quick" and result["cases_run"] == CASES
    env = result["environment"]
    for key in ("cpu", "cores", "threads", "torch", "hpcml", "gpu", "date", "loadavg_start", "loadavg_end"):
        assert key in env
    cases = result["cases"]
    assert set(cases) == set(CASES)
    for name, case in cases.items():
        assert case["status"] in ("ok", "skipped"), name
        assert case["status"] == "ok" or case["reason"]
    for name in ("time-to-accuracy", "throughput"):
        c = cases[name]["contenders"]
        assert c["hpcml"]["summary"]["runs"] == 1 and c["plain"]["summary"]["runs"] == 1
        assert "summary" in c["lightning"] or "not installed" in c["lightning"]["skipped"]
        assert {"plain", "lightning"} <= set(cases[name]["speedups"])
    ttt = cases["time-to-accuracy"]
    run = ttt["contenders"]["hpcml"]["runs"][0]
    curve = run["curve"]
    assert curve and all(0.0 <= acc <= 1.0 for _, acc in curve) and run["model"] == "convnet1d"
    # times to each target are read off the curve (independently recomputed here)
    assert run["time_to_target"] == next((t for t, a in curve if a >= 0.94), None)
    assert run["time_to_985"] == next((t for t, a in curve if a >= 0.985), None)
    tuned = ttt["contenders"]["plain tuned"]["runs"][0]
    assert tuned["epochs_run"] == 15 and tuned["time_to_985"] == next(
        (t for t, a in tuned["curve"] if a >= 0.985), None
    )
    assert cases["mfu"]["flops_per_step"] > 0 and cases["mfu"]["measured_peak_flops"] > 0
    if available_cores() >= 2:
        assert [p["procs"] for p in cases["scaling"]["curve"]][:2] == [1, 2]
        comm = cases["scaling"]["communication"][0]
        v = {k: s["median"] for k, s in comm["variants"].items()}
        assert set(v) == {"1 process", "ddp", "no communication", "bf16 compression", "1 MB buckets"}
        assert comm["communication_share"] == pytest.approx((v["ddp"] - v["no communication"]) / v["ddp"])
        assert "DDP 2 ranks x 1 thread, gloo (case 4)" in cases["breakdown"]["configs"]
    goals = result["goals"]
    precision = cases["precision"]
    assert set(precision["auto_picks"]) == {
        "default recipe (convnet1d)",
        "MLP, batch 100",
        "compute-bound MLP",
    }
    for p in ("fp32", "bf16"):
        run = precision["contenders"][f"default recipe (convnet1d), {p}"]["runs"][0]
        assert run["train_seconds"] > 0 and 0.5 < run["test_accuracy"] <= 1.0
    busy = cases["busy"]
    if busy["status"] == "ok":
        assert {c["threads"][0] for k, c in busy["contenders"].items() if k.endswith("1 thread")} == {1}
    assert len(goals) == 8 + 3 + 3 + (cases["scaling"]["status"] == "ok") + 2 * (
        busy["status"] == "ok"
    ) + 4 * (cases["compress"]["status"] == "ok") + 4 * (cases["predict"]["status"] == "ok") and all(
        {"goal", "target", "value", "met", "note", "case"} <= set(g) for g in goals
    )

    md = (out / "b.md").read_text()
    assert "| goal | ratio | target | status | note |" in md
    for name in CASES:
        assert f"| {name} |" in md
    for plot in ("time-to-accuracy", "breakdown") + (
        ("scaling",) if cases["scaling"]["status"] == "ok" else ()
    ):
        assert (out / f"b-{plot}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".bench-")]  # no staging left behind


def test_hpcml_benchmark_is_the_bench_function():
    import hpcml
    import hpcml.bench.cases  # noqa: F401  (the package and the function have different names)

    with pytest.raises(UsageError, match="unknown bench case"):
        hpcml.benchmark(cases=["nope"], out=None)
    with pytest.raises(UsageError, match="unknown suite"):
        hpcml.benchmark(suite="huge", out=None)
