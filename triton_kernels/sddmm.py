"""sddmm: values[p] = dot(X[i, :], Y[j, :]) for the p-th nonzero (i, j) of a CSR pattern.

Design: nonzero-split, so the work per program is the same whatever the row lengths. Each program
takes BLOCK_P consecutive nonzeros; their rows come from a vectorized binary search of row_ptr
(log2(m) cached loads, no per-nonzero row tensor to build or read). It then walks d in BLOCK_D
chunks, gathering the BLOCK_P x BLOCK_D tiles of X's and Y's rows, and accumulates the products
in a 2-D fp32 accumulator reduced once at the end. Consecutive nonzeros mostly share their row,
so the X tile is largely the same few rows (L1 hits); Y's rows are the gathered, bandwidth-bound part.

The rows of X and Y should be contiguous (stride(1) == 1) for coalesced, vectorized loads; the
backward call sddmm(row_ptr, col_idx, dy.t(), x.t()) passes column-major views, which the launcher
copies to row-major first: one pass over X and Y, while the kernel reads them ~nnz/m and ~nnz/k times.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import LIB, autotune, launch

# First config: the interpreter's. GPU: wide d chunks for long dots (16-byte loads along d),
# more nonzeros per program for short ones.
_CONFIGS = [
    triton.Config({"BLOCK_P": 32, "BLOCK_D": 32, "STAGES": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_P": 32, "BLOCK_D": 64, "STAGES": 3}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_P": 64, "BLOCK_D": 64, "STAGES": 3}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_P": 32, "BLOCK_D": 128, "STAGES": 3}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_P": 64, "BLOCK_D": 128, "STAGES": 3}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_P": 128, "BLOCK_D": 32, "STAGES": 3}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_P": 128, "BLOCK_D": 16, "STAGES": 2}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_P": 64, "BLOCK_D": 64, "STAGES": 1}, num_warps=4, num_stages=1),
]


@autotune(configs=_CONFIGS, key=["D"])
@triton.jit
def _sddmm_kernel(row_ptr_ptr, col_idx_ptr, x_ptr, y_ptr, out_ptr, M, NNZ, D, n_search,
                  stride_xm, stride_xd, stride_ym, stride_yd, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                  STAGES: tl.constexpr):
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < NNZ
    # Row of each nonzero: the largest r with row_ptr[r] <= p, keeping row_ptr[lo] <= p < row_ptr[hi]
    # (empty rows have row_ptr[r] == row_ptr[r + 1] and are skipped). n_search = bit_length(m) steps.
    lo = tl.zeros((BLOCK_P,), dtype=tl.int64)
    hi = tl.zeros((BLOCK_P,), dtype=tl.int64) + M
    for _ in range(n_search):
        mid = (lo + hi) // 2
        right = tl.load(row_ptr_ptr + mid) <= offs_p
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    cols = tl.load(col_idx_ptr + offs_p, mask=mask_p, other=0).to(tl.int64)
    x_rows = x_ptr + lo[:, None] * stride_xm
    y_rows = y_ptr + cols[:, None] * stride_ym
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=STAGES):  # explicit: loads pipelined via cp.async
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_p[:, None] & (offs_d < D)[None, :]
        x = tl.load(x_rows + offs_d[None, :] * stride_xd, mask=mask, other=0.0)
        y = tl.load(y_rows + offs_d[None, :] * stride_yd, mask=mask, other=0.0)
        acc += x.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + offs_p, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=mask_p)


@torch.library.triton_op(f"{LIB}::sddmm", mutates_args=())
def sddmm(row_ptr: Tensor, col_idx: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    nnz, m, d = col_idx.numel(), row_ptr.numel() - 1, X.shape[1]
    if nnz == 0 or d == 0:
        return torch.zeros((nnz,), dtype=X.dtype, device=X.device)
    if d > 1 and X.stride(1) != 1:
        X = X.contiguous()  # coalesced row loads (module docstring)
    if d > 1 and Y.stride(1) != 1:
        Y = Y.contiguous()
    out = torch.empty((nnz,), dtype=X.dtype, device=X.device)
    def grid(meta):
        return (triton.cdiv(nnz, meta["BLOCK_P"]),)

    launch(_sddmm_kernel)[grid](row_ptr, col_idx, X, Y, out, m, nnz, d, int(m).bit_length(),
                                X.stride(0), X.stride(1), Y.stride(0), Y.stride(1))
    return out
