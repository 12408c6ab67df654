"""SparseConv2d: nn.Conv2d (groups = 1) with a CSR weight (rows Cout, columns Cin*kh*kw)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import bsr_conv2d, sparse_conv2d
from ..ops.dispatch import get_backend
from ..ops.sparse_conv2d import _pair, check_groups, is_channels_last, output_size
from ..sparse_matrix import SparseMatrix
from . import kernel_choice
from .base import SparseWeightMixin
from .conv_gemm import conv2d_gemm, node_op


def _same_padding(kernel_size, dilation, stride):
    if stride != (1, 1):
        raise ValueError("SparseConv2d: padding='same' needs stride 1, as in nn.Conv2d")
    pads = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        if total % 2:
            raise ValueError("SparseConv2d: padding='same' with an even effective kernel size needs asymmetric "
                             "padding, which is not supported")
        pads.append(total // 2)
    return tuple(pads)


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class SparseConv2d(SparseWeightMixin, nn.Module):
    """Mirrors ``nn.Conv2d`` (groups = 1) with a sparse weight; ``format="bsr"`` keeps whole blocks of the
    (Cout, Cin*kh*kw) weight matrix, as ``SparseLinear``. A padding_mode other than 'zeros' ('reflect',
    'replicate', 'circular') pads the input with F.pad first, as nn.Conv2d does, and the kernels run unpadded
    (``padding`` is then what the kernels take, (0, 0); ``input_padding`` the module's own).

    ``kernel`` picks how a CSR layer computes: ``"csr"`` (the sparse_conv2d op, whose CPU kernel is the
    pointwise one for an unpadded 1x1, else, per pass, the faster of the direct and batch-innermost kernels,
    measured on the pass's first call where it is large enough to matter), ``"gemm"``
    (a CSR GEMM of the (Cout, Cin*kh*kw) weight with the input's patches, for a 1x1 conv just the pixels:
    built channels first from NCHW, as rows from channels_last, see ``conv_gemm``), ``"dense"`` (F.conv2d on
    the scattered weight), or ``"auto"`` (default): the fastest of them, measured once per input geometry (see
    ``sparsekern.nn.kernel_choice``). The output has the input's memory format.
    """

    DENSE_TYPE = nn.Conv2d
    kernel = "auto"
    feature_dim = -3  # channels: dim -3 of (N, C, H, W) and (C, H, W)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", density: float = 1.0,
                 device=None, dtype=None, generator: Optional[torch.Generator] = None, format: str = "csr",
                 block: int = 32):
        super().__init__()
        check_groups("SparseConv2d", groups)  # before nn.Conv2d, whose error for groups=1.0 names no argument
        dense = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                          padding_mode, device=device, dtype=dtype)
        self._copy_geometry(dense)
        self.format, self.block = format, block  # validated by _init_sparse_weight
        mask = self._initial_mask(density, generator, dense.weight.device)
        self._init_sparse_weight(dense.weight.detach(), mask, format, block)
        self.bias = dense.bias

    def _copy_geometry(self, conv: nn.Conv2d) -> None:
        check_groups("SparseConv2d", conv.groups)
        if conv.padding_mode not in PADDING_MODES:
            raise ValueError(f"SparseConv2d: padding_mode must be one of {PADDING_MODES}, got {conv.padding_mode!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        # nn.Conv2d takes stride 0 or negative padding and fails in its forward; checked here, at construction
        self.kernel_size = conv.kernel_size
        self.stride = _pair("SparseConv2d", "stride", conv.stride, 1)
        self.dilation = _pair("SparseConv2d", "dilation", conv.dilation, 1)
        self.groups, self.padding_mode = 1, conv.padding_mode
        if conv.padding == "same":
            padding = _same_padding(conv.kernel_size, self.dilation, self.stride)
        elif conv.padding == "valid":
            padding = (0, 0)
        else:
            padding = _pair("SparseConv2d", "padding", conv.padding, 0)
        self.input_padding = padding
        self.padding = padding if self.padding_mode == "zeros" else (0, 0)
        self.weight_shape = conv.weight.shape

    def __setstate__(self, state):
        state.setdefault("input_padding", state.get("padding"))  # a module pickled before padding modes
        super().__setstate__(state)

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the kernels run on for the layer's input ``x``: x padded by F.pad for a padding_mode other than
        'zeros' (the kernels then run unpadded), else x."""
        if self.padding_mode == "zeros" or not isinstance(x, torch.Tensor) or x.dim() != 4:
            return x
        ph, pw = self.input_padding
        return F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)

    def weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        return torch.nn.grad.conv2d_weight(x, self.weight_shape, grad_out, self.stride, self.padding, self.dilation)

    def _empty_dense(self) -> nn.Conv2d:
        return nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.input_padding,
                         self.dilation, 1, self.bias is not None, self.padding_mode, device=self.values.device,
                         dtype=self.values.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self(x.unsqueeze(0)).squeeze(0)
        x = self.kernel_input(x)
        fast = self.__dict__.get(kernel_choice.FAST)  # the C++ route kept by the last calls (kernel_choice._keep_fast)
        if fast is not None and not torch.compiler.is_compiling():
            y = fast(self, x)
            if y is not None:
                return y
        if self.format == "bsr":
            return bsr_conv2d(x, self.block_weight(), self.bias, self.stride, self.padding, self.dilation)
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels \
                or min(output_size(x.shape[2], x.shape[3], self.kernel_size, self.stride, self.padding,
                                   self.dilation)) <= 0:
            return self.run_kernel("csr", x)  # the op's argument checks name what is wrong
        return kernel_choice.run(self, x)

    # -- the kernels this layer can run (sparsekern.nn.kernel_choice) ----------------------
    def candidates(self):
        return ("csr", "gemm", "dense")

    def geometry_key(self) -> tuple:
        return (tuple(self.kernel_size), tuple(self.stride), tuple(self.padding), tuple(self.dilation))

    def dense_macs(self, x: torch.Tensor) -> int:
        ho, wo = output_size(x.shape[2], x.shape[3], self.kernel_size, self.stride, self.padding, self.dilation)
        return x.shape[0] * max(ho, 0) * max(wo, 0) * self.weight_shape.numel()

    def dense_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def dense_geometry(self) -> tuple:
        """(stride, padding, dilation) as the extension's dense-kernel passes take them."""
        return list(self.stride), list(self.padding), list(self.dilation)

    def dense_backward(self, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, needs) -> tuple:
        """(input, dense weight, bias) gradients of ``dense_forward``, those ``needs`` asks for: one
        oneDNN / cuDNN backward call, as F.conv2d's own backward makes."""
        return torch.ops.aten.convolution_backward(
            grad, x, weight, [self.out_channels] if needs[2] else None, self.stride, self.padding,
            self.dilation, False, [0, 0], 1, [bool(n) for n in needs])

    csr_op = "sparse_conv2d"

    def csr_node(self, x: torch.Tensor) -> torch.Tensor:
        """The ``csr`` kernel on a checked CPU input as one C++ autograd node (kernel_choice._run_kernel)."""
        p = self.pattern
        return torch.ops.sparsekern._sparse_conv2d_node(x, self.values, self.bias, p.row_ptr, p.col_idx,
                                                        list(self.kernel_size), list(self.stride), list(self.padding),
                                                        list(self.dilation))

    def cpu_conv_kernels(self, x: torch.Tensor) -> Optional[str]:
        """Which of the CPU extension's conv kernels each pass of the ``csr`` kernel runs on an input shaped like
        ``x``: "forward/input gradient/weight gradient", each ``direct``, ``batched`` or ``pointwise`` (the one
        measured on the pass's first call, else the geometry rule's, as a float32 call would run). None where the
        ``csr`` kernel runs no C++ conv: another device or backend, or a BSR weight."""
        if (self.format != "csr" or x.device.type != "cpu" or x.dim() != 4
                or get_backend("sparse_conv2d", x.device) != "cpp"):
            return None
        p, geo = self.pattern, (list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation))
        kernel = torch.ops.sparsekern._conv2d_cpu_kernel
        # The choices are kept per layout (a channels_last input's passes read and write channels_last tensors); the
        # gradients' layout taken as the input's.
        return "/".join(kernel(list(x.shape), p.row_ptr, p.col_idx, *geo, q, is_channels_last(x)) for q in range(3))

    def gemm_op(self, x: torch.Tensor) -> str:
        """The op whose C++ node the ``gemm`` kernel runs for ``x`` on the CPU (kernel_choice keeps the check)."""
        return node_op(x)

    def run_kernel(self, kernel: str, x: torch.Tensor, node: Optional[bool] = None) -> torch.Tensor:
        """``kernel`` on ``x``; ``node``: whether the extension's C++ nodes run it, where the caller knows."""
        if kernel == "dense":
            return self.dense_forward(x, self.dense_weight(), self.bias)
        if kernel == "gemm":
            return self._conv_as_gemm(x, node)
        return sparse_conv2d(x, self.sparse_weight(), self.bias, self.stride, self.padding, self.dilation)

    def _conv_as_gemm(self, x: torch.Tensor, node: Optional[bool] = None) -> torch.Tensor:
        """The conv as one CSR matrix product over channels x (batch * pixels) (``conv2d_gemm``): batch
        tiles that suit the many-channel, few-pixel layers (1x1 and late-stage convs) the direct kernel does not."""
        ho, wo = output_size(x.shape[2], x.shape[3], self.kernel_size, self.stride, self.padding, self.dilation)
        if ho <= 0 or wo <= 0:  # let the conv op report it
            return sparse_conv2d(x, self.sparse_weight(), self.bias, self.stride, self.padding, self.dilation)
        p = self.pattern
        k = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        W = SparseMatrix(p.row_ptr, p.col_idx, self.values, (self.out_channels, k), validate=False,
                         transpose=p.transpose())
        return conv2d_gemm(x, W, self.bias, self.kernel_size, self.stride, self.padding, self.dilation, node)

    def extra_repr(self) -> str:
        mode = "" if self.padding_mode == "zeros" else f", padding_mode={self.padding_mode!r}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.input_padding}{mode}, dilation={self.dilation}, bias={self.bias is not None}, "
                + self.extra_repr_density() + ("" if self.kernel == "auto" else f", kernel={self.kernel!r}"))


SparseConv2d.ROUTE_BASE = SparseConv2d  # whose methods the C++ route stands for (kernel_choice._plain)
