"""Sweeps with Optuna: TPE search and pruning, checked against the study in the sweep's SQLite file."""

import json

import pytest

import hpcml
from hpcml.errors import UsageError

optuna = pytest.importorskip("optuna", reason="the optuna extra is not installed")

BASE = {
    "data": {"name": "", "target": "y", "val_fraction": 0.2},  # a CSV: user data has validation splits
    "model": {"name": "mlp", "kwargs": {"hidden": 32}},
    "epochs": 6,
    "batch_size": 64,
    "precision": "fp32",
    "optim": {"schedule": "constant"},
    "checkpoint": {"every": None},
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from sklearn.datasets import make_classification

    x, y = make_classification(800, 8, n_informative=5, n_classes=3, random_state=0)
    path = tmp_path_factory.mktemp("data") / "train.csv"
    lines = [",".join([*(f"f{i}" for i in range(8)), "y"])]
    lines += [",".join([*(f"{v:.5f}" for v in row), str(label)]) for row, label in zip(x, y, strict=True)]
    path.write_text("\n".join(lines) + "\n")
    return {**BASE, "data": {**BASE["data"], "name": str(path)}}


def _study(out):
    return optuna.load_study(study_name="hpcml-sweep", storage=f"sqlite:///{out / 'optuna.db'}")


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_trials_match_run_dirs(out, study, epochs=BASE["epochs"]):
    """Every trial's reported values are its run's per-epoch val_accuracy; its end is the run's end."""
    state = optuna.trial.TrialState
    for t in study.get_trials():
        res = [
            r
            for r in json.loads((out / "sweep.json").read_text())["job_list"]
            if r["params"] == t.user_attrs["point"]
        ]
        assert len(res) == 1
        rows = _rows(out / "runs" / res[0]["id"])
        assert t.intermediate_values == {r["epoch"]: r["val_accuracy"] for r in rows}
        if t.state == state.PRUNED:
            assert len(rows) < epochs
        else:
            assert t.state == state.COMPLETE and t.value == rows[-1]["val_accuracy"] and len(rows) == epochs


@pytest.mark.parametrize("prune", [pytest.param("median", marks=pytest.mark.slow), "asha"])
def test_pruning_stops_bad_trials_early_on_the_local_pool(base, tmp_path, prune):
    # two good learning rates first, then hopeless ones: once two have finished, the rest fall behind
    lrs = [0.05, 0.03, 1e-6, 2e-6, 3e-6]
    res = hpcml.sweep(base, params={"lr": lrs}, workers=2, prune=prune, out=tmp_path)
    assert res.failed == []
    study = _study(tmp_path)
    assert len(study.trials) == 5
    pruned = {t.number for t in study.trials if t.state == optuna.trial.TrialState.PRUNED}
    hopeless = {t.number for t in study.trials if t.user_attrs["point"]["optim.lr"] < 1e-5}
    if prune == "median":  # the first two finished trials are the reference: never pruned
        assert pruned <= hopeless and len(pruned) >= 2
    else:  # asha may stop the second good one at epoch 1 if the first did better there; never a hopeless one
        assert hopeless <= pruned
    _check_trials_match_run_dirs(tmp_path, study)
    status = {r["params"]["optim.lr"]: r["status"] for r in res.rows}
    assert res.best["params"]["optim.lr"] in (0.05, 0.03) and res.best["status"] == "ok"
    assert sum(s == "pruned" for s in status.values()) == len(pruned)


def test_tpe_search_keeps_its_study_in_the_sweep_folder_and_resumes(base, tmp_path):
    params = {"lr": "1e-4..0.1:log", "model.kwargs.hidden": [16, 32]}
    base = {**base, "epochs": 2}
    first = hpcml.sweep(base, params=params, random=3, search_kind="tpe", workers=2, out=tmp_path, seed=3)
    assert first.failed == [] and first.ran == 3 and len(_study(tmp_path).trials) == 3
    again = hpcml.sweep(base, params=params, random=4, search_kind="tpe", workers=2, out=tmp_path, seed=3)
    study = _study(tmp_path)
    assert again.ran == 1 and again.skipped == 3 and len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    for t in study.trials:  # the config each job trained is the one TPE chose
        point = t.user_attrs["point"]
        assert point["optim.lr"] == float(f"{t.params['optim.lr']:.4g}")
        assert point["model.kwargs.hidden"] == t.params["model.kwargs.hidden"]
    _check_trials_match_run_dirs(tmp_path, study, epochs=2)


def test_search_and_prune_refuse_what_cannot_work(base, tmp_path):
    no_val = {**base, "data": {**base["data"], "val_fraction": 0.0}}
    with pytest.raises(UsageError, match="validation split"):
        hpcml.sweep(no_val, params={"lr": [0.1, 0.2]}, prune="median", out=tmp_path)
    with pytest.raises(UsageError, match="--search tpe needs --random N"):
        hpcml.sweep(base, params={"lr": "0.1..0.2"}, search_kind="tpe", out=tmp_path)
    with pytest.raises(UsageError, match="does not combine with --folds"):
        hpcml.sweep(base, params={"lr": [0.1, 0.2]}, prune="asha", folds=2, out=tmp_path)
    with pytest.raises(UsageError, match="unknown pruner 'hyperband'; valid: median, asha"):
        hpcml.sweep(base, params={"lr": [0.1, 0.2]}, prune="hyperband", out=tmp_path)


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'hpcml[ray]')")
    from hpcml.jobs.ray_backend import start_local_ray

    stop = start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()
    stop()


def test_asha_prunes_on_ray_through_the_same_sqlite_study(ray_instance, base, tmp_path):
    lrs = [0.05, 0.03, 1e-6, 2e-6, 3e-6]
    res = hpcml.sweep(base, params={"lr": lrs}, workers=2, prune="asha", backend="ray", out=tmp_path)
    assert res.failed == []
    study = _study(tmp_path)
    pruned = {t.number for t in study.trials if t.state == optuna.trial.TrialState.PRUNED}
    hopeless = {t.number for t in study.trials if t.user_attrs["point"]["optim.lr"] < 1e-5}
    assert len(study.trials) == 5 and hopeless <= pruned
    _check_trials_match_run_dirs(tmp_path, study)
