"""conv2d as one CSR matrix product over channels x (batch * pixels): the route that suits layers with
many channels and few pixels (1x1 convs, and every conv at 7x7 or 4x4), where the direct kernel's
tiles, cut from one image's rows, are short.

From NCHW the dense operand is channels first, (Cin*kh*kw, N*Ho*Wo), for ``spmm``: on the CPU node a view of
the input's image planes (runs of Ho*Wo elements) that the kernels read in place, and the output's planes are
written in place, NCHW; elsewhere copies that move whole planes. The (N*Ho*Wo, Cin) rows of ``sparse_linear``
would need an element-by-element transpose (measured 2-6x slower at ResNet-50's 7x7 and 14x14 layers). A
channels_last input already is (N*H*W, Cin) rows, so it takes ``sparse_linear`` and gets a channels_last output,
with no copy either way."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops import sparse_linear, spmm
from ..ops.dispatch import cpu_node
from ..ops.sparse_conv2d import is_channels_last, output_size
from ..sparse_matrix import SparseMatrix

Pair = Tuple[int, int]


def node_op(x: torch.Tensor) -> str:
    """The op whose C++ node conv2d_gemm runs for ``x`` on the CPU (ops.dispatch.cpu_node decides whether)."""
    return "sparse_linear" if is_channels_last(x) else "spmm"


class _Subsample(torch.autograd.Function):
    """x[:, :, ::sh, ::sw] copied in x's layout, whose gradient is one zero fill and one strided copy. Through the
    two slices' own nodes it took two of each, a zero fill of half the input and then of all of it (0.2-0.3 ms a
    step under torch.profiler at ResNet-50's stride-2 1x1 layers on this route, 112x112, batch 16)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, stride: Pair) -> torch.Tensor:
        ctx.shape, ctx.stride = x.shape, stride
        memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        return x[:, :, ::stride[0], ::stride[1]].contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        sh, sw = ctx.stride
        memory_format = torch.channels_last if is_channels_last(grad) else torch.contiguous_format
        gx = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=memory_format).zero_()
        gx[:, :, ::sh, ::sw] = grad
        return gx, None


def conv2d_gemm(x: torch.Tensor, W: SparseMatrix, bias: Optional[torch.Tensor], kernel_size: Pair, stride: Pair,
                padding: Pair, dilation: Pair, node: Optional[bool] = None) -> torch.Tensor:
    """``F.conv2d(x, W.to_dense().view(Cout, Cin, kh, kw), bias, stride, padding, dilation)`` for a 4-D x and a
    CSR weight W of shape (Cout, Cin*kh*kw), whose output is at least 1x1. An NCHW x gives a contiguous
    NCHW result, a channels_last x a channels_last one. Differentiable in x, W.values and bias. ``node``:
    ``cpu_node(x, W.values, node_op(x))`` where the caller knows it (a layer's kept route), else checked here."""
    n = x.shape[0]
    channels_last = is_channels_last(x)
    if node is None:
        node = cpu_node(x, W.values, "sparse_linear" if channels_last else "spmm")
    pointwise = tuple(kernel_size) == (1, 1) and tuple(padding) == (0, 0)
    if pointwise:
        if tuple(stride) != (1, 1):
            x = _Subsample.apply(x, tuple(stride)) if node else x[:, :, ::stride[0], ::stride[1]]
        ho, wo = x.shape[2], x.shape[3]
    else:
        ho, wo = output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
        x = F.unfold(x, kernel_size, dilation, padding, stride)  # (N, Cin*kh*kw, Ho*Wo)
    cout, k = W.shape[0], W.shape[1]  # (never -1 in the views: ambiguous for an empty batch)
    # On the CPU the products run as the extension's C++ autograd nodes (ops.dispatch.cpu_node).
    if channels_last:
        rows = (x.permute(0, 2, 3, 1) if pointwise else x.transpose(1, 2)).reshape(n * ho * wo, k)
        if node:
            y = torch.ops.sparsekern._sparse_linear_node(rows, W.values, bias, W.row_ptr, W.col_idx,
                                                         *W.transpose_pattern())
        else:
            y = sparse_linear(rows, W, bias)  # (N*Ho*Wo, Cout)
        return y.view(n, ho, wo, cout).permute(0, 3, 1, 2)
    if node:
        # The node reads the (Cin*kh*kw, N, Ho*Wo) planes of x where they lie and writes y's NCHW planes: no copy
        # either way, nor of the gradients (four copies were 15-20 % of a ResNet-50 1x1 conv at 7x7).
        planes = x.reshape(n, k, ho * wo).transpose(0, 1)
        y = torch.ops.sparsekern._spmm_node(W.values, W.row_ptr, W.col_idx, planes, *W.transpose_pattern())
        y = y.transpose(0, 1).reshape(n, cout, ho, wo)  # a view: y's memory is (N, Cout, Ho*Wo)
    else:
        cols = x.transpose(0, 1).reshape(k, n * ho * wo)
        y = spmm(W, cols).view(cout, n, ho, wo).transpose(0, 1).contiguous()  # (Cout, N*Ho*Wo) -> NCHW
    return y if bias is None else y + bias.view(1, -1, 1, 1)
