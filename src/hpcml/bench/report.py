"""Bench output: JSON + Markdown under the out dir, plots, and a console table.

All files are rendered into a temporary folder inside the out dir first and moved into place at the
end, so an interrupted or failed bench never leaves half-written results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpcml._files import atomic_dir, save_figure

HEADER = ["case", "contender", "median", "min", "max", "runs", "note"]


def _fmt(v: Any, metric: str) -> str:
    if v is None:
        return "not reached" if metric == "seconds" else "n/a"
    if metric == "seconds":
        return f"{v:.2f} s"
    if metric == "ms":
        return f"{v:.3f} ms"
    if metric == "FLOP/s":
        return f"{v / 1e9:,.1f} GFLOP/s"
    return f"{v:,.0f}"


def case_rows(case: dict[str, Any]) -> list[list[str]]:
    """One row per contender of a case: the same cells for the console and the Markdown table."""
    name = case["name"]
    if case["status"] != "ok":
        return [[name, "-", "-", "-", "-", "-", f"skipped: {case['reason']}"]]
    if name == "breakdown":
        rows = []
        for cfg_name, b in case["configs"].items():
            parts = ", ".join(
                f"{k} {v['fraction']:.0%}"
                for k, v in b["phases"].items()
                if k != "communication" or v["fraction"]
            )
            ms = b["loop_seconds_per_step"] * 1e3
            rows.append([name, cfg_name, f"{ms:.2f} ms", "-", "-", str(b["steps"]), parts])
        return rows
    metric = case["metric"]
    rows = []
    for contender, c in case["contenders"].items():
        if "skipped" in c:
            rows.append([name, contender, "-", "-", "-", "-", f"skipped: {c['skipped']}"])
            continue
        s = c["summary"]
        note = ""
        speed = case.get("speedups", {}).get(contender)
        if speed is not None:
            note = f"hpcml {speed:.2f}x faster"
        if name == "time-to-accuracy":
            high = c.get("to_985", {}).get("median")
            note = (
                f"94%: {s['ok']}/{s['runs']} reached, {c['epochs_median']:g} epochs; 98.5%: "
                + ("not reached" if high is None else f"{high:.2f} s")
                + (f"; final {c['final_accuracy']['median']:.4f}" if "final_accuracy" in c else "")
            )
            note += f"; {speed:.2f}x faster to 94%" if speed is not None else ""
        if name in ("scaling", "predict"):
            point = next((p for p in case["curve"] if _label(p) == contender), None)
            if point is not None and point["efficiency"] is not None:
                note = f"efficiency {point['efficiency']:.0%}"
        if name == "precision":
            acc = c["test_accuracy"]["median"]
            note = f"test acc {acc:.4f}"
            if c.get("speedup_vs_fp32") is not None:
                note += f"; {c['speedup_vs_fp32']:.2f}x fp32's speed"
        if name == "mfu" and contender == "hpcml":
            note = f"MFU {case['mfu_measured_peak']:.0%} of measured peak"
            if case.get("mfu_datasheet") is not None:
                note += f", {case['mfu_datasheet']:.0%} of datasheet"
        note = c.get("note", note)  # a case may word its own note (serve: latency, ratios)
        cells = [_fmt(s[k], metric) for k in ("median", "min", "max")]
        rows.append([name, contender, *cells, str(s["runs"]), note])
    return rows + [_comm_row(name, r) for r in case.get("communication", [])]


def _comm_row(name: str, r: dict[str, Any]) -> list[str]:
    """A DDP step taken apart (bench/comm.py): its time, efficiency, communication share, options."""

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0%}"

    s = r["variants"]["ddp"]
    others = ", ".join(f"{k} {v:.2f}x" for k, v in r.get("variant_speedups", {}).items() if v)
    slow = r.get("compute_slowdown")
    note = (
        f"vs 1 process: efficiency {pct(r.get('efficiency'))}; communication "
        f"{pct(r.get('communication_share'))} of the step; without it "
        f"{'n/a' if slow is None else f'{slow:.2f}x'} 1 process; all-reduce alone "
        f"{r['all_reduce']['fp32_seconds'] * 1e3:.1f} ms, exposed {r.get('exposed_seconds', 0) * 1e3:.1f} "
        f"ms, overlap {pct(r.get('overlap'))}; "
        f"speed of {others or 'no variants'}; load {r['loadavg']:.1f}"
    )
    cells = [_fmt(s[k] * 1e3, "ms") for k in ("median", "min", "max")]
    return [name, f"DDP step, batch {r['batch_size']}/rank", *cells, str(r["repeats"]), note]


def _label(point: dict) -> str:
    if "procs" in point:
        n = point["procs"]
        return f"{n} proc{'s' if n > 1 else ''} x 1 thread"
    n = point["workers"]
    return f"{n} worker{'s' if n > 1 else ''}"


def goal_rows(result: dict[str, Any]) -> list[list[str]]:
    rows = []
    for g in result["goals"]:
        value = "n/a" if g["value"] is None else f"{g['value']:.2f}"
        status = {True: "met", False: "MISSED", None: "not measured"}[g["met"]]
        rows.append([g["goal"], value, f"{g['target']:g}", status, g["note"]])
    return rows


def environment_line(env: dict[str, Any]) -> str:
    gpu = f", GPU {env['gpu']}" if env.get("gpu") else ""
    return (
        f"{env['cpu']}, {env['cores']} cores, torch threads {env['threads']}, torch {env['torch']}, "
        f"hpcml {env['hpcml']}{gpu}, {env['date']}; load average {env['loadavg_start']:.2f} at start, "
        f"{env.get('loadavg_end', float('nan')):.2f} at end"
    )


def busy_note(env: dict[str, Any]) -> str:
    """A warning when other processes competed for the cores: the numbers then carry their noise."""
    load = max(env.get("loadavg_start", 0.0), env.get("loadavg_end", 0.0))
    if load < env["cores"]:
        return ""
    return (
        f"**Busy machine:** load average {load:.1f} on {env['cores']} cores during the run: other "
        "processes competed for the cores, so these numbers are noisy (and slower than on an idle machine)."
    )


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines ('|' inside a cell becomes '/')."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows),
    ]


def markdown(result: dict[str, Any]) -> str:
    table = md_table
    lines = [
        f"# hpcml bench ({result['suite']} suite)",
        "",
        environment_line(result["environment"]) + ".",
        f"Repeats {result['config']['repeat']} (median, min, max; contenders interleaved, warm-up excluded).",
        "",
        *([busy_note(result["environment"]), ""] if busy_note(result["environment"]) else []),
        *([f"Note: {result['note']}.", ""] if result.get("note") else []),
        "## Goals",
        "",
        *table(["goal", "ratio", "target", "status", "note"], goal_rows(result)),
        "",
        "## Cases",
        "",
        *table(HEADER, [r for c in result["cases"].values() for r in case_rows(c)]),
        "",
        "Speedups are ratios of medians, > 1 favours hpcml. Time to accuracy includes the per-epoch test",
        "evaluation for every contender and excludes data generation and process start-up.",
        "",
    ]
    return "\n".join(lines)


def console_table(result: dict[str, Any], console) -> None:
    # Cells as Text, not strings: rich would read "pip install 'hpcml[compare]'" as markup and drop
    # "[compare]".
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(f"hpcml bench ({result['suite']}): {environment_line(result['environment'])}"))
    for h in HEADER:
        t.add_column(h, justify="left" if h in ("case", "contender", "note") else "right")
    for case in result["cases"].values():
        for row in case_rows(case):
            t.add_row(*map(Text, row))
    console.print(t)
    g = Table(title="goals (ratios from this run)")
    for h in ("goal", "ratio", "target", "status", "note"):
        g.add_column(h, justify="right" if h in ("ratio", "target") else "left")
    for row in goal_rows(result):
        g.add_row(*map(Text, row))
    console.print(g)


def _plots(result: dict[str, Any], folder: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cases = result["cases"]
    ttt = cases.get("time-to-accuracy")
    if ttt and ttt["status"] == "ok":
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, c) in enumerate(ttt["contenders"].items()):
            for j, run in enumerate(c.get("runs", [])):
                xs, ys = zip(*run["curve"], strict=True) if run["curve"] else ((), ())
                ax.plot(
                    xs,
                    ys,
                    marker=".",
                    color=f"C{i}",
                    alpha=1.0 if j == 0 else 0.4,
                    label=name if j == 0 else None,
                )
        for k, t in enumerate(ttt["config"]["targets"]):
            ax.axhline(
                t, color="grey", linestyle="--" if k == 0 else ":", linewidth=1, label=f"target {t:.1%}"
            )
        ax.set(xlabel="seconds (training + per-epoch eval)", ylabel="test accuracy", title=ttt["title"])
        ax.set_ylim(0.5, 1.0)
        ax.grid(alpha=0.3)
        ax.legend()
        written.append(save_figure(fig, folder / f"{stem}-time-to-accuracy.png", dpi=110))
    curves = [c for k in ("scaling", "predict") if (c := cases.get(k)) and c["status"] == "ok"]
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4.2), squeeze=False)
        for ax, case in zip(axes[0], curves, strict=True):
            key, unit = (
                ("procs", "samples_per_second")
                if case["name"] == "scaling"
                else ("workers", "rows_per_second")
            )
            xs = [p[key] for p in case["curve"]]
            ys = [p[unit] for p in case["curve"]]
            ax.plot(xs, ys, marker="o", label="hpcml")
            ax.plot(xs, [ys[0] * x for x in xs], linestyle="--", color="grey", label="ideal")
            ax.set(xlabel=key, ylabel=unit.replace("_", " "), title=case["title"], xticks=xs)
            ax.title.set_fontsize(9)
            ax.grid(alpha=0.3)
            ax.legend()
        written.append(save_figure(fig, folder / f"{stem}-scaling.png", dpi=110))
    bd = cases.get("breakdown")
    if bd and bd["status"] == "ok":
        fig, ax = plt.subplots(figsize=(8, 0.6 * len(bd["configs"]) + 1.6))
        names = list(bd["configs"])
        left = [0.0] * len(names)
        for i, phase in enumerate(next(iter(bd["configs"].values()))["phases"]):
            widths = [bd["configs"][n]["phases"][phase]["fraction"] * 100 for n in names]
            ax.barh(names, widths, left=left, color=f"C{i}", label=phase)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        ax.set(xlabel="% of step time", title=bd["title"], xlim=(0, 100))
        ax.tick_params(axis="y", labelsize=7)
        ax.legend(fontsize=7, ncols=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
        written.append(save_figure(fig, folder / f"{stem}-breakdown.png", dpi=110))
    return written


def write(result: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """Render JSON, Markdown and plots, then move them into `out` together (nothing lands unless all
    rendered; other results already in `out` stay)."""
    with atomic_dir(out, merge=True) as staging:
        (staging / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (staging / f"{stem}.md").write_text(markdown(result))
        _plots(result, staging, stem)
        names = sorted(f.name for f in staging.iterdir())
    return [out / name for name in names]
