"""SparseLinear: nn.Linear with a CSR weight."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import sparse_linear
from .base import SparseWeightMixin, random_mask


class SparseLinear(SparseWeightMixin, nn.Module):
    """``y = x @ W^T + b`` with W stored as CSR; mirrors ``nn.Linear``.

    Built empty with ``density`` (a uniformly random pattern with round(density * numel)
    weights, initialized as nn.Linear then masked), or from a dense layer with ``from_dense``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, density: float = 1.0,
                 device=None, dtype=None, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = torch.Size((out_features, in_features))
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        mask = random_mask(self.weight_shape, density, generator, device=dense.weight.device)
        self._init_sparse_weight(dense.weight.detach(), mask)
        self.bias = dense.bias

    @classmethod
    def from_dense(cls, module: nn.Linear, mask: Optional[torch.Tensor] = None) -> "SparseLinear":
        """The sparse equivalent of ``module`` at ``mask`` (None = the weight's nonzeros)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense: module must be nn.Linear, got {type(module).__name__}")
        weight = module.weight.detach()
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features = module.in_features, module.out_features
        out.weight_shape = weight.shape
        out._init_sparse_weight(weight, weight != 0 if mask is None else mask)
        out.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())
        return out

    def to_dense(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.sparse_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + self.extra_repr_density())
