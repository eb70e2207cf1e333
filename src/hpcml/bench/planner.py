"""`hpcml bench --plan`: what data parallelism would give this model on N ranks, before buying them.

Measured here: the model's compute time per step on one process, built as `hpcml train` builds it
(training.build; two per-rank batch sizes, fitted as t_c(b) = fixed + per_row * b), and its gradient
bytes. Projected for each link, from the ring all-reduce of those bytes:

    t_comm(N) = 2 (N-1)/N * bytes / bandwidth + latency * log2 N
    t_step(N) = t_c + max(0, t_comm(N) - overlap * t_c)        efficiency(N) = t_c / t_step(N)

`overlap` is the share of the compute that can hide communication (0: none; 1: all of it; DDP
overlaps the all-reduce with backward, about 2/3 of a step, at best). The batch per rank that keeps
efficiency >= target solves t_c(b) >= target * t_comm / (1 - target + target * overlap).

Assumed: compute per step is the same on every rank and linear in the rows per rank; the link named
is the slowest hop of the ring and nothing else shares it; compression to bf16/fp16 halves the bytes.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hpcml.errors import UsageError

TARGET = 0.85
FORMULA = "t_comm = 2(N-1)/N * bytes / bandwidth + latency * log2 N; t = t_c + max(0, t_comm - overlap * t_c)"


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes per second, each direction
    latency: float  # seconds per log2 N step
    source: str = "assumed"


# Typical figures, stated as assumptions (--link replaces them): TCP over Ethernet pays tens of
# microseconds per message; RDMA (RoCE) and NVLink a few.
LINKS = (
    Link("10GbE", 10e9 / 8, 50e-6),
    Link("25GbE", 25e9 / 8, 30e-6),
    Link("100GbE RDMA", 100e9 / 8, 10e-6),
    Link("NVLink", 300e9, 5e-6),
)
_UNITS = {"gb/s": 1e9 / 8, "mb/s": 1e6 / 8, "tb/s": 1e12 / 8, "GB/s": 1e9, "MB/s": 1e6, "TB/s": 1e12}
_TIMES = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse_link(spec: str) -> Link:
    """NAME=BANDWIDTH@LATENCY, e.g. 'ib=200Gb/s@2us' or 'nvlink=300GB/s@5us' (Gb: bits, GB: bytes)."""
    m = re.fullmatch(
        r"\s*([^=@]+?)\s*=\s*(\d+(?:\.\d+)?)\s*([GMT][Bb]/s)\s*@\s*(\d+(?:\.\d+)?)\s*(ns|us|ms|s)\s*", spec
    )
    unit = m and (m.group(3) if m.group(3)[1] == "B" else m.group(3).lower())
    if m is None or unit not in _UNITS or float(m.group(2)) <= 0:
        raise UsageError(
            f"--link {spec!r}: expected NAME=BANDWIDTH@LATENCY with BANDWIDTH > 0 in Gb/s, GB/s, Mb/s, "
            "MB/s, Tb/s or TB/s and LATENCY in ns, us, ms or s, e.g. ib=200Gb/s@2us"
        )
    bw = float(m.group(2)) * _UNITS[unit]
    return Link(m.group(1), bw, float(m.group(4)) * _TIMES[m.group(5)], "set")


def allreduce_seconds(nbytes: float, ranks: int, link: Link) -> float:
    """The ring all-reduce cost model: 2(N-1)/N * bytes / bandwidth + latency * log2 N (0 for N=1)."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) / ranks * nbytes / link.bandwidth + link.latency * math.log2(ranks)


def step_seconds(compute: float, comm: float, overlap: float) -> float:
    """A step of `compute` seconds whose all-reduce takes `comm`, of which overlap * compute is hidden."""
    return compute + max(0.0, comm - overlap * compute)


def batch_for(target: float, comm: float, overlap: float, fixed: float, per_row: float) -> int:
    """The smallest rows per rank b with t_c(b) = fixed + per_row * b at efficiency >= target."""
    need = target * comm / (1 - target + target * overlap)
    return max(1, math.ceil((need - fixed) / per_row)) if per_row > 0 else 0


def project(
    *, compute: float, nbytes: float, link: Link, ranks: list[int], overlap: float, fixed: float,
    per_row: float, target: float = TARGET,
) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for n in ranks:
        comm = allreduce_seconds(nbytes, n, link)
        step = step_seconds(compute, comm, overlap)
        rows.append({
            "ranks": n, "comm_seconds": comm, "step_seconds": step, "efficiency": compute / step,
            "batch_per_rank_for_target": batch_for(target, comm, overlap, fixed, per_row),
        })  # fmt: skip
    return rows


