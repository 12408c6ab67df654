"""sparse_conv2d and its two backward ops: implicit-GEMM convolutions over a CSR weight.

Design (all three ops share it):

* The CSR weight (rows Cout, columns c = (ci*kh + r)*kw + s) is packed per *row group* of G rows
  (``_pack``, plain torch, no host sync): for each group the sorted union of the columns its rows
  use ("union columns", count ``cnt[g]``) and a dense (union, G) panel of the values there (zeros
  where a row of the group has no nonzero). An unstructured pattern then becomes, per group, a
  short dense GEMM over only the columns that matter, so the inner step is a tensor-core ``tl.dot``
  instead of one scalar FMA per nonzero. On a GPU the cost is dominated by gathering the input
  (index math + masked loads), which is shared by the G rows; ``_group_size`` trades that against
  the zeros the union adds (larger G = fewer gathers, more wasted MMA work at high sparsity).
* forward (``_conv_kernel``): tile = BLOCK_P output pixels (of N*Ho*Wo) x the G rows of a group;
  loop over the group's union columns in chunks of BLOCK_K, decode (ci, r, s), gather the input
  (padding / stride / dilation as load masks, any strides, so NCHW and channels_last alike),
  ``acc += X_tile @ W_panel`` in fp32, bias fused, cast on store.
* backward_input: the same kernel with ``TRANSPOSED``, a gather formulation (no atomics, so
  deterministic): rows are Cin, columns (co, r, s) of W^T, and input pixel (h, w) reads
  grad_out[(h + ph - r*dh) / sh, ...] where the division is exact. With stride > 1 only
  1 / (sh*sw) of the taps are valid for a given pixel; the others are masked loads (wasted MMA
  work), acceptable for the few strided layers of a network.
* backward_weight (``_wgrad_kernel``): per (group, chunk of BLOCK_K union columns) the dense tile
  dW = grad_out[G rows, M] @ X_cols[M, BLOCK_K] reduced over M = N*Ho*Wo (fp32), split over M
  into SPLIT slices for parallelism; each slice writes the nonzeros of its tile to its own row of
  a (SPLIT, nnz) fp32 buffer, summed by torch (deterministic, no atomics).
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from ._common import INTERPRET, LIB, autotune, launch, precision

# ---------------------------------------------------------------------------------------------
# Host-side packing
# ---------------------------------------------------------------------------------------------

_MAX_GROUP = 128  # rows per program at most (tests lower it to get several groups on tiny shapes)


def _hint(v) -> int:
    """A size's value for heuristics (group size, M split) without a guard on it: under torch.compile
    with dynamic shapes a symbolic nnz or batch then does not specialize (recompile) the graph."""
    if not isinstance(v, torch.SymInt):
        return int(v)
    from torch.fx.experimental import symbolic_shapes as sym
    fn = getattr(sym, "optimization_hint", None) or getattr(sym, "hint_int", None)  # name by torch version
    return int(fn(v, fallback=4096)) if fn is not None else int(v)


def _group_size(rows: int, n_cols: int, nnz: int, dtype: torch.dtype) -> int:
    """Rows per program G (a power of two >= 16, the smallest tl.dot width).

    Cost model per output pixel and group row: gathers ~ u(G) / G (one per union column, shared
    by the group), MMA ~ u(G) * c, with u(G) = 1 - (1 - density)^G the expected union fraction
    of a random pattern and c the cost of an MMA FMA relative to a gathered element (~1/64 on
    tensor cores; exact fp32 dots run as FMAs, ~1/8).
    """
    rows, n_cols, nnz = _hint(rows), _hint(n_cols), _hint(nnz)
    cap = max(16, min(_MAX_GROUP, triton.next_power_of_2(max(rows, 1))))
    density = min(1.0, nnz / max(1, rows * n_cols))
    c = 1 / 8 if precision(dtype) == "ieee" else 1 / 64
    cost = {g: (1 - (1 - density) ** g) * (1 / g + c) for g in (16, 32, 64, 128) if g <= cap}
    best = min(cost.values())
    # Near-ties (dense-ish patterns) go to the larger group: fewer gathers of the same input.
    return max(g for g, v in cost.items() if v <= 1.05 * best)


def _pack(row_ptr: Tensor, col_idx: Tensor, values: Optional[Tensor], n_rows: int, n_in: int, kh: int, kw: int,
          group: int, transpose: bool, channels_last: bool, with_index: bool = False):
    """Row-group packing of the CSR weight (see the module docstring), all in torch without host syncs.

    Rows are Cout (columns (ci, r, s)) or, with ``transpose``, Cin (columns (co, r, s)); ``n_in`` is
    the channel count of the columns. Returns ``cols`` (n_groups, KC) int32 (the union columns of
    group g first, ``cnt[g]`` of them), ``cnt`` (n_groups,) int32, the values panel (n_groups, KC, G)
    when ``values`` is given, and with ``with_index`` the nonzero index panel (n_groups, KC, G)
    int32, -1 where the pattern has no entry.
    """
    dev = col_idx.device
    nnz = col_idx.numel()
    khw = kh * kw
    rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, device=dev), (row_ptr[1:] - row_ptr[:-1]).long(),
                                   output_size=nnz)
    col = col_idx.long()
    if transpose:  # nonzero (co, (ci, r, s)) of W is nonzero (ci, (co, r, s)) of W^T
        rs = col % khw
        rows, col = col // khw, rows * khw + rs
    kc = n_in * khw
    # The order in which a group visits its union columns: channels-last sources are read
    # (r, s)-major so that consecutive columns are consecutive (contiguous) channels.
    rank = (col % khw) * n_in + col // khw if channels_last else col
    n_groups = triton.cdiv(n_rows, group)
    g = rows // group
    used = torch.zeros(n_groups, kc, dtype=torch.bool, device=dev)
    used[g, rank] = True
    csum = used.cumsum(1)
    cnt = csum[:, -1].to(torch.int32)
    pos = csum[g, rank] - 1  # slot of each nonzero's column in its group's union list
    cols = torch.zeros(n_groups, kc, dtype=torch.int32, device=dev)
    cols[g, pos] = col.to(torch.int32)  # nonzeros sharing a column write the same value
    i = rows % group
    panel = None
    if values is not None:
        panel = torch.zeros(n_groups, kc, group, dtype=values.dtype, device=dev)
        panel[g, pos, i] = values
    index = None
    if with_index:
        index = torch.full((n_groups, kc, group), -1, dtype=torch.int32, device=dev)
        index[g, pos, i] = torch.arange(nnz, dtype=torch.int32, device=dev)
    return cols, cnt, panel, index


def _is_channels_last(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _dot_f32(dtype: torch.dtype) -> bool:
    # The interpreter's numpy has no bfloat16 matmul: there bf16 tiles are upcast to fp32 (on a GPU
    # bf16 goes to the tensor cores).
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits, so that the split-M path is exercised by the CPU tests


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

def _conv_configs():
    # First config = the interpreter's (small tiles keep numpy fast). The rest are for a GPU:
    # BLOCK_P output pixels x G rows per program, BLOCK_K union columns per step.
    cfgs = [triton.Config({"BLOCK_P": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)]
    for bp, bk, w, s in [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                         (128, 64, 4, 2), (256, 32, 8, 3)]:
        cfgs.append(triton.Config({"BLOCK_P": bp, "BLOCK_K": bk}, num_warps=w, num_stages=s))
    return cfgs


@autotune(configs=_conv_configs(), key=["P", "KC", "ROWS", "BLOCK_CO", "TRANSPOSED", "KH", "KW"])
@triton.jit
def _conv_kernel(
    src_ptr, w_ptr, cols_ptr, cnt_ptr, bias_ptr, out_ptr,
    P, ROWS, KC,                      # output pixels (N*OH*OW), rows (output channels), packed columns
    SRC_H, SRC_W, OUT_H, OUT_W,
    s_n, s_c, s_h, s_w,               # source strides (x, or grad_out when TRANSPOSED)
    o_n, o_c, o_h, o_w,               # output strides
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
    PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BIG: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Programs of one pixel tile are adjacent (group fastest): they gather the same source pixels,
    # which then come from L2.
    n_groups = tl.cdiv(ROWS, BLOCK_CO)
    pid = tl.program_id(0)
    g = pid % n_groups
    pid_p = pid // n_groups

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    n = offs_p // (OUT_H * OUT_W)
    hw = offs_p % (OUT_H * OUT_W)
    oh = hw // OUT_W
    ow = hw % OUT_W
    if BIG:  # > 2^31 elements: 64-bit offsets
        n = n.to(tl.int64)
    if TRANSPOSED:
        base_h = oh + PH   # source row = (base_h - r*DH) / SH when exact
        base_w = ow + PW
        pix = n * s_n
    else:
        base_h = oh * SH - PH  # source row = base_h + r*DH
        base_w = ow * SW - PW
        pix = n * s_n + base_h * s_h + base_w * s_w

    offs_co = tl.arange(0, BLOCK_CO)
    acc = tl.zeros((BLOCK_P, BLOCK_CO), dtype=tl.float32)
    cnt = tl.load(cnt_ptr + g)
    cols_base = cols_ptr + g.to(tl.int64) * KC
    w_base = w_ptr + g.to(tl.int64) * KC * BLOCK_CO
    for k0 in range(0, cnt, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < cnt
        col = tl.load(cols_base + offs_k, mask=k_mask, other=0)
        c = col // (KH * KW)
        rs = col % (KH * KW)
        r = rs // KW
        s = rs % KW
        if BIG:
            c = c.to(tl.int64)
        valid = p_mask[:, None] & k_mask[None, :]
        if TRANSPOSED:
            th = base_h[:, None] - (r * DH)[None, :]
            tw = base_w[:, None] - (s * DW)[None, :]
            ih = th // SH
            iw = tw // SW
            valid &= (th >= 0) & (tw >= 0) & (ih < SRC_H) & (iw < SRC_W)
            if SH > 1:
                valid &= (th % SH) == 0
            if SW > 1:
                valid &= (tw % SW) == 0
            src_off = pix[:, None] + (c * s_c)[None, :] + ih * s_h + iw * s_w
        else:
            # Without padding every tap of a valid output pixel is inside the input.
            if PH > 0:
                ih = base_h[:, None] + (r * DH)[None, :]
                valid &= (ih >= 0) & (ih < SRC_H)
            if PW > 0:
                iw = base_w[:, None] + (s * DW)[None, :]
                valid &= (iw >= 0) & (iw < SRC_W)
            src_off = pix[:, None] + (c * s_c + (r * DH) * s_h + (s * DW) * s_w)[None, :]
        a = tl.load(src_ptr + src_off, mask=valid, other=0.0)
        w = tl.load(w_base + offs_k[:, None] * BLOCK_CO + offs_co[None, :], mask=k_mask[:, None], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=DOT_PREC)
        else:
            acc = tl.dot(a, w, acc)

    co = g * BLOCK_CO + offs_co
    co_mask = co < ROWS
    if HAS_BIAS:
        b = tl.load(bias_ptr + co, mask=co_mask, other=0.0)
        acc += b.to(tl.float32)[None, :]
    out_off = (n * o_n + oh * o_h + ow * o_w)[:, None] + (co * o_c)[None, :]
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=p_mask[:, None] & co_mask[None, :])


def _wgrad_configs():
    cfgs = [triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=2)]
    for bm, bk, w, s in [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 4), (256, 32, 8, 3)]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s))
    return cfgs


_M_QUANTUM = 256  # M_PER_SPLIT is a multiple of every BLOCK_M above


@autotune(configs=_wgrad_configs(), key=["M", "KC", "ROWS", "BLOCK_CO", "M_PER_SPLIT", "KH", "KW"])
@triton.jit
def _wgrad_kernel(
    go_ptr, x_ptr, cols_ptr, cnt_ptr, idx_ptr, part_ptr,
    M, ROWS, KC, NNZ, M_PER_SPLIT,
    H, W, OH, OW,
    g_n, g_c, g_h, g_w,               # grad_out strides
    x_n, x_c, x_h, x_w,               # x strides
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
    PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr, BIG: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    k_tiles = tl.cdiv(KC, BLOCK_K)
    pid = tl.program_id(0)
    g = pid // k_tiles
    k0 = (pid % k_tiles) * BLOCK_K
    split = tl.program_id(1)
    cnt = tl.load(cnt_ptr + g)

    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < cnt
    col = tl.load(cols_ptr + g.to(tl.int64) * KC + offs_k, mask=k_mask, other=0)
    c = col // (KH * KW)
    rs = col % (KH * KW)
    r = rs // KW
    s = rs % KW
    if BIG:
        c = c.to(tl.int64)
    col_off = c * x_c + (r * DH) * x_h + (s * DW) * x_w
    offs_co = tl.arange(0, BLOCK_CO)
    co = g * BLOCK_CO + offs_co
    co_mask = co < ROWS

    m_lo = split * M_PER_SPLIT
    m_hi = tl.minimum(m_lo + M_PER_SPLIT, M)
    m_hi = tl.where(k0 < cnt, m_hi, m_lo)  # tiles past the group's union columns do nothing
    acc = tl.zeros((BLOCK_CO, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_hi
        n = offs_m // (OH * OW)
        hw = offs_m % (OH * OW)
        oh = hw // OW
        ow = hw % OW
        if BIG:
            n = n.to(tl.int64)
        go = tl.load(go_ptr + (co * g_c)[:, None] + (n * g_n + oh * g_h + ow * g_w)[None, :],
                     mask=co_mask[:, None] & m_mask[None, :], other=0.0)
        base_h = oh * SH - PH
        base_w = ow * SW - PW
        valid = m_mask[:, None] & k_mask[None, :]
        if PH > 0:
            ih = base_h[:, None] + (r * DH)[None, :]
            valid &= (ih >= 0) & (ih < H)
        if PW > 0:
            iw = base_w[:, None] + (s * DW)[None, :]
            valid &= (iw >= 0) & (iw < W)
        xt = tl.load(x_ptr + (n * x_n + base_h * x_h + base_w * x_w)[:, None] + col_off[None, :], mask=valid, other=0.0)
        if DOT_F32:
            acc = tl.dot(go.to(tl.float32), xt.to(tl.float32), acc, input_precision=DOT_PREC)
        else:
            acc = tl.dot(go, xt, acc)

    # Scatter the tile's pattern entries to this split's row of the partial sums.
    idx = tl.load(idx_ptr + (g.to(tl.int64) * KC + offs_k)[None, :] * BLOCK_CO + offs_co[:, None],
                  mask=k_mask[None, :], other=-1)
    # Every split has rows (m_lo < M) and a tile past cnt has idx -1: each entry of part is written once.
    tl.store(part_ptr + split.to(tl.int64) * NNZ + idx, acc, mask=idx >= 0)


# ---------------------------------------------------------------------------------------------
# Ops
# ---------------------------------------------------------------------------------------------

def _launch_conv(src: Tensor, panel: Tensor, cols: Tensor, cnt: Tensor, bias: Optional[Tensor], out: Tensor,
                 rows: int, group: int, kernel_size, stride, padding, dilation, transposed: bool) -> None:
    n_out, _, oh, ow = out.shape
    p = n_out * oh * ow
    n_groups = triton.cdiv(rows, group)
    big = max(src.numel(), out.numel()) >= 2 ** 31
    launch(_conv_kernel)[lambda meta: (triton.cdiv(p, meta["BLOCK_P"]) * n_groups,)](
        src, panel, cols, cnt, bias if bias is not None else out, out,
        p, rows, cols.shape[1],
        src.shape[2], src.shape[3], oh, ow,
        *src.stride(), *out.stride(),
        KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
        DH=dilation[0], DW=dilation[1],
        TRANSPOSED=transposed, HAS_BIAS=bias is not None, DOT_F32=_dot_f32(src.dtype),
        DOT_PREC=precision(src.dtype), BIG=big, BLOCK_CO=group,
    )


def _out_hw(h: int, w: int, kernel_size, stride, padding, dilation):
    return ((h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1,
            (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1)


@triton_op(f"{LIB}::sparse_conv2d", mutates_args=())
def sparse_conv2d(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, kernel_size: List[int],
                  bias: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int]) -> Tensor:
    n, cin, h, w = x.shape
    cout = row_ptr.shape[0] - 1
    kh, kw = kernel_size
    oh, ow = _out_hw(h, w, kernel_size, stride, padding, dilation)
    channels_last = _is_channels_last(x)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    nnz = col_idx.shape[0]
    if n * cout * oh * ow == 0 or nnz == 0 or cin * kh * kw == 0:  # nothing to reduce: bias (or zeros) only
        out = torch.empty((n, cout, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt).zero_()
        if bias is not None and out.numel():
            out += bias.view(1, cout, 1, 1)
        return out
    out = torch.empty((n, cout, oh, ow), dtype=x.dtype, device=x.device, memory_format=fmt)
    group = _group_size(cout, cin * kh * kw, nnz, x.dtype)
    cols, cnt, panel, _ = _pack(row_ptr, col_idx, values.to(x.dtype), cout, cin, kh, kw, group, transpose=False,
                                channels_last=x.stride(1) == 1)
    _launch_conv(x, panel, cols, cnt, bias, out, cout, group, kernel_size, stride, padding, dilation, False)
    return out


@triton_op(f"{LIB}::sparse_conv2d_backward_input", mutates_args=())
def sparse_conv2d_backward_input(grad_out: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor,
                                 input_size: List[int], kernel_size: List[int], stride: List[int],
                                 padding: List[int], dilation: List[int]) -> Tensor:
    n, cin, h, w = input_size
    cout = row_ptr.shape[0] - 1
    kh, kw = kernel_size
    fmt = torch.channels_last if _is_channels_last(grad_out) else torch.contiguous_format
    nnz = col_idx.shape[0]
    if n * cin * h * w == 0 or nnz == 0 or grad_out.numel() == 0:
        return torch.empty((n, cin, h, w), dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt).zero_()
    dx = torch.empty((n, cin, h, w), dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt)
    group = _group_size(cin, cout * kh * kw, nnz, grad_out.dtype)
    cols, cnt, panel, _ = _pack(row_ptr, col_idx, values.to(grad_out.dtype), cin, cout, kh, kw, group, transpose=True,
                                channels_last=grad_out.stride(1) == 1)
    _launch_conv(grad_out, panel, cols, cnt, None, dx, cin, group, kernel_size, stride, padding, dilation, True)
    return dx


@triton_op(f"{LIB}::sparse_conv2d_backward_weight", mutates_args=())
def sparse_conv2d_backward_weight(grad_out: Tensor, x: Tensor, row_ptr: Tensor, col_idx: Tensor,
                                  kernel_size: List[int], stride: List[int], padding: List[int],
                                  dilation: List[int]) -> Tensor:
    n, cin, h, w = x.shape
    cout = row_ptr.shape[0] - 1
    kh, kw = kernel_size
    _, _, oh, ow = grad_out.shape
    nnz = col_idx.shape[0]
    m = n * oh * ow
    if nnz == 0 or m == 0:
        return torch.zeros((nnz,), dtype=x.dtype, device=x.device)
    kc = cin * kh * kw
    group = _group_size(cout, kc, nnz, x.dtype)
    cols, cnt, _, index = _pack(row_ptr, col_idx, None, cout, cin, kh, kw, group, transpose=False,
                                channels_last=x.stride(1) == 1, with_index=True)
    n_groups = triton.cdiv(cout, group)
    # Split M so that there are a few programs per SM even when the (group, column chunk) tiles are few.
    # The slice length comes from size hints (no guard); the slice count follows from it symbolically.
    m_hint = _hint(m)
    tiles = _hint(n_groups * triton.cdiv(kc, 64))
    splits = max(1, min(triton.cdiv(4 * _num_sms(x.device), tiles), triton.cdiv(m_hint, _M_QUANTUM)))
    m_per_split = triton.cdiv(triton.cdiv(m_hint, splits), _M_QUANTUM) * _M_QUANTUM
    splits = (m + m_per_split - 1) // m_per_split
    part = torch.empty((splits, nnz), dtype=torch.float32, device=x.device)
    big = max(x.numel(), grad_out.numel(), splits * nnz) >= 2 ** 31
    launch(_wgrad_kernel)[lambda meta: (n_groups * triton.cdiv(kc, meta["BLOCK_K"]), splits)](
        grad_out, x, cols, cnt, index, part,
        m, cout, kc, nnz, m_per_split,
        h, w, oh, ow,
        *grad_out.stride(), *x.stride(),
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1], DH=dilation[0], DW=dilation[1],
        DOT_F32=_dot_f32(x.dtype), DOT_PREC=precision(x.dtype), BIG=big, BLOCK_CO=group,
    )
    return part.sum(0).to(x.dtype)
