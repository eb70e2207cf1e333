"""Streaming a store that does not fit in memory: shards read ahead in a thread, a shuffle buffer,
bounded memory, and an order that is a pure function of (seed, epoch, rank, world_size).

Which path: `fits_in_memory(store, budget)` (budget from `parse_size("64MB")` or
`default_memory_budget()`). Rule: the in-memory path needs `rows * (features * 4 + 8)` bytes for the
float32 features and int64 labels, times SAFETY = 4 (Arrow columns as read, up to 8 B a value, plus
the float32 array, plus the normalized copy); it fits when that is at most the budget.

Split: `split_shards(manifest, test_fraction=, seed=)` holds out ceil(test_fraction * shards) whole
shards chosen by a seeded permutation (rows are not split inside a shard: a shard is the unit of I/O).
A store packed from a file sorted by label gives skewed shards: shuffle rows before packing.

Order of one epoch (StreamBatches.epoch):
1. A permutation of the train shards seeded by (seed, epoch), the same on every rank, dealt
   round-robin: rank r reads shards perm[r], perm[r + world], ... (disjoint across ranks).
2. Shards are read, checked (sha256, rows, schema: store.iter_shards), cleaned (clean.table_to_arrays
   with the manifest's classes, so label ids are stable) and transformed (the fitted Normalizer) by
   `workers` background threads, up to `prefetch` shards ahead. Arrow and NumPy release the GIL, so
   this overlaps with the training step. An error there is re-raised in the consuming thread.
3. Shuffle buffer (seeded by seed, epoch, rank, world_size): each shard's rows join the buffer, the
   union is permuted, and all but `shuffle_buffer` rows are emitted; the buffer is emitted at the end.
4. Emitted rows are cut into steps of batch_size * accum rows, `accum` Micro each (weight 1.0).
Steps per epoch (`len`) is the same on every rank and every epoch: floor(R / (batch_size * accum)),
R = the manifest rows of the floor(shards / world_size) smallest train shards, the fewest a rank can
be dealt. Rows beyond that on a rank are not used that epoch (counted in `last_epoch`); a new
permutation each epoch makes them different rows. If cleaning dropped rows and a rank runs short,
its last steps are zero-weight one-row Micro (count 0), as DeviceBatches pads, so DDP stays in step.

Resume: `epoch(e, start=s)` replays the pipeline (re-reading shards up to step s, without building
tensors) and yields exactly steps s.. of `epoch(e)`. The position (epoch, step) is only meaningful
with the same `signature` (store, shards, seed, batch, accum, world size, buffer): save it with it.

Memory: about (prefetch + workers + 1) decoded shards plus 2 * (shuffle_buffer + shard rows) rows,
whatever the store's size (`memory_estimate()`).
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hpcml.data import store as _store
from hpcml.data.augment import ImageTransform
from hpcml.data.clean import MISSING, table_to_arrays
from hpcml.data.loader import Micro
from hpcml.data.preprocess import Normalizer
from hpcml.errors import HpcmlError, UsageError

__all__ = [
    "SAFETY", "parse_size", "default_memory_budget", "dataset_bytes", "fits_in_memory", "split_shards",
    "StreamBatches", "fit_normalizer_stream", "iter_eval_chunks",
]  # fmt: skip

SAFETY = 4
BUDGET_FRACTION = 0.25
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.I)
_MICRO_HAS_INDEX = "index" in getattr(Micro, "__dataclass_fields__", {})


def parse_size(text: str | int) -> int:
    """'64MB' -> 64_000_000, '1.5GiB' -> 1_610_612_736, '4096' -> 4096. KB/MB/GB/TB are powers of
    1000, KiB/MiB/GiB/TiB powers of 1024 (case-insensitive)."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    m = _SIZE.fullmatch(str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise UsageError(
            f"memory size {text!r}: give a positive number of bytes with an optional unit "
            "(KB, MB, GB, TB; KiB, MiB, GiB, TiB), e.g. 64MB or 2GiB"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_memory_budget() -> int:
    """25% of the memory this process may use: physical RAM, or a cgroup (container) limit if lower.
    A quarter leaves room for the model, optimizer state, the test split and other processes."""
    import psutil

    total = psutil.virtual_memory().total
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = Path(path).read_text().strip()
        except OSError:
            continue
        if limit.isdigit():
            total = min(total, int(limit))
    return int(total * BUDGET_FRACTION)


