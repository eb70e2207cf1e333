"""The precision decision, for CPUs this test does not run on: the CPU's flags are passed in."""

from __future__ import annotations

import pytest
import torch

from hpcml.training.precision import BF16_MIN_STEP_FLOPS, resolve_precision

CPU = torch.device("cpu")
AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512_NO_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl"}


BIG, SMALL = 34e9, 0.11e9  # GFLOP per step: the bench's compute-bound MLP, the default cnn1d recipe


@pytest.mark.parametrize(
    ("flags", "step_flops", "expected"),
    [
        (AVX2_ONLY, BIG, "fp32"),
        (AVX512_NO_BF16, BIG, "fp32"),
        (AVX512_NO_BF16 | {"avx512_bf16"}, BIG, "bf16"),
        (AVX2_ONLY | {"amx_bf16", "amx_tile"}, BIG, "bf16"),
        (AVX512_NO_BF16 | {"avx512_bf16"}, SMALL, "fp32"),  # native, but a small step: casts cost more
        (AVX512_NO_BF16 | {"avx512_bf16", "amx_bf16"}, SMALL, "fp32"),
        (AVX512_NO_BF16 | {"avx512_bf16"}, None, "fp32"),  # size unknown: the safe choice
        (frozenset(), BIG, "fp32"),  # flags unknown (not Linux)
    ],
)
def test_auto_picks_bf16_only_with_native_bf16_and_a_large_step(flags, step_flops, expected):
    precision, reason = resolve_precision("auto", CPU, flags=flags, step_flops=step_flops)
    assert precision == expected
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert reason.startswith("CPU has native bf16" if native else "CPU has no native bf16")
    if native and step_flops is not None:
        assert f"{step_flops / 1e9:.2g} GFLOP per step" in reason


def test_threshold_sits_between_the_measured_points():
    # measured: bf16 0.96x at 0.12 GFLOP/step, 1.07x at 0.48, 1.77x at 1.9 (see precision.py)
    assert 0.48e9 < BF16_MIN_STEP_FLOPS <= 1.9e9


def test_step_flops_are_counted_without_allocating(tmp_path):
    from hpcml.config import TrainConfig
    from hpcml.data.sources import load_dataset
    from hpcml.training.build import step_flops

    cfg = TrainConfig.model_validate(
        {"data": {"name": "synthetic", "rows": 600, "features": 8, "classes": 3},
         "model": {"name": "mlp", "kwargs": {"hidden": 32, "depth": 1}}, "batch_size": 64}
    )  # fmt: skip
    # per row: forward 2*(8*32 + 32*3); backward: both gradients of the second matmul (weight and
    # input, 2*32*3 each) and only the weight gradient of the first (its input needs no gradient)
    fwd = 2 * (8 * 32 + 32 * 3)
    expected = 64 * (fwd + 2 * 2 * 32 * 3 + 2 * 8 * 32)
    assert step_flops(cfg, load_dataset(cfg.data)) == expected


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept_whatever_the_cpu(requested):
    for flags in (AVX2_ONLY, AVX512_NO_BF16 | {"avx512_bf16"}):
        assert resolve_precision(requested, CPU, flags=flags)[0] == requested


def test_emulated_bf16_is_said_so():
    assert "emulates" in resolve_precision("bf16", CPU, flags=AVX2_ONLY)[1]


# --- threads: auto from the cores other processes leave free ------------------------------------------

STAT_A = """cpu  100 0 100 800 0 0 0 0 0 0
cpu0 50 0 50 400 0 0 0 0 0 0
cpu1 50 0 50 400 0 0 0 0 0 0
intr 1 2 3
"""
# one second later: cpu0 fully busy (another process), cpu1 idle
STAT_B = """cpu  200 0 100 900 0 0 0 0 0 0
cpu0 150 0 50 400 0 0 0 0 0 0
cpu1 50 0 50 500 0 0 0 0 0 0
"""


def test_cpu_times_count_busy_and_total_jiffies_of_the_allowed_cpus():
    from hpcml.training.precision import _cpu_times

    assert _cpu_times(STAT_A, {0, 1}) == (200.0, 1000.0)
    busy_a, total_a = _cpu_times(STAT_A, {0, 1})
    busy_b, total_b = _cpu_times(STAT_B, {0, 1})
    assert 2 * (1 - (busy_b - busy_a) / (total_b - total_a)) == 1.0  # one of two cores free
    assert _cpu_times(STAT_B, {1}) == (100.0, 600.0)  # affinity: only cpu1 counts


@pytest.mark.parametrize(
    ("cores", "free", "procs", "threads"),
    [
        (2, 2.0, 1, 2),  # idle machine: every core
        (2, 1.0, 1, 1),  # one core busy elsewhere: no thread waits on it
        (2, 1.75, 1, 2),  # a little background noise still counts as free
        (2, 1.5, 1, 1),
        (2, 0.1, 1, 1),  # everything busy: still one thread
        (16, 15.9, 4, 4),  # 4 ranks on a node share the free cores
        (16, 8.0, 4, 2),
    ],
)
def test_auto_threads_follow_the_free_cores(cores, free, procs, threads):
    from hpcml.training.precision import choose_threads

    n, why = choose_threads(cores, free, procs)
    assert n == threads and why.startswith(f"auto: {free:.1f} of {cores} cores free")


def test_report_records_the_thread_choice(tmp_path, small_cfg):
    import hpcml

    auto = hpcml.train({**small_cfg, "threads": None, "epochs": 1}, out=tmp_path / "a").report
    assert 1 <= auto["threads"] <= 2 and auto["threads_reason"].startswith("auto: ")
    fixed = hpcml.train({**small_cfg, "epochs": 1}, out=tmp_path / "f").report
    assert fixed["threads"] == 1 and fixed["threads_reason"] == "requested"
