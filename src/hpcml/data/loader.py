"""Device-resident batches: the whole split is one tensor on the device and batches are slices.

No DataLoader workers, no per-sample indexing, no collation. Per epoch one seeded permutation of the
whole training set (a pure function of seed and epoch, identical on every rank and machine) is cut
into global steps of `batch_size * world_size * accum` samples. Each global step is split into
`world_size * accum` near-equal chunks; rank r takes chunks r, r + world, ... as its micro-batches.
The rank's rows for the whole epoch are gathered once, so every micro-batch is a contiguous view.

Exactness rule (no padding, no dropping): every sample is used exactly once per epoch across ranks.
When the last global step is short, chunks differ in size by at most one, and each micro-batch's loss
is weighted by `n_local * world / n_step` so that DDP's gradient average equals the gradient of the
mean over the whole global step, exactly as one process with the global batch would compute it. A
rank left without samples in that last step runs one zero-weighted sample so collectives still match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hpcml.data.augment import ImageTransform


@dataclass(frozen=True)
class Micro:
    x: torch.Tensor
    y: torch.Tensor
    weight: float  # loss multiplier; 1.0 for a full step on one process, 0.0 for a padding sample
    count: int  # real samples in this micro-batch (0 for padding)
    index: torch.Tensor | None = None  # CPU row ids into the training split (for resume/trace checks)


class DeviceBatches:
    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        accum: int = 1,
        transform: ImageTransform | None = None,
    ):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y = x, y
        self.rank, self.world_size, self.accum = rank, world_size, accum
        self.batch_size = max(1, min(batch_size, len(x) // (world_size * accum) or 1))
        self.global_batch = self.batch_size * world_size * accum
        self.shuffle = shuffle
        self.seed = seed
        self.transform = transform  # uint8 images: made float (and augmented) per micro-batch

    def __len__(self) -> int:
        """Optimizer steps per epoch."""
        return -(-len(self.x) // self.global_batch)

    def order(self, epoch: int) -> torch.Tensor:
        """The global sample order of `epoch`, a CPU int64 tensor; identical on every rank."""
        if not self.shuffle:
            return torch.arange(len(self.x))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.x), generator=g)

    def plan(self, epoch: int) -> list[list[tuple[torch.Tensor, float]]]:
        """This rank's (indices, weight) micro-batches for each step of `epoch` (CPU, host-side)."""
        order = self.order(epoch)
        parts = self.world_size * self.accum
        steps = []
        for s in range(0, len(order), self.global_batch):
            block = order[s : s + self.global_batch]
            chunks = torch.tensor_split(block, parts)
            micro = []
            for j in range(self.accum):
                idx = chunks[j * self.world_size + self.rank]
                if len(idx) == 0:  # short last step: keep collectives in lockstep with a zero weight
                    micro.append((block[:1], 0.0))
                else:
                    micro.append((idx, len(idx) * self.world_size / len(block)))
            steps.append(micro)
        return steps

    def epoch(self, epoch: int, *, start: int = 0) -> Iterator[list[Micro]]:
        """The micro-batches of each step of `epoch`, beginning at step `start` (mid-epoch resume)."""
        plan = self.plan(epoch)[start:]
        if not plan:
            return
        flat = [idx for step in plan for idx, _ in step]
        idx = torch.cat(flat).to(self.x.device, non_blocking=True)
        x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)  # one gather per epoch
        pos = 0
        for step in plan:
            micro = []
            for ids, w in step:
                n = len(ids)
                xb = x[pos : pos + n]
                if self.transform is not None:
                    xb = self.transform.train(xb, idx[pos : pos + n], epoch)
                micro.append(Micro(xb, y[pos : pos + n], w, n if w > 0 else 0, ids if w > 0 else ids[:0]))
                pos += n
            yield micro


class FullBatches:
    """Full-batch gradient descent as Batches: every epoch is one optimizer step over the whole
    training set, cut into chunks so memory stays bounded on large data.

    Each rank takes a contiguous shard; each chunk is a micro-batch weighted by
    chunk_rows * world_size / total_rows, so DDP's gradient average is the exact gradient of the mean
    over the whole set (the accumulation path of the step computes it, all-reducing on the last chunk).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        rank: int = 0,
        world_size: int = 1,
        chunk: int = 16384,
        transform: ImageTransform | None = None,
    ):
        shard = torch.tensor_split(torch.arange(len(x)), world_size)[rank].to(x.device)
        self.x, self.y, self.rows = x.index_select(0, shard), y.index_select(0, shard), shard
        self.transform = transform
        self.total, self.world_size, self.chunk = len(x), world_size, chunk
        self.batch_size = len(self.x)
        self.global_batch = len(x)

    def __len__(self) -> int:
        return 1

    def epoch(self, epoch: int, *, start: int = 0) -> Iterator[list[Micro]]:
        if start >= 1:
            return
        w = self.world_size / self.total
        t = self.transform

        def x(i: int) -> torch.Tensor:
            xb = self.x[i : i + self.chunk]
            return xb if t is None else t.train(xb, self.rows[i : i + self.chunk], epoch)

        yield [
            Micro(x(i), self.y[i : i + self.chunk], n * w, n)
            for i in range(0, len(self.x), self.chunk)
            for n in [min(self.chunk, len(self.x) - i)]
        ]


class EvalSplit:
    """A split to score, as chunks of (x, y) on the device: one in-memory shard of this rank, or a
    factory of chunks streamed from a store. Both give the same sums to EpochStats."""

    def __init__(self, chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], rows: int):
        self._chunks, self.rows = chunks, rows

    @classmethod
    def in_memory(
        cls, x: torch.Tensor, y: torch.Tensor, *, transform: ImageTransform | None = None, rows: int = 8192
    ) -> EvalSplit:
        """The split held on the device; uint8 images (`transform`) become float `rows` at a time."""
        if transform is None:
            return cls(lambda: [(x, y)], len(x))

        def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for i in range(0, len(x), rows):
                yield transform.eval(x[i : i + rows]), y[i : i + rows]

        return cls(chunks, len(x))

    def chunks(self) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        return self._chunks()
