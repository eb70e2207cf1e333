"""What the image families (mobilenet.py, resnet.py) share: the conv-BatchNorm-activation unit,
the stems and the smallest image each takes, torchvision's weight init, and the input handling.

Stems: "imagenet" is the paper's (the network downsamples 32x: 224x224 -> 7x7 before pooling);
"cifar" is for small images and downsamples 8x (32x32 -> 4x4), as the CIFAR ResNets do. An image
smaller than the total downsampling would leave the last stages computing on padding alone, so the
constructor refuses it, naming the stem that fits.
"""

from __future__ import annotations

import torch
from torch import nn

from hpcml.models.cnn import _as_channels_first

STEMS = {"imagenet": 32, "cifar": 8}  # stem -> total downsampling = the smallest image side it takes


def make_divisible(value: float, divisor: int = 8) -> int:
    """`value` rounded to a multiple of `divisor`, never down by more than 10% (torchvision's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d -> activation (none if `act` is None); the
    children are numbered 0, 1, 2 as torchvision's Conv2dNormActivation, so the state dicts match."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel: int = 3,
        *,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU,
        bn: dict[str, float] | None = None,
    ):
        layers = [
            nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out, **(bn or {})),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


def image_shape(input_shape: tuple[int, ...], *, name: str, stem: str) -> tuple[int, int, int]:
    """(C, H, W) of `input_shape` ((C, H, W) or (H, W)), checked against what `stem` can take."""
    if stem not in STEMS:
        raise ValueError(f"{name}: stem must be one of {', '.join(map(repr, STEMS))}, got {stem!r}")
    c, h, w = _as_channels_first(tuple(input_shape), 2, name)
    least = STEMS[stem]
    if min(h, w) < least:
        fix = "use --model-kw stem=cifar (8x8 and up) or --image-size" if stem == "imagenet" else (
            "use --image-size"
        )  # fmt: skip
        raise ValueError(
            f"{name} with stem={stem} needs images of at least {least}x{least} (got {h}x{w}); {fix}"
        )
    return c, h, w


def as_images(x: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, H, W) from flat rows or (B, H, W); a 4-D input is passed as is, so channels_last stays."""
    return x if x.dim() == 4 else x.reshape(x.shape[0], *shape)


def init_weights(module: nn.Module, *, linear_std: float | None) -> None:
    """torchvision's init: Kaiming-normal (fan_out) convs with zero bias, BatchNorm 1 and 0, and
    Linear layers N(0, linear_std) with zero bias (MobileNets) or torch's default (ResNet: None)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0, linear_std)
            nn.init.zeros_(m.bias)
