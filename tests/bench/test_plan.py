"""hpcml bench --plan: the all-reduce cost model against hand-computed numbers, link parsing, and a CLI
run on a small model (the projection in its JSON recomputed here, independently)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from hpcml.bench.planner import (
    Link,
    allreduce_seconds,
    batch_for,
    parse_link,
    project,
    rank_counts,
    step_seconds,
)
from hpcml.errors import UsageError

GBE25 = Link("25GbE", 25e9 / 8, 20e-6)  # 3.125e9 bytes/s


def test_ring_allreduce_cost_by_hand():
    # 100 MB over 25 Gb/s at 8 ranks: 2 * 7/8 * 1e8 / 3.125e9 = 0.056 s, plus 3 latency steps of 20 us
    assert allreduce_seconds(100e6, 8, GBE25) == pytest.approx(0.056 + 60e-6, rel=1e-12)
    # 2 ranks: one full copy of the bytes and one latency step: 4e6 / 3.125e9 + 20e-6
    assert allreduce_seconds(4e6, 2, GBE25) == pytest.approx(0.00128 + 20e-6, rel=1e-12)
    # 1024 ranks: 2 * 1023/1024 * 1e6 / 3.125e9 = 0.000639375 s, plus 10 * 20 us
    assert allreduce_seconds(1e6, 1024, GBE25) == pytest.approx(0.000639375 + 0.0002, rel=1e-12)
    assert allreduce_seconds(1e9, 1, GBE25) == 0.0


def test_step_efficiency_and_batch_by_hand():
    comm = 0.056 + 60e-6  # the 8-rank all-reduce above
    # no overlap: 0.1 s compute + 0.05606 s communication
    rows = project(compute=0.1, nbytes=100e6, link=GBE25, ranks=[8], overlap=0.0, fixed=0.0, per_row=1e-3)
    assert rows[0]["step_seconds"] == pytest.approx(0.15606)
    assert rows[0]["efficiency"] == pytest.approx(0.1 / 0.15606)
    # efficiency 85% needs compute >= 0.85 * 0.05606 / 0.15 = 0.317673 s: 317.67 -> 318 rows at 1 ms a row
    assert rows[0]["batch_per_rank_for_target"] == 318
    # half the compute hides communication: 0.1 + (0.05606 - 0.05) = 0.10606 s
    assert step_seconds(0.1, comm, 0.5) == pytest.approx(0.10606)
    # with overlap 0.5: compute >= 0.85 * 0.05606 / (0.15 + 0.425) = 0.0828713 s; 2 ms fixed -> 80.87 -> 81
    assert batch_for(0.85, comm, 0.5, 0.002, 1e-3) == 81
    assert step_seconds(0.1, 0.01, 1.0) == 0.1  # fully hidden
    assert rank_counts(1024) == [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
    assert rank_counts(6) == [2, 4]


def test_parse_link_units_and_errors():
    ib = parse_link("ib=200Gb/s@2us")
    assert (ib.name, ib.bandwidth, ib.latency, ib.source) == ("ib", 25e9, pytest.approx(2e-6), "set")
    nv = parse_link("nvlink = 300GB/s @ 5us")
    assert (nv.name, nv.bandwidth, nv.latency) == ("nvlink", 300e9, pytest.approx(5e-6))
    assert parse_link("slow=100Mb/s@1ms").bandwidth == pytest.approx(12.5e6)
    for bad in ("ib", "ib=200@2us", "ib=200Gb/s", "ib=0Gb/s@2us", "ib=200Gb/s@2 weeks", "=1GB/s@1us"):
        with pytest.raises(UsageError, match="NAME=BANDWIDTH@LATENCY"):
            parse_link(bad)


def test_plan_cli_prints_the_table_for_a_small_model(cli, tmp_path, small_cfg):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(small_cfg))
    out = tmp_path / "plan"
    r = cli(
        "bench", "--plan", "--config", str(path), "--no-check-local", "--steps", "3", "--repeat", "1",
        "--link", "slow=1Gb/s@100us", "--link", "ib=200Gb/s@2us", "--max-ranks", "64", "--out", str(out),
        "--stem", "p", timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    for text in ("ranks", "slow", "ib", "64", "local check skipped"):
        assert text in r.stdout, r.stdout
    res = json.loads((out / "p.json").read_text())
    assert (out / "p.md").read_text().startswith("# hpcml bench --plan")
    # MLP 8 -> 32 -> 32 -> 3 with biases, fp32: (8*32 + 32 + 32*32 + 32 + 32*3 + 3) * 4 bytes
    assert res["gradient_bytes"] == (8 * 32 + 32 + 32 * 32 + 32 + 32 * 3 + 3) * 4
    assert [p["ranks"] for p in res["projections"]["slow"]] == [2, 4, 8, 16, 32, 64]
    t_c, nbytes = res["compute_seconds_per_step"], res["wire_bytes"]
    for n, p in zip([2, 4, 8, 16, 32, 64], res["projections"]["slow"], strict=True):
        comm = 2 * (n - 1) / n * nbytes / (1e9 / 8) + 100e-6 * math.log2(n)
        assert p["comm_seconds"] == pytest.approx(comm)
        assert p["efficiency"] == pytest.approx(t_c / (t_c + comm))  # overlap 0: nothing hidden
    # 1 Gb/s cannot hide 2.8 KB behind a sub-millisecond step: the batch that would reach 85% is shown
    assert res["projections"]["slow"][-1]["efficiency"] < 0.85 and "b≥" in r.stdout


def test_plan_cli_bad_link_and_overlap_exit_2(cli, tmp_path):
    r = cli("bench", "--plan", "--link", "fast", "--out", str(tmp_path))
    assert r.returncode == 2 and "NAME=BANDWIDTH@LATENCY" in r.stderr
    r = cli("bench", "--plan", "--overlap", "1.5", "--out", str(tmp_path))
    assert r.returncode == 2 and "--overlap must be in [0, 1]" in r.stderr
