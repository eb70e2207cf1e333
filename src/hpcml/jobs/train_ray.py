"""`hpcml train --backend ray --nproc N`: a data-parallel job whose ranks are Ray actors, placed as a
placement group (one bundle per rank), in the manner of Ray Train's TorchTrainer.

- **Placement.** Rank i runs in bundle i. A bundle is CPU = threads (or 1), GPU = 1 on CUDA, and any
  `--rank-resource`; the strategy is `--placement` (PACK by default). A request the cluster can never
  hold is refused at once; one it cannot hold now fails after PLACEMENT_TIMEOUT.
- **Rendezvous.** Rank 0's actor opens the rendezvous store on its node's address, on a port it has
  already bound (no other process can take it in between), as torchrun's agent hosts its store. Every
  rank gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_ADDR/MASTER_PORT and runs the
  worker entry of `--nproc` (launch/worker.run_rank), so there is one setup sequence: gloo on the CPU,
  NCCL on GPUs. On a cluster on 127.0.0.1 the store listens there too.
- **Storage.** Every rank reads and writes the run dir at the driver's (absolute) path, so on several
  machines it must be on storage they all share (NFS, a cluster file system). This is checked first:
  the driver writes a marker into the run dir and each rank must read it back, else a clear error names
  the rank and its node. Ranks run in the driver's working directory when their node has it (relative
  data paths), else in Ray's.
- **Failure.** When a rank fails (an error, its process killed, its node lost), every rank of the group
  is stopped and a new group starts in the same bundles; it resumes from the newest checkpoint
  (training/resume.py), up to `max_restarts` times. A usage error (a bad config, storage that is not
  shared) is not retried.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hpcml.config import RayLaunchConfig, TrainConfig, build_config
from hpcml.errors import HpcmlError, UsageError
from hpcml.jobs.ray_backend import first_line, ray_session

__all__ = ["launch_ray", "rank_bundle", "infeasible", "local_ranks", "RankActor"]

PLACEMENT_TIMEOUT = 120.0  # seconds a placement the cluster could hold may wait for resources to free up
_MARKER = ".hpcml-storage-check"

log = logging.getLogger("hpcml")


def rank_bundle(cfg: TrainConfig, launch: RayLaunchConfig, *, gpu: bool) -> dict[str, float]:
    """The Ray resources one rank reserves: CPU = its threads (or 1), GPU = 1 on CUDA, then the user's."""
    bundle = {"CPU": float(cfg.threads or 1)}
    if gpu:
        bundle["GPU"] = 1.0
    return bundle | launch.rank_resources


def use_gpus(cfg: TrainConfig, cluster: Mapping[str, float], nproc: int) -> bool:
    """device=cuda: one GPU per rank; auto: the same when the cluster has a GPU for every rank."""
    if cfg.device.startswith("cuda:"):
        raise UsageError(
            f"device={cfg.device} names one GPU for every rank; with --backend ray use device=cuda (Ray "
            "gives each rank a GPU of its own)"
        )
    gpus = cluster.get("GPU", 0)
    if cfg.device == "cuda" and gpus < 1:
        raise UsageError("device=cuda, but the Ray cluster has no GPUs")
    return cfg.device == "cuda" or (cfg.device == "auto" and gpus >= nproc)


def infeasible(
    nodes: Sequence[Mapping[str, float]], bundle: Mapping[str, float], nproc: int, strategy: str
) -> str | None:
    """Why the cluster (each live node's total resources) can never hold `nproc` bundles with
    `strategy`, or None when it can (it may still have to wait for resources to free up)."""
    slots = [min(math.floor(node.get(k, 0) / v + 1e-9) for k, v in bundle.items()) for node in nodes]
    most, holding = max(slots, default=0), sum(s > 0 for s in slots)
    if strategy == "STRICT_PACK" and most < nproc:
        return f"STRICT_PACK needs one node that holds all {nproc} ranks; the most one node holds is {most}"
    if strategy == "STRICT_SPREAD" and holding < nproc:
        return f"STRICT_SPREAD needs {nproc} nodes that each hold a rank; there are {holding}"
    if sum(slots) < nproc:
        return f"the cluster holds {sum(slots)} of the {nproc} ranks"
    return None


