"""Conv nets for sequences (convnet1d, the MNIST-1D paper's cnn1d) and small images (cnn2d)."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F


def _as_channels_first(input_shape: tuple[int, ...], dims: int, name: str) -> tuple[int, ...]:
    if len(input_shape) == dims:  # no channel axis: one channel
        return (1, *input_shape)
    if len(input_shape) == dims + 1:
        return input_shape
    raise ValueError(f"{name} needs inputs of {dims} or {dims + 1} dims (C x ...), got shape {input_shape}")


def _widths(widths: list[int] | None, default: list[int], name: str) -> list[int]:
    """Per-layer channel counts (a pruned model records them in `widths`; they replace `channels`)."""
    if widths is None:
        widths = default
    if len(widths) != 3 or any(w <= 0 for w in widths):
        raise ValueError(f"{name} takes widths of 3 positive channel counts, got {widths}")
    return list(widths)


class CNN1d(nn.Module):
    """The MNIST-1D paper's small conv net: three strided 1-D convolutions and a linear head.

    The paper uses 25 channels; with those, MNIST-1D test accuracy plateaus near 92-93% in our runs
    (plain Adam, batch 100, 150 epochs), so the default is 64 (reaches 94-96% in under 30 epochs).
    `widths` gives the three convolutions their own channel counts (a pruned model records them).
    """

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_outputs: int,
        channels: int = 64,
        widths: list[int] | None = None,
    ):
        super().__init__()
        self.shape = _as_channels_first(input_shape, 1, "cnn1d")
        c = self.shape[0]
        w1, w2, w3 = _widths(widths, [channels] * 3, "cnn1d")
        self.features = nn.Sequential(
            nn.Conv1d(c, w1, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(w1, w2, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(w2, w3, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            width = self.features(torch.zeros(1, *self.shape)).shape[1]
        self.head = nn.Linear(width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(x.shape[0], *self.shape)))


class CNN2d(nn.Module):
    """A small conv net for small images (digits 8x8 and up). `widths` ([channels, 2 x channels,
    2 x channels] by default) gives the three convolutions their own channel counts."""

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_outputs: int,
        channels: int = 32,
        widths: list[int] | None = None,
    ):
        super().__init__()
        self.shape = _as_channels_first(input_shape, 2, "cnn2d")
        c = self.shape[0]
        w1, w2, w3 = _widths(widths, [channels, 2 * channels, 2 * channels], "cnn2d")
        self.features = nn.Sequential(
            nn.Conv2d(c, w1, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w1, w2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w2, w3, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(w3 * 4, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(x.shape[0], *self.shape)))


class _PairMax(torch.autograd.Function):
    """max over adjacent pairs of the last axis, with the gradient max_pool1d(x, 2) gives: all of it to
    the larger of each pair, to the first one on a tie (its argmax)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        n = x.shape[-1] // 2
        pairs = x[..., : 2 * n].unflatten(-1, (n, 2))
        first, second = pairs[..., 0], pairs[..., 1]
        ctx.save_for_backward(second > first)
        ctx.length = x.shape[-1]
        return torch.maximum(first, second)  # NaN propagates, as in max_pool1d

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (take_second,) = ctx.saved_tensors
        out = grad.new_empty(*grad.shape, 2)
        torch.mul(grad, take_second, out=out[..., 1])
        torch.sub(grad, out[..., 1], out=out[..., 0])
        out = out.flatten(-2)
        return F.pad(out, (0, ctx.length - out.shape[-1])) if out.shape[-1] != ctx.length else out


class PairMaxPool1d(nn.MaxPool1d):
    """nn.MaxPool1d(2), with a faster training path on the CPU: the same outputs and the same
    gradients, computed by `_PairMax` instead of max_pool1d_with_indices.

    Measured on a 2-core Xeon (batch 100 x 32 channels x 40, 2 threads): forward + backward 320 us
    against 552 us for max_pool1d, whose indexed CPU kernel is not vectorized for a window of 2; two of
    them were 13% of convnet1d's training step. Without autograd (evaluation, predict, export) this is
    nn.MaxPool1d itself, so ONNX export and pruning see the standard layer, as it is on GPUs. One
    difference: where the second of a pair is NaN, max_pool1d sends the gradient to it and this to
    the first (the output is NaN either way).
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = x.device.type == "cpu" and x.shape[-1] >= 2 and x.requires_grad and torch.is_grad_enabled()
        if fast and not torch.compiler.is_compiling():
            return _PairMax.apply(x)
        return super().forward(x)


class ConvNet1d(nn.Module):
    """hpcml's default for sequences: five 3-wide convolutions with BatchNorm and GELU, max-pooled
    twice, and a linear head (~16k parameters at 32 channels on MNIST-1D). Faster to a better model
    than the paper's CNN (`cnn1d`): BatchNorm lets the one-cycle schedule use a high learning rate."""

    def __init__(self, *, input_shape: tuple[int, ...], num_outputs: int, channels: int = 32):
        super().__init__()
        self.shape = _as_channels_first(input_shape, 1, "convnet1d")
        if self.shape[1] < 4:
            raise ValueError(f"convnet1d pools twice: sequences need length >= 4, got {self.shape[1]}")

        def block(c_in: int) -> list[nn.Module]:
            return [nn.Conv1d(c_in, channels, 3, padding=1, bias=False), nn.BatchNorm1d(channels), nn.GELU()]

        self.features = nn.Sequential(
            *block(self.shape[0]), *block(channels), PairMaxPool1d(),
            *block(channels), *block(channels), PairMaxPool1d(),
            *block(channels), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(channels * (self.shape[1] // 4), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(x.shape[0], *self.shape)))
