"""Triton spmm, sparse_linear and gather (triton_kernels/spmm.py, gather.py) against sparsekern.reference in float64.

On CPU the kernels run under TRITON_INTERPRET=1 with the first autotune config (BLOCK_N=32,
BLOCK_NZ=16, 2 rows per program): the shapes below are chosen to cross those tiles (n > 32, rows
longer than 16, an odd number of rows); test_every_config runs each of the other configs too.
"""
import pytest
import torch
from triton_testing import CONFIG_DTYPES, DEVICE, DTYPES, assert_close, needs_gpu

import sparsekern.triton_kernels.gather  # noqa: F401  (registers sparsekern_triton::gather)
import sparsekern.triton_kernels.spmm as spmm_mod
from sparsekern import reference
from sparsekern.sparse_matrix import csr_from_mask, transpose_pattern

ops = torch.ops.sparsekern_triton
# These kernels use no tl.dot, so bfloat16 runs under the interpreter too (DTYPES leaves it to GPUs).
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_csr(m, k, density, dtype, index_dtype=torch.int64, seed=0, long_row=None, empty_rows=()):
    """(values, row_ptr, col_idx) of a random (m, k) pattern; ``long_row`` gets every column, ``empty_rows`` none."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(m, k, generator=g) < density
    if long_row is not None:
        mask[long_row] = True
    for r in empty_rows:
        mask[r] = False
    row_ptr, col_idx = csr_from_mask(mask)
    values = torch.randn(col_idx.numel(), generator=g).to(dtype)
    return values.to(DEVICE), row_ptr.to(index_dtype).to(DEVICE), col_idx.to(DEVICE)


def randn(*shape, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def f64(*ts):
    return [None if t is None else t.double() for t in ts]


# (m, k, n, density, row_ptr dtype, long row, empty rows)
CASES = {
    "ragged-50%": (13, 21, 40, 0.5, torch.int64, None, (0, 7, 12)),
    "90%-int32": (20, 37, 7, 0.1, torch.int32, None, ()),
    "99%-mostly-empty": (9, 50, 33, 0.01, torch.int64, None, ()),
    "dense": (5, 19, 17, 1.0, torch.int32, None, ()),
    "empty": (10, 8, 12, 0.0, torch.int64, None, ()),
    "one-long-row": (15, 70, 20, 0.05, torch.int32, 6, ()),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_spmm(case, dtype):
    m, k, n, density, index_dtype, long_row, empty = case
    values, row_ptr, col_idx = make_csr(m, k, density, dtype, index_dtype, long_row=long_row, empty_rows=empty)
    B = randn(k, n, dtype=dtype)
    out = ops.spmm(values, row_ptr, col_idx, B)
    assert out.shape == (m, n) and out.dtype == dtype
    assert_close(out, reference.spmm(*f64(values), row_ptr, col_idx, *f64(B)), dtype)


@pytest.mark.parametrize("layout", ["transposed", "col-strided", "row-padded"])
def test_spmm_strided_B(layout):
    m, k, n = 11, 23, 37
    values, row_ptr, col_idx = make_csr(m, k, 0.3, torch.float32)
    base = randn(2 * k, 2 * n, dtype=torch.float32)
    B = {"transposed": base[:n, :k].t(), "col-strided": base[:k, ::2][:, :n], "row-padded": base[:k, :n]}[layout]
    assert_close(ops.spmm(values, row_ptr, col_idx, B), reference.spmm(*f64(values), row_ptr, col_idx, *f64(B)),
                 torch.float32)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_spmm_backward_calls(dtype):
    """The calls of spmm's and sddmm's backward: W^T's values through gather, grad (maybe transposed) as B."""
    m, k, n = 14, 19, 35
    values, row_ptr, col_idx = make_csr(m, k, 0.3, dtype, torch.int32)
    t_row_ptr, t_col_idx, t_perm = transpose_pattern(row_ptr, col_idx, k)
    grad = randn(n, m, dtype=dtype).t()  # (m, n), column-major
    t_values = ops.gather(values, t_perm)
    d_B = ops.spmm(t_values, t_row_ptr, t_col_idx, grad)
    expected = reference.csr_to_dense(*f64(values), row_ptr, col_idx, k).t() @ grad.double()
    assert_close(d_B, expected, dtype)


