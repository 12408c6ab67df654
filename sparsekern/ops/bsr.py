"""Block-sparse ops: bsr_linear (y = x @ W^T + b), bsr_sddmm (the weight gradient at the block
pattern) and bsr_conv2d, for a ``BlockSparseMatrix`` W.

Kernels: Triton (tensor-core tiles, CUDA or the interpreter) and the reference. The CPU backend
(``cpp``) runs the same nonzeros as an element CSR through the CSR engine (``W.to_csr()``): on a CPU
a block pattern buys nothing over CSR.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..block_sparse import BlockSparseMatrix
from ..sparse_matrix import check_csr_pattern
from . import _checks as check
from .dispatch import Op, declare, get_backend, implementation, kernel_for, reference_kernel
from .sparse_conv2d import _pair, output_size, sparse_conv2d
from .sparse_linear import sparse_linear

OP = "bsr_linear"


def _check_bsr(op: str, W) -> BlockSparseMatrix:
    if not isinstance(W, BlockSparseMatrix):
        raise TypeError(f"{op}: W must be a sparsekern.BlockSparseMatrix, got {type(W).__name__}")
    return W


def bsr_linear(x: torch.Tensor, W: BlockSparseMatrix, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` for x of shape (..., k); differentiable in x, W.values and bias."""
    check.tensor(OP, "x", x)
    _check_bsr(OP, W)
    check.linear_operands(OP, x, W, bias)
    backend = get_backend(OP, x.device)
    if backend == "cpp":
        return sparse_linear(x, W.to_csr(), bias)
    check.backend_dtype(OP, backend, "x", x)
    t = W.transpose_pattern() if torch.is_grad_enabled() and x.requires_grad else (None, None, None)
    x2 = x.reshape(math.prod(x.shape[:-1]), W.k)
    y = implementation(OP, x.device)(x2, W.values, W.row_ptr, W.col_idx, bias, *t)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], W.m)


def bsr_sddmm(row_ptr: torch.Tensor, col_idx: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
              block: int) -> torch.Tensor:
    """(nnzb, b, b) blocks ``X[rows of block p] @ Y[cols of block p]^T`` of X (m, d) @ Y (k, d)^T at a
    block pattern (row_ptr over m/b block rows, col_idx of block columns)."""
    op = "bsr_sddmm"
    check.tensor(op, "X", X, dim=2)
    check.tensor(op, "Y", Y, dim=2)
    check.floating(op, "X", X)
    check.same(op, {"X": X, "Y": Y})
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"{op}: X and Y must share their second dim, got {tuple(X.shape)} and {tuple(Y.shape)}")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{op}: block must be an int >= 1, got {block!r}")
    if X.shape[0] % block or Y.shape[0] % block:
        raise ValueError(f"{op}: X rows ({X.shape[0]}) and Y rows ({Y.shape[0]}) must be multiples of block={block}")
    # The kernels trust the pattern: a bad one reads out of range or returns blocks it does not hold.
    check_csr_pattern(op, row_ptr, col_idx, X.shape[0] // block, Y.shape[0] // block,
                      f" (X.shape[0]/block + 1 for X of {X.shape[0]} rows, block={block})")
    backend = get_backend(op, X.device)
    if backend == "cpp":  # no CPU kernel of its own: CPU training takes the CSR path (bsr_linear)
        return reference_kernel(op, X.device.type)(row_ptr, col_idx, X, Y, block)
    check.backend_dtype(op, backend, "X", X)
    return implementation(op, X.device)(row_ptr, col_idx, X, Y, block)


def bsr_conv2d(x: torch.Tensor, W: BlockSparseMatrix, bias: Optional[torch.Tensor] = None, stride=1, padding=0,
               dilation=1) -> torch.Tensor:
    """conv2d (NCHW, groups = 1) with a block-sparse weight (rows Cout, columns Cin*kh*kw): im2col
    tiles fed to ``bsr_linear`` on the GPU, the CSR conv kernel on the CPU."""
    op = "bsr_conv2d"
    _check_bsr(op, W)
    check.tensor(op, "x", x, dim=4)
    if len(W.shape) != 4:
        raise ValueError(f"{op}: W must have a 4-D (Cout, Cin, kh, kw) shape, got {tuple(W.shape)}")
    cout, cin, kh, kw = W.shape
    if x.shape[1] != cin:
        raise ValueError(f"{op}: x must have {cin} channels (W is {tuple(W.shape)}), got {x.shape[1]}")
    stride, padding, dilation = _pair(op, "stride", stride, 1), _pair(op, "padding", padding, 0), \
        _pair(op, "dilation", dilation, 1)
    if get_backend(OP, x.device) == "cpp":
        return sparse_conv2d(x, W.to_csr(), bias, stride, padding, dilation)
    n, _, h, w = x.shape
    ho, wo = output_size(h, w, (kh, kw), stride, padding, dilation)
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (N, Cin*kh*kw, L)
    y = bsr_linear(cols.transpose(1, 2), W, bias)  # (N, L, Cout)
    return y.transpose(1, 2).reshape(n, cout, ho, wo)


def _setup_context(ctx, inputs, output):
    x, values, row_ptr, col_idx, bias, t_row_ptr, t_col_idx, t_perm = inputs
    ctx.save_for_backward(x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)


def _backward(ctx, grad):
    x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm = ctx.saved_tensors
    needs = tuple(ctx.needs_input_grad) + (False,) * (8 - len(ctx.needs_input_grad))
    d_x = d_values = d_bias = None
    if needs[0]:
        if t_perm is None:
            raise RuntimeError(f"{OP}: the gradient of x needs W's block transpose; call sparsekern.ops.bsr_linear")
        # dx = dy @ W: the same kernel over W^T, whose blocks are W's blocks transposed.
        d_x = kernel_for(OP, grad)(grad, values.index_select(0, t_perm).transpose(1, 2), t_row_ptr, t_col_idx)
    if needs[1]:
        d_values = kernel_for("bsr_sddmm", grad)(row_ptr, col_idx, grad.t(), x.t(), values.shape[-1])
    if needs[4]:
        d_bias = grad.sum(0)
    return d_x, d_values, None, None, d_bias, None, None, None


# No C++ schemas: the CPU runs the CSR ops (see above), the GPU the Triton kernels.
declare(Op(OP, bsr_linear, schema=False, backward=_backward, setup_context=_setup_context, autocast=True,
           triton="bsr"))
declare(Op("bsr_sddmm", bsr_sddmm, schema=False, differentiable=False, autocast=True, triton="bsr"))
declare(Op("bsr_conv2d", bsr_conv2d, dispatched=False))  # follows bsr_linear's backend
