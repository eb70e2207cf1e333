"""Typed configs, one per component, and YAML load/dump.

The same `TrainConfig` drives the CLI, the Python API, a sweep job and a DDP rank. The file written to a
run dir (`config.yaml`) is the fully resolved config and re-runs the same training as is.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hpcml.errors import UsageError

__all__ = [
    "CallbackSpec",
    "CheckpointConfig",
    "DataConfig",
    "DDPConfig",
    "ModelConfig",
    "OptimConfig",
    "RayLaunchConfig",
    "ServeConfig",
    "TrainConfig",
    "load_config",
    "dump_config",
]

OPTIMIZERS = ("sgd", "adam", "adamw", "gd")
SCHEDULES = ("constant", "cosine", "onecycle")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the data comes from: `name` is a built-in dataset (`hpcml.data.list_datasets()`) or the
    path / fsspec URL of a CSV, Parquet, NumPy file, image folder or hpcml dataset store."""

    name: str = "mnist1d"
    layout: Literal["auto", "flat", "image"] = Field(
        "auto", description="digits: 'image' gives 1x8x8 inputs, 'flat' 64 features; auto = image"
    )
    normalize: Literal["standard", "minmax", "none"] = "standard"
    # synthetic only
    rows: int = Field(10_000, gt=0, description="synthetic and shapes: number of rows")
    features: int = Field(32, gt=0, description="synthetic: number of features")
    classes: int = Field(4, ge=2, description="synthetic: number of classes")
    data_seed: int = Field(0, description="synthetic: generation seed")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="synthetic and files: share of rows held out")
    # user files and stores (data/user.py)
    target: str | None = Field(None, description="label column (NumPy: array name, default y)")
    columns: list[str] | None = Field(None, description="feature columns (default: all but the target)")
    missing: Literal["drop", "mean", "median", "error"] = Field(
        "drop", description="rows with NaN/Inf features or no label: drop, impute (mean/median) or fail"
    )
    task: Literal["auto", "classification", "regression"] = Field(
        "auto", description="auto: regression when the target has non-integral numbers"
    )
    drop_duplicates: bool = Field(False, description="drop repeated (features, label) rows (always counted)")
    drop_constant: bool = Field(False, description="drop constant feature columns (always reported)")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="share of all rows held out for validation")
    test_data: str | None = Field(None, description="a separate test file/store instead of test_fraction")
    image_size: int | None = Field(
        None, gt=0, description="image folders: resize every image to N x N; shapes: its size (32)"
    )
    memory_budget: str | None = Field(
        None, description="stores larger than this stream from disk (e.g. 64MB, 2GiB); default 25% of RAM"
    )
    # cross-validation (data/folds.py): fold `fold` of the training split, stratified and seeded by
    # data_seed, becomes the evaluation ("test") split; the other folds train.
    folds: int | None = Field(None, ge=2, description="cross-validation: folds of the training split")
    fold: int = Field(0, ge=0, description="cross-validation: the fold held out for evaluation")

    @model_validator(mode="after")
    def _fold_in_range(self) -> DataConfig:
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"data.fold must be in 0..{self.folds - 1} for data.folds={self.folds}")
        return self


class ModelConfig(_Strict):
    """The model: `auto`, a built-in or installed plugin name (`hpcml models`), or a spec
    `module:function` naming your own factory `f(input_shape, num_outputs, **kwargs) -> nn.Module`;
    `kwargs` are passed to it."""

    name: str = "auto"
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from hpcml.models.registry import name_problem  # checks syntax and names; imports nothing

        problem = None if v == "auto" else name_problem(v)
        if problem:
            raise ValueError(problem.replace("valid: ", "valid: auto, ", 1))
        return v


