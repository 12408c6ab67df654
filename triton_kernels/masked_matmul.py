"""masked_matmul (y = x @ (weight * mask)^T) and masked_sddmm (out = (X @ Y^T) * mask) in Triton.

Design. The mask is cut into fixed occupancy blocks of OCC_BLOCK = (BM, BK) elements (64 x 64 on a
GPU, 32 x 32 under the interpreter). These are also the kernels' weight/output tile sizes, decided
outside autotune: the occupancy map must match the tiles the kernels walk, and autotune's configs only
vary what does not change that (the token tile of masked_matmul, the reduction chunk of masked_sddmm,
num_warps, num_stages). One block size for both ops means the forward's mask and the backward's dW
(masked_sddmm on the same mask) share one cached map; dx uses mask.t(), whose map is the cached one
transposed (OCC_BLOCK is square).

- masked_matmul: one program per (token tile, weight row block). It walks only the nonempty k-blocks
  of its row block, from a compacted list (row-major (Mb, Kb) int32 whose row i lists row block i's
  nonempty k-blocks first, plus a per-row count), and fuses the mask into the weight tile load with
  tl.where, so masked-out weights (even NaN/inf) contribute exactly 0.
- masked_sddmm: one program per output tile; an empty mask block gets a zero trip count over d and
  stores zeros, a nonempty one accumulates X_tile @ Y_tile^T over d and zeroes outside the mask.

The occupancy map and compacted list are computed with torch ops (no host sync: sort, not nonzero)
and cached per mask pattern, keyed on (device, data_ptr, _version, shape, strides, block): in-place
edits of the mask (or of any view or detach() of it) bump _version and miss the cache; an edit
through ``mask.data`` does not (its own version counter) and needs clear_cache(). A weak reference to the mask's
base tensor keeps a freed mask's reused address from hitting a stale entry.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, LIB, autotune, grouped_tile, launch, precision

# Weight rows x k (masked_matmul) = output rows x cols (masked_sddmm) per tile and occupancy block.
OCC_BLOCK: Tuple[int, int] = (32, 32) if INTERPRET else (64, 64)
_CACHE_SIZE = 8  # a model's few masks (and their transposes) between pattern updates
_cache: OrderedDict[tuple, dict] = OrderedDict()
cache_stats = {"hits": 0, "misses": 0}


def block_occupancy(mask: torch.Tensor, BN: int, BK: int) -> torch.Tensor:
    """int8 (ceil(m/BN), ceil(k/BK)): 1 where the (BN, BK) block of the (m, k) bool mask has a True."""
    m, k = mask.shape
    mb, kb = triton.cdiv(m, BN), triton.cdiv(k, BK)
    if m == 0 or k == 0:
        return torch.zeros((mb, kb), dtype=torch.int8, device=mask.device)
    if m % BN or k % BK:  # pad with False to whole blocks
        padded = mask.new_zeros((mb * BN, kb * BK))
        padded[:m, :k] = mask
        mask = padded
    blocks = mask.reshape(mb, BN, kb, BK).view(torch.uint8)
    return blocks.amax(dim=(1, 3)).to(torch.int8)


def _compact(occ: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per row block: its nonempty k-blocks first, in order (stable sort), and how many there are."""
    order = torch.sort(occ, dim=1, descending=True, stable=True).indices.to(torch.int32).contiguous()
    return order, occ.sum(dim=1, dtype=torch.int32)


