"""Hyper-parameter sweeps and cross-validation: many training jobs, one table.

A sweep expands `--param NAME=V1,V2` options into configs (the full grid, or `random` of them), and
each config into `folds` jobs. A job is one `TrainConfig`, trained in its own process by the task
runner (tasks.py); its run dir is `OUT/runs/<id>`, where the id is a hash of the job's resolved config,
so rerunning a sweep skips every job whose run dir has a report.json and retries the rest.

Random search (`random=N`): with only value lists, N distinct points of the grid, chosen with `seed`;
a value may also be a range, `lo..hi` (uniform) or `lo..hi:log` (log-uniform; integers if both ends
are integers), and then every one of the N points draws each parameter independently (floats are
rounded to 4 significant digits, so a point's values read well and hash the same on every rerun).

Outputs in OUT: results.csv / results.md (one row per config, sorted by the metric, mean and sample
std across folds), best.yaml (the best config without folds: `hpcml train --config OUT/best.yaml`),
`<metric>_vs_params.png`, and sweep.json (every job, its status, attempts and error).
"""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcml._system import available_cores
from hpcml.config import TrainConfig, build_config, dump_config, merge
from hpcml.errors import UsageError
from hpcml.jobs import search
from hpcml.jobs import sweep_report as report

# job_id and run_job (the task function, by its older spec hpcml.jobs.sweep:run_job too) re-exported
from hpcml.jobs.sweep_jobs import Plan, check_search, job_id, make_job, run_job  # noqa: F401
from hpcml.jobs.tasks import Event

__all__ = ["sweep", "SweepResult", "valid_params", "parse_params"]

ALIASES = {"lr": "optim.lr", "optimizer": "optim.name", "model": "model.name", "data": "data.name"}
RESERVED = {
    "data.folds": "use folds= (--folds K) for cross-validation",
    "data.fold": "use folds= (--folds K) for cross-validation",
    "threads": "threads per job follow from workers= (--workers): cores // workers",
}


@dataclass
class SweepResult:
    """What `hpcml.sweep` did: the table rows (best first), the best row, failed jobs, and the files."""

    dir: Path
    metric: str  # the column name: test_accuracy, or cv_accuracy with folds
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    failed: list[dict[str, Any]]
    ran: int
    skipped: int
    summary: dict[str, Any] = field(default_factory=dict)


def valid_params() -> list[str]:
    """Every dotted config field a sweep can vary (model.kwargs.NAME takes any NAME)."""
    return [*(p for p in _leaves(TrainConfig) if p not in RESERVED), "model.kwargs.NAME"]


def _leaves(model: type, prefix: str = "") -> list[str]:
    from pydantic import BaseModel

    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _leaves(ann, f"{prefix}{name}.")
        elif f"{prefix}{name}" != "model.kwargs":
            out.append(f"{prefix}{name}")
    return out


def resolve_name(name: str) -> str:
    """'lr' -> 'optim.lr'; a unique last part ('warmup_fraction') -> its dotted name; else an error."""
    leaves = _leaves(TrainConfig)
    name = name.strip()
    dotted = ALIASES.get(name, name)
    if dotted not in leaves and not (dotted.startswith("model.kwargs.") and len(dotted) > 13):
        by_tail = [p for p in leaves if p.rsplit(".", 1)[-1] == name]
        if len(by_tail) != 1:
            short = sorted({*ALIASES, *(p.rsplit(".", 1)[-1] for p in leaves if p not in RESERVED)})
            raise UsageError(
                f"unknown parameter {name!r}; valid: {', '.join(valid_params())} "
                f"(short forms: {', '.join(s for s in short if _unique_tail(s, leaves) or s in ALIASES)})"
            )
        dotted = by_tail[0]
    if dotted in RESERVED:
        raise UsageError(f"parameter {dotted!r} cannot be swept: {RESERVED[dotted]}")
    return dotted


def _unique_tail(tail: str, leaves: list[str]) -> bool:
    return sum(p.rsplit(".", 1)[-1] == tail for p in leaves) == 1 and tail not in leaves


@dataclass(frozen=True)
class _Range:
    lo: float
    hi: float
    log: bool
    integer: bool


def _scalar(text: str) -> Any:
    """'64' -> 64, '1e-3' -> 0.001, 'true' -> True, 'null' -> None, anything else stays text."""
    import yaml

    text = text.strip()
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, bool | None) else text