def local_ranks(nodes: Sequence[str]) -> list[tuple[int, int]]:
    """(LOCAL_RANK, LOCAL_WORLD_SIZE) of each rank, from the node each rank runs on (in rank order)."""
    seen: dict[str, int] = {}
    order = []
    for node in nodes:
        order.append(seen.get(node, 0))
        seen[node] = order[-1] + 1
    return [(local, seen[node]) for local, node in zip(order, nodes, strict=True)]


def rank_env(
    rank: int, world: int, local: tuple[int, int], master: tuple[str, int], *, attempt: int, gpu: bool
) -> dict[str, str]:
    """The environment a rank trains under: the variables torchrun gives its workers."""
    env = {
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(local[0]),
        "LOCAL_WORLD_SIZE": str(local[1]),
        "MASTER_ADDR": master[0],
        "MASTER_PORT": str(master[1]),
        "TORCHELASTIC_RESTART_COUNT": str(attempt),  # > 0: resume from the newest checkpoint
        "TORCHELASTIC_USE_AGENT_STORE": "True",  # the store is hosted (by rank 0's actor): join it
    }
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # Ray 2.60 shows every GPU to an actor that reserved none
    return env


class RankActor:
    """One rank's process, as a Ray actor. It serves one attempt: a restart makes new ones."""

    def where(self) -> tuple[str, str]:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()

    def open_store(self, world_size: int) -> int:
        """Rank 0: host the rendezvous store on this node's address; returns its port."""
        import ray
        import torch.distributed as dist

        from hpcml.distributed.dist import COLLECTIVE_TIMEOUT

        ip = ray.util.get_node_ip_address()
        self._socket = socket.create_server((ip, 0), family=socket.AF_INET6 if ":" in ip else socket.AF_INET)
        port = self._socket.getsockname()[1]
        self._store = dist.TCPStore(
            ip, port, world_size, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False,
            master_listen_fd=self._socket.fileno(),
        )  # fmt: skip
        return port

    def train(
        self, cfg: dict[str, Any], out: str, env: dict[str, str], *, cwd: str, resume: bool, token: str
    ) -> None:
        from hpcml.launch.worker import run_rank

        marker = Path(out) / _MARKER
        try:
            seen = marker.read_text()
        except OSError:
            seen = None
        if seen != token:
            import ray

            raise UsageError(
                f"its node ({ray.util.get_node_ip_address()}) does not see the run dir {out} as the driver "
                f"wrote it (no {_MARKER} file there): with --backend ray the driver and every node must see "
                "the run dir at the same path, on shared storage (NFS, a cluster file system)"
            )
        os.environ.update(env)
        if os.path.isdir(cwd):
            os.chdir(cwd)
        run_rank(build_config(cfg), out, quiet=True, resume=resume)


class _RankFailed(Exception):
    def __init__(self, rank: int, why: str, retry: bool, usage: bool):
        super().__init__(f"rank {rank} failed: {why}")
        self.retry, self.error = retry, UsageError if usage else HpcmlError


def _why(ray: Any, err: Exception) -> tuple[str, bool, bool]:
    """A rank's failure in words, whether restarting the group may help, and whether it is a usage
    error (exit code 2)."""
    if isinstance(err, ray.exceptions.RayActorError):
        if err.actor_init_failed:  # e.g. hpcml is not installed on that node: a restart would not help
            return f"its actor could not start: {str(err).strip().splitlines()[-1]}", False, False
        return "its process died (killed, crashed, out of memory, or its node was lost)", True, False
    cause = getattr(err, "cause", err)
    if isinstance(cause, UsageError):
        return str(cause), False, True
    if isinstance(cause, HpcmlError):
        return str(cause), True, False
    return f"{type(cause).__name__}: {first_line(cause)}", True, False