def _manifest(store_or_manifest: str | Path | dict) -> dict:
    return (
        store_or_manifest if isinstance(store_or_manifest, dict) else _store.read_manifest(store_or_manifest)
    )


def dataset_bytes(store_or_manifest: str | Path | dict, *, features: list[str] | None = None) -> int:
    """Bytes of the whole store as in-memory arrays: rows * (features * 4 + 8), or for a uint8
    image column rows * (C*H*W + 8)."""
    m = _manifest(store_or_manifest)
    width = 4
    if features is not None:
        n = len(features)
    elif m.get("feature_shape"):
        n = math.prod(m["feature_shape"])
        width = 1 if any("value_type=uint8" in c["type"] for c in m["schema"]) else 4
    else:
        n = sum(1 for c in m["schema"] if c["name"] != m["target"])
    return int(m["total_rows"]) * (n * width + 8)


def fits_in_memory(
    store_or_manifest: str | Path | dict, budget: int | str, *, features: list[str] | None = None
) -> bool:
    """True when loading the whole store is safe: dataset_bytes * SAFETY <= budget."""
    return dataset_bytes(store_or_manifest, features=features) * SAFETY <= parse_size(budget)


def split_shards(
    store_or_manifest: str | Path | dict, *, test_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train shard indices, test shard indices), both sorted: ceil(test_fraction * shards) shards
    picked by a permutation seeded with `seed` are the test split; no test split when it is 0."""
    m = _manifest(store_or_manifest)
    n = len(m["shards"])
    if not 0 <= test_fraction < 1:
        raise UsageError(f"test_fraction={test_fraction}; it must be in [0, 1)")
    n_test = math.ceil(test_fraction * n)
    if n_test >= n:
        raise UsageError(
            f"the store has {n} shard(s): too few to hold out {test_fraction:.0%} as whole shards and "
            "keep any for training; repack with a smaller --shard-rows or give a separate test store"
        )
    perm = np.random.default_rng([_u64(seed), 0x5E1]).permutation(n)
    return sorted(int(i) for i in perm[n_test:]), sorted(int(i) for i in perm[:n_test])


def _u64(v: int) -> int:
    return int(v) % 2**64  # SeedSequence wants non-negative entropy; negative seeds stay distinct


class _ShardReader:
    """One shard -> (x, y, global row ids, report): read + verified by iter_shards, cleaned with the
    manifest's classes, transformed. Called in the prefetch threads, so it touches no shared state."""

    def __init__(self, store, m, *, target, features, missing, transform, verify):
        if missing not in MISSING:
            raise UsageError(f"missing={missing!r}; valid: {', '.join(MISSING)}")
        self.store, self.m = store, m
        self.target = target or m["target"]
        if self.target is None:
            raise UsageError(f"{store}: the store records no target column; pass target=")
        if self.target != m["target"]:
            # per-shard label sets differ, so only the manifest's class list keeps ids stable
            raise UsageError(
                f"{store}: streaming uses the target recorded in the store ({m['target']!r}); "
                f"repack with --target {self.target} to train on {self.target!r}"
            )
        self.features, self.missing, self.transform, self.verify = features, missing, transform, verify
        self.offsets = np.concatenate([[0], np.cumsum([s["rows"] for s in m["shards"]])]).astype(np.int64)
        self.name = _store._fs(store)[2]

    def __call__(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
        ((_, table),) = _store.iter_shards(self.store, shards=[i], verify=self.verify)
        shown = f"{self.name}/{self.m['shards'][i]['file']}"
        x, y, _, report = table_to_arrays(
            table, name=shown, fmt="hpcml-store", target=self.target, features=self.features,
            missing=self.missing, classes=self.m["classes"],
            feature_shape=self.m.get("feature_shape") if self.features is None else None,
            duplicates=False, with_kept=True,
        )  # fmt: skip
        ids = np.arange(self.offsets[i], self.offsets[i + 1], dtype=np.int64)[report.pop("kept")]
        if self.transform is not None:
            x = self.transform(x)
        return x, y, ids, report


def _prefetched(fn: Callable, items: Iterable, *, depth: int, workers: int = 1) -> Iterator:
    """fn(item) for each item, in order, computed by `workers` threads up to `depth` items ahead.
    A worker's exception is re-raised here, in the consumer's thread, at the item that failed."""
    items = list(items)
    if depth < 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, depth)), thread_name_prefix="hpcml-stream")
    pending: deque = deque(pool.submit(fn, it) for it in items[:depth])
    rest = iter(items[depth:])
    try:
        while pending:
            result = pending.popleft().result()
            if (nxt := next(rest, None)) is not None:
                pending.append(pool.submit(fn, nxt))
            yield result
            del result  # don't hold a shard while waiting for the consumer to ask for the next
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)  # a read in flight finishes; no thread outlives the epoch


