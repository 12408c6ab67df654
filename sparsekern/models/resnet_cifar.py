"""CIFAR ResNets (He et al. 2016, section 4.2) and Wide ResNets (Zagoruyko & Komodakis 2016)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNet", "WideResNet", "resnet20", "resnet32", "wrn_22_2"]


def _init_convs(model: nn.Module) -> None:
    # He init for every conv, BN as identity: the initialization of both papers.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.stride, self.extra = stride, planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """Two 3x3 convs with BN; the shortcut is identity, option A (pad) or option B (1x1 conv + BN)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "A":
                self.shortcut = PadShortcut(in_planes, planes, stride)
            elif shortcut == "B":
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                              nn.BatchNorm2d(planes))
            else:
                raise ValueError(f"BasicBlock: shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: conv 16, three stages of n blocks (16, 32, 64 channels), pool, fc.

    ``shortcut='A'`` (default, the paper's CIFAR choice): parameter-free, ResNet-20 has 269,722 (272,474 with B)
    parameters with 10 classes; ``'B'``: 1x1 projection convs where the shape changes.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CifarResNet: depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_planes = [], 16
        for stage, planes in enumerate((16, 32, 64)):
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1, shortcut))
                in_planes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
            blocks = []
        self.fc = nn.Linear(64, num_classes)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-BN-ReLU-conv3x3; a 1x1 conv shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride, bias=False)
                         if stride != 1 or in_planes != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        # As in the reference code: the projection sees the pre-activated input.
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 inputs (no dropout): conv 16, three stages of (depth-4)/6 blocks
    of 16k, 32k, 64k channels, BN-ReLU, pool, fc."""

    def __init__(self, depth: int = 22, width: int = 2, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth must be 6n+4 (16, 22, 28, 40), got {depth}")
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        in_planes = 16
        for stage, planes in enumerate((16 * width, 32 * width, 64 * width)):
            blocks = []
            for i in range(n):
                blocks.append(WideBlock(in_planes, planes, 2 if stage > 0 and i == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet20(num_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels, shortcut)


def resnet32(num_classes: int = 10, in_channels: int = 3, shortcut: str = "A") -> CifarResNet:
    return CifarResNet(32, num_classes, in_channels, shortcut)


def wrn_22_2(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    return WideResNet(22, 2, num_classes, in_channels)