def _gather(ray: Any, refs: list[Any]) -> list[Any]:
    """The results of one call per rank, in rank order; the first rank to fail raises _RankFailed
    at once (its peers would wait in a collective until they time out)."""
    rank_of = {ref: r for r, ref in enumerate(refs)}
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except Exception as err:  # noqa: BLE001 - every failure of a rank is named and decided on
            raise _RankFailed(rank_of[done[0]], *_why(ray, err)) from None
    return ray.get(refs)


def _attempt(
    ray: Any, pg: Any, bundle: dict[str, float], cfg: TrainConfig, *, out: Path, attempt: int, resume: bool
) -> None:
    """One try of the whole group: new actors in the placement group's bundles, stopped at the end."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    nproc = pg.bundle_count
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU")}
    actor = ray.remote(RankActor)
    actors = [
        actor.options(
            num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), resources=custom, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
        ).remote()
        for r in range(nproc)
    ]  # fmt: skip
    token = secrets.token_hex(16)
    marker = out / _MARKER
    marker.write_text(token)
    try:
        nodes = _gather(ray, [a.where.remote() for a in actors])
        port = _gather(ray, [actors[0].open_store.remote(nproc)])[0] if nproc > 1 else 0
        locals_ = local_ranks([node for node, _ in nodes])
        gpu = bundle.get("GPU", 0) > 0
        calls = [
            a.train.remote(
                cfg.model_dump(mode="json"), str(out),
                rank_env(r, nproc, locals_[r], (nodes[0][1], port), attempt=attempt, gpu=gpu),
                cwd=os.getcwd(), resume=resume, token=token,
            )
            for r, a in enumerate(actors)
        ]  # fmt: skip
        _gather(ray, calls)
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        marker.unlink(missing_ok=True)


def _placement_group(ray: Any, bundle: dict[str, float], nproc: int, strategy: str) -> Any:
    from ray.util.placement_group import placement_group, remove_placement_group

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    why = infeasible(nodes, bundle, nproc, strategy)
    if why is not None:
        raise UsageError(f"Ray cannot place {nproc} ranks of {bundle} each: {why}")
    pg = placement_group([bundle] * nproc, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        raise HpcmlError(
            f"Ray could not place {nproc} ranks of {bundle} each ({strategy}) within "
            f"{PLACEMENT_TIMEOUT:g} s: the cluster's resources are taken by other work"
        ) from None
    return pg


def launch_ray(
    cfg: TrainConfig,
    *,
    out: Path,
    nproc: int,
    launch: RayLaunchConfig,
    max_restarts: int = 0,
    resume: bool = False,
) -> bool:
    """Run `cfg` on `nproc` ranks placed on the Ray cluster `launch` names. True where the run dir was
    written (rank 0 writes it, at `out` as every node sees it)."""
    out = out.resolve()
    with ray_session(launch.address) as ray:  # first: it imports Ray (after its loopback switch)
        from ray.util.placement_group import remove_placement_group

        bundle = rank_bundle(cfg, launch, gpu=use_gpus(cfg, ray.cluster_resources(), nproc))
        pg = _placement_group(ray, bundle, nproc, launch.placement)
        try:
            for attempt in range(max_restarts + 1):
                try:
                    _attempt(ray, pg, bundle, cfg, out=out, attempt=attempt, resume=resume)
                    break
                except _RankFailed as err:
                    if not err.retry or attempt == max_restarts:
                        raise err.error(str(err)) from None
                    log.warning(
                        "%s; restarting all %d ranks from the newest checkpoint (restart %d of %d)",
                        err, nproc, attempt + 1, max_restarts,
                    )  # fmt: skip
        finally:
            remove_placement_group(pg)
    return (out / "report.json").exists()
