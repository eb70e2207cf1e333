"""The `hpcml` command in real processes: exit codes, messages, --json, --help."""

import json
import subprocess
import sys

import pytest

SMALL = [
    "--data",
    "synthetic",
    "--rows",
    "400",
    "--features",
    "6",
    "--classes",
    "2",
    "--epochs",
    "2",
    "--threads",
    "1",
    "--quiet",
]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "nope"], "unknown dataset 'nope': not a built-in (mnist1d, digits, synthetic, shapes)"),
        (
            ["--model", "resnet"],
            "model.name: unknown model 'resnet'; valid: auto, mlp, cnn1d, convnet1d, cnn2d, mobilenet_v2, "
            "mobilenet_v3_small, resnet18, resnet34, or",
        ),
        (
            ["--optimizer", "lbfgs"],
            "optim.name: Input should be 'sgd', 'adam', 'adamw' or 'gd' (got 'lbfgs')",
        ),
        (["--schedule", "step"], "optim.schedule: Input should be 'constant', 'cosine' or 'onecycle'"),
        (["--lr", "0"], "optim.lr: Input should be greater than 0 (got 0.0)"),
        (["--lr", "-1"], "optim.lr: Input should be greater than 0 (got -1.0)"),
        (["--batch-size", "0"], "batch_size: Input should be greater than 0 (got 0)"),
        (["--epochs", "0"], "epochs: Input should be greater than 0 (got 0)"),
        (["--precision", "fp8"], "precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16' (got 'fp8')"),
        (["--device", "tpu"], "device: unknown device 'tpu'; valid: auto, cpu, cuda, cuda:N"),
        (["--set", "optim.bogus=1"], "optim.bogus: Extra inputs are not permitted"),
        (["--model-kw", "hidden"], "--model-kw expects KEY=VALUE, got 'hidden'"),
        (
            ["--model", "mlp", "--model-kw", "widht=3"],
            "model mlp: MLP.__init__() got an unexpected keyword argument 'widht'",
        ),
    ],
)
def test_bad_input_exit_2_names_the_field(cli, tmp_path, args, message):
    out = tmp_path / "run"
    r = cli("train", *SMALL, *args, "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert not (out / "model").exists()


def test_bad_flag_type_is_usage_error(cli):
    r = cli("train", "--epochs", "ten")
    assert r.returncode == 2 and "Invalid value for '--epochs'" in r.stderr


def test_missing_config_file(cli, tmp_path):
    r = cli("train", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "cannot read config" in r.stderr and "nope.yaml" in r.stderr


def test_runtime_failure_exit_1_and_no_model_dir(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("train", *SMALL, "--optimizer", "sgd", "--lr", "1e30", "--out", str(out))
    assert r.returncode == 1, r.stderr
    assert "training diverged at epoch 1" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "model").exists() and not (out / "report.json").exists()


def test_train_json_and_evaluate(cli, tmp_path):
    out = tmp_path / "run"
    r = cli("train", *SMALL, "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report == json.loads((out / "report.json").read_text())
    assert report["epochs"] == 2 and report["data"]["train_rows"] == 320
    r = cli("evaluate", str(out / "model"), "--data", "synthetic", "--json")
    assert r.returncode != 0  # the default synthetic (32 features) does not fit this 6-feature model
    assert "expects (6,)" in r.stderr
    r = cli("train", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "again"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["test_accuracy"] == report["test_accuracy"]


def test_evaluate_on_builtin(cli, tmp_path):
    out = tmp_path / "run"
    r = cli(
        "train",
        "--data",
        "digits",
        "--layout",
        "flat",
        "--epochs",
        "3",
        "--threads",
        "1",
        "--out",
        str(out),
        "--json",
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    r = cli("evaluate", str(out / "model"), "--data", "digits", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["test_accuracy"] == pytest.approx(report["test_accuracy"], abs=1e-6)
    r = cli("evaluate", str(tmp_path / "missing"))
    assert r.returncode == 2 and "not a model dir" in r.stderr


def test_human_summary_and_version(cli, tmp_path):
    r = cli("train", *[a for a in SMALL if a != "--quiet"], "--optimizer", "gd", "--out", str(tmp_path / "r"))
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout and "full batch" in r.stdout and str(tmp_path / "r") in r.stdout
    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == "hpcml 0.1.0"


def test_help_has_examples_and_does_not_import_heavy_modules():
    code = (
        "import sys; from hpcml.cli import main\n"
        "rc = main(['train', '--help'])\n"
        "heavy = [m for m in ('torch', 'ray', 'pyarrow', 'matplotlib', 'sklearn') if m in sys.modules]\n"
        "print('HEAVY', heavy, rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY [] 0" in r.stdout, r.stdout + r.stderr
    assert "Examples:" in r.stdout and "hpcml train --data digits --model cnn2d" in r.stdout
    r = subprocess.run(
        [sys.executable, "-c", "import hpcml, sys; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.strip() == "False"
