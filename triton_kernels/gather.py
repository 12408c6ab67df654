"""gather: out[i] = src[index[i]] (1-D); backward passes read W^T's values through the transpose permutation."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import LIB, launch

# Memory-bound and trivial: one fixed config (autotuning keyed on n would re-benchmark for every nnz).
_BLOCK = 1024


@triton.jit
def _gather_kernel(src_ptr, index_ptr, out_ptr, n, stride_src, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    idx = tl.load(index_ptr + offs, mask=mask, other=0).to(tl.int64)
    tl.store(out_ptr + offs, tl.load(src_ptr + idx * stride_src, mask=mask), mask=mask)


@torch.library.triton_op(f"{LIB}::gather", mutates_args=())
def gather(src: Tensor, index: Tensor) -> Tensor:
    n = index.numel()
    out = torch.empty((n,), dtype=src.dtype, device=src.device)
    if n == 0:
        return out
    launch(_gather_kernel)[(triton.cdiv(n, _BLOCK),)](src, index, out, n, src.stride(0), BLOCK=_BLOCK, num_warps=4)
    return out
