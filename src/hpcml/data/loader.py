"""Device-resident batches: the whole split is one tensor on the device and a batch is a slice.

No DataLoader workers, no per-sample indexing, no collation: per epoch one seeded permutation gathers
the split once, then every batch is a contiguous view. The order is a pure function of
(seed, epoch), so a run can be resumed at any (epoch, step) and ranks can take disjoint shards.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class DeviceBatches:
    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, shuffle: bool = True, seed: int = 0,
    ):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        self.x, self.y = x, y
        self.batch_size = min(batch_size, len(x))
        self.shuffle = shuffle
        self.seed = seed

    def __len__(self) -> int:
        """Batches per epoch; the last one may be smaller (every sample is used once per epoch)."""
        return -(-len(self.x) // self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of `epoch`, a CPU int64 tensor; identical on every machine and rank."""
        if not self.shuffle:
            return torch.arange(len(self.x))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.x), generator=g)

    def epoch(self, epoch: int, *, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of `epoch`, beginning at batch index `start` (for mid-epoch resume)."""
        if self.shuffle:
            idx = self.order(epoch).to(self.x.device, non_blocking=True)
            x, y = self.x.index_select(0, idx), self.y.index_select(0, idx)
        else:
            x, y = self.x, self.y
        b = self.batch_size
        for i in range(start * b, len(x), b):
            yield x[i : i + b], y[i : i + b]
