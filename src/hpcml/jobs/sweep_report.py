"""The sweep's table (one row per config, mean and std across folds), its CSV/Markdown/rich forms and
the plot of the metric against each swept parameter. Pure formatting: sweep.py decides what ran."""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from hpcml._files import atomic_write, save_figure

_STATUS_ORDER = {"ok": 0, "partial": 1, "pruned": 2, "failed": 3}


def direction(metric: str) -> str:
    """'min' for losses and times, 'max' for everything else (accuracies, throughput)."""
    return "min" if any(s in metric for s in ("loss", "seconds")) else "max"


def metric_name(metric: str, folds: int | None) -> str:
    """With folds the report's test_* values come from the held-out fold: call them cv_*."""
    if folds and "test_" in metric:
        return metric.replace("test_", "cv_", 1)
    return metric


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def build_rows(jobs: list[dict], params: list[str], *, metric: str, folds: int | None) -> list[dict]:
    """Group jobs by config, average the metric over its finished folds, sort best first.

    A config with a failed fold is 'partial' and ranks after every complete one; one stopped by the
    sweep's pruner is 'pruned' (its score is from fewer epochs) and ranks after those; one with no
    finished fold is 'failed', comes last and has no rank (None): it has no score to rank by.
    """
    groups: dict[int, list[dict]] = defaultdict(list)
    for j in jobs:
        groups[j["point"]].append(j)
    rows = []
    for point, js in groups.items():
        done = [j for j in js if j["status"] == "done" and _number((j["report"] or {}).get(metric))]
        vals = [float(j["report"][metric]) for j in done]
        secs = [
            float(j["report"]["train_seconds"]) for j in done if _number(j["report"].get("train_seconds"))
        ]
        rows.append({
            "point": point,
            "params": {p: js[0]["params"].get(p) for p in params},
            "mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) >= 2 else None,
            "n": len(vals),
            "of": len(js),
            "status": "pruned" if vals and any(_pruned(j) for j in done) else (
                "ok" if len(vals) == len(js) else ("partial" if vals else "failed")
            ),
            "train_seconds": statistics.fmean(secs) if secs else None,
            "jobs": [j["id"] for j in js],
            "error": next((j["error"] for j in js if j["error"]), None),
        })  # fmt: skip
    sign = -1.0 if direction(metric) == "max" else 1.0
    rows.sort(key=lambda r: (_STATUS_ORDER[r["status"]], sign * r["mean"] if r["mean"] is not None else 0))
    for i, r in enumerate(rows):
        r["rank"] = i + 1 if r["status"] != "failed" else None
    return rows


def _pruned(job: dict) -> bool:
    return str(job["report"].get("stopped_by") or "").startswith("pruned")


def fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4f}"
    return str(v)


def _header(params: list[str], metric: str) -> list[str]:
    return ["rank", *params, f"{metric}_mean", f"{metric}_std", "runs", "status", "train_seconds", "jobs",
            "error"]  # fmt: skip


def to_csv(rows: list[dict], params: list[str], metric: str) -> str:
    """Full precision (repr) for the numbers: the CSV is for machines and re-analysis."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(_header(params, metric))
    for r in rows:
        w.writerow([
            fmt(r["rank"]), *(r["params"][p] for p in params),
            "" if r["mean"] is None else repr(r["mean"]), "" if r["std"] is None else repr(r["std"]),
            f"{r['n']}/{r['of']}", r["status"],
            "" if r["train_seconds"] is None else f"{r['train_seconds']:.3f}",
            ";".join(r["jobs"]), r["error"] or "",
        ])  # fmt: skip
    return buf.getvalue()


def _cells(r: dict, params: list[str]) -> list[str]:
    score = fmt(r["mean"]) + (f" ± {fmt(r['std'])}" if r["std"] is not None else "")
    return [fmt(r["rank"]), *(str(r["params"][p]) for p in params), score, f"{r['n']}/{r['of']}",
            r["status"], fmt(r["train_seconds"])]  # fmt: skip


def to_markdown(rows: list[dict], params: list[str], metric: str) -> str:
    head = ["rank", *params, f"{metric} (mean ± std)", "runs", "status", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cells(r, params)) + " |" for r in rows]
    failed = [r for r in rows if r["error"]]
    if failed:
        lines += ["", "Errors:", ""]
        lines += [f"- {_row_name(r)}: {r['error'].splitlines()[0]}" for r in failed]
    return "\n".join(lines) + "\n"


def _params_text(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "base config"


def _row_name(r: dict) -> str:
    return f"rank {r['rank']} ({_params_text(r)})" if r["rank"] is not None else _params_text(r)


def rich_table(rows: list[dict], params: list[str], metric: str, *, title: str):
    from rich.table import Table
    from rich.text import Text

    t = Table(title=Text(title), title_justify="left")  # Text: a value like "[x]" is not markup
    for h in ["rank", *params, f"{metric} (mean ± std)", "runs", "status", "train s"]:
        t.add_column(h, justify="left" if h in params or h == "status" else "right")
    for r in rows:
        style = None if r["status"] == "ok" else ("yellow" if r["status"] == "partial" else "red")
        t.add_row(*map(Text, _cells(r, params)), style=style)
    return t


def write_text(path: Path, text: str) -> None:
    """Atomic: a reader (or a crash) never sees a half-written file."""
    atomic_write(path, text)


def plot(rows: list[dict], params: list[str], metric: str, out: Path) -> Path | None:
    """One panel per parameter: every config's mean (± std across folds), and the best per value."""
    ok = [r for r in rows if r["mean"] is not None]
    if not ok or not params:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = min if direction(metric) == "min" else max
    fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.6), squeeze=False)
    for ax, p in zip(axes[0], params, strict=True):
        values = sorted(
            {r["params"][p] for r in ok}, key=lambda v: (not _number(v), v if _number(v) else str(v))
        )
        numeric = all(_number(v) for v in values)
        pos = {v: (v if numeric else i) for i, v in enumerate(values)}
        xs = [pos[r["params"][p]] for r in ok]
        ax.errorbar(xs, [r["mean"] for r in ok], yerr=[r["std"] or 0 for r in ok], fmt="o", alpha=0.5,
                    capsize=3, label="configs")  # fmt: skip
        tops = [best(r["mean"] for r in ok if r["params"][p] == v) for v in values]
        ax.plot([pos[v] for v in values], tops, "-", color="C1", label="best per value")
        if numeric and min(values) > 0 and max(values) / min(values) >= 10:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set(xlabel=p, ylabel=metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{metric} vs swept parameters")
    return save_figure(fig, out)