@pytest.mark.parametrize("m, k, n", [(0, 5, 4), (6, 5, 0), (6, 0, 4)])
def test_spmm_zero_size(m, k, n):
    values, row_ptr, col_idx = make_csr(m, k, 0.5, torch.float32)
    out = ops.spmm(values, row_ptr, col_idx, randn(k, n, dtype=torch.float32))
    assert out.shape == (m, n)
    assert not out.any()


# ---- sparse_linear ----

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("case", ["ragged-50%", "90%-int32", "one-long-row", "empty"])
def test_sparse_linear(case, bias, dtype):
    m, k, n_batch, density, index_dtype, long_row, empty = CASES[case]
    values, row_ptr, col_idx = make_csr(m, k, density, dtype, index_dtype, long_row=long_row, empty_rows=empty)
    x = randn(n_batch, k, dtype=dtype)
    b = randn(m, dtype=dtype, seed=2) if bias else None
    y = ops.sparse_linear(x, values, row_ptr, col_idx, b)
    assert y.shape == (n_batch, m) and y.dtype == dtype and y.is_contiguous()
    assert_close(y, reference.sparse_linear(*f64(x, values), row_ptr, col_idx, *f64(b)), dtype)


@pytest.mark.parametrize("layout", ["column-major", "col-strided", "single-row"])
def test_sparse_linear_strided_x(layout):
    m, k = 17, 26
    values, row_ptr, col_idx = make_csr(m, k, 0.3, torch.float32)
    base = randn(2 * k, 80, dtype=torch.float32)
    x = {"column-major": base[:k, :35].t(), "col-strided": base[:35, ::2][:, :k], "single-row": base[:1, :k]}[layout]
    b = randn(m, dtype=torch.float32, seed=2)
    assert_close(ops.sparse_linear(x, values, row_ptr, col_idx, b),
                 reference.sparse_linear(*f64(x, values), row_ptr, col_idx, *f64(b)), torch.float32)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_sparse_linear_backward_input_call(dtype):
    """d_x = sparse_linear(grad, gather(values, t_perm), t_row_ptr, t_col_idx): the transpose as W."""
    m, k, n_batch = 21, 13, 34
    values, row_ptr, col_idx = make_csr(m, k, 0.4, dtype)
    t_row_ptr, t_col_idx, t_perm = transpose_pattern(row_ptr, col_idx, k)
    grad = randn(n_batch, m, dtype=dtype)
    d_x = ops.sparse_linear(grad, ops.gather(values, t_perm), t_row_ptr, t_col_idx)
    expected = grad.double() @ reference.csr_to_dense(*f64(values), row_ptr, col_idx, k)
    assert d_x.shape == (n_batch, k)
    assert_close(d_x, expected, dtype)


@pytest.mark.parametrize("n_batch, m, k", [(0, 5, 4), (3, 0, 4), (3, 5, 0)])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_sparse_linear_zero_size(n_batch, m, k, bias):
    values, row_ptr, col_idx = make_csr(m, k, 0.5, torch.float32)
    x = randn(n_batch, k, dtype=torch.float32)
    b = randn(m, dtype=torch.float32, seed=2) if bias else None
    y = ops.sparse_linear(x, values, row_ptr, col_idx, b)
    assert y.shape == (n_batch, m)
    assert_close(y, reference.sparse_linear(*f64(x, values), row_ptr, col_idx, *f64(b)), torch.float32)


# ---- gather ----

