"""spmm: out = A @ B for a CSR matrix A (m, k) and a dense B (k, n)."""
import torch

from ..sparse_matrix import SparseMatrix, transpose_pattern
from . import _checks as check
from .dispatch import Op, call, declare, get_backend, kernel_for

OP = "spmm"


def spmm(A: SparseMatrix, B: torch.Tensor) -> torch.Tensor:
    """A @ B, differentiable in ``A.values`` and ``B``."""
    check.sparse(OP, "A", A)
    check.tensor(OP, "B", B, dim=2)
    check.floating(OP, "B", B)
    if B.shape[0] != A.k:
        raise ValueError(f"{OP}: B must have {A.k} rows (A is {A.m}x{A.k}), got {B.shape[0]}")
    check.same(OP, {"A.values": A.values, "B": B})
    backend = get_backend(OP, B.device)
    check.backend_dtype(OP, backend, "B", B)
    t = A.transpose_pattern() if torch.is_grad_enabled() and B.requires_grad else (None, None, None)
    return call(OP, B.device, A.values, A.row_ptr, A.col_idx, B, *t)


def _fake(values, row_ptr, col_idx, B, t_row_ptr=None, t_col_idx=None, t_perm=None):
    return B.new_empty((row_ptr.shape[0] - 1, B.shape[1]), dtype=values.dtype)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.transpose = inputs[4:]


def _backward(ctx, grad):
    values, row_ptr, col_idx, B = ctx.saved_tensors
    d_values = d_B = None
    if ctx.needs_input_grad[0]:
        d_values = kernel_for("sddmm", grad)(row_ptr, col_idx, grad, B)
    if ctx.needs_input_grad[3]:
        t_row_ptr, t_col_idx, t_perm = ctx.transpose
        if t_perm is None:  # called on the op directly, without the cached transpose
            t_row_ptr, t_col_idx, t_perm = transpose_pattern(row_ptr, col_idx, B.shape[0])
        d_B = kernel_for("spmm", grad)(kernel_for("gather", grad)(values, t_perm), t_row_ptr, t_col_idx, grad)
    return d_values, None, None, d_B, None, None, None


declare(Op(OP, spmm, fake=_fake, backward=_backward, setup_context=_setup_context, autocast=True, triton="spmm"))
