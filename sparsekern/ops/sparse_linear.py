"""sparse_linear: y = x @ W^T + bias with W a CSR (m, k) matrix."""
import math
from typing import Optional

import torch

from ..sparse_matrix import SparseMatrix
from . import _checks as check
from .dispatch import Op, call, declare, get_backend, kernel_for

OP = "sparse_linear"


def sparse_linear(x: torch.Tensor, W: SparseMatrix, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W^T + bias`` for x of shape (..., k); differentiable in x, W.values and bias."""
    check.tensor(OP, "x", x)
    check.sparse(OP, "W", W)
    if len(W.shape) != 2:
        raise ValueError(f"{OP}: W must be a 2-D (out_features, in_features) matrix, got shape {tuple(W.shape)}")
    check.linear_operands(OP, x, W, bias)
    backend = get_backend(OP, x.device)
    check.backend_dtype(OP, backend, "x", x)
    needs_transpose = torch.is_grad_enabled() and x.requires_grad
    t = W.transpose_pattern() if needs_transpose else (None, None, None)
    x2 = x.reshape(math.prod(x.shape[:-1]), W.k)  # not -1: ambiguous when W.k == 0
    y = call(OP, x.device, x2, W.values, W.row_ptr, W.col_idx, bias, *t)
    # No view for 2-D x: an in-place op on a view of the output (ReLU(inplace=True)) costs autograd
    # two extra copies (CopySlices) in backward.
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], W.m)


def _fake(x, values, row_ptr, col_idx, bias=None, t_row_ptr=None, t_col_idx=None, t_perm=None):
    return x.new_empty((x.shape[0], row_ptr.shape[0] - 1))


def _setup_context(ctx, inputs, output):
    x, values, row_ptr, col_idx, bias, t_row_ptr, t_col_idx, t_perm = inputs
    ctx.save_for_backward(x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm)


def _backward(ctx, grad):
    x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm = ctx.saved_tensors
    d_x = d_values = d_bias = None
    # The dispatcher drops trailing arguments equal to their defaults (bias=None, t_*=None), and
    # needs_input_grad then has fewer than 8 entries: pad it.
    needs = tuple(ctx.needs_input_grad) + (False,) * (8 - len(ctx.needs_input_grad))
    if needs[0]:
        if t_perm is None:
            raise RuntimeError(f"{OP}: the gradient of x needs W's transpose; call sparsekern.ops.sparse_linear, "
                               "which passes the cached transpose")
        # dx = dy @ W = dy @ (W^T)^T: the same kernel over the transpose.
        d_x = kernel_for("sparse_linear", grad)(grad, kernel_for("gather", grad)(values, t_perm), t_row_ptr, t_col_idx)
    if needs[1]:
        d_values = kernel_for("sddmm", grad)(row_ptr, col_idx, grad.t(), x.t())
    if needs[4]:
        d_bias = grad.sum(0)
    return d_x, d_values, None, None, d_bias, None, None, None


declare(Op(OP, sparse_linear, fake=_fake, backward=_backward, setup_context=_setup_context, autocast=True,
           triton="spmm"))