def rank_counts(max_ranks: int) -> list[int]:
    return [2**k for k in range(1, int(math.log2(max_ranks)) + 1)] if max_ranks >= 2 else []


def plan(
    config: Any = None,
    *,
    links: list[Link] | None = None,
    overlap: float = 0.0,
    max_ranks: int = 1024,
    steps: int = 20,
    repeats: int = 3,
    check_local: bool = True,
) -> dict[str, Any]:
    """Measure `config`'s compute per step and gradient bytes here, then project (see the module
    doc). `config`: a TrainConfig, dict or YAML path; None: the bench's data-parallel case. With
    `check_local` (and >= 2 cores, CPU), also 2 gloo ranks here: their measured step beside the
    projection of a link measured the same way (a real all-reduce of the gradient bytes)."""
    from hpcml.bench.cases_parallel import scaling_config
    from hpcml.training.precision import available_cores
    from hpcml.training.run import as_config

    if not 0 <= overlap <= 1:
        raise UsageError(f"--overlap must be in [0, 1] (got {overlap})")
    if max_ranks < 2 or steps < 1 or repeats < 1:
        raise UsageError(
            f"need --max-ranks >= 2, --steps >= 1, --repeat >= 1 (got {max_ranks}, {steps}, {repeats})"
        )
    cfg = as_config(config if config is not None else scaling_config(16384, 1, 1))
    load = os.getloadavg()[0]
    small, fit = _compute(cfg, steps=steps, repeats=repeats)
    t0, fixed, per_row = fit["seconds"][0], fit["fixed_seconds"], fit["seconds_per_row"]
    compressed = cfg.ddp.grad_compression != "none"
    wire = small["gradient_bytes"] / (2 if compressed else 1)
    chosen = list(links or LINKS)
    ranks = rank_counts(max_ranks)
    args = {"compute": t0, "nbytes": wire, "overlap": overlap, "fixed": fixed, "per_row": per_row}
    result: dict[str, Any] = {
        "model": small["model"], "batch_size": small["batch_size"], "grad_accum": cfg.grad_accum,
        "device": small["device"], "precision": small["precision"], "threads": small["threads"],
        "compute_seconds_per_step": t0, "compute_fit": fit,
        "gradient_bytes": small["gradient_bytes"], "grad_compression": cfg.ddp.grad_compression,
        "wire_bytes": wire, "overlap": overlap, "target_efficiency": TARGET, "formula": FORMULA,
        "links": [asdict(k) for k in chosen],
        "projections": {k.name: project(link=k, ranks=ranks, **args) for k in chosen},
        "loadavg_start": load,
    }  # fmt: skip
    cores = available_cores()
    if not check_local:
        result["local_check"] = {"skipped": "not asked for (--no-check-local)"}
    elif cores < 2 or small["device"] != "cpu":
        result["local_check"] = {
            "skipped": f"needs a CPU run and >= 2 cores (device {small['device']}, {cores} cores)"
        }
    else:
        result["local_check"] = _local_check(cfg, steps=steps, repeats=repeats, overlap=overlap, wire=wire)
    result["loadavg_end"] = os.getloadavg()[0]
    return result


