"""topk_select: indices (int64, ascending) of the k largest (smallest) scores among candidates; exact,
ties to the lower index, +0.0 == -0.0, NaN among the candidates raises. O(n) radix select, no sort.

  1. Keys: each float maps to an unsigned key of its width (uint16 bits held in uint32 for 16-bit
     floats, uint32, uint64) whose unsigned order is "better first" for both largest=True and False:
     key = 2^(w-1) + |x|bits for x >= 0 (and -0.0), 2^(w-1) - |x|bits for x < 0, complemented for
     smallest. No valid float maps to key 0.
  2. One histogram pass per 8-bit digit, most significant first (2 for 16-bit floats, 4 for fp32,
     8 for fp64). The scores are split into G contiguous spans, one per program (a few per SM on a
     GPU); each program builds tl.histogram of the digit of its candidates whose key matches the
     prefix known so far, stores it (per program, for the final bookkeeping) and adds it atomically
     into the level's 256-bin total. The level-0 pass also counts NaN candidates.
  3. After each pass a one-program kernel walks the 256 totals from the top to the bucket where the
     cumulative count reaches the rank still sought: that digit is appended to the prefix, the rank
     reduced by the keys above it. Everything stays on the device: no host sync between levels.
     The next pass folds the previous level's "better than the bucket" counts into each program's
     count of keys > threshold. After the last digit the prefix is the threshold key T, the key of
     the k-th best score.
  4. The last select kernel also scans the G programs: g_j = #keys > T, e_j = #keys == T in span j;
     span j takes min(e_j, what is left of the k - sum(g) ties) ties, and writes at the prefix-sum
     offset of its counts. The write pass re-reads the scores and stores, in index order, each
     selected index at offset + running cumsum: the output comes out sorted, no final sort needed.
The only host sync is the final read of the NaN count (to raise) and of the number written.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import INTERPRET, LIB, launch

# No autotuning: the host sizes the per-program buffers from BLOCK and the number of programs.
# 4096 scores per tile and 8 warps: 16 per thread, enough loads in flight for a bandwidth-bound pass.
_BLOCK = 1024 if INTERPRET else 4096
_WARPS = 8
_BLOCK_G = 64  # programs per step of the final scan
_BINS = 256
_RADIX = 8
# Slots of the int64 `state` vector the kernels pass along: the key prefix (the threshold T at the
# end), the rank still sought, #NaN candidates, #candidates, the last bucket chosen, #indices written.
_PREFIX, _KK, _NAN, _NCAND, _BSEL, _COUNT = (tl.constexpr(i) for i in range(6))

_NBITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}


@triton.jit
def _keys(x, NBITS: tl.constexpr, LARGEST: tl.constexpr):
    """Order-preserving unsigned keys (see the module docstring), in uint32 (or uint64 for fp64)."""
    if NBITS == 64:
        u = x.to(tl.uint64, bitcast=True)
    elif NBITS == 32:
        u = x.to(tl.uint32, bitcast=True)
    else:
        u = x.to(tl.uint16, bitcast=True).to(tl.uint32)
    half = (u * 0 + 1) << (NBITS - 1)  # 2^(w-1) in the key type (no out-of-range literal for w = 64)
    mag = u & (half - 1)
    key = tl.where((u >> (NBITS - 1)) != 0, half - mag, half + mag)  # -0.0 -> half, like +0.0
    if not LARGEST:
        key = (half - 1) + half - key  # complement in w bits: larger key = smaller score
    return key


@triton.jit
def _span(pid, n, span):
    start = pid.to(tl.int64) * span
    end = tl.minimum(start + span, n)
    return start, end


@triton.jit
def _hist_kernel(scores_ptr, cand_ptr, state_ptr, hist_ptr, totals_ptr, gt_ptr, n, span, G, stride_s, stride_c,
                 LEVEL: tl.constexpr, NBITS: tl.constexpr, LARGEST: tl.constexpr, HAS_CAND: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    bins = tl.arange(0, 256)
    shift: tl.constexpr = NBITS - 8 * (LEVEL + 1)
    if LEVEL > 0:
        # Fold the previous level into this span's count of keys better than the threshold: those in
        # buckets above the one selected (buckets below are out for good; the selected one goes on).
        bsel = tl.load(state_ptr + _BSEL)
        h_prev = tl.load(hist_ptr + ((LEVEL - 1) * G + pid) * 256 + bins)
        tl.store(gt_ptr + pid, tl.load(gt_ptr + pid) + tl.sum(tl.where(bins > bsel, h_prev, 0).to(tl.int64), 0))
        if NBITS == 64:
            prefix = tl.load(state_ptr + _PREFIX).to(tl.uint64, bitcast=True)
        else:
            prefix = tl.load(state_ptr + _PREFIX).to(tl.uint32)
    start, end = _span(pid, n, span)
    hist = tl.zeros((256,), dtype=tl.int32)
    nan = tl.zeros((BLOCK,), dtype=tl.int32)
    for t in range(start, end, BLOCK):
        offs = t + tl.arange(0, BLOCK)
        valid = offs < end
        x = tl.load(scores_ptr + offs * stride_s, mask=valid, other=0.0)
        if HAS_CAND:
            valid &= tl.load(cand_ptr + offs * stride_c, mask=valid, other=0) != 0
        key = _keys(x, NBITS, LARGEST)
        if LEVEL == 0:
            nan += (valid & (x != x)).to(tl.int32)
        else:
            valid &= (key >> (shift + 8)) == (prefix >> (shift + 8))
        hist += tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=valid)
    tl.store(hist_ptr + (LEVEL * G + pid) * 256 + bins, hist)
    tl.atomic_add(totals_ptr + LEVEL * 256 + bins, hist)
    if LEVEL == 0:
        tl.atomic_add(state_ptr + _NAN, tl.sum(nan, 0).to(tl.int64))


@triton.jit
def _select_kernel(state_ptr, hist_ptr, totals_ptr, gt_ptr, off_ptr, take_ptr, cnt_ptr, G,
                   LEVEL: tl.constexpr, NBITS: tl.constexpr, LAST: tl.constexpr, BLOCK_G: tl.constexpr):
    bins = tl.arange(0, 256)
    shift: tl.constexpr = NBITS - 8 * (LEVEL + 1)
    tot = tl.load(totals_ptr + LEVEL * 256 + bins).to(tl.int64)
    kk = tl.load(state_ptr + _KK)
    total = tl.sum(tot, 0)
    if LEVEL == 0:
        tl.store(state_ptr + _NCAND, total)
        kk = tl.minimum(kk, total)  # k > #candidates: all of them (the host trims the output)
    at_or_above = total - tl.cumsum(tot, 0) + tot  # keys in buckets >= b
    bsel = tl.sum((at_or_above >= kk).to(tl.int64), 0) - 1  # the highest bucket reaching rank kk
    bsel = tl.maximum(bsel, 0)
    kk -= tl.sum(tl.where(bins > bsel, tot, 0), 0)
    tl.store(state_ptr + _PREFIX, tl.load(state_ptr + _PREFIX) | (bsel << shift))
    tl.store(state_ptr + _KK, kk)
    tl.store(state_ptr + _BSEL, bsel)
    if LAST:
        # Per span: g = #keys > T (earlier levels already folded into gt), e = #keys == T; the first
        # kk ties in index order are taken: span j takes clamp(kk - ties before it, 0, e_j).
        eq_before = tl.zeros((), dtype=tl.int64)
        written = tl.zeros((), dtype=tl.int64)
        for g0 in range(0, G, BLOCK_G):
            progs = g0 + tl.arange(0, BLOCK_G)
            pmask = progs < G
            h = tl.load(hist_ptr + (LEVEL * G + progs[:, None]) * 256 + bins[None, :],
                        mask=pmask[:, None] & (bins >= bsel)[None, :], other=0).to(tl.int64)
            gt = tl.load(gt_ptr + progs, mask=pmask, other=0) + tl.sum(tl.where(bins > bsel, h, 0), 1)
            eq = tl.sum(tl.where(bins == bsel, h, 0), 1)
            take = tl.minimum(tl.maximum(kk - (eq_before + tl.cumsum(eq, 0) - eq), 0), eq)
            cnt = gt + take
            tl.store(off_ptr + progs, written + tl.cumsum(cnt, 0) - cnt, mask=pmask)
            tl.store(take_ptr + progs, take, mask=pmask)
            tl.store(cnt_ptr + progs, cnt, mask=pmask)
            eq_before += tl.sum(eq, 0)
            written += tl.sum(cnt, 0)
        tl.store(state_ptr + _COUNT, written)


@triton.jit
def _write_kernel(scores_ptr, cand_ptr, state_ptr, off_ptr, take_ptr, cnt_ptr, out_ptr, n, span, stride_s, stride_c,
                  NBITS: tl.constexpr, LARGEST: tl.constexpr, HAS_CAND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    if NBITS == 64:
        thr = tl.load(state_ptr + _PREFIX).to(tl.uint64, bitcast=True)
    else:
        thr = tl.load(state_ptr + _PREFIX).to(tl.uint32)
    base = tl.load(off_ptr + pid)
    eq_take = tl.load(take_ptr + pid)
    nout = tl.load(cnt_ptr + pid)
    start, end = _span(pid, n, span)
    written = tl.zeros((), dtype=tl.int64)
    eq_seen = tl.zeros((), dtype=tl.int64)
    for t in range(start, end, BLOCK):
        if written < nout:  # the rest of the span holds nothing selected
            offs = t + tl.arange(0, BLOCK)
            valid = offs < end
            x = tl.load(scores_ptr + offs * stride_s, mask=valid, other=0.0)
            if HAS_CAND:
                valid &= tl.load(cand_ptr + offs * stride_c, mask=valid, other=0) != 0
            key = _keys(x, NBITS, LARGEST)
            eq = (valid & (key == thr)).to(tl.int64)
            take = (valid & (key > thr)) | ((eq != 0) & (eq_seen + tl.cumsum(eq, 0) - eq < eq_take))
            ti = take.to(tl.int64)
            tl.store(out_ptr + base + written + tl.cumsum(ti, 0) - ti, offs, mask=take)
            written += tl.sum(ti, 0)
            eq_seen += tl.sum(eq, 0)


def _may_sync(t: Tensor) -> bool:
    """False while torch.compile traces the op (fake tensors): no data-dependent checks then."""
    return not torch.compiler.is_compiling() and torch._guards.detect_fake_mode((t,)) is None


def _raise_on_nan(scores: Tensor, candidates: Optional[Tensor]) -> None:
    if _may_sync(scores):
        nan = torch.isnan(scores)
        if bool((nan if candidates is None else nan & candidates).any()):
            raise ValueError("topk_select: scores contains NaN")


_MAX_PROGRAMS_CPU = 64  # interpreter (tests lower it to get spans of several tiles on small inputs)


def _num_programs(n: int, device: torch.device) -> int:
    # A few spans per SM: enough loads in flight, and few per-span histograms for the final scan.
    max_programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
        else _MAX_PROGRAMS_CPU
    return max(1, min(triton.cdiv(n, _BLOCK), max_programs))


@torch.library.triton_op(f"{LIB}::topk_select", mutates_args=())
def topk_select(scores: Tensor, k: int, largest: bool = True, candidates: Optional[Tensor] = None) -> Tensor:
    n, dev = scores.numel(), scores.device
    if k <= 0 or n == 0 or (candidates is None and k >= n):
        _raise_on_nan(scores, candidates)
        return torch.arange(n if k > 0 else 0, dtype=torch.int64, device=dev)
    nbits = _NBITS[scores.dtype]
    levels = nbits // _RADIX
    G = _num_programs(n, dev)
    span = triton.cdiv(triton.cdiv(n, G), _BLOCK) * _BLOCK  # whole tiles per span
    G = triton.cdiv(n, span)
    cand = candidates.view(torch.uint8) if candidates is not None else scores  # bool -> bytes for Triton
    stride_c = candidates.stride(0) if candidates is not None else 0

    state = torch.zeros(8, dtype=torch.int64, device=dev)
    state[_KK.value] = k
    hist = torch.empty((levels, G, _BINS), dtype=torch.int32, device=dev)
    totals = torch.zeros((levels, _BINS), dtype=torch.int32, device=dev)
    gt = torch.zeros(G, dtype=torch.int64, device=dev)
    off, take, cnt = torch.empty((3, G), dtype=torch.int64, device=dev).unbind(0)
    common = dict(NBITS=nbits, LARGEST=largest)
    for level in range(levels):
        launch(_hist_kernel)[(G,)](scores, cand, state, hist, totals, gt, n, span, G, scores.stride(0), stride_c,
                                   LEVEL=level, HAS_CAND=candidates is not None, BLOCK=_BLOCK, num_warps=_WARPS,
                                   **common)
        launch(_select_kernel)[(1,)](state, hist, totals, gt, off, take, cnt, G, LEVEL=level, NBITS=nbits,
                                     LAST=level == levels - 1, BLOCK_G=_BLOCK_G, num_warps=8)
    out = torch.empty(k, dtype=torch.int64, device=dev)
    launch(_write_kernel)[(G,)](scores, cand, state, off, take, cnt, out, n, span, scores.stride(0), stride_c,
                                HAS_CAND=candidates is not None, BLOCK=_BLOCK, num_warps=_WARPS, **common)
    if _may_sync(state):
        nan, written = state[[_NAN.value, _COUNT.value]].tolist()
        if nan:
            raise ValueError("topk_select: scores contains NaN")
        if written < k:  # k > #candidates (the ops layer rejects it): all candidates
            out = out[:written]
    return out
