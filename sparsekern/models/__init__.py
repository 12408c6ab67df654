"""Model definitions (plain nn.Conv2d / nn.Linear, groups = 1, so ``sparsify`` can swap them)
and the ``get_model`` registry."""
from __future__ import annotations

from typing import Callable, Dict, Optional

from torch import nn

from .build import build_model
from .convnext import ConvNeXt, convnext_tiny
from .mlp import MLP, LeNet5
from .resnet_cifar import CifarResNet, WideResNet, resnet20, resnet32, wrn_22_2
from .resnet_imagenet import ImageNetResNet, resnet18, resnet50
from .transformer import BertEncoder, VisionTransformer

__all__ = ["build_model", "MLP", "LeNet5", "CifarResNet", "WideResNet", "ImageNetResNet", "resnet20", "resnet32",
           "wrn_22_2", "resnet18", "resnet50", "BertEncoder", "VisionTransformer", "ConvNeXt", "convnext_tiny",
           "get_model", "MODELS"]


def _mlp(num_classes: int, in_channels: int, image_size: int, **kwargs) -> nn.Module:
    return MLP(in_channels * image_size * image_size, num_classes=num_classes, **kwargs)


def _lenet5(num_classes: int, in_channels: int, image_size: int, **kwargs) -> nn.Module:
    return LeNet5(num_classes, in_channels, image_size, **kwargs)


def _no_size(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    # These nets end in global pooling: any input size works, image_size is not needed.
    return lambda num_classes, in_channels, image_size, **kwargs: build(num_classes=num_classes,
                                                                        in_channels=in_channels, **kwargs)


def _bert(num_classes: int, in_channels, image_size, **kwargs) -> nn.Module:
    return BertEncoder(num_classes, **kwargs)  # token ids in: no channels, no image size


def _vit(num_classes: int, in_channels: int, image_size: int, **kwargs) -> nn.Module:
    return VisionTransformer(num_classes, in_channels, image_size, **kwargs)


# name -> (builder, default in_channels, default image_size)
MODELS: Dict[str, tuple] = {
    "mlp": (_mlp, 1, 28),
    "lenet5": (_lenet5, 1, 32),
    "resnet20": (_no_size(resnet20), 3, 32),
    "resnet32": (_no_size(resnet32), 3, 32),
    "wrn-22-2": (_no_size(wrn_22_2), 3, 32),
    "resnet18": (_no_size(resnet18), 3, 224),
    "resnet50": (_no_size(resnet50), 3, 224),
    "bert-small": (_bert, None, None),
    "vit-s16": (_vit, 3, 224),
    "convnext-tiny": (_no_size(convnext_tiny), 3, 224),
}


def get_model(name: str, num_classes: int = 10, in_channels: Optional[int] = None, image_size: Optional[int] = None,
              **kwargs) -> nn.Module:
    """Build model ``name`` (one of MODELS) for inputs (in_channels, image_size, image_size).

    ``None`` takes the model's usual input (1x28x28 for mlp, 1x32x32 for lenet5, 3x32x32
    for the CIFAR nets, 3x224x224 for the ImageNet nets and vit-s16); extra keyword arguments go to
    the model (e.g. ``hidden=(100,)`` for mlp, ``shortcut='B'`` for resnet20). bert-small takes token
    ids (batch, seq) and ignores ``in_channels`` and ``image_size``.
    """
    key = name.lower().replace("_", "-")
    if key not in MODELS:
        raise ValueError(f"get_model: name must be one of {tuple(MODELS)}, got {name!r}")
    build, default_channels, default_size = MODELS[key]
    return build(num_classes, in_channels or default_channels, image_size or default_size, **kwargs)
