"""Process-group helpers for one DDP rank: who am I, wrap the model, sum tensors across ranks."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hpcml.config import DDPConfig
from hpcml.errors import UsageError

# A collective that waits longer than this fails instead of hanging (a peer died mid-step, say).
COLLECTIVE_TIMEOUT = timedelta(seconds=120)
DEFAULT_BUCKET_MB = 25  # DDP's own default (after a 1 MiB first bucket)
AUTO_ONE_BUCKET_MB = 25  # bucket_mb auto on a CPU: gradients up to this size go in one bucket
COMPRESSION_REASON = (
    "default: the fp32 all-reduce keeps a DDP run equal to one process with the global batch; bf16 "
    "compression measured no faster on gloo on a 2-core CPU (`hpcml bench --cases scaling`)"
)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """Read the variables torch.distributed's launcher sets for each worker."""
        env = os.environ
        return cls(
            int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), int(env["LOCAL_WORLD_SIZE"])
        )


def launcher_env(env: Mapping[str, str]) -> tuple[str, DistInfo] | None:
    """The rank a launcher outside hpcml gave this process: ('torchrun', info) from WORLD_SIZE/RANK/
    LOCAL_RANK, ('SLURM', info) from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, or None for a job of one.

    torchrun's variables win (torchrun run inside an srun step sets both). A SLURM job also needs
    MASTER_ADDR and MASTER_PORT, which torch.distributed's env:// rendezvous reads.
    """
    if "WORLD_SIZE" in env and "RANK" in env:
        world = _int(env, "WORLD_SIZE")
        if world <= 1:
            return None
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        return "torchrun", DistInfo(_int(env, "RANK"), world, local, local_world)
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        world = _int(env, "SLURM_NTASKS")
        if world <= 1:
            return None
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise UsageError(
                f"a SLURM job of {world} tasks needs {' and '.join(missing)} (the address and a free port "
                "of the node of task 0), e.g. export MASTER_ADDR=$(scontrol show hostnames "
                '"$SLURM_JOB_NODELIST" | head -n1) MASTER_PORT=29500'
            )
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        return "SLURM", DistInfo(_int(env, "SLURM_PROCID"), world, local, _slurm_local_world(env, world))
    return None


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise UsageError(f"environment variable {key}={env[key]!r} is not a whole number") from None


def _slurm_local_world(env: Mapping[str, str], world: int) -> int:
    """Tasks on this node: SLURM_NTASKS_PER_NODE, else this node's entry of SLURM_TASKS_PER_NODE
    ('4(x2),3' = 4, 4, 3), else all tasks on one node."""
    if env.get("SLURM_NTASKS_PER_NODE", "").isdigit():
        return int(env["SLURM_NTASKS_PER_NODE"])
    counts: list[int] = []
    for n, times in re.findall(r"(\d+)(?:\(x(\d+)\))?", env.get("SLURM_TASKS_PER_NODE", "")):
        counts += [int(n)] * int(times or 1)
    node = int(env["SLURM_NODEID"]) if env.get("SLURM_NODEID", "").isdigit() else 0
    return counts[node] if node < len(counts) else world


