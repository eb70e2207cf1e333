"""MobileNetV2 (Sandler et al. 2018) and MobileNetV3-Small (Howard et al. 2019), as torchvision
builds them: the same stages, channel rounding (multiples of 8), BatchNorm settings, init and layer
names, so torchvision's state dicts load as they are.

`width` scales every channel count (rounded to a multiple of 8, never down by more than 10%);
MobileNetV2 keeps its 1280-wide last conv below width 1, as torchvision does.

stem="imagenet": the papers' first conv with stride 2 (images of 32x32 and up; 224x224 -> 7x7).
stem="cifar": for small images, the first conv has stride 1 and so does the first stage that
downsamples (V2: the 24-channel stage; V3-Small: the first block), so the network downsamples 8x
(32x32 -> 4x4), as the CIFAR ResNets do and as the common CIFAR MobileNetV2 (kuangliu/pytorch-cifar)
does. Dropping only the first conv's stride would leave 2x2 feature maps at 32x32, too coarse for the
last three stages. The parameters are the same as with the imagenet stem; the MACs are ~16x per pixel.
"""

from __future__ import annotations

import torch
from torch import nn

from hpcml.models._vision import ConvBNAct, as_images, image_shape, init_weights, make_divisible

__all__ = ["MobileNetV2", "MobileNetV3Small"]

# MobileNetV2 stages: expansion t, channels c, blocks n, stride s of the first block
_V2 = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]
# MobileNetV3-Small blocks: kernel, expanded, out, squeeze-excitation, hardswish (else ReLU), stride
_V3_SMALL = [
    (3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1),
]  # fmt: skip
_V3_BN = {"eps": 0.001, "momentum": 0.01}


def _check(name: str, width: float, dropout: float) -> None:
    if not width > 0:
        raise ValueError(f"{name}: width must be > 0, got {width}")
    if not 0 <= dropout < 1:
        raise ValueError(f"{name}: dropout must be in [0, 1), got {dropout}")


class SqueezeExcitation(nn.Module):
    """Channel weights from the pooled features (1x1 convs, ReLU, hardsigmoid) times the input."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class InvertedResidual(nn.Module):
    """Expand (1x1; none when `hidden` equals `c_in`), depthwise kxk, squeeze-excitation (V3), and a
    linear 1x1 projection; plus the input where the shape is kept. torchvision names the layers
    `conv` in V2 (projection conv and BatchNorm as two entries) and `block` in V3."""

    def __init__(self, c_in: int, hidden: int, c_out: int, *, kernel: int, stride: int, act: type[nn.Module],
                 se: bool = False, bn: dict[str, float] | None = None, v2: bool = False):  # fmt: skip
        super().__init__()
        layers: list[nn.Module] = []
        if hidden != c_in:
            layers.append(ConvBNAct(c_in, hidden, 1, act=act, bn=bn))
        layers.append(ConvBNAct(hidden, hidden, kernel, stride=stride, groups=hidden, act=act, bn=bn))
        if se:
            layers.append(SqueezeExcitation(hidden, make_divisible(hidden // 4)))
        project = ConvBNAct(hidden, c_out, 1, act=None, bn=bn)
        layers += list(project) if v2 else [project]
        self.body = "conv" if v2 else "block"
        self.add_module(self.body, nn.Sequential(*layers))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = getattr(self, self.body)(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2: 17 inverted residual blocks (ReLU6), a 1x1 conv to 1280 channels, pooling, and
    dropout + a linear head (3.5M parameters, 0.30 GMACs at 3x224x224, 1000 classes, width 1)."""

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_outputs: int,
        width: float = 1.0,
        stem: str = "imagenet",
        dropout: float = 0.2,
    ):
        super().__init__()
        _check("mobilenet_v2", width, dropout)
        self.shape = image_shape(input_shape, name="mobilenet_v2", stem=stem)
        small = stem == "cifar"
        c_in = make_divisible(32 * width)
        layers: list[nn.Module] = [ConvBNAct(self.shape[0], c_in, 3, stride=1 if small else 2, act=nn.ReLU6)]
        for i, (t, c, n, s) in enumerate(_V2):
            c_out = make_divisible(c * width)
            for j in range(n):
                stride = (1 if small and i == 1 else s) if j == 0 else 1
                layers.append(InvertedResidual(c_in, int(round(c_in * t)), c_out, kernel=3, stride=stride,
                                               act=nn.ReLU6, v2=True))  # fmt: skip
                c_in = c_out
        last = make_divisible(1280 * max(1.0, width))
        layers.append(ConvBNAct(c_in, last, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_outputs))
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(as_images(x, self.shape)))
        return self.classifier(torch.flatten(x, 1))


class MobileNetV3Small(nn.Module):
    """MobileNetV3-Small: 11 blocks (ReLU or hardswish, squeeze-excitation with hardsigmoid), a 1x1
    conv to 576 channels, pooling, and a 1024-wide hardswish + dropout head (2.5M parameters,
    0.06 GMACs at 3x224x224, 1000 classes, width 1)."""

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_outputs: int,
        width: float = 1.0,
        stem: str = "imagenet",
        dropout: float = 0.2,
    ):
        super().__init__()
        _check("mobilenet_v3_small", width, dropout)
        self.shape = image_shape(input_shape, name="mobilenet_v3_small", stem=stem)
        small = stem == "cifar"
        c_in = make_divisible(16 * width)
        layers: list[nn.Module] = [
            ConvBNAct(self.shape[0], c_in, 3, stride=1 if small else 2, act=nn.Hardswish, bn=_V3_BN)
        ]
        for i, (k, expanded, c, se, hs, s) in enumerate(_V3_SMALL):
            c_out = make_divisible(c * width)
            layers.append(
                InvertedResidual(c_in, make_divisible(expanded * width), c_out, kernel=k,
                                 stride=1 if small and i == 0 else s, act=nn.Hardswish if hs else nn.ReLU,
                                 se=se, bn=_V3_BN)
            )  # fmt: skip
            c_in = c_out
        layers.append(ConvBNAct(c_in, 6 * c_in, 1, act=nn.Hardswish, bn=_V3_BN))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        head = make_divisible(1024 * width)
        self.classifier = nn.Sequential(
            nn.Linear(6 * c_in, head), nn.Hardswish(inplace=True), nn.Dropout(dropout, inplace=True),
            nn.Linear(head, num_outputs),
        )  # fmt: skip
        init_weights(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(as_images(x, self.shape)))
        return self.classifier(torch.flatten(x, 1))
