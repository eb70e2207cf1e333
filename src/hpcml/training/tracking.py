"""Loggers for the trackers users already run: TensorBoard event files and MLflow. Callbacks, rank 0 only.

Both log each epoch's metrics row (losses, accuracies, lr, samples/s), the config, and report.json as
the final metrics; MLflow also gets the model dir (safetensors + JSON) and report.json as artifacts.
They are optional extras, imported when a run asks for them (`log: [tensorboard, mlflow]`).

A tracker that fails never fails the run: the run dir is written as always, and a warning on the
"hpcml" logger names what was not logged. MLflow's address is MLflow's own setting
(MLFLOW_TRACKING_URI; without it MLflow's local store, ./mlflow.db with artifacts in ./mlruns).
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hpcml.errors import UsageError
from hpcml.training.callbacks import Callback

__all__ = ["LOGGERS", "TensorBoardLogger", "MLflowLogger", "loggers", "mlflow_client", "start_parent_run"]

LOGGERS = ("tensorboard", "mlflow")
EXPERIMENT = "hpcml"
log = logging.getLogger("hpcml")


def _require(module: str, extra: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"--log {extra} needs {extra}: pip install 'hpcml[{extra}]'") from None


def check_available(names: list[str]) -> None:
    """Fail before training when a chosen logger's extra is not installed."""
    for name in names:
        _require("tensorboard" if name == "tensorboard" else "mlflow", name)


def loggers(
    names: list[str], run_dir: Path, *, is_main: bool, parent_run: str | None = None
) -> list[Callback]:
    """The loggers a config names, for rank 0 (other ranks log nothing)."""
    if not is_main:
        return []
    check_available(names)
    out: list[Callback] = []
    if "tensorboard" in names:
        out.append(TensorBoardLogger(run_dir))
    if "mlflow" in names:
        out.append(MLflowLogger(run_dir, parent_run=parent_run))
    return out


def _numbers(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _flat(doc: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A config as MLflow params: dotted keys, JSON values ('optim.lr' -> '0.01')."""
    out: dict[str, str] = {}
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)
    return out


class TensorBoardLogger(Callback):
    """Event files in `<run dir>/tensorboard/`: every number of each epoch's row, step = epoch; the
    config as text; report.json's numbers under `report/`."""

    def __init__(self, run_dir: Path):
        self.dir, self.writer = Path(run_dir) / "tensorboard", None

    def on_train_start(self, run, state) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (checked)

        from hpcml.config import dump_config

        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.writer.add_text("config", "```\n" + dump_config(run.cfg) + "```", global_step=state.epoch)

    def on_epoch_end(self, run, state, row) -> None:
        for key, value in _numbers(row).items():
            if key != "epoch":
                self.writer.add_scalar(key, value, global_step=row["epoch"])
        self.writer.flush()

    def on_train_end(self, run, state) -> None:
        report = _read_report(self.dir.parent)
        for key, value in _numbers(report or {}).items():
            self.writer.add_scalar(f"report/{key}", value, global_step=state.epoch)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _read_report(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None


def mlflow_client() -> Any:
    """An MlflowClient at MLflow's configured tracking URI, or None (with a warning) when that is a
    server that does not answer: MLflow's own retries would hold a run for minutes."""
    tracking = _require("mlflow.tracking", "mlflow")
    client = tracking.MlflowClient()
    uri = str(client.tracking_uri)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3):
                pass
        except OSError as err:
            log.warning("mlflow: tracking server %s does not answer (%s)", uri, getattr(err, "reason", err))
            return None
    return client


def _experiment(client: Any) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    return exp.experiment_id if exp is not None else client.create_experiment(EXPERIMENT)


def start_parent_run(name: str, params: dict[str, Any]) -> str | None:
    """An MLflow run for a sweep, the parent of its jobs' runs; None (warned) if MLflow is down."""
    client = mlflow_client()
    if client is None:
        log.warning("mlflow: not logged: the sweep %s and its jobs (their run dirs have everything)", name)
        return None
    try:
        run = client.create_run(_experiment(client), run_name=name)
        client.log_batch(run.info.run_id, params=_params(params))
    except Exception as err:  # noqa: BLE001 - a tracker never fails the work
        log.warning("mlflow: not logged: the sweep %s and its jobs (%s)", name, _first_line(err))
        return None
    return run.info.run_id


def end_parent_run(run_id: str | None, metrics: dict[str, Any]) -> None:
    if run_id is None:
        return
    try:
        client = _require("mlflow.tracking", "mlflow").MlflowClient()
        client.log_batch(run_id, metrics=_metrics(_numbers(metrics), step=0))
        client.set_terminated(run_id, "FINISHED")
    except Exception as err:  # noqa: BLE001
        log.warning("mlflow: not logged: the sweep's summary and end (%s)", _first_line(err))


def _params(values: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in _flat(values).items()]


def _metrics(values: dict[str, float], *, step: int, prefix: str = "") -> list[Any]:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(prefix + k, v, now, step) for k, v in values.items()]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


class MLflowLogger(Callback):
    """One MLflow run per training run (nested under `parent_run`, a sweep's): the config as params,
    each epoch's numbers (step = epoch), report.json's numbers as `report.*`, and the model dir and
    report.json as artifacts."""

    def __init__(self, run_dir: Path, *, parent_run: str | None = None):
        self.dir, self.parent = Path(run_dir), parent_run
        self.client: Any = None
        self.run_id: str | None = None
        self.missed: list[str] = []  # what could not be logged, for the warning at the end
        self.ended = False

    def _do(self, what: str, fn: Callable[[], Any]) -> None:
        if self.missed:  # after a first failure nothing more is tried: each try could take MLflow's retries
            self.missed.append(what)
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - a tracker never fails the run
            self.missed.append(f"{what} ({_first_line(err)})")

    def on_train_start(self, run, state) -> None:
        self.client = mlflow_client()
        if self.client is None:
            self.missed.append("the run's start")
            return

        def start() -> None:
            tags = {"mlflow.parentRunId": self.parent} if self.parent else None
            created = self.client.create_run(_experiment(self.client), run_name=self.dir.name, tags=tags)
            self.run_id = created.info.run_id
            self.client.log_batch(self.run_id, params=_params(run.cfg.model_dump(mode="json")))

        self._do("the run's start and config", start)

    def on_epoch_end(self, run, state, row) -> None:
        metrics = {k: v for k, v in _numbers(row).items() if k != "epoch"}
        self._do(
            f"epoch {row['epoch']} metrics",
            lambda: self.client.log_batch(self.run_id, metrics=_metrics(metrics, step=row["epoch"])),
        )

    def on_train_end(self, run, state) -> None:
        report = _read_report(self.dir) or {}

        def finish() -> None:
            self.client.log_batch(
                self.run_id, metrics=_metrics(_numbers(report), step=state.epoch, prefix="report.")
            )
            self.client.log_artifact(self.run_id, str(self.dir / "report.json"))
            self.client.log_artifacts(self.run_id, str(self.dir / "model"), artifact_path="model")
            self.client.set_terminated(self.run_id, "FINISHED")

        self._do("the final report and model dir", finish)
        self.ended = True

    def close(self) -> None:
        if not self.ended and self.run_id is not None and not self.missed:
            self._do("the run's failed end", lambda: self.client.set_terminated(self.run_id, "FAILED"))
        if self.missed:
            log.warning(
                "mlflow: not logged to %s: %s; the run dir %s has everything",
                os.environ.get("MLFLOW_TRACKING_URI", "MLflow's local store"),
                ", ".join(self.missed),
                self.dir,
            )
