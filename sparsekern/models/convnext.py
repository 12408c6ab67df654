"""ConvNeXt (Liu et al. 2022): a 4x4 stride-4 patchify stem, four stages of blocks (7x7 depthwise conv,
LayerNorm, pointwise Linear 4x expansion, GELU, Linear back, layer scale, residual) with LayerNorm +
2x2 stride-2 downsampling convs between stages, global average pooling, LayerNorm and a linear head.

The pointwise layers are ``nn.Linear`` on channels-last tokens, as in the reference implementation, so
``sparsify`` makes them sparse; the depthwise convs (groups = channels) stay dense."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["ConvNeXt", "convnext_tiny"]


class _ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    fusable_activations = (("pwconv1", "act"),)  # act applies to pwconv1's output alone (sparsekern.fuse_activations)

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (N, H, W, C): the pointwise layers act on the last dim
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    """Defaults: ConvNeXt-T (depths 3-3-9-3, widths 96-192-384-768), no stochastic depth."""

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, depths: Sequence[int] = (3, 3, 9, 3),
                 dims: Sequence[int] = (96, 192, 384, 768)):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"ConvNeXt: depths and dims must have the same length, got {len(depths)} and {len(dims)}")
        self.downsample = nn.ModuleList([nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, stride=4),
                                                       _ChannelsFirstLayerNorm(dims[0], eps=1e-6))])
        for a, b in zip(dims[:-1], dims[1:]):
            self.downsample.append(nn.Sequential(_ChannelsFirstLayerNorm(a, eps=1e-6), nn.Conv2d(a, b, 2, stride=2)))
        self.stages = nn.ModuleList(nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)]) for n, d in zip(depths, dims))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):  # the reference implementation's init
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample, self.stages):
            x = stage(down(x))
        return self.head(self.norm(x.mean((2, 3))))


def convnext_tiny(num_classes: int = 1000, in_channels: int = 3) -> ConvNeXt:
    return ConvNeXt(num_classes, in_channels)
