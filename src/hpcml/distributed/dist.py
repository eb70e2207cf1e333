"""Process-group helpers for one DDP rank: who am I, wrap the model, sum tensors across ranks."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

# A collective that waits longer than this fails instead of hanging (a peer died mid-step, say).
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


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


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel with bucketed all-reduce overlapping backward (default 25 MB buckets)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=True)


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
