"""The implementations a case compares, each wrapped as an ``Impl``: dense PyTorch,
sparsekern, ``torch.sparse`` CSR and SparseProp (optional: ``pip install pybind11 scipy``, then ``pip install
--no-build-isolation sparseprop``).

Every builder takes the dense module, whose weight is already zero outside ``mask``,
and returns an ``Impl`` computing the same function from its own copy of the weight.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import nn

import sparsekern

DENSE, SPARSEKERN, TORCH_SPARSE, SPARSEPROP = "dense", "sparsekern", "torch.sparse", "SparseProp"
COLUMNS = (DENSE, SPARSEKERN, TORCH_SPARSE, SPARSEPROP)


@dataclass
class Impl:
    column: str  # which table column it fills (one of COLUMNS)
    forward: Callable[..., torch.Tensor]
    params: List[torch.Tensor] = field(default_factory=list)  # trainable leaves besides the input
    weight_grad: Optional[Callable[[], torch.Tensor]] = None  # the weight's gradient, dense-shaped
    bias: Optional[torch.Tensor] = None
    variant: str = ""  # named in the notes when a column keeps the best of several variants


def _params(*tensors) -> List[torch.Tensor]:
    return [t for t in tensors if t is not None]


# -- dense PyTorch and sparsekern -----------------------------------------------------------
def dense(module: nn.Module, mask: torch.Tensor) -> Impl:
    """nn.Linear / nn.Conv2d with the (masked) dense weight; its weight grad is dense, compared on the mask."""
    return Impl(DENSE, module, _params(module.weight, module.bias), lambda: module.weight.grad * mask, module.bias)


def sparsekern_module(module: nn.Module, mask: torch.Tensor) -> Impl:
    cls = sparsekern.nn.SparseLinear if isinstance(module, nn.Linear) else sparsekern.nn.SparseConv2d
    sparse = cls.from_dense(module, mask)

    def weight_grad():
        return sparse.sparse_weight().with_values(sparse.values.grad).to_dense()
    return Impl(SPARSEKERN, sparse, _params(sparse.values, sparse.bias), weight_grad, sparse.bias)


# -- torch.sparse ---------------------------------------------------------------------------
def torch_sparse_linear(module: nn.Linear, mask: torch.Tensor) -> List[Impl]:
    """``torch.sparse.mm(W_csr, x.T).T + b``, with x.T as the view it is (column-major) and copied row-major: the
    CSR product's speed depends on its dense operand's layout, so the table keeps the faster. Its backward gives
    W_csr a CSR gradient on the pattern."""
    def impl(contiguous: bool) -> Impl:
        with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
            warnings.simplefilter("ignore", UserWarning)
            weight = module.weight.detach().to_sparse_csr().requires_grad_()
        bias = None if module.bias is None else module.bias.detach().clone().requires_grad_()

        def forward(x):
            y = torch.sparse.mm(weight, x.t().contiguous() if contiguous else x.t()).t()
            return y if bias is None else y + bias
        return Impl(TORCH_SPARSE, forward, _params(weight, bias), lambda: weight.grad.to_dense(), bias,
                    variant=f"mm(W, x.T{'.contiguous()' if contiguous else ''}).T")
    return [impl(False), impl(True)]


# -- SparseProp -----------------------------------------------------------------------------
_sparseprop = None  # (modules, utils, version), or the reason it is unavailable


def sparseprop_status() -> str:
    """"" when SparseProp is importable, else why not."""
    _load_sparseprop()
    return _sparseprop if isinstance(_sparseprop, str) else ""


def sparseprop_version() -> str:
    _load_sparseprop()
    return "" if isinstance(_sparseprop, str) else _sparseprop[2]


def _load_sparseprop():
    global _sparseprop
    if _sparseprop is None:
        try:
            # sparseprop/__init__ does `import backend` (a top-level extension module it installs).
            from importlib.metadata import version

            import sparseprop.modules as modules
            import sparseprop.modules.utils as utils
            _sparseprop = (modules, utils, version("sparseprop"))
        except Exception as exc:  # not installed, or its extension fails to load
            _sparseprop = f"{type(exc).__name__}: {exc}"
    return None if isinstance(_sparseprop, str) else _sparseprop


def sparseprop_linear(module: nn.Linear, mask: torch.Tensor) -> List[Impl]:
    """``sparseprop.modules.SparseLinear.from_dense(linear)``: CSR of the weight's nonzeros (via scipy)."""
    loaded = _load_sparseprop()
    if loaded is None:
        return []
    modules, utils, _ = loaded
    sparse = modules.SparseLinear.from_dense(module)
    shape = tuple(module.weight.shape)
    return [Impl(SPARSEPROP, sparse, _params(sparse.W_val, sparse.bias),
                 lambda: utils.from_csr_2d(sparse.W_val.grad, sparse.W_idx, shape), sparse.bias)]


def sparseprop_conv2d(module: nn.Conv2d, mask: torch.Tensor) -> List[Impl]:
    """``sparseprop.modules.SparseConv2d.from_dense(conv, vectorizing_over_on=...)``, both variants:
    SparseProp itself picks the faster one per layer (``sparsify_conv2d_auto``), so the table keeps the best."""
    loaded = _load_sparseprop()
    if loaded is None:
        return []
    modules, utils, _ = loaded
    shape = tuple(module.weight.shape)
    impls = []
    for over_on in (False, True):
        sparse = modules.SparseConv2d.from_dense(module, vectorizing_over_on=over_on)
        impls.append(Impl(SPARSEPROP, sparse, _params(sparse.W_val, sparse.bias),
                          lambda s=sparse: utils.from_sparse_format_conv2d(s.W_val.grad, s.W_idx, shape),
                          sparse.bias, variant=f"vectorizing_over_on={over_on}"))
    return impls
