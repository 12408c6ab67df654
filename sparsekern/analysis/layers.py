"""The weight-bearing layers of a model, dense or sparse: what pruning may remove and what the
comparisons of solutions measure. One definition, shared by ``sparsekern.lottery`` and the analysis."""
from __future__ import annotations

from typing import Dict, Iterable

import torch
from torch import nn

from ..nn import SparseWeightMixin
from ..nn.conv1d import dense_weight_of
from ..sparsity import sparsifiable_layers

__all__ = ["prunable_layers", "layer_weights", "masks_of"]


def prunable_layers(model: nn.Module, ignore: Iterable[str] = ()) -> Dict[str, nn.Module]:
    """Layers whose weights pruning may remove: ``nn.Linear``, ``nn.Conv2d`` (groups = 1), transformers
    ``Conv1D`` (its weight read as (out, in), as ``sparsify`` reads it) and the sparse modules, by qualified
    name, less those named in ``ignore`` (a name also covers what lies under it)."""
    ignore = (ignore,) if isinstance(ignore, str) else tuple(ignore)
    dense = sparsifiable_layers(model, ignore)
    skip = lambda name: any(name == p or name.startswith(p + ".") for p in ignore)  # noqa: E731
    return {name: m for name, m in model.named_modules()
            if name in dense or (isinstance(m, SparseWeightMixin) and not skip(name))}


def _weight(module: nn.Module) -> torch.Tensor:
    return module.dense_weight() if isinstance(module, SparseWeightMixin) else dense_weight_of(module)


@torch.no_grad()
def layer_weights(model: nn.Module, ignore: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
    """{layer name: its dense weight (zeros outside a sparse layer's pattern)}, detached copies."""
    return {name: _weight(m).detach().clone() for name, m in prunable_layers(model, ignore).items()}


def masks_of(model: nn.Module, ignore: Iterable[str] = ()) -> Dict[str, torch.Tensor]:
    """The current masks: a sparse layer's pattern, all-True for a dense layer."""
    return {name: m.mask() if isinstance(m, SparseWeightMixin) else torch.ones_like(_weight(m), dtype=torch.bool)
            for name, m in prunable_layers(model, ignore).items()}
