"""A seeded model for a data set's input, dense or sparse: what the CLI, the studies and the demo build."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..init import he_normal_
from ..sparsity import sparsify

__all__ = ["build_model"]


def build_model(name: str, num_classes: int, in_channels: Optional[int], image_size: Optional[int], seed: int,
                density: float = 1.0, distribution: str = "erk", init: str = "sparse", he_init: bool = True,
                **kwargs) -> nn.Module:
    """``get_model(name)`` for (in_channels, image_size, image_size) inputs, its weights drawn from ``seed``.

    ``he_init`` redraws every Linear / Conv2d weight He normal (``sparsekern.init.he_normal_``, seeded by
    ``seed``); ``density < 1`` then sparsifies it (``distribution`` per layer, ``init`` scheme, mask seeded
    by ``seed + 1``). LeNet-5 below 32x32 gets padding 2, so 28x28 MNIST has the classic 32x32 shapes.
    """
    from . import get_model  # the registry lives in the package's __init__
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"build_model: density must lie in (0, 1], got {density!r}")
    if name == "lenet5" and image_size is not None and image_size < 32:
        kwargs.setdefault("padding", 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_model(name, num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    if he_init:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            he_normal_(model)
    if density < 1.0:
        sparsify(model, density, distribution, init=init, generator=torch.Generator().manual_seed(seed + 1))
    return model
