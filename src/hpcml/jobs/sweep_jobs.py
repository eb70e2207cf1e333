"""A sweep's jobs: one per (point, fold), the tasks that train them, and running them on the Runner,
with an Optuna study (search.py) when the sweep searches with TPE or prunes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpcml.config import build_config, merge
from hpcml.errors import HpcmlError, UsageError
from hpcml.jobs import search
from hpcml.jobs.tasks import Event, Outcome, Runner, Task

RUN_JOB = "hpcml.jobs.sweep_jobs:run_job"


def job_id(cfg) -> str:
    """A hash of what the job computes; `threads` (how fast) and `log` (where to) are left out."""
    import hashlib

    doc = cfg.model_dump(mode="json")
    doc.pop("threads", None)
    doc.pop("log", None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


def make_job(base: dict, point: dict, index: int, fold: int | None, folds: int | None, out: Path) -> dict:
    extra = {} if fold is None else {"data.folds": folds, "data.fold": fold}
    cfg = build_config(merge(base, {**point, **extra}), source=f"sweep point {point}")
    jid = job_id(cfg)
    job = {"id": jid, "point": index, "params": point, "fold": fold, "config": cfg, "dir": out / "runs" / jid,
           "trial": None}  # fmt: skip
    job["report"] = read_report(job["dir"])
    job["status"], job["attempts"], job["error"], job["ran"] = ("done", 0, None, False)
    return job


def read_report(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "report.json").read_text())
    except (OSError, json.JSONDecodeError):  # missing or damaged: the job runs (again)
        return None


class Plan:
    """The jobs to run and how: a fixed list, or (with a study) trials, which TPE keeps asking for
    until `trials` have ended, each finished job making room for the next."""

    def __init__(self, jobs: list[dict], *, out: Path, base: dict, params: dict, parent: str | None,
                 study: Any = None, prune: str | None = None, tpe_trials: int = 0):  # fmt: skip
        self.jobs, self.out, self.base, self.params, self.parent = jobs, out, base, params, parent
        self.study, self.prune, self.left = study, prune, tpe_trials - len(jobs)
        self.by_id = {j["id"]: j for j in jobs}

    def task(self, job: dict) -> Task:
        kwargs = {"config": job["config"].model_dump(mode="json"), "out": str(job["dir"]),
                  "parent_run": self.parent}  # fmt: skip
        if self.study is not None:
            if job["trial"] is None:  # a grid or random point: its trial records it, TPE did not pick it
                job["trial"] = search.ask(self.study, self.params, point=job["params"])[0]
            kwargs["trial"] = search.trial_spec(self.out, job["trial"], prune=self.prune)
        return Task(job["id"], RUN_JOB, kwargs)

    def ask(self) -> list[Task]:
        """The next TPE trial as a task; a point that repeats an earlier job's config counts as a trial
        told that job's value (TPE may sample a categorical point twice)."""
        while self.left > 0:
            self.left -= 1
            trial, point = search.ask(self.study, self.params)
            job = make_job(self.base, point, len(self.jobs), None, None, self.out)
            job["trial"] = trial
            if job["id"] in self.by_id:
                search.tell_like(self.study, trial, self.by_id[job["id"]]["trial"])
                continue
            self.jobs.append(job)
            self.by_id[job["id"]] = job
            return [self.task(job)]
        return []

    def ended(self, outcome: Outcome) -> list[Task]:
        job = self.by_id.get(outcome.id)
        if job is not None and job["trial"] is not None and not outcome.ok:
            search.fail(self.study, job["trial"].number)  # the job could not tell it: it crashed
        return self.ask()

    def run(self, *, workers: int, backend: str, address: str | None, retries: int, on_event: Event | None):
        todo = [self.task(j) for j in self.jobs if j["report"] is None]
        for _ in range(max(0, workers - len(todo))):
            todo += self.ask()
        if not todo:
            return
        with Runner(workers=workers, backend=backend, address=address) as runner:
            outcomes = runner.run(todo, retries=retries, on_event=on_event, more=self.ended)
        for j in self.jobs:
            o = outcomes.get(j["id"])
            if o is not None:
                j.update(ran=True, attempts=o.attempts, errors=o.errors, usage_error=o.usage_error)
                if o.ok:
                    j.update(report=o.value, status="done")
                else:
                    j.update(status="failed", error=o.error)


def check_search(search_kind: str | None, *, random: int | None, prune: str | None, folds, base_cfg) -> str:
    """The search ('grid' | 'random' | 'tpe'), after refusing combinations that cannot work."""
    kind = search_kind or ("grid" if random is None else "random")
    if kind not in search.SEARCHES:
        raise UsageError(f"unknown search {kind!r}; valid: {', '.join(search.SEARCHES)}")
    if prune is not None and prune not in search.PRUNERS:
        raise UsageError(f"unknown pruner {prune!r}; valid: {', '.join(search.PRUNERS)}")
    if kind == "tpe" and random is None:
        raise UsageError("--search tpe needs --random N: the number of trials")
    if kind == "random" and random is None:
        raise UsageError("--search random needs --random N: the number of configs")
    if kind == "tpe" or prune:
        what = "--search tpe" if kind == "tpe" else "--prune"
        if folds:
            raise UsageError(f"{what} does not combine with --folds (a trial is one training run)")
        if not base_cfg.data.val_fraction:
            raise UsageError(
                f"{what} learns from the per-epoch validation metric: give the base config a validation "
                "split (data.val_fraction, e.g. --param data.val_fraction=0.1)"
            )
    return kind


def run_job(
    *,
    config: dict[str, Any],
    out: str,
    threads: int,
    attempt: int,
    parent_run: str | None = None,
    trial: dict[str, Any] | None = None,
) -> dict:
    """One sweep job in a worker: train `config` into `out` and return its report. `trial` ties it to
    its Optuna trial (pruning, TPE); `parent_run` to the sweep's MLflow run."""
    import shutil

    from hpcml.training.run import run_process

    cfg = build_config(config)
    if cfg.threads is None:
        cfg = cfg.model_copy(update={"threads": threads})
    if Path(out).exists():  # an earlier attempt died half-way: start its run dir afresh
        shutil.rmtree(out)
    callbacks = [search.Pruning(**trial)] if trial is not None else []
    run = run_process(cfg, out=out, quiet=True, parent_run=parent_run, callbacks=callbacks)
    if run is None:
        raise HpcmlError(f"{out}: the training run wrote no report")
    return json.loads(json.dumps(run.report))  # plain JSON values, the same as report.json holds