def _cacheable(t: torch.Tensor) -> bool:
    """Real eager tensors only: under tracing (torch.compile, fake or functional tensors, dispatch
    modes) or CUDA graph capture the map must be part of the recorded computation, not a constant
    from a Python dict that may be evicted."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or torch._is_functional_tensor(t):
        return False
    if t.is_inference():  # no version counter: in-place edits would go unnoticed
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():  # the graph must own the map it reads
        return False
    return t.device.type != "meta"


def _key(mask: torch.Tensor, BN: int, BK: int) -> tuple:
    return (mask.device, mask.data_ptr(), mask._version, tuple(mask.shape), mask.stride(), BN, BK)


def _lookup(key: tuple) -> Optional[dict]:
    entry = _cache.get(key)
    if entry is None:
        return None
    if entry["base"]() is None:  # that mask is gone: its address may now belong to another tensor
        del _cache[key]
        return None
    _cache.move_to_end(key)
    return entry


def _entry(mask: torch.Tensor, BN: int, BK: int) -> dict:
    """The cache entry {"occ", "list", "base"} of mask's pattern; computed on a miss."""
    if not _cacheable(mask):
        return {"occ": block_occupancy(mask, BN, BK), "list": None}
    key = _key(mask, BN, BK)
    entry = _lookup(key)
    if entry is not None:
        cache_stats["hits"] += 1
        return entry
    cache_stats["misses"] += 1
    # A transposed view (the backward's mask.t()) reuses the map of the mask it views.
    t_entry = _lookup((mask.device, mask.data_ptr(), mask._version, tuple(mask.shape)[::-1], mask.stride()[::-1],
                       BK, BN))
    occ = t_entry["occ"].t().contiguous() if t_entry is not None else block_occupancy(mask, BN, BK)
    base = mask._base if mask._base is not None else mask
    entry = {"occ": occ, "list": None, "base": weakref.ref(base)}
    _cache[key] = entry
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return entry


def cached_block_occupancy(mask: torch.Tensor, BN: int = OCC_BLOCK[0], BK: int = OCC_BLOCK[1]) -> torch.Tensor:
    """block_occupancy, computed once per mask pattern (see the module docstring)."""
    return _entry(mask, BN, BK)["occ"]


def cached_block_list(mask: torch.Tensor, BN: int = OCC_BLOCK[0], BK: int = OCC_BLOCK[1]):
    """(k-block list (Mb, Kb) int32, count (Mb,) int32) of mask's nonempty blocks, cached like the map."""
    entry = _entry(mask, BN, BK)
    if entry["list"] is None:
        entry["list"] = _compact(entry["occ"])
    return entry["list"]


def clear_cache() -> None:
    _cache.clear()


# -- masked_matmul ----------------------------------------------------------------------------

# The first config is the interpreter's (small and fast on CPU); BLOCK_N is the token tile.
_MM_CONFIGS = [
    triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 256}, num_warps=8, num_stages=3),
]


@autotune(configs=_MM_CONFIGS, key=["N", "M", "K"])
@triton.jit
def _masked_matmul_kernel(x_ptr, w_ptr, mask_ptr, kidx_ptr, kcnt_ptr, y_ptr, N, M, K, KB,
                          stride_xn, stride_xk, stride_wm, stride_wk, stride_mm, stride_mk, stride_yn, stride_ym,
                          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP: tl.constexpr, PRECISION: tl.constexpr):
    # Grouped order: GROUP token tiles sweep the weight row blocks together, sharing x rows in L2.
    pid_n, pid_m = grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(M, BLOCK_M), GROUP)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_kk = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    m_ok = offs_m < M
    # 64-bit row offsets: N * stride can pass 2^31 for large token counts.
    x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn
    w_cols = w_ptr + offs_m.to(tl.int64)[None, :] * stride_wm
    mask_cols = mask_ptr + offs_m.to(tl.int64)[None, :] * stride_mm

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    count = tl.load(kcnt_ptr + pid_m)
    for i in range(count):  # only this row block's nonempty k-blocks
        kb = tl.load(kidx_ptr + pid_m * KB + i)
        offs_k = kb * BLOCK_K + offs_kk
        k_ok = offs_k < K
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        # (weight * mask)^T tile, (BLOCK_K, BLOCK_M); where, not multiply: a masked NaN must give 0.
        wk_ok = k_ok[:, None] & m_ok[None, :]
        w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=wk_ok, other=0.0)
        keep = tl.load(mask_cols + offs_k[:, None] * stride_mk, mask=wk_ok, other=0)
        w = tl.where(keep != 0, w, tl.zeros_like(w))
        acc = tl.dot(x, w, acc, input_precision=PRECISION)

    y_ptrs = y_ptr + offs_n.to(tl.int64)[:, None] * stride_yn + offs_m[None, :] * stride_ym
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@torch.library.triton_op(f"{LIB}::masked_matmul", mutates_args=())
def masked_matmul(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    N, K = x.shape
    M = weight.shape[0]
    if N == 0 or M == 0 or K == 0:
        return x.new_zeros((N, M))
    BM, BK = OCC_BLOCK
    kidx, kcnt = cached_block_list(mask, BM, BK)
    y = x.new_empty((N, M))
    mask_u8 = mask.view(torch.uint8)  # same strides; triton's bool pointers are i1

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(M, BM),)

    launch(_masked_matmul_kernel)[grid](
        x, weight, mask_u8, kidx, kcnt, y, N, M, K, kidx.shape[1],
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), mask_u8.stride(0), mask_u8.stride(1),
        y.stride(0), y.stride(1),
        BLOCK_M=BM, BLOCK_K=BK, GROUP=8, PRECISION=precision(x.dtype))
    return y


