"""ResNet-18 and ResNet-34 (He et al. 2015, "Deep Residual Learning for Image Recognition"), as
torchvision builds them: BasicBlocks, the stride on a block's first 3x3 conv, a 1x1 conv + BatchNorm
shortcut where the shape changes. Layer names match torchvision's, so its state dicts load as they are.

stem="imagenet": the paper's 7x7/2 conv + 3x3/2 max-pool (images of 32x32 and up; 224x224 -> 7x7).
stem="cifar": one 3x3/1 conv and no max-pool, as the paper's CIFAR-10 networks (8x8 and up; 32x32 ->
4x4). Parameters differ from the imagenet stem only by the first conv (3x3 instead of 7x7).
"""

from __future__ import annotations

import torch
from torch import nn

from hpcml.models._vision import ConvBNAct, as_images, image_shape, init_weights

__all__ = ["ResNet", "resnet18", "resnet34"]


class BasicBlock(nn.Module):
    """Two 3x3 conv + BatchNorm, ReLU between and after the residual sum."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (
            ConvBNAct(c_in, c_out, 1, stride=stride, act=None) if stride != 1 or c_in != c_out else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet(nn.Module):
    """A ResNet of BasicBlocks: `blocks` per stage at 64, 128, 256, 512 channels."""

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_outputs: int,
        blocks: tuple[int, int, int, int],
        stem: str = "imagenet",
        name: str = "resnet",
    ):
        super().__init__()
        self.shape = image_shape(input_shape, name=name, stem=stem)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(self.shape[0], 64, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(self.shape[0], 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        c_in = 64
        for i, (n, c_out) in enumerate(zip(blocks, (64, 128, 256, 512), strict=True)):
            stage = [BasicBlock(c_in if j == 0 else c_out, c_out, 2 if i and not j else 1) for j in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            c_in = c_out
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_outputs)
        init_weights(self, linear_std=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(as_images(x, self.shape)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(*, input_shape: tuple[int, ...], num_outputs: int, stem: str = "imagenet") -> ResNet:
    """ResNet-18: 2, 2, 2, 2 BasicBlocks (11.7M parameters, 1.8 GMACs at 3x224x224, 1000 classes)."""
    return ResNet(input_shape=input_shape, num_outputs=num_outputs, blocks=(2, 2, 2, 2), stem=stem,
                  name="resnet18")  # fmt: skip


def resnet34(*, input_shape: tuple[int, ...], num_outputs: int, stem: str = "imagenet") -> ResNet:
    """ResNet-34: 3, 4, 6, 3 BasicBlocks (21.8M parameters, 3.7 GMACs at 3x224x224, 1000 classes)."""
    return ResNet(input_shape=input_shape, num_outputs=num_outputs, blocks=(3, 4, 6, 3), stem=stem,
                  name="resnet34")  # fmt: skip
