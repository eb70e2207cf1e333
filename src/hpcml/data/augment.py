"""Image batches on the device: uint8 -> float, normalized and augmented, one batch at a time.

Images stay uint8 wherever they are held (a quarter of float32's bytes, on the host and on the
device); a batch becomes float only when the step takes it. Augmentation is a random crop of the
image padded with `crop` zero pixels on each side, and a horizontal flip, done together as one
gather on the device: no DataLoader workers, no per-sample PIL work.

The randomness is a hash of (seed, epoch, row id), not a generator's running state. Every rank, a
resumed run and the streaming loader therefore draw the same crop and flip for the same row in the
same epoch, so a resumed or data-parallel run is bit-identical to an uninterrupted single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hpcml.data.preprocess import Normalizer
from hpcml.errors import UsageError

__all__ = ["AUGMENTS", "Augment", "ImageTransform"]

AUGMENTS = ("flip", "crop")
_M64 = (1 << 64) - 1


def _signed(v: int) -> int:
    """A uint64 constant as the int64 torch holds (two's complement)."""
    return v - (1 << 64) if v >= 1 << 63 else v


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on int64 tensors (wrapping arithmetic): a well-mixed hash per element."""
    z = z + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


@dataclass(frozen=True)
class Augment:
    """What to do to each training image: `crop` pixels of zero padding for a random crop (0: none),
    and a random horizontal flip."""

    flip: bool = False
    crop: int = 0

    @classmethod
    def from_config(cls, names: list[str], crop_padding: int) -> Augment:
        unknown = [n for n in names if n not in AUGMENTS]
        if unknown:
            raise UsageError(f"augment {', '.join(unknown)}: unknown; valid: {', '.join(AUGMENTS)}")
        return cls(flip="flip" in names, crop=crop_padding if "crop" in names else 0)

    @property
    def active(self) -> bool:
        return self.flip or self.crop > 0

    def describe(self) -> list[str]:
        return (["flip"] if self.flip else []) + ([f"crop (padding {self.crop})"] if self.crop else [])


class ImageTransform:
    """uint8 (B, C, H, W) batches -> normalized float on their device, augmented in training.

    Normalization is (x - shift) / scale in float32, the same operations in the same order as the
    host-side `Normalizer` that `Model.predict` applies, so evaluation during training and predict give
    bit-identical inputs.
    """

    def __init__(
        self,
        normalizer: Normalizer,
        augment: Augment,
        *,
        seed: int,
        device: torch.device,
        channels_last: bool = False,
    ):
        self.shift = torch.from_numpy(normalizer.shift).to(device)
        self.scale = torch.from_numpy(normalizer.scale).to(device)
        self.none = normalizer.method == "none"
        self.augment, self.seed, self.channels_last = augment, seed, channels_last

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # keeps the layout: a channels_last gather stays channels_last
        x = x if self.none else (x - self.shift) / self.scale
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    def eval(self, x: torch.Tensor) -> torch.Tensor:
        """A batch to evaluate or predict on: normalized only."""
        return self._normalize(x)

    def train(self, x: torch.Tensor, rows: torch.Tensor, epoch: int) -> torch.Tensor:
        """A training batch: `rows` are the batch's row ids (int64, any device), which with the seed
        and `epoch` decide each image's crop and flip."""
        if not self.augment.active:
            return self._normalize(x)
        return self._normalize(self.crop_flip(x, self.draws(rows.to(x.device), epoch)))

    def draws(self, rows: torch.Tensor, epoch: int) -> torch.Tensor:
        """(B, 3) int64: vertical offset, horizontal offset (0 .. 2*crop) and flip (0/1) per row."""
        key = ((self.seed & _M64) * 0x100000001B3 + (epoch & _M64) * 0x9E3779B1) & _M64
        h = splitmix64(rows.long() ^ _signed(key))
        span = 2 * self.augment.crop + 1
        dy = _shr(h, 8) % span
        dx = _shr(h, 32) % span
        flip = (h & 1) if self.augment.flip else torch.zeros_like(h)
        return torch.stack([dy, dx, flip], 1)

    def crop_flip(self, x: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        """Each image cut at its offsets from the zero-padded batch, mirrored where flip is 1: one
        gather. The result has channels_last strides (a permuted (B, H, W, C) gather)."""
        b, _, h, w = x.shape
        p = self.augment.crop
        padded = torch.nn.functional.pad(x, (p, p, p, p)) if p else x
        dy, dx, flip = draws[:, 0:1], draws[:, 1:2], draws[:, 2:3].bool()
        ar_h = torch.arange(h, device=x.device)
        ar_w = torch.arange(w, device=x.device)
        rows = dy + ar_h  # (B, H)
        cols = dx + torch.where(flip, w - 1 - ar_w, ar_w)  # (B, W)
        batch = torch.arange(b, device=x.device)[:, None, None]
        out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
        return out.permute(0, 3, 1, 2)
