"""Fully connected networks (LeNet-300-100 by default) and LeNet-5."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["MLP", "LeNet5"]


class MLP(nn.Module):
    """Flatten, then Linear-ReLU per hidden width, then a Linear classifier (784-300-100-10 by default)."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (300, 100), num_classes: int = 10):
        super().__init__()
        widths = [in_features, *hidden]
        layers: list = [nn.Flatten()]
        for fan_in, fan_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LeNet5(nn.Module):
    """LeNet-5: conv 6@5x5, max-pool 2, conv 16@5x5, max-pool 2, fc 120, fc 84, fc ``num_classes``.

    ReLU and max-pooling as in the paper's released code (rigl_tf2), not the tanh and
    subsampling of 1998. Classic input is 32x32; ``padding`` of the first conv defaults
    to 2 for 28x28 input (so the shapes are those of 32x32). The released code uses
    padding 0 on 28x28 MNIST (fc input 16*4*4 = 256): pass ``padding=0`` to match it.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 32, padding: int = -1):
        super().__init__()
        padding = (2 if image_size == 28 else 0) if padding < 0 else padding
        side = ((image_size + 2 * padding - 4) // 2 - 4) // 2  # two (conv 5x5, pool 2) stages
        if side < 1:
            raise ValueError(f"LeNet5: image_size {image_size} with padding {padding} is too small "
                             f"(needs image_size + 2 * padding >= 14)")
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=padding)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)
