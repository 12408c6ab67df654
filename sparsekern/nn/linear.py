"""SparseLinear: nn.Linear with a CSR weight."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import bsr_linear, sparse_linear
from . import kernel_choice
from .base import SparseWeightMixin
from .conv1d import conv1d_as_linear, is_conv1d, linear_as_conv1d
from .fast_modules import narrow_linear

ACTIVATIONS = (None, "relu", "gelu")  # what SparseLinear(activation=...) fuses; "gelu" is F.gelu's exact (erf) form
_FUNCTIONS = {"relu": F.relu, "gelu": F.gelu}
_MODULES = {"relu": nn.ReLU, "gelu": nn.GELU}
_NODES = {None: "_sparse_linear_node", "relu": "_sparse_linear_relu_node", "gelu": "_sparse_linear_gelu_node"}


class SparseLinear(SparseWeightMixin, nn.Module):
    """``y = x @ W^T + b`` with W stored as CSR; mirrors ``nn.Linear``.

    Built empty with ``density`` (a uniformly random pattern with round(density * numel)
    weights, initialized as nn.Linear then masked), or from a dense layer with ``from_dense``.
    ``format="bsr"`` keeps whole ``block`` x ``block`` blocks (round(density * blocks) of them) and runs
    the block-sparse kernels on the GPU; the module API is the same.

    ``kernel`` picks how a CSR layer computes: ``"auto"`` (default) runs the faster of ``"csr"`` (the
    sparse kernels) and ``"dense"`` (F.linear on the scattered weight), measured once per input
    geometry (see ``sparsekern.nn.kernel_choice``); set it to pin one.

    ``activation="relu"`` makes the layer ``relu(x @ W^T + b)``, ``"gelu"`` ``gelu(x @ W^T + b)`` (F.gelu's exact
    form): on the CPU the ``csr`` kernel's node applies it and takes its backward itself (no autograd node for the
    activation; for GELU the node keeps gelu' at the product, as much memory as F.gelu keeps, and multiplies the
    gradient by it as it packs the gradient's tiles); every other path runs ``F.relu`` / ``F.gelu`` after the product.
    ``sparsekern.fuse_activations(model)`` sets it where such an activation follows the layer (see there). The
    layer's output, and the gradient a hook on it sees, are then those after the activation.
    """

    DENSE_TYPE = nn.Linear
    kernel = "auto"
    feature_dim = -1  # features: the last dim of x and y

    def __init__(self, in_features: int, out_features: int, bias: bool = True, density: float = 1.0,
                 device=None, dtype=None, generator: Optional[torch.Generator] = None, format: str = "csr",
                 block: int = 32, activation: Optional[str] = None):
        super().__init__()
        self.activation = activation
        dense = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._copy_geometry(dense)
        self.format, self.block = format, block  # validated by _init_sparse_weight
        mask = self._initial_mask(density, generator, dense.weight.device)
        self._init_sparse_weight(dense.weight.detach(), mask, format, block)
        self.bias = dense.bias

    @property
    def activation(self) -> Optional[str]:
        """None, or ``"relu"``: the activation fused into the layer's output."""
        return self.__dict__.get("_activation")

    @activation.setter
    def activation(self, name: Optional[str]) -> None:
        if name not in ACTIVATIONS:
            raise ValueError(f"SparseLinear: activation must be one of {ACTIVATIONS}, got {name!r}")
        self.__dict__["_activation"] = name

    def activate(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.activation is None else _FUNCTIONS[self.activation](y)

    def pre_activation_grad(self, grad: torch.Tensor, y: Optional[torch.Tensor], x: Optional[torch.Tensor] = None
                            ) -> torch.Tensor:
        """The gradient at the product from ``grad`` at the output ``y`` of input ``x`` (what the activation's
        backward computes: the ReLU's from ``y``; the GELU's needs the product, recomputed from ``x``)."""
        if self.activation == "relu":
            return torch.ops.aten.threshold_backward(grad, y, 0)
        if self.activation == "gelu":
            if x is None:
                raise ValueError("SparseLinear.pre_activation_grad: a GELU layer needs its input x")
            with torch.no_grad():  # the product again, on any format and device (DST's dense gradient is dense too)
                # in x's dtype, as the forward ran it (under autocast: bf16 x, the weight cast to it)
                weight = self.dense_weight().to(x.dtype)
                bias = None if self.bias is None else self.bias.to(x.dtype)
                z = F.linear(x, weight, bias)
                return torch.ops.aten.gelu_backward(grad.to(z.dtype), z)
        return grad

    def _copy_geometry(self, module: nn.Linear) -> None:
        self.in_features, self.out_features = module.in_features, module.out_features
        self.weight_shape = module.weight.shape

    def weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        return grad_out.reshape(-1, self.out_features).t() @ x.reshape(-1, self.in_features)

    @classmethod
    def from_dense(cls, module: nn.Module, mask: Optional[torch.Tensor] = None, format: str = "csr",
                   block: int = 32) -> SparseLinear:
        """As ``SparseWeightMixin.from_dense``; ``module`` may also be transformers' ``Conv1D`` (GPT-2's
        projections: the weight stored transposed), taken as the ``nn.Linear`` it computes (``mask`` in
        (out, in)); ``to_dense`` then gives a Conv1D back."""
        if not is_conv1d(module):
            return super().from_dense(module, mask, format, block)
        out = super().from_dense(conv1d_as_linear(module), mask, format, block)
        out._conv1d_type = type(module)
        return out

    def to_dense(self) -> nn.Module:
        """The equivalent dense module: ``nn.Linear`` (zero outside the pattern; transformers' ``Conv1D`` for a
        layer made from one), followed by ``nn.ReLU`` or ``nn.GELU`` in an ``nn.Sequential`` when the layer has
        a fused activation."""
        dense = super().to_dense()
        conv1d = self.__dict__.get("_conv1d_type")
        if conv1d is not None:
            dense = linear_as_conv1d(dense, conv1d)
        return dense if self.activation is None else \
            nn.Sequential(dense, _MODULES[self.activation]()).train(self.training)

    def _empty_dense(self) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                         device=self.values.device, dtype=self.values.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.__dict__.get(kernel_choice.FAST)  # the C++ route kept by the last calls (kernel_choice._keep_fast)
        if fast is not None and not torch.compiler.is_compiling():
            y = fast(self, x)
            if y is not None:
                return y
        if self.format == "bsr":
            return self.activate(bsr_linear(x, self.block_weight(), self.bias))
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            return self.run_kernel("csr", x)  # the op's argument checks name what is wrong
        return kernel_choice.run(self, x)

    # -- the kernels this layer can run (sparsekern.nn.kernel_choice) ----------------------
    def candidates(self):
        return ("csr", "dense")

    def geometry_key(self) -> tuple:
        return ()

    def dense_macs(self, x: torch.Tensor) -> int:
        return (x.numel() // max(self.in_features, 1)) * self.in_features * self.out_features

    def dense_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        y = narrow_linear(x, weight, bias)  # a head of a few outputs: faster than MKL's GEMMs at such shapes
        return F.linear(x, weight, bias) if y is None else y

    def dense_geometry(self) -> tuple:
        """No stride, padding or dilation: the extension's dense-kernel passes then run a linear."""
        return [], [], []

    def dense_backward(self, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, needs) -> tuple:
        """(input, dense weight, bias) gradients of ``dense_forward``, those ``needs`` asks for."""
        return (grad @ weight if needs[0] else None,
                self.weight_grad(x, grad) if needs[1] else None,
                grad.reshape(-1, self.out_features).sum(0) if needs[2] else None)

    csr_op = "sparse_linear"

    def csr_node(self, x: torch.Tensor) -> torch.Tensor:
        """The ``csr`` kernel on a checked CPU input as one C++ autograd node (kernel_choice._run_kernel)."""
        p = self.pattern
        x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), self.in_features)
        node = getattr(torch.ops.sparsekern, _NODES[self.activation])
        y = node(x2, self.values, self.bias, p.row_ptr, p.col_idx, *p.transpose())
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def run_kernel(self, kernel: str, x: torch.Tensor, node: Optional[bool] = None) -> torch.Tensor:
        if kernel == "dense":
            return self.dense_forward(x, self.dense_weight(), self.bias)
        return sparse_linear(x, self.sparse_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + self.extra_repr_density() + ("" if self.kernel == "auto" else f", kernel={self.kernel!r}")
                + ("" if self.activation is None else f", activation={self.activation!r}"))


SparseLinear.ROUTE_BASE = SparseLinear  # whose methods the C++ route stands for (kernel_choice._plain)
