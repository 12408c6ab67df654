"""spmm (out = A @ B, A CSR) and sparse_linear (y = x @ W^T + bias, W CSR): one row-split kernel.

Design (Sputnik-style row split, Gale et al. SC'20):
  * Each program computes ROWS rows of the output times a BLOCK_N column tile. For one row it walks
    the row's nonzeros in chunks of BLOCK_NZ: it loads BLOCK_NZ column indices and values, gathers
    the BLOCK_NZ x BLOCK_N tile of B's rows and accumulates vals[:, None] * tile into a 2-D fp32
    accumulator, reduced across the nonzero axis once at the end (no cross-thread reduction in the
    loop). The gather is one load per nonzero per column, so the kernel is bound by the (L2) traffic
    of B, not by FLOPs: CUDA-core FMAs, no tl.dot (a one-hot dot would spend 16x the FLOPs for
    nothing since every B row is used once per output row).
  * Load balance: rows are visited in order of decreasing length (a stable argsort of the row
    lengths, computed with torch on the device, no host sync). Neighbouring programs then get rows
    of similar length (ROWS short rows per program do not wait on a long one), and the longest rows
    start first, so a very long row overlaps with the short ones instead of finishing last (LPT
    scheduling). Rows are not split across programs: that would need atomics into an fp32 buffer
    (non-deterministic sums, an extra cast pass for 16-bit outputs); one row costs at most k/BLOCK_NZ
    iterations, small next to the whole product for the layer shapes this library targets.
  * sparse_linear is the same kernel with B = x^T (strides) and the output written transposed
    (out[row, n] at y[n, row]) with the bias of the row fused.

Gathered rows of B should be contiguous (B.stride(1) == 1) for coalesced loads: when they are not
(x in sparse_linear, a transposed grad in backward), the launcher copies B to a row-major layout
first; that costs one pass over B while the gathers read B about nnz/k times.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import LIB, autotune, launch


def _config(block_n, block_nz, rows, stages, warps):
    return triton.Config({"BLOCK_N": block_n, "BLOCK_NZ": block_nz, "ROWS": rows, "STAGES": stages},
                         num_warps=warps, num_stages=stages)


# First config: what the interpreter runs (small tiles keep CPU tests quick). The others cover
# short rows / narrow B (ROWS > 1, small BLOCK_N) and long rows / wide B (bigger tiles). STAGES > 1
# pipelines the gathers through shared memory (cp.async); STAGES = 1 relies on occupancy instead.
_CONFIGS = [
    _config(32, 16, 2, 1, 4),
    _config(64, 32, 1, 1, 4),
    _config(64, 32, 1, 3, 4),
    _config(128, 32, 1, 1, 4),
    _config(128, 32, 1, 3, 4),
    _config(128, 64, 1, 3, 8),
    _config(256, 32, 1, 2, 8),
    _config(64, 16, 4, 1, 4),
    _config(32, 32, 2, 2, 2),
    _config(16, 64, 2, 2, 2),
]


@autotune(configs=_CONFIGS, key=["N", "ROW_LEN_BUCKET"])
@triton.jit
def _csr_rows_kernel(values_ptr, row_ptr_ptr, col_idx_ptr, order_ptr, b_ptr, bias_ptr, out_ptr,
                     M, N, stride_bk, stride_bn, stride_om, stride_on,
                     ROW_LEN_BUCKET,  # autotune key only: log2 of the mean row length
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NZ: tl.constexpr, ROWS: tl.constexpr,
                     STAGES: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    b_cols = offs_n.to(tl.int64)[None, :] * stride_bn
    out_cols = offs_n.to(tl.int64) * stride_on
    for r in tl.static_range(ROWS):
        slot = pid_m * ROWS + r
        if slot < M:
            row = tl.load(order_ptr + slot)  # swizzled: longest rows first
            start = tl.load(row_ptr_ptr + row)
            end = tl.load(row_ptr_ptr + row + 1)
            acc = tl.zeros((BLOCK_NZ, BLOCK_N), dtype=tl.float32)
            for p in tl.range(start, end, BLOCK_NZ, num_stages=STAGES):  # explicit: cp.async-pipelined gathers
                offs = p + tl.arange(0, BLOCK_NZ)
                mask_nz = offs < end
                cols = tl.load(col_idx_ptr + offs, mask=mask_nz, other=0).to(tl.int64)
                vals = tl.load(values_ptr + offs, mask=mask_nz, other=0.0).to(tl.float32)
                tile = tl.load(b_ptr + cols[:, None] * stride_bk + b_cols,
                               mask=mask_nz[:, None] & mask_n[None, :], other=0.0)
                acc += vals[:, None] * tile.to(tl.float32)
            res = tl.sum(acc, axis=0)
            if HAS_BIAS:
                res += tl.load(bias_ptr + row).to(tl.float32)
            tl.store(out_ptr + row.to(tl.int64) * stride_om + out_cols, res.to(out_ptr.dtype.element_ty),
                     mask=mask_n)


def _row_len_bucket(nnz: int, m: int) -> int:
    return max(int(nnz) // max(int(m), 1), 1).bit_length()  # int(): a SymInt has no bit_length


def _csr_times_dense(values: Tensor, row_ptr: Tensor, col_idx: Tensor, B: Tensor, out: Tensor,
                     out_strides, bias: Optional[Tensor]) -> None:
    """out[row, n] (at out_strides) = sum_p values[p] * B[col_idx[p], n] (+ bias[row]) for every row;
    out must be non-empty and nnz > 0."""
    m, n = row_ptr.numel() - 1, B.shape[1]
    if n > 1 and B.stride(1) != 1:
        B = B.contiguous()  # coalesced gathers (see the module docstring)
    lengths = row_ptr[1:] - row_ptr[:-1]
    order = torch.argsort(lengths, descending=True, stable=True)
    def grid(meta):
        return (triton.cdiv(m, meta["ROWS"]), triton.cdiv(n, meta["BLOCK_N"]))

    launch(_csr_rows_kernel)[grid](
        values, row_ptr, col_idx, order, B, bias if bias is not None else values, out,
        m, n, B.stride(0), B.stride(1), out_strides[0], out_strides[1],
        _row_len_bucket(values.numel(), m), HAS_BIAS=bias is not None)


@torch.library.triton_op(f"{LIB}::spmm", mutates_args=())
def spmm(values: Tensor, row_ptr: Tensor, col_idx: Tensor, B: Tensor, t_row_ptr: Optional[Tensor] = None,
         t_col_idx: Optional[Tensor] = None, t_perm: Optional[Tensor] = None) -> Tensor:
    # t_*: the cached transpose, used by the autograd formula only.
    m, n = row_ptr.numel() - 1, B.shape[1]
    if m == 0 or n == 0 or values.numel() == 0:
        return torch.zeros((m, n), dtype=values.dtype, device=B.device)
    out = torch.empty((m, n), dtype=values.dtype, device=B.device)
    _csr_times_dense(values, row_ptr, col_idx, B, out, out.stride(), None)
    return out


@torch.library.triton_op(f"{LIB}::sparse_linear", mutates_args=())
def sparse_linear(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, bias: Optional[Tensor] = None,
                  t_row_ptr: Optional[Tensor] = None, t_col_idx: Optional[Tensor] = None,
                  t_perm: Optional[Tensor] = None) -> Tensor:
    # y^T (m, N) = W (m, k) @ x^T (k, N): the spmm kernel over B = x^T, writing row r of y^T at y[:, r].
    n_batch, m = x.shape[0], row_ptr.numel() - 1
    if n_batch == 0 or m == 0 or values.numel() == 0:
        y = torch.zeros((n_batch, m), dtype=x.dtype, device=x.device)
        return y if bias is None else y + bias
    y = torch.empty((n_batch, m), dtype=x.dtype, device=x.device)
    _csr_times_dense(values, row_ptr, col_idx, x.t(), y, (y.stride(1), y.stride(0)), bias)
    return y