def init_process_group(info: DistInfo, device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = None
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # The static rendezvous keeps one agent store across elastic restarts and torch adds no
        # per-attempt prefix, so a restarted rank could read the dead attempt's gloo addresses and
        # fail with "connection refused". A prefix per attempt keeps each attempt's keys apart.
        client = dist.TCPStore(
            env["MASTER_ADDR"], int(env["MASTER_PORT"]), info.world_size, is_master=False,
            timeout=COLLECTIVE_TIMEOUT,
        )  # fmt: skip
        store = dist.PrefixStore(f"hpcml/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", client)
    dist.init_process_group(
        backend, store=store, rank=info.rank, world_size=info.world_size, timeout=COLLECTIVE_TIMEOUT
    )


def gradient_bytes(module: nn.Module) -> int:
    """Bytes of the gradients one optimizer step all-reduces (trainable parameters, their dtype)."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)


def bucket_mb(cfg: DDPConfig, grad_bytes: int, device_type: str = "cpu") -> float | None:
    """The all-reduce bucket size (MiB) for `cfg.bucket_mb`; None: DDP's default (a 1 MiB first
    bucket, then 25 MiB), which overlaps the all-reduce with backward on GPUs (NCCL).

    auto on a CPU (gloo): one bucket for gradients up to AUTO_ONE_BUCKET_MB. There the all-reduce
    takes CPU time from the cores that run backward, so overlap hides little, while every extra bucket
    is one more collective and its latency.
    """
    if cfg.bucket_mb != "auto":
        return float(cfg.bucket_mb)
    mb = grad_bytes / 2**20
    if device_type == "cuda" or mb > AUTO_ONE_BUCKET_MB:
        return None
    return float(math.ceil(mb * 1.01))  # a little headroom: DDP closes a bucket once it reaches the cap


def _noop_hook(_state, bucket):  # no annotations: DDP checks them as objects, these would be strings
    """Sends nothing: each rank keeps its own gradients. For timing a step without communication."""
    fut = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


def _bf16_on_gloo(state, bucket):
    """torch's bf16_compress_hook under another name: DDP refuses that name without CUDA and NCCL
    >= 2.10 (older NCCL has no bf16), a check meant for NCCL. gloo sums bf16 tensors itself."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    return default_hooks.bf16_compress_hook(state, bucket)


def wrap_ddp(
    module: nn.Module, device: torch.device, cfg: DDPConfig | None = None, *, no_communication: bool = False
) -> nn.Module:
    """DistributedDataParallel with bucketed all-reduce overlapping backward, its buckets sized and its
    gradients compressed as `cfg` says. `no_communication` (the bench's no-op hook) skips the all-reduce,
    to time the step without it; training never sets it."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    cfg = cfg or DDPConfig()
    ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(
        module, device_ids=ids, gradient_as_bucket_view=True,
        bucket_cap_mb=bucket_mb(cfg, gradient_bytes(module), device.type),
    )  # fmt: skip
    hooks = {"bf16": default_hooks.bf16_compress_hook, "fp16": default_hooks.fp16_compress_hook}
    if device.type == "cpu":
        hooks["bf16"] = _bf16_on_gloo
    hook = _noop_hook if no_communication else hooks.get(cfg.grad_compression)
    if hook is not None:
        ddp.register_comm_hook(None, hook)  # None: the default process group
    return ddp


def ddp_summary(step_model: nn.Module, cfg: DDPConfig) -> dict[str, Any]:
    """What report.json records of a DDP run's gradient exchange: the choices and the buckets built."""
    ddp = getattr(step_model, "_orig_mod", step_model)  # under torch.compile
    try:  # DDP's own record of its buckets (what its logger reports), in bytes: "1234,5678"
        sizes = str(ddp._get_ddp_logging_data().get("bucket_sizes", ""))
        buckets: int | None = len([b for b in sizes.split(",") if b.strip()])
    except (AttributeError, RuntimeError):
        buckets = None
    grad = gradient_bytes(ddp.module)
    size = bucket_mb(cfg, grad, next(ddp.module.parameters()).device.type)
    exact = cfg.grad_compression == "none"
    return {
        "grad_compression": cfg.grad_compression,
        "grad_compression_reason": COMPRESSION_REASON if exact else "set in the config",
        "bucket_mb": size if size is not None else f"DDP default ({DEFAULT_BUCKET_MB}, first bucket 1)",
        "bucket_mb_setting": cfg.bucket_mb,
        "buckets": buckets,
        "gradient_bytes": grad,
    }


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu" or dist.get_backend() != "gloo":
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t
    host = t.cpu()  # gloo reduces CPU tensors
    dist.all_reduce(host, op=dist.ReduceOp.SUM)
    return host.to(t.device)


def all_agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank (e.g. 'target reached', 'diverged')."""
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device)
    return bool(all_reduce_sum(t).item() > 0)