class OptimConfig(_Strict):
    name: Literal["sgd", "adam", "adamw", "gd"] = "adamw"
    lr: float | None = Field(
        None, gt=0, description="peak lr for onecycle; null: the model's recipe (convnet1d 3e-2), else 1e-2"
    )
    momentum: float | None = Field(None, ge=0, lt=1, description="sgd/gd; default 0.9 for sgd, 0 for gd")
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    # onecycle (warm up, then anneal): measured 98.8% on MNIST-1D in 10 epochs where cosine needed 30
    schedule: Literal["constant", "cosine", "onecycle"] = "onecycle"
    warmup_fraction: float = Field(0.25, ge=0, lt=1, description="onecycle: share of steps warming up")

    @model_validator(mode="after")
    def _resolve_momentum(self) -> OptimConfig:
        # Resolved here, not at build time, so config.yaml holds the value used and re-runs identically.
        if self.momentum is None and self.name in ("sgd", "gd"):
            self.momentum = 0.9 if self.name == "sgd" else 0.0
        return self


class CheckpointConfig(_Strict):
    """When checkpoints are written to `<run dir>/checkpoints/` (always also at the end of a run)."""

    every: str | None = Field(
        "1e", description="'N' = every N optimizer steps, 'Ne' = every N epochs, null = only at the end"
    )
    keep: int = Field(2, ge=1, description="newest checkpoints kept; the last good one is never deleted")
    on_error: Literal["stop", "continue"] = Field(
        "stop", description="a failed save (full disk, I/O error): stop the run, or warn and go on"
    )

    @field_validator("every", mode="before")
    @classmethod
    def _every(cls, v: str | int | None) -> str | None:
        if v is None or str(v).strip().lower() in ("", "off", "none", "end"):
            return None
        text = str(v).strip().lower()
        digits = text[:-1] if text.endswith("e") else text
        if not digits.isdigit() or int(digits) < 1:
            raise ValueError(f"expected N (steps), Ne (epochs) or off, got {v!r}")
        return text

    def interval(self) -> tuple[int, str] | None:
        """(N, 'step' | 'epoch'), or None when only the final checkpoint is written."""
        if self.every is None:
            return None
        if self.every.endswith("e"):
            return int(self.every[:-1]), "epoch"
        return int(self.every), "step"


class DDPConfig(_Strict):
    """How data-parallel ranks exchange gradients (DDP; ignored by a run of one process).

    `grad_compression`: none keeps the all-reduce in fp32, so a DDP run computes what one process with
    the global batch computes; bf16/fp16 halve the bytes sent (DDP's compression hooks) and round the
    averaged gradients. `bucket_mb`: DDP's all-reduce bucket size; auto sizes it from the model's
    gradient bytes (`hpcml.distributed.dist.bucket_mb`)."""

    grad_compression: Literal["none", "bf16", "fp16"] = Field(
        "none", description="all-reduce gradients as fp32 (none), bf16 or fp16"
    )
    bucket_mb: float | Literal["auto"] = Field(
        "auto", description="all-reduce bucket size in MB; auto: from the model's gradient bytes"
    )

    @field_validator("bucket_mb", mode="before")
    @classmethod
    def _bucket(cls, v: Any) -> float | str:
        text = str(v).strip().lower()
        if text == "auto":
            return "auto"
        try:
            mb = float(text)
        except ValueError:
            mb = float("nan")
        if not 0 < mb <= 1024 or isinstance(v, bool):
            raise ValueError("expected auto or a size in MB in (0, 1024]")
        return mb


