"""Sparsity-aware initialization of sparse layers."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .nn import SparseConv2d, SparseWeightMixin

__all__ = ["INITS", "sparse_init_", "initialize_", "he_normal_"]

INITS = ("sparse", "dense", "layer")
_MODES = ("fan_in", "fan_out")
_DISTRIBUTIONS = ("normal", "uniform")


def check_density(where: str, density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"{where}: density must lie in (0, 1], got {density!r}")
    return float(density)


def _check_module(where: str, module) -> None:
    if not isinstance(module, SparseWeightMixin):
        raise TypeError(f"{where}: module must be a sparse layer (SparseLinear, SparseConv2d), "
                        f"got {type(module).__name__}")


def _fans(module: SparseWeightMixin, mode: str) -> torch.Tensor:
    """Per nonzero: the number of active connections of the unit it scales (kernel positions included)."""
    row_ptr, col_idx = module.row_ptr, module.col_idx
    if mode == "fan_in":  # the nonzero's output unit: its row's length
        counts = row_ptr[1:] - row_ptr[:-1]
        return counts[module.sparse_weight().row_indices()]
    # fan_out: the nonzero's input unit (a channel for a conv): all active weights leaving it
    per_channel = math.prod(module.weight_shape[2:]) if isinstance(module, SparseConv2d) else 1
    channel = col_idx.long() // per_channel
    counts = torch.bincount(channel, minlength=module.weight_shape[1])
    return counts[channel]


@torch.no_grad()
def he_normal_(model: torch.nn.Module) -> torch.nn.Module:
    """He normal (fan-in, ReLU gain) on every dense ``nn.Linear`` / ``nn.Conv2d`` weight, zero biases: the
    dense init the studies share, so dense and sparsity-aware inits differ only in which fan-in scales it.
    Returns the model."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                m.bias.zero_()
    return model


@torch.no_grad()
def sparse_init_(module, nonlinearity: str = "relu", mode: str = "fan_in", distribution: str = "normal",
                 param: Optional[float] = None, generator: Optional[torch.Generator] = None):
    """Per-unit scaled init (rigl's ``unit_scaled_init``): every weight of a unit gets
    std = gain / sqrt(that unit's number of active connections), so each unit's output variance is
    the dense network's whatever its sparsity. ``mode``: ``fan_in`` scales by each output unit's
    active inputs, ``fan_out`` by each input unit's active outputs. Units without connections have
    no weights, so stay zero. Returns the module."""
    _check_module("sparse_init_", module)
    if mode not in _MODES:
        raise ValueError(f"sparse_init_: mode must be one of {_MODES}, got {mode!r}")
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(f"sparse_init_: distribution must be one of {_DISTRIBUTIONS}, got {distribution!r}")
    gain = torch.nn.init.calculate_gain(nonlinearity, param)
    values = module.values
    std = gain / _fans(module, mode).to(torch.float64).sqrt()
    if distribution == "normal":
        draw = torch.randn(values.numel(), dtype=torch.float64, generator=generator)
    else:  # uniform of the same std: bound sqrt(3) * std
        draw = (torch.rand(values.numel(), dtype=torch.float64, generator=generator) * 2 - 1) * math.sqrt(3.0)
    values.copy_(draw.to(values.device) * std)
    return module


@torch.no_grad()
def initialize_(module, init: str, density: float, generator: Optional[torch.Generator] = None):
    """The init scheme ``init`` of ``sparsekern.sparsify`` on a sparse layer whose values hold the dense
    layer's weights, masked: ``sparse`` (``sparse_init_``), ``dense`` (keep them) or ``layer`` (scale
    them by 1/sqrt(density), the dense std over sqrt(layer density))."""
    _check_module("initialize_", module)
    density = check_density("initialize_", density)
    if init == "sparse":
        sparse_init_(module, generator=generator)
    elif init == "layer":
        module.values.mul_(1.0 / math.sqrt(density))
    elif init != "dense":
        raise ValueError(f"initialize_: init must be one of {INITS}, got {init!r}")
    return module
