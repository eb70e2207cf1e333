from __future__ import annotations

import torch
from torch import nn


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
            *block(self.shape[0]), *block(channels), nn.MaxPool1d(2),
            *block(channels), *block(channels), nn.MaxPool1d(2),
            *block(channels), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(channels * (self.shape[1] // 4), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.view(x.shape[0], *self.shape)))