class CallbackSpec(_Strict):
    """A callback class by spec, `module:Class` (built with `kwargs`), so a config can carry it to every
    rank of a data-parallel job and to every job of a sweep. Like a model spec it names code: the
    config's author has chosen to run it."""

    spec: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TrainConfig(_Strict):
    """Everything that decides what a training run computes."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    epochs: int | None = Field(None, gt=0, description="null: the model's recipe (convnet1d 8), else 10")
    batch_size: int = Field(100, gt=0, description="per-process batch; ignored by the gd optimizer")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step (global batch x K)")
    eval_batch_size: int = Field(8192, gt=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    augment: list[Literal["flip", "crop"]] = Field(
        default_factory=list, description="image augmentation on the device, per batch: flip, crop"
    )
    crop_padding: int = Field(4, ge=1, le=64, description="zero pixels around each image for the random crop")
    channels_last: Literal["auto", "on", "off"] = Field(
        "auto", description="channels_last memory format for image models; auto: where it was measured to pay"
    )
    seed: int = 0
    target_accuracy: float | None = Field(None, gt=0, le=1, description="stop once test accuracy >= this")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: Literal["auto", "on", "off"] = "auto"
    device: str = "auto"
    ddp: DDPConfig = Field(default_factory=DDPConfig)
    threads: int | None = Field(
        None,
        gt=0,
        description="torch threads per process; null = auto: the cores other processes leave free",
    )
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    patience: int | None = Field(
        None, gt=0, description="early stopping: stop after N epochs without a better validation metric"
    )
    callbacks: list[CallbackSpec] = Field(default_factory=list, description="extra callbacks, by spec")
    log: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="trackers to log to (rank 0): tensorboard, mlflow"
    )

    @field_validator("log", "augment")
    @classmethod
    def _once(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError(f"unknown device {v!r}; valid: auto, cpu, cuda, cuda:N")
        return v


class ServeConfig(_Strict):
    """`hpcml serve`: where it listens, how it batches, what it accepts. The token is not here: it
    comes from HPCML_SERVE_TOKEN_FILE (a 0600 file) or HPCML_SERVE_TOKEN, never from a flag."""

    model_dir: str
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535, description="0: a free port (printed when listening)")
    workers: int = Field(1, ge=1, le=64, description="server processes; workers x threads = cores")
    threads: int | None = Field(None, ge=1, description="torch threads per worker (default cores/workers)")
    max_batch: int = Field(64, ge=1, le=65536, description="rows per forward, at most")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="longest wait for more rows")
    max_rows: int = Field(1024, ge=1, description="rows per request, at most (more: 413)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request body, at most (more: 413)")
    tls_cert: str | None = None
    tls_key: str | None = None
    insecure_http: bool = Field(False, description="allow plain HTTP on a non-loopback host")
    trust_code: bool = False
    audit_log: str | None = Field(None, description="JSON-lines audit file (default: stderr)")
    backend: Literal["local", "ray"] = "local"
    runtime: Literal["torch", "onnx"] = Field("torch", description="onnx: ONNX Runtime (hpcml[onnx])")
    replicas: int = Field(1, ge=1, description="ray: Serve replicas")
    address: str | None = Field(None, description="ray: HOST:PORT of a running cluster (default: local)")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServeConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        return self


class RayLaunchConfig(_Strict):
    """`hpcml train --backend ray`: where a data-parallel job's ranks run on a Ray cluster. It changes
    where the ranks run, never what they compute (that is the TrainConfig's, and `--nproc`'s)."""

    address: str | None = Field(None, description="HOST:PORT, ray://HOST:PORT or auto; null: local Ray")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for the ranks' bundles (one bundle per rank)"
    )
    rank_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Ray resources each rank reserves, e.g. {CPU: 2, trainer: 1}; default CPU = threads "
        "(or 1), plus GPU = 1 on CUDA",
    )

    @field_validator("placement", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @field_validator("rank_resources")
    @classmethod
    def _positive(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [f"{k}={n}" for k, n in v.items() if not k or n <= 0]
        if bad:
            raise ValueError(f"resources must be named and > 0, got {', '.join(bad)}")
        return v


def format_validation_error(err: ValidationError, *, source: str = "config") -> str:
    """One line per bad field, naming it as a user would write it (`optim.lr`)."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"{source}: {field}: {msg}{shown}")
    return "\n".join(lines)


def build_config(values: dict[str, Any], *, source: str = "config") -> TrainConfig:
    """Validate a nested dict into a TrainConfig, raising UsageError naming each bad field."""
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as err:
        raise UsageError(format_validation_error(err, source=source)) from None


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise UsageError(f"cannot read config {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path}: expected a mapping of config fields, got {type(values).__name__}")
    return build_config(values, source=str(path))


def dump_config(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `overrides` (dotted keys allowed: 'optim.lr') into a copy of `base`; neither is changed."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"cannot set {key}: {p} is not a section")
        node[leaf] = copy.deepcopy(value)
    return out
