"""Pure-PyTorch oracle for every op: slow, obviously right, differentiable by torch autograd.

Signatures mirror the op schemas in csrc/ops.cpp (tensors, not SparseMatrix), so
each backend is tested against exactly the same call.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def csr_to_dense(values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    m = row_ptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(m, device=row_ptr.device), row_ptr[1:] - row_ptr[:-1])
    dense = torch.zeros(m, n_cols, dtype=values.dtype, device=values.device)
    return dense.index_put((rows, col_idx.long()), values)


def _rows(row_ptr: torch.Tensor) -> torch.Tensor:
    m = row_ptr.numel() - 1
    return torch.repeat_interleave(torch.arange(m, device=row_ptr.device), row_ptr[1:] - row_ptr[:-1])


def spmm(values, row_ptr, col_idx, B, t_row_ptr=None, t_col_idx=None, t_perm=None):
    return csr_to_dense(values, row_ptr, col_idx, B.shape[0]) @ B


def sddmm(row_ptr, col_idx, X, Y):
    return (X[_rows(row_ptr)] * Y[col_idx.long()]).sum(-1)


def sparse_linear(x, values, row_ptr, col_idx, bias=None, t_row_ptr=None, t_col_idx=None, t_perm=None):
    y = x @ csr_to_dense(values, row_ptr, col_idx, x.shape[-1]).t()
    return y if bias is None else y + bias


def masked_matmul(x, weight, mask):
    return x @ torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device)).t()


def masked_sddmm(X, Y, mask):
    return torch.where(mask, X @ Y.t(), torch.zeros((), dtype=X.dtype, device=X.device))


def sparse_conv2d(x, values, row_ptr, col_idx, kernel_size: Sequence[int], bias: Optional[torch.Tensor],
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]):
    kh, kw = kernel_size
    cin = x.shape[1]
    w = csr_to_dense(values, row_ptr, col_idx, cin * kh * kw).reshape(row_ptr.numel() - 1, cin, kh, kw)
    if cin == 0:  # F.conv2d returns (N, 0, H, W) for zero input channels: the output is the bias alone
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        out = x.new_zeros((x.shape[0], w.shape[0], ho, wo))
        return out if bias is None else out + bias.view(1, -1, 1, 1)
    if w.shape[0] == 0:  # F.conv2d rejects Cout = 0: compute one zero channel, then drop it
        w = torch.cat([w, w.new_zeros((1, cin, kh, kw))])
        bias = None if bias is None else torch.cat([bias, bias.new_zeros(1)])
        return F.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation))[:, :0]
    return F.conv2d(x, w, bias, tuple(stride), tuple(padding), tuple(dilation))


def gather(src, index):
    return src[index]


def topk_select(scores: torch.Tensor, k: int, largest: bool = True, candidates: Optional[torch.Tensor] = None):
    if bool(torch.isnan(scores if candidates is None else scores[candidates]).any()):
        raise ValueError("topk_select: scores contains NaN")
    idx = torch.arange(scores.numel(), device=scores.device)
    if candidates is not None:
        idx = idx[candidates]
    vals = scores[idx]
    # +0.0 and -0.0 tie; a stable sort on the (negated) values breaks ties by lower index.
    vals = vals + 0.0
    order = torch.sort(-vals if largest else vals, stable=True).indices[:k]
    return torch.sort(idx[order]).values


# ---- block-sparse (BSR): values (nnzb, b, b), row_ptr (m/b + 1) and col_idx (nnzb) over blocks ----

def bsr_to_dense(values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Dense (m, n_cols) matrix of a BSR matrix whose blocks are values[p] at block (row, col_idx[p])."""
    b = values.shape[-1]
    mb = row_ptr.numel() - 1
    blocks = torch.zeros(mb, n_cols // b, b, b, dtype=values.dtype, device=values.device)
    blocks = blocks.index_put((_rows(row_ptr), col_idx.long()), values)
    return blocks.permute(0, 2, 1, 3).reshape(mb * b, n_cols)


def bsr_linear(x, values, row_ptr, col_idx, bias=None, t_row_ptr=None, t_col_idx=None, t_perm=None):
    """y (N, m) = x (N, k) @ W^T + bias for the BSR matrix W (m, k)."""
    y = x @ bsr_to_dense(values, row_ptr, col_idx, x.shape[-1]).t()
    return y if bias is None else y + bias


def bsr_sddmm(row_ptr, col_idx, X, Y, block: int):
    """values[p] (b, b) = X[rows of block p] @ Y[cols of block p]^T; X (m, d), Y (k, d)."""
    b = block
    rows, cols = _rows(row_ptr), col_idx.long()
    # Explicit block counts: reshape(-1, b, d) is ambiguous when d == 0 (e.g. a batch of 0 in a backward).
    Xb = X.reshape(X.shape[0] // b, b, X.shape[-1])[rows]
    Yb = Y.reshape(Y.shape[0] // b, b, Y.shape[-1])[cols]
    return Xb @ Yb.transpose(1, 2)