# -- masked_sddmm -----------------------------------------------------------------------------

# BLOCK_D: the chunk of the reduction dim d per step (d is the token count for dW).
_SDDMM_CONFIGS = [
    triton.Config({"BLOCK_D": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_D": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_D": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_D": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_D": 128}, num_warps=8, num_stages=3),
]


@autotune(configs=_SDDMM_CONFIGS, key=["M", "K", "D"])
@triton.jit
def _masked_sddmm_kernel(x_ptr, y_ptr, mask_ptr, occ_ptr, out_ptr, M, K, D, KB,
                         stride_xm, stride_xd, stride_yk, stride_yd, stride_mm, stride_mk, stride_om, stride_ok,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                         GROUP: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    k_ok = offs_k < K
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    y_cols = y_ptr + offs_k.to(tl.int64)[None, :] * stride_yk

    # An empty mask block gets no d steps (a zero trip count rather than a branch keeps the loop
    # pipelinable) and stores zeros.
    occupied = tl.load(occ_ptr + pid_m * KB + pid_k)
    d_end = tl.where(occupied != 0, D, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, d_end, BLOCK_D):
        d = d0 + offs_d
        d_ok = d < D
        x = tl.load(x_rows + d[None, :] * stride_xd, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        yt = tl.load(y_cols + d[:, None] * stride_yd, mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, yt, acc, input_precision=PRECISION)

    out_ok = m_ok[:, None] & k_ok[None, :]
    # An empty block reads no mask: a row bound of 0, not `out_ok & (occupied != 0)` (see _common).
    read_ok = (offs_m < tl.where(occupied != 0, M, 0))[:, None] & k_ok[None, :]
    keep = tl.load(mask_ptr + offs_m.to(tl.int64)[:, None] * stride_mm + offs_k[None, :] * stride_mk,
                   mask=read_ok, other=0)
    acc = tl.where(keep != 0, acc, tl.zeros_like(acc))  # exactly 0 off the mask, even where acc is NaN
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_k[None, :] * stride_ok
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@torch.library.triton_op(f"{LIB}::masked_sddmm", mutates_args=())
def masked_sddmm(X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    M, D = X.shape
    K = Y.shape[0]
    if M == 0 or K == 0 or D == 0:
        return X.new_zeros((M, K))
    BM, BK = OCC_BLOCK
    occ = cached_block_occupancy(mask, BM, BK)
    out = X.new_empty((M, K))
    mask_u8 = mask.view(torch.uint8)
    grid = (triton.cdiv(M, BM) * triton.cdiv(K, BK),)
    launch(_masked_sddmm_kernel)[grid](
        X, Y, mask_u8, occ, out, M, K, D, occ.shape[1],
        X.stride(0), X.stride(1), Y.stride(0), Y.stride(1), mask_u8.stride(0), mask_u8.stride(1),
        out.stride(0), out.stride(1),
        BLOCK_M=BM, BLOCK_K=BK, GROUP=8, PRECISION=precision(X.dtype))
    return out
