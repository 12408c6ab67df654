"""sddmm: (X @ Y^T) sampled at a sparse pattern; the weight gradient at the mask."""
import torch

from ..sparse_matrix import SparseMatrix, transpose_pattern
from . import _checks as check
from .dispatch import Op, call, declare, get_backend, kernel_for

OP = "sddmm"


def sddmm(pattern: SparseMatrix, X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """values[p] = dot(X[i, :], Y[j, :]) for the p-th nonzero (i, j) of ``pattern``."""
    check.sparse(OP, "pattern", pattern)
    check.tensor(OP, "X", X, dim=2)
    check.tensor(OP, "Y", Y, dim=2)
    check.floating(OP, "X", X)
    if X.shape[0] != pattern.m:
        raise ValueError(f"{OP}: X must have {pattern.m} rows (pattern is {pattern.m}x{pattern.k}), got {X.shape[0]}")
    if Y.shape[0] != pattern.k:
        raise ValueError(f"{OP}: Y must have {pattern.k} rows (pattern is {pattern.m}x{pattern.k}), got {Y.shape[0]}")
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"{OP}: X and Y must have the same number of columns, got {X.shape[1]} and {Y.shape[1]}")
    check.same(OP, {"X": X, "Y": Y})
    if pattern.device != X.device:
        raise ValueError(f"{OP}: pattern is on {pattern.device} but X is on {X.device}")
    backend = get_backend(OP, X.device)
    check.backend_dtype(OP, backend, "X", X)
    return call(OP, X.device, pattern.row_ptr, pattern.col_idx, X, Y)


def _fake(row_ptr, col_idx, X, Y):
    return X.new_empty((col_idx.shape[0],))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    row_ptr, col_idx, X, Y = ctx.saved_tensors
    d_X = d_Y = None
    if ctx.needs_input_grad[2]:
        d_X = kernel_for("spmm", grad)(grad, row_ptr, col_idx, Y)
    if ctx.needs_input_grad[3]:
        # Rare path (sddmm is usually itself a backward): the transpose is built here.
        t_row_ptr, t_col_idx, t_perm = transpose_pattern(row_ptr, col_idx, Y.shape[0])
        d_Y = kernel_for("spmm", grad)(kernel_for("gather", grad)(grad, t_perm), t_row_ptr, t_col_idx, X)
    return None, None, d_X, d_Y


declare(Op(OP, sddmm, fake=_fake, backward=_backward, setup_context=_setup_context, autocast=True, triton="sddmm"))
