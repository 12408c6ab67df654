"""Triton sddmm (triton_kernels/sddmm.py) against sparsekern.reference in float64.

On CPU the kernel runs under TRITON_INTERPRET=1 with the first autotune config (BLOCK_P=32,
BLOCK_D=32): shapes cross both tiles (nnz and d not multiples of 32). test_every_config runs each of
the other configs too.
"""
import pytest
import torch
from triton_testing import CONFIG_DTYPES, DEVICE, DTYPES, assert_close, needs_gpu

import sparsekern.triton_kernels.sddmm as sddmm_mod
from sparsekern import reference
from sparsekern.sparse_matrix import csr_from_mask

ops = torch.ops.sparsekern_triton
# No tl.dot in this kernel, so bfloat16 runs under the interpreter too (DTYPES leaves it to GPUs).
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_pattern(m, k, density, index_dtype=torch.int64, seed=0, long_row=None, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(m, k, generator=g) < density
    if long_row is not None:
        mask[long_row] = True
    for r in empty_rows:
        mask[r] = False
    row_ptr, col_idx = csr_from_mask(mask)
    return row_ptr.to(index_dtype).to(DEVICE), col_idx.to(DEVICE)


def randn(*shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def check(row_ptr, col_idx, X, Y, dtype):
    out = ops.sddmm(row_ptr, col_idx, X, Y)
    assert out.shape == (col_idx.numel(),) and out.dtype == X.dtype
    assert_close(out, reference.sddmm(row_ptr, col_idx, X.double(), Y.double()), dtype)


# (m, k, d, density, row_ptr dtype, long row, empty rows)
CASES = {
    "ragged-50%": (13, 17, 45, 0.5, torch.int64, None, (0, 5, 12)),
    "90%-int32": (30, 40, 20, 0.1, torch.int32, None, ()),
    "99%-mostly-empty": (60, 50, 33, 0.01, torch.int64, None, (0, 59)),
    "dense-d1": (6, 11, 1, 1.0, torch.int32, None, ()),
    "one-long-row": (12, 70, 9, 0.03, torch.int64, 4, ()),
    "empty": (7, 9, 5, 0.0, torch.int32, None, ()),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_sddmm(case, dtype):
    m, k, d, density, index_dtype, long_row, empty = case
    row_ptr, col_idx = make_pattern(m, k, density, index_dtype, long_row=long_row, empty_rows=empty)
    check(row_ptr, col_idx, randn(m, d, dtype=dtype), randn(k, d, dtype=dtype, seed=2), dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sddmm_backward_calls(dtype):
    """sparse_linear's weight gradient: sddmm(row_ptr, col_idx, dy.t(), x.t()) with dy (N, m), x (N, k)."""
    m, k, n_batch = 15, 22, 37
    row_ptr, col_idx = make_pattern(m, k, 0.3, torch.int32)
    dy, x = randn(n_batch, m, dtype=dtype), randn(n_batch, k, dtype=dtype, seed=2)
    check(row_ptr, col_idx, dy.t(), x.t(), dtype)


@pytest.mark.parametrize("layout", ["row-padded", "col-strided", "mixed"])
def test_sddmm_strided(layout):
    m, k, d = 11, 14, 40
    row_ptr, col_idx = make_pattern(m, k, 0.4)
    base = randn(2 * m + 2 * k, 2 * d + 3, dtype=torch.float32)
    if layout == "row-padded":
        X, Y = base[:m, :d], base[m:m + k, 3:d + 3]
    elif layout == "col-strided":
        X, Y = base[:m, ::2][:, :d], base[m:m + k, 1::2][:, :d]
    else:
        X, Y = base[:d, :m].t(), base[m:m + k, :d]
    check(row_ptr, col_idx, X, Y, torch.float32)


def test_sddmm_many_empty_rows():
    """The row of each nonzero comes from a binary search of row_ptr: leading, trailing and runs of empty rows."""
    m, k, d = 300, 8, 3
    mask = torch.zeros(m, k, dtype=torch.bool)
    for r in (3, 4, 100, 101, 102, 250, 298):
        mask[r, torch.arange(r % 5, k, 2)] = True
    row_ptr, col_idx = csr_from_mask(mask)
    check(row_ptr.to(DEVICE), col_idx.to(DEVICE), randn(m, d, dtype=torch.float32),
          randn(k, d, dtype=torch.float32, seed=2), torch.float32)


@pytest.mark.parametrize("m, k, d", [(0, 4, 3), (5, 0, 3), (5, 4, 0)])
def test_sddmm_zero_size(m, k, d):
    row_ptr, col_idx = make_pattern(m, k, 0.5)
    out = ops.sddmm(row_ptr, col_idx, randn(m, d, dtype=torch.float32), randn(k, d, dtype=torch.float32))
    assert out.shape == (col_idx.numel(),)
    assert not out.any()


# ---- realistic shapes (GPU only) ----

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.1, 0.01])
def test_gpu_sddmm(dtype, density):
    m, k, n_batch = 3072, 1024, 512
    row_ptr, col_idx = make_pattern(m, k, density, long_row=7, empty_rows=(0, 1))
    dy, x = randn(n_batch, m, dtype=dtype), randn(n_batch, k, dtype=dtype, seed=2)
    check(row_ptr, col_idx, dy.t(), x.t(), dtype)
    check(row_ptr, col_idx, dy.t().contiguous(), x.t().contiguous(), dtype)


# ---- every autotune config (the small shape everywhere, the realistic one on a GPU) ----

# (m, k, d, density, long row, empty rows) of test_every_config. "small" (also the CPU's, under the
# interpreter): nnz = 208 (a tail after 1 to 6 tiles of BLOCK_P 32 / 64 / 128), d = 70 (a tail after 1 to
# 4 chunks of BLOCK_D 16 / 32 / 64, one partial chunk of 128), empty first and last rows.
EVERY_CONFIG_SHAPES = [
    pytest.param((23, 29, 70, 0.3, 3, (0, 22)), id="small"),
    pytest.param((301, 257, 130, 0.1, 3, (0, 300)), id="realistic", marks=needs_gpu),
]


@pytest.mark.parametrize("shape", EVERY_CONFIG_SHAPES)
@pytest.mark.parametrize("config", sddmm_mod._CONFIGS, ids=str)
def test_every_config(config, shape):
    """The autotuner only runs the winner afterwards (and the interpreter only the first config): check
    each config's result once."""
    m, k, d, density, long_row, empty_rows = shape
    for dtype in CONFIG_DTYPES:
        row_ptr, col_idx = make_pattern(m, k, density, torch.int32, long_row=long_row, empty_rows=empty_rows)
        X, Y = randn(m, d, dtype=dtype), randn(k, d, dtype=dtype, seed=2)
        nnz = col_idx.numel()
        out = torch.empty(nnz, dtype=dtype, device=DEVICE)
        grid = ((nnz + config.kwargs["BLOCK_P"] - 1) // config.kwargs["BLOCK_P"],)
        sddmm_mod._sddmm_kernel.fn[grid](row_ptr, col_idx, X, Y, out, m, nnz, d, m.bit_length(), X.stride(0),
                                         X.stride(1), Y.stride(0), Y.stride(1), num_warps=config.num_warps,
                                         num_stages=config.num_stages, **config.kwargs)
        assert_close(out, reference.sddmm(row_ptr, col_idx, X.double(), Y.double()), dtype)