@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_gather(dtype):
    src = randn(2 * 1500, dtype=dtype)[::2]  # strided source, more than one 1024-block
    index = torch.randint(0, src.numel(), (2100,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    assert torch.equal(ops.gather(src, index), src[index])
    assert ops.gather(src, index[:0]).shape == (0,)


# ---- realistic shapes (GPU only) ----

@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.1, 0.01])
def test_gpu_spmm_sparse_linear(dtype, density):
    m, k, n = 3072, 1024, 512
    values, row_ptr, col_idx = make_csr(m, k, density, dtype, long_row=100, empty_rows=(5, 6))
    B = randn(k, n, dtype=dtype)
    assert_close(ops.spmm(values, row_ptr, col_idx, B), reference.spmm(*f64(values), row_ptr, col_idx, *f64(B)), dtype)
    x, b = randn(n, k, dtype=dtype), randn(m, dtype=dtype, seed=2)
    assert_close(ops.sparse_linear(x, values, row_ptr, col_idx, b),
                 reference.sparse_linear(*f64(x, values), row_ptr, col_idx, *f64(b)), dtype)


# ---- every autotune config (the small shape everywhere, the realistic one on a GPU) ----

# (m, k, n, density, long row, empty rows) of test_every_config. "small" (also the CPU's, under the
# interpreter): m odd (no multiple of ROWS = 2 or 4), rows of ~25 nonzeros and a long row of k = 83
# (a tail after 1 to 5 chunks of every BLOCK_NZ), n = 70 (a tail after 1 to 4 tiles of BLOCK_N 16 / 32 /
# 64, one partial tile of 128 / 256), empty first and last rows.
EVERY_CONFIG_SHAPES = [
    pytest.param((19, 83, 70, 0.3, 3, (0, 18)), id="small"),
    pytest.param((301, 257, 130, 0.1, 3, (0, 300)), id="realistic", marks=needs_gpu),
]


@pytest.mark.parametrize("shape", EVERY_CONFIG_SHAPES)
@pytest.mark.parametrize("config", spmm_mod._CONFIGS, ids=str)
def test_every_config(config, shape):
    """The autotuner only runs the winner afterwards (and the interpreter only the first config): check
    each config's result once, as spmm (row-major out) and as sparse_linear (bias, out written transposed)."""
    m, k, n, density, long_row, empty_rows = shape
    for dtype in CONFIG_DTYPES:
        values, row_ptr, col_idx = make_csr(m, k, density, dtype, torch.int32, long_row=long_row,
                                            empty_rows=empty_rows)
        B = randn(k, n, dtype=dtype)
        out = torch.empty(m, n, dtype=dtype, device=DEVICE)
        order = torch.argsort(row_ptr[1:] - row_ptr[:-1], descending=True, stable=True)
        grid = (triton_cdiv(m, config.kwargs["ROWS"]), triton_cdiv(n, config.kwargs["BLOCK_N"]))
        spmm_mod._csr_rows_kernel.fn[grid](values, row_ptr, col_idx, order, B, values, out, m, n, B.stride(0),
                                           B.stride(1), out.stride(0), out.stride(1), 1, HAS_BIAS=False,
                                           num_warps=config.num_warps, num_stages=config.num_stages,
                                           **config.kwargs)
        assert_close(out, reference.spmm(*f64(values), row_ptr, col_idx, *f64(B)), dtype)
        # sparse_linear: y (n, m) = x @ W^T + bias with x = B^T, row r of W written at y[:, r].
        bias = randn(m, dtype=dtype, seed=2)
        y = torch.empty(n, m, dtype=dtype, device=DEVICE)
        spmm_mod._csr_rows_kernel.fn[grid](values, row_ptr, col_idx, order, B, bias, y, m, n, B.stride(0),
                                           B.stride(1), y.stride(1), y.stride(0), 1, HAS_BIAS=True,
                                           num_warps=config.num_warps, num_stages=config.num_stages,
                                           **config.kwargs)
        assert_close(y, reference.sparse_linear(*f64(B.t(), values), row_ptr, col_idx, *f64(bias)), dtype)


def triton_cdiv(a, b):
    return (a + b - 1) // b
