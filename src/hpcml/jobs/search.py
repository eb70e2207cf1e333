"""Optuna for sweeps: TPE search and pruning of bad trials, with the study in the sweep folder.

The study lives in `OUT/optuna.db` (SQLite), so every job process (spawned locally, or a Ray worker
that sees the sweep folder) opens the same one, and a rerun of the sweep continues it. The driver asks
for trials (with TPE, its parameters); each job reports its per-epoch validation metric to its trial
through the `Pruning` callback, stops when the pruner says so, and tells the study how it ended, so
the pruner's comparisons and TPE's next guesses see every finished trial at once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hpcml.errors import UsageError
from hpcml.training.callbacks import Callback

__all__ = ["PRUNERS", "SEARCHES", "Pruning", "open_study", "ask", "trial_spec"]

SEARCHES = ("grid", "random", "tpe")
PRUNERS = ("median", "asha")
STUDY = "hpcml-sweep"


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UsageError("--search tpe and --prune need Optuna: pip install 'hpcml[optuna]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def storage_url(out: Path) -> str:
    return f"sqlite:///{Path(out).absolute() / 'optuna.db'}"


def make_pruner(name: str | None) -> Any:
    """median: stop a trial whose metric is below the median of finished trials at the same epoch (after
    2 finished trials and 1 epoch). asha: successive halving over epochs (rungs at 1, 3, 9, ... epochs,
    keeping the best third), which needs no finished trials."""
    optuna = import_optuna()
    if name is None:
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if name == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    raise UsageError(f"unknown pruner {name!r}; valid: {', '.join(PRUNERS)}")


def open_study(out: Path, *, prune: str | None, seed: int, direction: str = "maximize") -> Any:
    optuna = import_optuna()
    study = optuna.create_study(
        storage=storage_url(out), study_name=STUDY, direction=direction, load_if_exists=True,
        pruner=make_pruner(prune),
    )  # fmt: skip
    # a rerun draws on from where the study is: seeded as the first run, it would repeat its points
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.get_trials(deepcopy=False)))
    return study


def distributions(params: dict[str, Any]) -> dict[str, Any]:
    """A sweep's values as Optuna distributions: a list is categorical, a range float/int (log)."""
    optuna = import_optuna()
    out = {}
    for name, v in params.items():
        if isinstance(v, list):
            out[name] = optuna.distributions.CategoricalDistribution(v)
        elif v.integer:
            out[name] = optuna.distributions.IntDistribution(int(v.lo), int(v.hi), log=v.log)
        else:
            out[name] = optuna.distributions.FloatDistribution(v.lo, v.hi, log=v.log)
    return out


def ask(study: Any, params: dict[str, Any], *, point: dict[str, Any] | None = None) -> tuple[Any, dict]:
    """A new trial: with TPE its point is sampled (`point=None`), else the given point is recorded."""
    trial = study.ask(distributions(params) if point is None else {})
    if point is None:
        point = {k: _round(v) for k, v in trial.params.items()}
    trial.set_user_attr("point", point)
    return trial, point


def _round(v: Any) -> Any:
    return float(f"{v:.4g}") if isinstance(v, float) else v  # as random search rounds its draws


def finished_trials(study: Any) -> list[Any]:
    """The trials that ended (complete or pruned), each with its point in user_attrs; trials a killed
    sweep left running are marked failed (their jobs run again as new trials)."""
    optuna = import_optuna()
    done = []
    for t in study.get_trials(deepcopy=False):
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
            done.append(t)
        elif t.state == optuna.trial.TrialState.RUNNING:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    return done


def trial_spec(out: Path, trial: Any, *, prune: str | None) -> dict[str, Any]:
    """What a job needs to find its trial: plain values, sent to a spawned process or a Ray worker."""
    return {"storage": storage_url(out), "number": trial.number, "prune": prune}


def fail(study: Any, number: int) -> None:
    """The driver marks a trial failed whose job crashed before it could say so itself."""
    optuna = import_optuna()
    study.tell(number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def tell_like(study: Any, trial: Any, other: Any | None) -> None:
    """End `trial` as `other` (the trial of the same config) ended; failed if it has not (yet)."""
    state = import_optuna().trial.TrialState
    done = next((t for t in study.get_trials(deepcopy=False) if other and t.number == other.number), None)
    if done is not None and done.state == state.COMPLETE:
        study.tell(trial, done.value)
    else:
        pruned = done is not None and done.state == state.PRUNED
        study.tell(trial, state=state.PRUNED if pruned else state.FAIL)


class Pruning(Callback):
    """In a sweep job: report the validation metric (val_accuracy, val_r2) each epoch to the job's
    trial, stop the run when the pruner says so, and tell the study the trial's end (its last value, or
    pruned)."""

    def __init__(self, *, storage: str, number: int, prune: str | None):
        self.storage, self.number, self.prune = storage, number, prune
        self.pruned = False

    def on_train_start(self, run, state) -> None:
        optuna = import_optuna()
        storage = optuna.storages.RDBStorage(self.storage)
        self.study = optuna.load_study(study_name=STUDY, storage=storage, pruner=make_pruner(self.prune))
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(STUDY), self.number
        )
        self.trial = optuna.trial.Trial(self.study, trial_id)
        self.key = f"val_{run.metric}"

    def on_epoch_end(self, run, state, row) -> None:
        if self.key not in row:
            raise UsageError(
                f"--search tpe / --prune need {self.key} each epoch: data.val_fraction on a file or "
                "store (the built-in datasets have no validation split)"
            )
        self.trial.report(float(row[self.key]), row["epoch"])
        if row["epoch"] < run.cfg.epochs and self.trial.should_prune():
            self.pruned = True
            state.stop = f"pruned ({self.prune}) at epoch {row['epoch']}: {self.key} {row[self.key]:.4f}"

    def on_train_end(self, run, state) -> None:
        optuna = import_optuna()
        if self.pruned:
            self.study.tell(self.number, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
        else:
            self.study.tell(self.number, float(state.rows[-1][self.key]), skip_if_finished=True)
        logging.getLogger("hpcml").debug("trial %d: %s", self.number, state.stop or "complete")
