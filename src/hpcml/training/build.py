"""build(cfg, data, hw, dist) -> Components: every part of a run, made from the config in one place.

Training (fit.py), the benchmark's step breakdown and the doctor all build through here, so what they
time is what `hpcml train` runs.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from hpcml.config import TrainConfig
from hpcml.data.augment import Augment, ImageTransform
from hpcml.data.loader import DeviceBatches, EvalSplit, FullBatches
from hpcml.data.preprocess import Normalizer
from hpcml.data.sources import Dataset
from hpcml.distributed import dist as pdist
from hpcml.distributed.dist import DistInfo
from hpcml.errors import UsageError
from hpcml.training.losses import classification_loss
from hpcml.training.optim import build_optimizer, build_schedule
from hpcml.training.precision import Hardware, autocast

ModelSource = Callable[..., nn.Module] | nn.Module | None


@dataclass
class Components:
    """The typed parts of one run (one rank of a data-parallel run)."""

    cfg: TrainConfig
    data: Dataset
    hw: Hardware
    dist: DistInfo
    module: nn.Module  # the model itself: what is saved and checkpointed
    step_model: nn.Module  # what the step calls: the module, DDP-wrapped and/or compiled
    optimizer: torch.optim.Optimizer
    schedule: Any  # an lr scheduler stepped after every optimizer step, or None (constant)
    scaler: torch.amp.GradScaler | None
    amp: Any  # the autocast context of the chosen precision
    train_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    eval_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batches: Any  # DeviceBatches | StreamBatches | FullBatches: .epoch(e, start=), len(), global_batch
    test: EvalSplit
    val: EvalSplit | None
    normalizer: Normalizer
    y_scale: tuple[float, float] | None  # regression: the standardization of the targets (train)
    n_train: int

    @property
    def regression(self) -> bool:
        return self.data.task == "regression"

    @property
    def metric(self) -> str:
        return "r2" if self.regression else "accuracy"

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)

    @property
    def reduce(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return pdist.all_reduce_sum if self.dist.world_size > 1 else None

    def layout(self) -> dict[str, int]:
        """What must match between a checkpoint and its resume (it decides the data order)."""
        return {
            "world_size": self.dist.world_size,
            "global_batch": self.batches.global_batch,
            "steps_per_epoch": self.steps_per_epoch,
        }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out[:, 0].float(), y)


def build(
    cfg: TrainConfig, data: Dataset, hw: Hardware, dist: DistInfo | None = None, *, model: ModelSource = None
) -> Components:
    """Data on the device, the model (from the registry/spec in cfg.model, or `model`: a factory
    called like a registry entry, or a ready module), its DDP wrapper, compile, optimizer, schedule and
    precision. The process group, if any, is already initialized."""
    info = dist or DistInfo()
    dev = hw.device
    regression = data.task == "regression"
    if regression and cfg.target_accuracy is not None:
        raise UsageError("target_accuracy applies to classification; this data is a regression task")
    # regression trains on standardized targets (fitted on train); metrics are in the target's units
    y_scale = (float(data.y_train.mean()), float(data.y_train.std()) or 1.0) if regression else None
    if cfg.augment and data.kind != "image":
        raise UsageError(
            f"augment ({', '.join(cfg.augment)}) applies to images (C x H x W rows); {data.name} holds "
            f"{data.kind} data of shape {list(data.input_shape)}"
        )
    seed_everything(cfg.seed)  # same seed on every rank: identical initial weights
    module = make_module(cfg, data, model).to(dev)
    if hw.channels_last and not any(isinstance(m, nn.Conv2d) for m in module.modules()):
        hw = replace(hw, channels_last=False, channels_last_reason="the model has no 2-D convolutions")
    if hw.channels_last:
        module = module.to(memory_format=torch.channels_last)
    # the data after the model: its image batches take the model's memory format (nothing here draws
    # from the global RNG, so the weights are those of the seed)
    if data.stream is not None:  # a store larger than the memory budget: shards stream from disk
        normalizer, batches, test = _streamed(cfg, data, info, hw)
        val, n_train = None, len(batches) * batches.global_batch
    else:
        normalizer, batches, test, val = _in_memory(cfg, data, info, hw, y_scale)
        n_train = len(data.x_train)
    if cfg.patience is not None and val is None:
        raise UsageError("patience (early stopping) watches the validation metric: set a val_fraction")
    step_model: nn.Module = pdist.wrap_ddp(module, dev, cfg.ddp) if info.world_size > 1 else module
    if hw.compile:
        step_model = torch.compile(step_model)
    optimizer = build_optimizer(module.parameters(), cfg.optim, device=dev)
    schedule = build_schedule(optimizer, cfg.optim, total_steps=len(batches) * cfg.epochs)
    scaler = torch.amp.GradScaler(dev.type) if hw.precision == "fp16" and dev.type == "cuda" else None
    if regression:
        train_loss = eval_loss = _mse
    else:
        train_loss = classification_loss(cfg.label_smoothing)
        eval_loss = nn.CrossEntropyLoss()
    return Components(
        cfg=cfg, data=data, hw=hw, dist=info, module=module, step_model=step_model, optimizer=optimizer,
        schedule=schedule, scaler=scaler, amp=autocast(hw.precision, dev), train_loss=train_loss,
        eval_loss=eval_loss, batches=batches, test=test, val=val, normalizer=normalizer, y_scale=y_scale,
        n_train=n_train,
    )  # fmt: skip


def make_module(cfg: TrainConfig, data: Dataset, model: ModelSource = None) -> nn.Module:
    """The model of a run: `cfg.model` through the registry (built-in, plugin or `module:function`,
    imported because the config names it), or the factory / module the caller passed."""
    from hpcml.models.registry import create_model

    shape, outputs = data.input_shape, data.num_outputs
    if model is None:
        return create_model(
            cfg.model.name, input_shape=shape, num_outputs=outputs, trust_code=True, **cfg.model.kwargs
        )
    from hpcml.models.registry import build_from_factory, check_output

    if isinstance(model, nn.Module):
        check_output(cfg.model.name, model, shape, outputs)
        return model

    return build_from_factory(
        model, name=cfg.model.name, input_shape=shape, num_outputs=outputs, **cfg.model.kwargs
    )


def step_flops(
    cfg: TrainConfig, data: Dataset, model: ModelSource = None, *, world_size: int = 1
) -> float | None:
    """FLOPs of one rank's optimizer step (forward + backward of its rows), counted by FlopCounterMode
    on the `meta` device (nothing is allocated or computed); None if the model cannot be counted.
    The precision decision uses it: bf16 pays on a CPU only for steps large enough."""
    from hpcml.models.flops import train_step_flops

    if cfg.optim.name == "gd":
        rows = -(-data.train_rows // world_size)
    else:
        rows = min(cfg.batch_size, max(1, data.train_rows // world_size)) * cfg.grad_accum
    dev, module = "meta", model
    training = model.training if isinstance(model, nn.Module) else True
    try:
        if isinstance(model, nn.Module):  # already built: count 2 real rows, in eval mode so that
            dev = next(model.parameters()).device  # BatchNorm's running stats stay untouched
            model.eval()
        else:
            with torch.device("meta"):
                module = make_module(cfg, data, model)
        x = torch.zeros(2, *data.input_shape, device=dev)
        per_row = train_step_flops(module, x, None, lambda out, _y: out.float().sum()) / 2
    except Exception:  # noqa: BLE001 - an estimate only; the real build reports real errors
        return None
    finally:
        if isinstance(model, nn.Module):
            model.train(training)
    return float(per_row * rows)


def image_transform(cfg: TrainConfig, normalizer: Normalizer, hw: Hardware) -> ImageTransform:
    """Images are held raw (uint8 from image folders and stores) and made float, normalized and
    augmented on the device per batch (data/augment.py)."""
    augment = Augment.from_config(cfg.augment, cfg.crop_padding)
    return ImageTransform(
        normalizer, augment, seed=cfg.seed, device=hw.device, channels_last=hw.channels_last
    )


def _in_memory(cfg: TrainConfig, data: Dataset, info: DistInfo, hw: Hardware, y_scale):
    dev = hw.device
    normalizer = Normalizer.fit(data.x_train, method=cfg.data.normalize, per_feature=data.kind == "tabular")
    transform = image_transform(cfg, normalizer, hw) if data.kind == "image" else None
    on_host = normalizer if transform is None else np.asarray  # images: raw on the device

    def targets(y: np.ndarray) -> torch.Tensor:
        y = ((y - y_scale[0]) / y_scale[1]).astype(np.float32) if y_scale else y
        return torch.from_numpy(y).to(dev)

    def shard(x: np.ndarray, y: np.ndarray) -> EvalSplit:
        # each rank evaluates a contiguous shard; the sums are all-reduced
        part = np.array_split(np.arange(len(x)), info.world_size)[info.rank]
        x_dev = torch.from_numpy(on_host(x[part])).to(dev)
        return EvalSplit.in_memory(x_dev, targets(y[part]), transform=transform, rows=cfg.eval_batch_size)

    x_train = torch.from_numpy(on_host(data.x_train)).to(dev)
    y_train = targets(data.y_train)
    if cfg.optim.name == "gd":
        batches: Any = FullBatches(
            x_train, y_train, rank=info.rank, world_size=info.world_size, transform=transform
        )
    else:
        batches = DeviceBatches(
            x_train, y_train, batch_size=cfg.batch_size, seed=cfg.seed, rank=info.rank,
            world_size=info.world_size, accum=cfg.grad_accum, transform=transform,
        )  # fmt: skip
    test = shard(data.x_test, data.y_test)
    val = shard(data.x_val, data.y_val) if data.x_val is not None else None
    return normalizer, batches, test, val


def _streamed(cfg: TrainConfig, data: Dataset, info: DistInfo, hw: Hardware):
    """(normalizer, StreamBatches, test split) for a store streamed from disk."""
    from hpcml.data.stream import StreamBatches, fit_normalizer_stream, iter_eval_chunks

    st, dev = data.stream, hw.device
    if cfg.optim.name == "gd":
        raise UsageError("the gd optimizer needs the whole training set in memory; raise --memory-budget")
    common = {"target": st.target, "features": st.features, "missing": cfg.data.missing}
    normalizer = fit_normalizer_stream(
        st.store, method=cfg.data.normalize, shards=st.train, per_feature=data.kind == "tabular", **common
    )
    images = image_transform(cfg, normalizer, hw) if data.kind == "image" else None
    on_host = normalizer if images is None else None  # images: raw to the device, made float there
    batches = StreamBatches(
        st.store, shards=st.train, batch_size=cfg.batch_size, seed=cfg.seed, rank=info.rank,
        world_size=info.world_size, accum=cfg.grad_accum, transform=on_host, device=dev,
        device_transform=images, memory_budget=st.memory_budget, **common,
    )  # fmt: skip
    mine = st.test[info.rank :: info.world_size]  # each rank scores its share; the sums are all-reduced

    def chunks():
        it = iter_eval_chunks(
            st.store, shards=mine, rows=cfg.eval_batch_size, transform=on_host, device=dev, **common
        )
        return it if images is None else ((images.eval(x), y) for x, y in it)

    return normalizer, batches, EvalSplit(chunks, st.test_rows)