def _compute(cfg, *, steps: int, repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One process's step time at the config's batch and at twice it, fitted as fixed + per_row * rows
    (proportional when noise or a batch capped by the data leaves no slope)."""
    from hpcml.bench import comm

    small, large = (
        comm.time_variants(cfg.model_copy(update={"batch_size": b}), steps=steps, repeats=repeats)
        for b in (cfg.batch_size, 2 * cfg.batch_size)
    )
    t0, t1 = small["variants"]["1 process"]["median"], large["variants"]["1 process"]["median"]
    r0, r1 = (r["batch_size"] * cfg.grad_accum for r in (small, large))  # the rows a rank steps
    per_row = (t1 - t0) / (r1 - r0) if r1 > r0 else 0.0
    if per_row <= 0:
        per_row = t0 / r0
    fit = {
        "batch_sizes": [small["batch_size"], large["batch_size"]], "seconds": [t0, t1],
        "fixed_seconds": max(0.0, t0 - per_row * r0), "seconds_per_row": per_row,
    }  # fmt: skip
    return small, fit


def _local_check(cfg, *, steps: int, repeats: int, overlap: float, wire: float) -> dict[str, Any]:
    """2 gloo ranks here: the measured DDP step beside the projection from this machine's own link."""
    from hpcml.bench import comm

    m = comm.measure(cfg, world=2, steps=steps, repeats=repeats)[0]
    ar = m["all_reduce"]
    link = Link(
        "this machine (gloo, loopback)",
        ar["bandwidth_bytes_per_second"] or math.inf,
        ar["latency_seconds"],
        "measured",
    )
    v = {k: x["median"] for k, x in m["variants"].items()}
    one, ddp, quiet = v["1 process"], v["ddp"], v["no communication"]
    comm_s = allreduce_seconds(wire, 2, link)
    projected = step_seconds(one, comm_s, overlap)
    return {
        "link": asdict(link), "compute_seconds": one, "projected_step_seconds": projected,
        "projected_efficiency": one / projected, "measured_step_seconds": ddp,
        "measured_efficiency": one / ddp, "measured_no_communication_seconds": quiet,
        # the communication model alone: the 2 ranks' own compute (they share this machine) + t_comm
        "projected_from_2_ranks_compute_seconds": step_seconds(quiet, comm_s, overlap),
        "measured_overlap": m.get("overlap"), "measured": m,
    }  # fmt: skip


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The projection as a table: a row per rank count, a column per link (efficiency, step time and,
    where the target is missed, the batch per rank that meets it). The same cells for the console and
    the Markdown file."""
    names = list(result["projections"])
    rows = []
    for i, first in enumerate(result["projections"][names[0]]):
        cells = [str(first["ranks"])]
        for name in names:
            p = result["projections"][name][i]
            ms, b = p["step_seconds"] * 1e3, p["batch_per_rank_for_target"]
            short = p["efficiency"] < result["target_efficiency"]
            cells.append(f"{p['efficiency']:.0%} · {ms:.1f} ms" + (f" · b≥{b:,}" if short else ""))
        rows.append(cells)
    return ["ranks", *names], rows


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _link(k: dict[str, Any]) -> str:
    return f"{k['bandwidth'] * 8 / 1e9:.3g} Gb/s, {k['latency'] * 1e6:.3g} us"


def summary_lines(result: dict[str, Any]) -> list[str]:
    """What was measured, what was assumed, and the local check, as plain lines."""
    r, fit = result, result["compute_fit"]
    lines = [
        f"measured: {r['model']}, batch {r['batch_size']} per rank, {r['device']}, {r['precision']}, "
        f"{r['threads']} thread(s): compute {_ms(r['compute_seconds_per_step'])}/step (batch "
        f"{fit['batch_sizes'][1]}: {_ms(fit['seconds'][1])}); gradients {r['gradient_bytes'] / 1e6:.2f} MB, "
        f"{r['wire_bytes'] / 1e6:.2f} MB sent (compression {r['grad_compression']})",
        f"model: {r['formula']}; overlap {r['overlap']:g}",
        f"cells: efficiency · step time · where below {r['target_efficiency']:.0%}, the batch per rank "
        "that reaches it (compute extrapolated linearly in the rows)",
        "links: " + "; ".join(f"{k['name']} {_link(k)} ({k['source']})" for k in r["links"]),
    ]
    c = r["local_check"]
    if "skipped" in c:
        lines.append(f"local check skipped: {c['skipped']}")
    else:
        lines.append(
            f"this machine, 2 gloo ranks (link measured: {_link(c['link'])}): projected "
            f"{_ms(c['projected_step_seconds'])}/step, efficiency {c['projected_efficiency']:.0%}; measured "
            f"{_ms(c['measured_step_seconds'])}/step, efficiency {c['measured_efficiency']:.0%}. The "
            "projection assumes each rank computes as fast as 1 process alone "
            f"({_ms(c['compute_seconds'])}); "
            f"here 2 ranks without communication took {_ms(c['measured_no_communication_seconds'])}, and "
            f"from that the model projects {_ms(c['projected_from_2_ranks_compute_seconds'])}/step"
        )
    lines.append(
        f"load average {r['loadavg_start']:.2f} at start, {r['loadavg_end']:.2f} at end: figures from a "
        "shared machine are provisional"
    )
    return lines


def write(result: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """`<stem>.json` and `<stem>.md` under `out`, like the bench's results."""
    import json

    from hpcml._files import atomic_write
    from hpcml.bench.report import md_table

    out.mkdir(parents=True, exist_ok=True)
    md = [
        "# hpcml bench --plan",
        "",
        *(f"- {line}" for line in summary_lines(result)),
        "",
        *md_table(*table(result)),
        "",
    ]
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    atomic_write(paths[0], json.dumps(result, indent=2) + "\n")
    atomic_write(paths[1], "\n".join(md))
    return paths