def _values(name: str, raw: Any) -> list[Any] | _Range:
    if isinstance(raw, _Range):
        return raw
    if isinstance(raw, list | tuple):
        values = list(raw)
    elif isinstance(raw, str) and ".." in raw:
        spec, _, scale = raw.partition(":")
        lo_text, _, hi_text = spec.partition("..")
        lo, hi = _scalar(lo_text), _scalar(hi_text)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi)) or lo >= hi:
            raise UsageError(f"--param {name}={raw}: a range is LO..HI with numbers LO < HI")
        if scale not in ("", "log") or (scale == "log" and lo <= 0):
            raise UsageError(f"--param {name}={raw}: a range ends in nothing or ':log' (with LO > 0)")
        return _Range(float(lo), float(hi), scale == "log", isinstance(lo, int) and isinstance(hi, int))
    elif isinstance(raw, str):
        values = [_scalar(v) for v in raw.split(",")]
    else:
        values = [raw]
    if not values or any(v == "" for v in values):
        raise UsageError(f"--param {name}: give at least one value, e.g. {name}=1,2")
    return list(dict.fromkeys(values))  # duplicates would be the same job twice


def parse_params(params: dict[str, Any] | list[str] | None) -> dict[str, list[Any] | _Range]:
    """{'lr': [..]} or ['lr=1e-3,1e-2', 'optim.weight_decay=1e-5..1e-2:log'] -> {dotted: values | range}."""
    items: list[tuple[str, Any]] = []
    if isinstance(params, dict):
        items = list(params.items())
    else:
        for pair in params or []:
            key, sep, raw = pair.partition("=")
            if not sep or not key.strip() or not raw.strip():
                raise UsageError(f"--param expects NAME=V1,V2,... or NAME=LO..HI, got {pair!r}")
            items.append((key, raw))
    out: dict[str, list[Any] | _Range] = {}
    for key, raw in items:
        dotted = resolve_name(key)
        if dotted in out:
            raise UsageError(f"parameter {dotted!r} given twice")
        out[dotted] = _values(dotted, raw)
    return out


def _points(params: dict[str, Any], *, random: int | None, seed: int) -> list[dict[str, Any]]:
    names = list(params)
    ranged = [n for n in names if isinstance(params[n], _Range)]
    if random is None:
        if ranged:
            raise UsageError(f"ranges ({', '.join(ranged)}) are sampled: add random=N (--random N)")
        return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*params.values())]
    if random < 1:
        raise UsageError(f"random must be >= 1, got {random}")
    import numpy as np

    rng = np.random.default_rng(seed)
    if not ranged:
        grid = list(itertools.product(*params.values()))
        pick = (
            sorted(rng.choice(len(grid), size=random, replace=False))
            if random < len(grid)
            else range(len(grid))
        )
        return [dict(zip(names, grid[i], strict=True)) for i in pick]
    points: dict[str, dict[str, Any]] = {}
    for _ in range(random):
        point = {n: _draw(params[n], rng) for n in names}
        points.setdefault(json.dumps(point, sort_keys=True), point)
    return list(points.values())


def _draw(values: list[Any] | _Range, rng: Any) -> Any:
    if not isinstance(values, _Range):
        return values[int(rng.integers(len(values)))]
    lo, hi = (math.log(values.lo), math.log(values.hi)) if values.log else (values.lo, values.hi)
    if values.integer and not values.log:
        return int(rng.integers(int(lo), int(hi) + 1))
    x = rng.uniform(lo, hi)
    x = math.exp(x) if values.log else x
    return int(round(x)) if values.integer else float(f"{x:.4g}")


def _check_values(base: dict[str, Any], params: dict[str, Any], source: str) -> None:
    """Each listed value alone on the base config: a bad one is named with its parameter."""
    for name, values in params.items():
        for v in [values.lo, values.hi] if isinstance(values, _Range) else values:
            try:
                build_config(merge(base, {name: v}), source=source)
            except UsageError as err:
                raise UsageError(f"--param {name}={v!r} is not valid:\n{err}") from None


