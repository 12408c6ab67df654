"""Triton bsr_linear / bsr_sddmm against sparsekern.reference (in float64). On a CPU the kernels run
under TRITON_INTERPRET=1 (with the first autotune config; the *_every_config tests run the others), so
shapes stay small."""
import math
import zlib

import pytest
import torch
from triton_testing import CONFIG_DTYPES, DEVICE, DTYPES, OutOfResources, assert_close, forced_config, needs_gpu

import sparsekern.triton_kernels.bsr as bsr  # defines the ops
from sparsekern import reference

ops = torch.ops.sparsekern_triton
BLOCKS = (16, 32, 64)
DENSITIES = (0.0, 0.5, 1.0)  # of blocks; 0 is nnzb = 0


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(*shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _bsr(mb, kb, b, density, dtype, g, index_dtype=torch.int32, empty_row=1, empty_col=None):
    """A random (mb*b, kb*b) BSR matrix; block row ``empty_row`` (and block column ``empty_col``) has no
    blocks. Returns (values, row_ptr, col_idx) and the transpose pattern (t_row_ptr, t_col_idx, t_perm)."""
    occ = torch.rand(mb, kb, generator=g) < density
    if empty_row is not None and empty_row < mb:
        occ[empty_row] = False
    if empty_col is not None:
        occ[:, empty_col] = False
    rows, cols = occ.nonzero(as_tuple=True)  # row-major: sorted within each block row
    zero = torch.zeros(1, dtype=torch.long)
    row_ptr = torch.cat([zero, occ.sum(1).cumsum(0)]).to(DEVICE, index_dtype)
    col_idx = cols.to(DEVICE, index_dtype)
    values = _randn(rows.numel(), b, b, dtype=dtype, g=g, scale=1 / math.sqrt(kb * b))
    perm = torch.argsort(cols * mb + rows)  # W^T's blocks: by block column, then block row
    t_row_ptr = torch.cat([zero, occ.sum(0).cumsum(0)]).to(DEVICE, index_dtype)
    return (values, row_ptr, col_idx), (t_row_ptr, rows[perm].to(DEVICE, index_dtype), perm.to(DEVICE))


def _dense(values, row_ptr, col_idx, k):
    return reference.bsr_to_dense(values.double(), row_ptr, col_idx, k)


# -- bsr_linear ---------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["int32+bias", "int64"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("b", BLOCKS)
def test_bsr_linear(b, density, dtype, variant):
    index_dtype = torch.int32 if variant.startswith("int32") else torch.int64
    N, mb, kb = 37, 3, 4  # N ragged against every token tile
    g = _gen("linear", b, density, dtype, variant)
    (values, row_ptr, col_idx), _ = _bsr(mb, kb, b, density, dtype, g, index_dtype)
    x = _randn(N, kb * b, dtype=dtype, g=g)
    bias = _randn(mb * b, dtype=dtype, g=g) if "bias" in variant else None
    y = ops.bsr_linear(x, values, row_ptr, col_idx, bias)
    assert y.dtype == dtype and y.shape == (N, mb * b)
    expected = reference.bsr_linear(x.double(), values.double(), row_ptr, col_idx,
                                    None if bias is None else bias.double())
    assert_close(y, expected, dtype)
    if bias is None:  # the empty block row
        assert torch.count_nonzero(y[:, b:2 * b]) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", BLOCKS)
def test_bsr_backward_calls(b, dtype):
    """The ops layer's backward: dx over W^T's blocks (a transposed view of values[t_perm]) and dW
    from transposed views of dy and x."""
    N, mb, kb = 21, 3, 2
    g = _gen("backward", b, dtype)
    (values, row_ptr, col_idx), (t_row_ptr, t_col_idx, t_perm) = _bsr(mb, kb, b, 0.6, dtype, g, empty_row=0)
    x = _randn(N, kb * b, dtype=dtype, g=g)
    dy = _randn(N, mb * b, dtype=dtype, g=g)
    dx = ops.bsr_linear(dy, values[t_perm].transpose(1, 2), t_row_ptr, t_col_idx)
    assert_close(dx, dy.double() @ _dense(values, row_ptr, col_idx, kb * b), dtype)
    dW = ops.bsr_sddmm(row_ptr, col_idx, dy.t(), x.t(), b)
    assert dW.shape == values.shape and dW.dtype == dtype
    assert_close(dW, reference.bsr_sddmm(row_ptr, col_idx, dy.t().double(), x.t().double(), b), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bsr_linear_strided(dtype):
    """x as a transposed view and as a column slice; values as a strided slice of a larger tensor."""
    N, mb, kb, b = 19, 2, 3, 16
    g = _gen("strided", dtype)
    (values, row_ptr, col_idx), _ = _bsr(mb, kb, b, 0.7, dtype, g, empty_row=None)
    values = torch.stack([values, values.neg()], dim=-1).flatten(-2)[:, :, ::2]  # stride 2 along j
    assert not values.is_contiguous()
    bias = _randn(mb * b, dtype=dtype, g=g)
    for x in (_randn(kb * b, N, dtype=dtype, g=g).t(), _randn(N, 2 * kb * b, dtype=dtype, g=g)[:, 1::2]):
        expected = reference.bsr_linear(x.double(), values.double(), row_ptr, col_idx, bias.double())
        assert_close(ops.bsr_linear(x, values, row_ptr, col_idx, bias), expected, dtype)


def test_bsr_linear_zero_size():
    g = _gen("zero")
    (values, row_ptr, col_idx), _ = _bsr(2, 3, 16, 1.0, torch.float32, g)
    bias = _randn(32, dtype=torch.float32, g=g)
    y = ops.bsr_linear(_randn(0, 48, dtype=torch.float32, g=g), values, row_ptr, col_idx, bias)
    assert y.shape == (0, 32)
    # m = 0: no block rows
    empty = (torch.zeros(0, 16, 16, device=DEVICE), torch.zeros(1, dtype=torch.int64, device=DEVICE),
             torch.zeros(0, dtype=torch.int64, device=DEVICE))
    assert ops.bsr_linear(_randn(5, 48, dtype=torch.float32, g=g), *empty).shape == (5, 0)
    # nnzb = 0: y is the bias
    (values, row_ptr, col_idx), _ = _bsr(2, 3, 16, 0.0, torch.float32, g)
    y = ops.bsr_linear(_randn(4, 48, dtype=torch.float32, g=g), values, row_ptr, col_idx, bias)
    assert torch.equal(y, bias.expand(4, 32))


def test_bsr_linear_reads_only_its_blocks():
    """x is NaN on a block column no block uses: the kernel never reads it (the dense reference,
    which multiplies it by zeros, would be NaN)."""
    N, mb, kb, b = 9, 2, 3, 16
    g = _gen("nan")
    (values, row_ptr, col_idx), _ = _bsr(mb, kb, b, 1.0, torch.float32, g, empty_row=None)
    keep = col_idx != 1  # drop block column 1 from every row
    counts = torch.stack([keep[row_ptr[i]:row_ptr[i + 1]].sum() for i in range(mb)])
    row_ptr = torch.cat([row_ptr[:1], counts.cumsum(0)]).to(row_ptr.dtype)
    values, col_idx = values[keep], col_idx[keep]
    x = _randn(N, kb * b, dtype=torch.float32, g=g)
    expected = reference.bsr_linear(x.double(), values.double(), row_ptr, col_idx)
    x[:, b:2 * b] = float("nan")
    y = ops.bsr_linear(x, values, row_ptr, col_idx)
    assert torch.isfinite(y).all()
    assert_close(y, expected, torch.float32)


# -- bsr_sddmm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", BLOCKS)
def test_bsr_sddmm(b, dtype, index_dtype):
    mb, kb, d = 3, 2, 37  # d ragged against the d chunk
    g = _gen("sddmm", b, dtype, index_dtype)
    (values, row_ptr, col_idx), _ = _bsr(mb, kb, b, 0.7, dtype, g, index_dtype)
    X, Y = _randn(mb * b, d, dtype=dtype, g=g), _randn(kb * b, d, dtype=dtype, g=g)
    out = ops.bsr_sddmm(row_ptr, col_idx, X, Y, b)
    assert out.shape == values.shape and out.dtype == dtype
    assert_close(out, reference.bsr_sddmm(row_ptr, col_idx, X.double(), Y.double(), b), dtype)


def test_bsr_sddmm_empty():
    g = _gen("sddmm-empty")
    (values, row_ptr, col_idx), _ = _bsr(2, 3, 32, 0.0, torch.float32, g)
    X, Y = _randn(64, 5, dtype=torch.float32, g=g), _randn(96, 5, dtype=torch.float32, g=g)
    assert ops.bsr_sddmm(row_ptr, col_idx, X, Y, 32).shape == (0, 32, 32)  # nnzb = 0
    (values, row_ptr, col_idx), _ = _bsr(2, 3, 32, 1.0, torch.float32, g)
    out = ops.bsr_sddmm(row_ptr, col_idx, X[:, :0], Y[:, :0], 32)  # d = 0
    assert out.shape == values.shape and torch.count_nonzero(out) == 0


# -- every autotune config ----------------------------------------------------------------------
# The autotuner only runs its winner afterwards, the interpreter only the first config: each config
# once, through the ops' own launchers (forced_config), for every block size. "small" (also the CPU's):
# N = D = 300 tokens, a tail after 1 to 9 token tiles / d chunks of 32 / 64 / 128 / 256; 4 x 5 blocks at
# density 0.5 (block rows of 1 to 4 blocks) with an empty block row and an empty block column (an empty
# block row of W^T, the dx call's).
EVERY_CONFIG_SHAPES = [
    pytest.param((300, 4, 5, 0.5), id="small"),
    pytest.param((1000, 16, 12, 0.3), id="realistic", marks=needs_gpu),
]


def _every_config_inputs(shape, b, dtype):
    """W's pattern and its transpose's, x (N, k), dy (N, m) and a bias (m,)."""
    N, mb, kb, density = shape
    g = _gen("every-config", b, dtype)
    (values, row_ptr, col_idx), t_pattern = _bsr(mb, kb, b, density, dtype, g, empty_row=1, empty_col=2)
    assert values.shape[0] > 0
    x, dy = _randn(N, kb * b, dtype=dtype, g=g), _randn(N, mb * b, dtype=dtype, g=g)
    return values, row_ptr, col_idx, t_pattern, x, dy, _randn(mb * b, dtype=dtype, g=g)


@pytest.mark.parametrize("shape", EVERY_CONFIG_SHAPES)
@pytest.mark.parametrize("config", bsr._LINEAR_CONFIGS, ids=str)
def test_bsr_linear_every_config(config, shape):
    """Forward (bias) and the backward's dx (W^T's blocks as a transposed view of values[t_perm])."""
    for dtype in CONFIG_DTYPES:
        for b in BLOCKS:
            values, row_ptr, col_idx, (t_row_ptr, t_col_idx, t_perm), x, dy, bias = \
                _every_config_inputs(shape, b, dtype)
            try:
                with forced_config(bsr, bsr._bsr_linear_kernel, config):
                    y = ops.bsr_linear(x, values, row_ptr, col_idx, bias)
                    dx = ops.bsr_linear(dy, values[t_perm].transpose(1, 2), t_row_ptr, t_col_idx)
            except OutOfResources:  # over the GPU's shared memory (b = 64 in fp32): the autotuner drops it
                continue
            expected = reference.bsr_linear(x.double(), values.double(), row_ptr, col_idx, bias.double())
            assert_close(y, expected, dtype)
            assert_close(dx, dy.double() @ _dense(values, row_ptr, col_idx, x.shape[1]), dtype)


@pytest.mark.parametrize("shape", EVERY_CONFIG_SHAPES)
@pytest.mark.parametrize("config", bsr._SDDMM_CONFIGS, ids=str)
def test_bsr_sddmm_every_config(config, shape):
    """The backward's dW = bsr_sddmm(dy^T, x^T): d is the token count."""
    for dtype in CONFIG_DTYPES:
        for b in BLOCKS:
            values, row_ptr, col_idx, _, x, dy, _ = _every_config_inputs(shape, b, dtype)
            try:
                with forced_config(bsr, bsr._bsr_sddmm_kernel, config):
                    dW = ops.bsr_sddmm(row_ptr, col_idx, dy.t(), x.t(), b)
            except OutOfResources:  # over the GPU's shared memory: the autotuner drops it
                continue
            assert_close(dW, reference.bsr_sddmm(row_ptr, col_idx, dy.t().double(), x.t().double(), b), dtype)


# -- realistic shapes (GPU only) ----------------------------------------------------------------

@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_bsr_realistic(b, dtype):
    N, m, k = 2048, 1024, 1024
    g = _gen("gpu", b, dtype)
    (values, row_ptr, col_idx), (t_row_ptr, t_col_idx, t_perm) = _bsr(m // b, k // b, b, 0.25, dtype, g)
    x = _randn(N, k, dtype=dtype, g=g)
    bias = _randn(m, dtype=dtype, g=g)
    y = ops.bsr_linear(x, values, row_ptr, col_idx, bias)
    assert_close(y, reference.bsr_linear(x.double(), values.double(), row_ptr, col_idx, bias.double()), dtype)
    dy = _randn(N, m, dtype=dtype, g=g)
    dx = ops.bsr_linear(dy, values[t_perm].transpose(1, 2), t_row_ptr, t_col_idx)
    assert_close(dx, dy.double() @ _dense(values, row_ptr, col_idx, k), dtype)
    dW = ops.bsr_sddmm(row_ptr, col_idx, dy.t(), x.t(), b)
    assert_close(dW, reference.bsr_sddmm(row_ptr, col_idx, dy.t().double(), x.t().double(), b), dtype)
