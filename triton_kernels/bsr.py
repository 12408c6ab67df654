"""Block-sparse (BSR) ops in Triton: bsr_linear (y = x @ W^T + bias) and bsr_sddmm (W's gradient blocks).

W (m, k) has square b x b blocks, b in {16, 32, 64}: values (nnzb, b, b) (any strides), row_ptr
(m/b + 1) and col_idx (nnzb, block columns, sorted within a block row), int32 or int64.

- bsr_linear: one program per (block row, token tile). It walks the block row's nonzero blocks and
  accumulates tl.dot(x[:, cols of the block] (BLOCK_N x b), block^T (b x b)) in fp32, then adds the
  bias and stores one (BLOCK_N x b) output tile. An empty block row stores the bias (or zeros).
  The block's transpose is a strided load (no copy), so the backward's values[t_perm].transpose(1, 2)
  costs nothing extra. Only the token tile is autotuned: the block is the other two tile dims.
- bsr_sddmm: one program per nonzero block p: values[p] = X[rows of p] @ Y[cols of p]^T, looping
  over d in BLOCK_D chunks; the block row of p comes from a per-block row index built with
  repeat_interleave (output_size given: no host sync).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import LIB, autotune, launch, precision

# BLOCK_N: the token tile. The first config is the interpreter's. Configs that overflow shared memory
# for large b and fp32 are dropped by the autotuner (OutOfResources).
_LINEAR_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=3),
]


@autotune(configs=_LINEAR_CONFIGS, key=["N", "M", "K", "B"])
@triton.jit
def _bsr_linear_kernel(x_ptr, v_ptr, row_ptr, col_ptr, bias_ptr, y_ptr, N, M, K, MB,
                       stride_xn, stride_xk, stride_vp, stride_vi, stride_vj, stride_yn, stride_ym,
                       B: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr):
    # Block rows vary fastest: consecutive programs read the same x rows (L2 reuse of the dense operand).
    pid = tl.program_id(0)
    rb = pid % MB
    pid_n = pid // MB

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, B)
    n_ok = offs_n < N
    x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn
    # block^T (b x b): element (j, i) is values[p, i, j].
    v_tile = offs_b[:, None] * stride_vj + offs_b[None, :] * stride_vi

    start = tl.load(row_ptr + rb).to(tl.int64)  # 64-bit p: p * stride_vp can pass 2^31
    end = tl.load(row_ptr + rb + 1).to(tl.int64)
    acc = tl.zeros((BLOCK_N, B), dtype=tl.float32)
    for p in range(start, end):
        c = tl.load(col_ptr + p).to(tl.int64)
        xt = tl.load(x_rows + (c * B + offs_b)[None, :] * stride_xk, mask=n_ok[:, None], other=0.0)
        wt = tl.load(v_ptr + p * stride_vp + v_tile)
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)

    offs_m = rb * B + offs_b
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_m).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_n.to(tl.int64)[:, None] * stride_yn + offs_m[None, :] * stride_ym
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None])


@torch.library.triton_op(f"{LIB}::bsr_linear", mutates_args=())
def bsr_linear(x: torch.Tensor, values: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
               bias: Optional[torch.Tensor] = None, t_row_ptr: Optional[torch.Tensor] = None,
               t_col_idx: Optional[torch.Tensor] = None, t_perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    # t_* serve the backward (sparsekern.ops.bsr), not this product.
    N, K = x.shape
    B = values.shape[-1]
    MB = row_ptr.shape[0] - 1
    M = MB * B
    if N == 0 or M == 0 or values.shape[0] == 0:  # nothing to multiply: y = bias (or zeros)
        y = x.new_zeros((N, M))
        return y if bias is None else y + bias.to(y.dtype)
    y = x.new_empty((N, M))

    def grid(meta):
        return (MB * triton.cdiv(N, meta["BLOCK_N"]),)

    launch(_bsr_linear_kernel)[grid](
        x, values, row_ptr, col_idx, bias if bias is not None else x, y, N, M, K, MB,  # x: unused stand-in
        x.stride(0), x.stride(1), values.stride(0), values.stride(1), values.stride(2), y.stride(0), y.stride(1),
        B=B, HAS_BIAS=bias is not None, PRECISION=precision(x.dtype))
    return y


# BLOCK_D: the chunk of the reduction dim d (the token count for dW) per step.
_SDDMM_CONFIGS = [
    triton.Config({"BLOCK_D": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_D": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_D": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_D": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_D": 256}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_D": 256}, num_warps=8, num_stages=3),
]


@autotune(configs=_SDDMM_CONFIGS, key=["D", "B"])
@triton.jit
def _bsr_sddmm_kernel(x_ptr, y_ptr, rows_ptr, col_ptr, out_ptr, D,
                      stride_xm, stride_xd, stride_yk, stride_yd,
                      B: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    p = tl.program_id(0)
    r = tl.load(rows_ptr + p).to(tl.int64)
    c = tl.load(col_ptr + p).to(tl.int64)
    offs_b = tl.arange(0, B)
    offs_d = tl.arange(0, BLOCK_D)
    x_rows = x_ptr + (r * B + offs_b)[:, None] * stride_xm
    y_cols = y_ptr + (c * B + offs_b)[None, :] * stride_yk

    acc = tl.zeros((B, B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        xt = tl.load(x_rows + d[None, :] * stride_xd, mask=d_ok[None, :], other=0.0)
        yt = tl.load(y_cols + d[:, None] * stride_yd, mask=d_ok[:, None], other=0.0)
        acc = tl.dot(xt, yt, acc, input_precision=PRECISION)

    out_ptrs = out_ptr + p.to(tl.int64) * (B * B) + offs_b[:, None] * B + offs_b[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))


@torch.library.triton_op(f"{LIB}::bsr_sddmm", mutates_args=())
def bsr_sddmm(row_ptr: torch.Tensor, col_idx: torch.Tensor, X: torch.Tensor, Y: torch.Tensor,
              block: int) -> torch.Tensor:
    nnzb = col_idx.shape[0]
    D = X.shape[1]
    out = X.new_empty((nnzb, block, block))
    if nnzb == 0:
        return out
    if D == 0:
        return out.zero_()
    MB = row_ptr.shape[0] - 1
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(MB, device=row_ptr.device, dtype=torch.int32), counts,
                                   output_size=nnzb)
    launch(_bsr_sddmm_kernel)[(nnzb,)](
        X, Y, rows, col_idx, out, D, X.stride(0), X.stride(1), Y.stride(0), Y.stride(1),
        B=block, PRECISION=precision(X.dtype))
    return out