def sweep(
    config: TrainConfig | dict | str | Path | None = None,
    *,
    params: dict[str, Any] | list[str] | None = None,
    out: str | Path | None = None,
    random: int | None = None,
    folds: int | None = None,
    workers: int | None = None,
    backend: str = "local",
    address: str | None = None,
    retries: int = 1,
    metric: str = "test_accuracy",
    seed: int = 0,
    search_kind: str | None = None,
    prune: str | None = None,
    log: list[str] | None = None,
    on_event: Event | None = None,
) -> SweepResult:
    """Train every config of a grid (or `random` of them), each `folds` times, and tabulate them.

    `config` is the base (TrainConfig, dict, or YAML path); `params` maps names to values, e.g.
    `{"lr": [1e-3, 1e-2], "batch_size": [64, 128]}`, or is a list of 'name=v1,v2' strings. Jobs run on
    `workers` processes (default: one per core) of `backend` ('local' or 'ray' at `address`); a failed
    job is retried `retries` times (one failing on invalid input, a UsageError, is not: it would fail
    the same way), then recorded with its error while the others go on. Rerunning with
    the same `out` skips finished jobs. `metric` is a report.json key; losses and times sort ascending.

    `search_kind="tpe"` lets Optuna's TPE choose `random` trials from the same parameters, learning from
    finished ones; `prune="median" | "asha"` stops trials whose per-epoch validation metric falls behind.
    Both need a validation split in the base config and keep their Optuna study in OUT/optuna.db, so a
    rerun continues it. `log=["mlflow"]` logs each job to MLflow, nested under a run for the sweep.
    """
    t0 = time.perf_counter()
    base_cfg = _as_config(config)
    if log:
        base_cfg = build_config({**base_cfg.model_dump(mode="json"), "log": log}, source="--log")
    base = base_cfg.model_dump(mode="json")
    parsed = parse_params(params)
    if folds is not None and (not isinstance(folds, int) or folds < 2):
        raise UsageError(f"folds must be a whole number >= 2, got {folds!r}")
    if base_cfg.data.folds is not None and folds is None:
        folds = base_cfg.data.folds  # a CV base config: its folds become the sweep's folds
    kind = check_search(search_kind, random=random, prune=prune, folds=folds, base_cfg=base_cfg)
    _check_values(base, parsed, "sweep")
    points = [] if kind == "tpe" else _points(parsed, random=random, seed=seed)
    workers = available_cores() if workers is None else workers
    out = Path(out) if out is not None else Path("runs") / time.strftime("sweep-%Y%m%d-%H%M%S")
    out = out.absolute()  # jobs may run elsewhere (Ray workers have their own working directory)
    (out / "runs").mkdir(parents=True, exist_ok=True)

    parent = _mlflow_parent(base_cfg, out, parsed)
    jobs, study = _jobs(base, points, kind=kind, folds=folds, out=out, prune=prune, seed=seed)
    _check_metric(metric, jobs)  # before running, when earlier runs left reports to check against
    plan = Plan(jobs, out=out, base=base, params=parsed, parent=parent, study=study, prune=prune,
                tpe_trials=random if kind == "tpe" else 0)  # fmt: skip
    plan.run(workers=workers, backend=backend, address=address, retries=retries, on_event=on_event)

    _check_metric(metric, jobs)
    table = report.build_rows(jobs, list(parsed), metric=metric, folds=folds)
    result = SweepResult(
        dir=out,
        metric=report.metric_name(metric, folds),
        rows=table,
        best=next((r for r in table if r["status"] == "ok"), None),
        failed=[_job_doc(j) for j in jobs if j["status"] == "failed"],
        ran=sum(j["ran"] for j in jobs),
        skipped=sum(not j["ran"] for j in jobs),
    )
    result.summary = {
        "metric": result.metric, "metric_key": metric, "direction": report.direction(metric),
        "folds": folds, "params": {k: _plain(v) for k, v in parsed.items()}, "random": random,
        "search": kind, "prune": prune,
        "seed": seed, "backend": backend, "workers": workers, "retries": retries,
        "jobs": len(jobs), "ran": result.ran, "skipped": result.skipped, "failed": len(result.failed),
        "wall_seconds": time.perf_counter() - t0, "rows": table, "best": result.best,
        "job_list": [_job_doc(j) for j in jobs], "files": {},
    }  # fmt: skip
    _write_outputs(result, base_cfg, jobs)
    if parent is not None:
        from hpcml.training.tracking import end_parent_run

        best = result.best["mean"] if result.best else None
        end_parent_run(
            parent, {f"best_{result.metric}": best, "jobs": len(jobs), "failed": len(result.failed)}
        )
    return result


