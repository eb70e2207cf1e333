"""The precision decision, for CPUs this test does not run on: the CPU's flags are passed in."""

from __future__ import annotations

import pytest
import torch

from hpcml.training.precision import resolve_precision

CPU = torch.device("cpu")
AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})
AVX512_NO_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl"}


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (AVX2_ONLY, "fp32"),
        (AVX512_NO_BF16, "fp32"),
        (AVX512_NO_BF16 | {"avx512_bf16"}, "bf16"),
        (AVX2_ONLY | {"amx_bf16", "amx_tile"}, "bf16"),
        (frozenset(), "fp32"),  # flags unknown (not Linux): the safe choice
    ],
)
def test_auto_picks_bf16_only_on_cpus_with_native_bf16(flags, expected):
    precision, reason = resolve_precision("auto", CPU, flags=flags)
    assert precision == expected
    assert reason.startswith("CPU has native bf16" if expected == "bf16" else "CPU has no native bf16")


@pytest.mark.parametrize("requested", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_kept_whatever_the_cpu(requested):
    for flags in (AVX2_ONLY, AVX512_NO_BF16 | {"avx512_bf16"}):
        assert resolve_precision(requested, CPU, flags=flags)[0] == requested


def test_emulated_bf16_is_said_so():
    assert "emulates" in resolve_precision("bf16", CPU, flags=AVX2_ONLY)[1]