class _Rows:
    """A FIFO of row chunks (tuples of aligned arrays) that hands out exactly n rows at a time."""

    def __init__(self):
        self.parts: deque = deque()
        self.rows = 0

    def put(self, arrays: tuple) -> None:
        if len(arrays[0]):
            self.parts.append(arrays)
            self.rows += len(arrays[0])

    def take(self, n: int) -> tuple:
        out = []
        while n:
            head = self.parts[0]
            k = min(n, len(head[0]))
            out.append(tuple(a[:k] for a in head))
            if k == len(head[0]):
                self.parts.popleft()
            else:
                self.parts[0] = tuple(a[k:] for a in head)
            n, self.rows = n - k, self.rows - k
        return out[0] if len(out) == 1 else tuple(np.concatenate(c) for c in zip(*out, strict=True))


class StreamBatches:
    """Steps of `accum` Micro batches streamed from a store's shards; the DeviceBatches interface."""

    def __init__(
        self,
        store: str | Path,
        *,
        shards: list[int] | None = None,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        accum: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 65_536,
        prefetch: int = 2,
        workers: int = 1,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
        target: str | None = None,
        features: list[str] | None = None,
        missing: str = "drop",
        device: str | torch.device = "cpu",
        verify: bool = True,
        device_transform: ImageTransform | None = None,
        memory_budget: int | None = None,
    ):
        m = _store.read_manifest(store)
        n = len(m["shards"])
        self.shards = list(range(n)) if shards is None else [int(i) for i in shards]
        if bad := [i for i in self.shards if not 0 <= i < n]:
            raise UsageError(f"{store}: shard index {bad[0]} out of range (the store has {n} shards)")
        if len(set(self.shards)) != len(self.shards):
            raise UsageError(f"{store}: shard indices repeat in {self.shards}")
        if not (world_size >= 1 and 0 <= rank < world_size and accum >= 1 and batch_size >= 1):
            raise UsageError(f"rank={rank}, world_size={world_size}, accum={accum}, batch_size={batch_size}")
        if len(self.shards) < world_size:
            raise UsageError(
                f"{store}: {len(self.shards)} training shard(s) for {world_size} ranks; every rank needs "
                "one: repack with a smaller --shard-rows"
            )
        self.store, self.manifest = store, m
        self.rank, self.world_size, self.accum, self.seed = rank, world_size, accum, seed
        if memory_budget:  # the shuffle buffer holds at most a quarter of the budget
            row = max(1, dataset_bytes(m, features=features) // max(1, m["total_rows"]))
            shuffle_buffer = min(shuffle_buffer, max(batch_size, memory_budget // 4 // row))
        self.shuffle, self.shuffle_buffer = shuffle, max(0, shuffle_buffer)
        self.prefetch, self.workers, self.device = prefetch, workers, torch.device(device)
        self.device_transform = device_transform  # uint8 images: float + augmented per micro-batch
        self._read = _ShardReader(
            store, m, target=target, features=features, missing=missing, transform=transform, verify=verify
        )
        sizes = sorted(m["shards"][i]["rows"] for i in self.shards)
        min_rank_rows = sum(sizes[: len(self.shards) // world_size])
        # as DeviceBatches: a batch larger than a rank's data shrinks rather than yielding nothing
        self.batch_size = max(1, min(batch_size, min_rank_rows // accum))
        self.global_batch = self.batch_size * world_size * accum
        self.rows_per_step = self.batch_size * accum  # on this rank
        self.steps = min_rank_rows // self.rows_per_step
        self.last_epoch: dict[str, Any] = {}

    def __len__(self) -> int:
        """Optimizer steps per epoch: the same on every rank and in every epoch."""
        return self.steps

    @property
    def signature(self) -> dict[str, Any]:
        """What a saved (epoch, step) position depends on; compare it before resuming."""
        return {
            "store_shards_sha256": [self.manifest["shards"][i]["sha256"] for i in self.shards],
            "seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
            "accum": self.accum, "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer,
        }  # fmt: skip

    def memory_estimate(self) -> int:
        """Upper bound in bytes of what one epoch holds at once (decoded shards + shuffle buffer)."""
        row = dataset_bytes(self.manifest, features=self._read.features) // max(
            1, self.manifest["total_rows"]
        )
        shard = max(self.manifest["shards"][i]["rows"] for i in self.shards)
        held = (self.prefetch + self.workers + 1) * shard * row * SAFETY
        return held + 2 * (self.shuffle_buffer + shard) * row

    def shard_order(self, epoch: int) -> list[int]:
        """This rank's shards for `epoch`, in reading order (disjoint across ranks)."""
        k = len(self.shards)
        perm = (
            np.random.default_rng([_u64(self.seed), _u64(epoch), 1]).permutation(k)
            if self.shuffle
            else np.arange(k)
        )
        return [self.shards[j] for j in perm[self.rank :: self.world_size]]

    def _rows(self, epoch: int, stats: dict) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """This rank's rows for `epoch` in their final order, in chunks."""
        rng = np.random.default_rng([_u64(self.seed), _u64(epoch), 2, self.rank, self.world_size])
        buf = None
        for x, y, ids, report in _prefetched(
            self._read, self.shard_order(epoch), depth=self.prefetch, workers=self.workers
        ):
            stats["shards_read"] += 1
            stats["rows_dropped_cleaning"] += report["rows_dropped"]
            if not self.shuffle:
                yield x, y, ids
                continue
            if buf is not None:
                x, y, ids = (np.concatenate(p) for p in zip(buf, (x, y, ids), strict=True))
            perm = rng.permutation(len(x))
            cut = max(0, len(x) - self.shuffle_buffer)
            emit = tuple(a[perm[:cut]] for a in (x, y, ids))
            buf = tuple(a[perm[cut:]] for a in (x, y, ids))
            del x, y, ids, perm  # both parts are copies: free the shard before the rows are used
            if cut:
                yield emit
            del emit
        if buf is not None:
            yield buf

    def epoch(self, epoch: int, *, start: int = 0) -> Iterator[list[Micro]]:
        """The `accum` Micro batches of each step of `epoch`, beginning at step `start` (resume)."""
        if not 0 <= start <= self.steps:
            raise UsageError(f"start step {start} is outside this epoch's 0..{self.steps} steps")
        stats = {"epoch": epoch, "shards_read": 0, "rows_dropped_cleaning": 0, "padded_steps": 0}
        self.last_epoch = stats
        rows, step, last = _Rows(), 0, None
        chunks = self._rows(epoch, stats)
        try:
            while step < self.steps:
                while rows.rows < self.rows_per_step and (chunk := next(chunks, None)) is not None:
                    rows.put(chunk)
                if rows.rows < self.rows_per_step:
                    break  # cleaning left this rank short: pad below
                x, y, ids = rows.take(self.rows_per_step)
                last = (x[-1:], y[-1:], ids[-1:])
                if step >= start:  # before `start` the rows are replayed, not built into tensors
                    yield self._micro(x, y, ids, 1.0, epoch)
                step += 1
        finally:
            chunks.close()  # stops the prefetch threads when the consumer stops early
        stats["padded_steps"] = self.steps - step
        for s in range(step, self.steps):  # zero-weight steps keep DDP ranks in lockstep
            if last is None:
                raise HpcmlError(f"{self.store}: rank {self.rank} got no rows after cleaning")
            if s >= start:
                yield [self._micro(*last, 0.0, epoch)[0] for _ in range(self.accum)]
        stats["rows_used"] = step * self.rows_per_step
        rank_rows = sum(self.manifest["shards"][i]["rows"] for i in self.shard_order(epoch))
        stats["rows_not_used"] = rank_rows - stats["rows_used"]

    def _micro(self, x: np.ndarray, y: np.ndarray, ids: np.ndarray, weight: float, epoch: int) -> list[Micro]:
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        yt = torch.from_numpy(np.ascontiguousarray(y)).to(self.device)
        it = torch.from_numpy(np.ascontiguousarray(ids))
        t = self.device_transform
        out = []
        for j in range(0, len(x), self.batch_size):
            sl = slice(j, j + self.batch_size)
            count = len(xt[sl]) if weight > 0 else 0
            extra = {"index": it[sl] if weight > 0 else it[:0]} if _MICRO_HAS_INDEX else {}
            xb = xt[sl] if t is None else t.train(xt[sl], it[sl], epoch)  # row ids seed the augmentation
            out.append(Micro(xb, yt[sl], weight, count, **extra))
        return out


def fit_normalizer_stream(
    store: str | Path,
    *,
    method: str,
    shards: list[int] | None = None,
    per_feature: bool = True,
    target: str | None = None,
    features: list[str] | None = None,
    missing: str = "drop",
    prefetch: int = 2,
) -> Normalizer:
    """Normalizer.fit over the cleaned rows of `shards` (the train split), one shard in memory at a
    time. Mean/std merge per-shard float64 moments (Chan et al.), so the result matches the in-memory
    fit to float32 rounding; std is the population std (ddof=0), as NumPy's."""
    if method not in ("standard", "minmax", "none"):
        raise UsageError(f"normalize method {method!r}; valid: standard, minmax, none")
    m = _store.read_manifest(store)
    read = _ShardReader(
        store, m, target=target, features=features, missing=missing, transform=None, verify=True
    )
    shards = list(range(len(m["shards"]))) if shards is None else list(shards)
    n, shape, mean, m2, lo, hi, counts = 0, None, 0.0, 0.0, None, None, None
    for x, _, _, _ in _prefetched(read, shards, depth=prefetch):
        shape = x.shape[1:] if per_feature else (1,) * (x.ndim - 1)
        if method == "none":
            break
        if x.dtype == np.uint8 and not per_feature:  # image bytes: exact, from a 256-bin histogram
            counts = np.bincount(x.reshape(-1), minlength=256) + (0 if counts is None else counts)
            continue
        a = x.reshape(len(x), -1) if per_feature else x.reshape(-1, 1)
        if method == "minmax":
            lo = a.min(0) if lo is None else np.minimum(lo, a.min(0))
            hi = a.max(0) if hi is None else np.maximum(hi, a.max(0))
            continue
        a = a.astype(np.float64)
        k, mk = len(a), a.mean(0)
        m2k = ((a - mk) ** 2).sum(0)
        delta, total = mk - mean, n + k
        mean, m2, n = mean + delta * (k / total), m2 + m2k + delta**2 * (n * k / total), total
    if shape is None:
        raise UsageError(f"{store}: no shards to fit the normalizer on")
    if method == "none":
        return Normalizer("none", np.zeros(shape, np.float32), np.ones(shape, np.float32))
    if counts is not None:
        return Normalizer.from_byte_counts(counts, method, shape)
    shift, scale = (mean, np.sqrt(m2 / n)) if method == "standard" else (lo, hi - lo)
    scale = np.where(scale > 1e-12, scale, 1.0)  # constant features pass through, as Normalizer.fit
    return Normalizer(
        method, np.reshape(shift, shape).astype(np.float32), np.reshape(scale, shape).astype(np.float32)
    )


def iter_eval_chunks(
    store: str | Path,
    *,
    shards: list[int] | None = None,
    rows: int = 65_536,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    target: str | None = None,
    features: list[str] | None = None,
    missing: str = "drop",
    device: str | torch.device = "cpu",
    prefetch: int = 2,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) tensors of at most `rows` rows over `shards` (the test split) in store order: every
    cleaned row exactly once, never more than ~(prefetch + 2) shards in memory."""
    m = _store.read_manifest(store)
    read = _ShardReader(
        store, m, target=target, features=features, missing=missing, transform=transform, verify=True
    )
    shards = list(range(len(m["shards"]))) if shards is None else list(shards)
    device = torch.device(device)
    for x, y, _, _ in _prefetched(read, shards, depth=prefetch):
        for i in range(0, len(x), max(1, rows)):
            yield (
                torch.from_numpy(np.ascontiguousarray(x[i : i + rows])).to(device),
                torch.from_numpy(np.ascontiguousarray(y[i : i + rows])).to(device),
            )