def _jobs(
    base: dict, points: list[dict], *, kind: str, folds, out: Path, prune, seed: int
) -> tuple[list, Any]:
    """One job per (point, fold), and the Optuna study when the sweep has one: with TPE the points are
    those of the study's finished trials (a rerun), each job tied to its trial."""
    study, trials = None, []
    if kind == "tpe" or prune:
        study = search.open_study(out, prune=prune, seed=seed)
        trials = search.finished_trials(study)  # and trials a killed sweep left running are failed
        points = [t.user_attrs["point"] for t in trials] if kind == "tpe" else points
    jobs = [
        make_job(base, point, i, fold, folds, out)
        for i, point in enumerate(points)
        for fold in (range(folds) if folds else [None])
    ]
    if kind == "tpe":
        for j, t in zip(jobs, trials, strict=True):
            j["trial"] = t
    if len({j["id"] for j in jobs}) != len(jobs):
        raise UsageError("two parameter combinations give the same config; remove the duplicate values")
    return jobs, study


def _mlflow_parent(base_cfg: TrainConfig, out: Path, parsed: dict[str, Any]) -> str | None:
    """With `log: [mlflow]`, the sweep's own MLflow run: each job's run is nested under it."""
    if "mlflow" not in base_cfg.log:
        return None
    from hpcml.training.tracking import start_parent_run

    return start_parent_run(out.name, {"sweep": {k: _plain(v) for k, v in parsed.items()}})


def _write_outputs(result: SweepResult, base_cfg: TrainConfig, jobs: list[dict]) -> None:
    out, files = result.dir, result.summary["files"]
    params = list(result.summary["params"])
    report.write_text(out / "results.csv", report.to_csv(result.rows, params, result.metric))
    report.write_text(out / "results.md", report.to_markdown(result.rows, params, result.metric))
    files.update(csv="results.csv", markdown="results.md")
    if result.best is not None:
        best = next(j for j in jobs if j["point"] == result.best["point"])["config"]
        data = best.data.model_copy(update={"folds": None, "fold": 0})
        best = best.model_copy(update={"data": data, "threads": base_cfg.threads})
        head = (
            f"# best of the sweep in {out}: {result.metric} {report.fmt(result.best['mean'])}"
            + (f" +- {report.fmt(result.best['std'])}" if result.best["std"] is not None else "")
            + f" ({result.best['n']} run(s)). Re-run: hpcml train --config {out / 'best.yaml'}\n"
        )
        report.write_text(out / "best.yaml", head + dump_config(best))
        files["best"] = "best.yaml"
    plot = report.plot(result.rows, params, result.metric, out / f"{result.metric}_vs_params.png")
    if plot is not None:
        files["plot"] = plot.name
    report.write_text(out / "sweep.json", json.dumps(result.summary, indent=2, default=str) + "\n")


def _as_config(config: TrainConfig | dict | str | Path | None) -> TrainConfig:
    # as hpcml.train reads it, without importing torch: only the workers need it
    from hpcml.config import load_config

    if config is None or isinstance(config, TrainConfig):
        return config or TrainConfig()
    return build_config(config) if isinstance(config, dict) else load_config(config)


def _check_metric(metric: str, jobs: list[dict]) -> None:
    got = next((j["report"] for j in jobs if j["report"]), None)
    if got is not None and not _number(got.get(metric)):
        keys = sorted(k for k, v in got.items() if _number(v))
        raise UsageError(f"unknown metric {metric!r}; report.json has: {', '.join(keys)}")


def _job_doc(j: dict) -> dict[str, Any]:
    return {
        "id": j["id"], "params": j["params"], "fold": j["fold"], "status": j["status"],
        "attempts": j["attempts"], "error": j["error"], "errors": j.get("errors", []),
        "usage_error": j.get("usage_error", False), "ran": j["ran"], "run_dir": str(j["dir"]),
    }  # fmt: skip


def _plain(v: Any) -> Any:
    return {"range": [v.lo, v.hi], "log": v.log, "integer": v.integer} if isinstance(v, _Range) else v


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)
