"""bsr_linear, bsr_sddmm and bsr_conv2d on the CPU backends against dense masked math (outputs and gradients).

On the CPU the ``cpp`` backend runs a BlockSparseMatrix through the CSR kernels (``W.to_csr()``), the
``reference`` backend through sparsekern.reference; both are checked against plain dense PyTorch on the
expanded weight, built here independently of the library.
"""

import pytest
import torch
import torch.nn.functional as F

import sparsekern
from sparsekern import BlockSparseMatrix, SparseMatrix
from sparsekern.ops import bsr_conv2d, bsr_linear, bsr_sddmm

from sk_testing import assert_close, gen, grads, make_input, random_mask, seed_of

LINEAR_KERNELS = ("sparse_linear", "sddmm", "gather")
CONV_KERNELS = ("sparse_conv2d", "sparse_conv2d_backward_input", "sparse_conv2d_backward_weight")

# (block rows, block cols, b, n): ragged n, n = 0, n = 1, a single block, b = 1.
LINEAR_CASES = ((3, 5, 2, 7), (2, 3, 4, 0), (4, 2, 4, 1), (1, 1, 8, 3), (5, 4, 1, 6))
# (density over blocks, empty block rows, a kept block of zeros)
PATTERNS = ((0.0, False, False), (0.5, True, True), (1.0, False, True), (0.6, False, False))


def _pattern_id(p):
    d, empty, zero = p
    return f"d{d:g}" + ("-emptyrows" if empty else "") + ("-zeroblock" if zero else "")


def make_bsr(mb, kb, b, pattern, dtype, g, shape=None):
    """A BlockSparseMatrix over an (mb*b, kb*b) matrix (viewed as ``shape``) whose values are a leaf that
    requires grad; returns (W, block mask)."""
    density, empty_rows, zero_block = pattern
    bmask = random_mask((mb, kb), density, g, empty_rows)
    dense = torch.randn(mb * b, kb * b, generator=g, dtype=torch.float64).to(dtype)
    emask = bmask.repeat_interleave(b, 0).repeat_interleave(b, 1)
    if zero_block and bool(bmask.any()):
        i, j = bmask.nonzero()[0].tolist()
        dense[i * b:(i + 1) * b, j * b:(j + 1) * b] = 0  # kept (in the mask) but all zero
    shape = (mb * b, kb * b) if shape is None else shape
    W = BlockSparseMatrix.from_dense(dense.reshape(shape), b, emask.reshape(shape))
    assert W.nnzb == int(bmask.sum())
    W.values.requires_grad_(True)
    return W, bmask


def dense_of(W: BlockSparseMatrix) -> torch.Tensor:
    """The (m, k) dense weight of W from its row_ptr/col_idx/values, by Python loops."""
    b = W.block
    out = torch.zeros(W.m, W.k, dtype=W.dtype)
    rp, ci = W.row_ptr.tolist(), W.col_idx.tolist()
    for i in range(len(rp) - 1):
        for p in range(rp[i], rp[i + 1]):
            j = ci[p]
            out[i * b:(i + 1) * b, j * b:(j + 1) * b] = W.values[p].detach()
    return out


def blocks_at(G: torch.Tensor, bmask: torch.Tensor, b: int) -> torch.Tensor:
    """The (nnzb, b, b) blocks of a dense (m, k) G at bmask, row-major block order."""
    mb, kb = bmask.shape
    return G.reshape(mb, b, kb, b).permute(0, 2, 1, 3)[bmask]


# -- bsr_linear ---------------------------------------------------------------------------

@pytest.mark.kernels(*LINEAR_KERNELS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: "mb{}kb{}b{}n{}".format(*c))
@pytest.mark.parametrize("pattern", PATTERNS, ids=_pattern_id)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_linear_matches_dense_masked_math(backend, case, pattern, with_bias, dtype):
    mb, kb, b, n = case
    m, k = mb * b, kb * b
    g = gen(seed_of("bsr_linear", case, pattern, with_bias, dtype))
    W, bmask = make_bsr(mb, kb, b, pattern, dtype, g)
    x = make_input((n, k), dtype, g, requires_grad=True)
    bias = make_input((m,), dtype, g, requires_grad=True) if with_bias else None
    assert sparsekern.ops.get_backend("bsr_linear", x.device) == backend
    y = bsr_linear(x, W, bias)
    # Dense masked math on the expanded weight.
    Wd = dense_of(W).requires_grad_(True)
    bd = bias.detach().clone().requires_grad_(True) if with_bias else None
    xd = x.detach().clone().requires_grad_(True)
    y_ref = F.linear(xd, Wd, bd)
    assert_close(y, y_ref, scale=k)
    grad_out = make_input(y.shape, dtype, g)
    got = grads(y, [x, W.values] + ([bias] if with_bias else []), grad_out)
    exp = grads(y_ref, [xd, Wd] + ([bd] if with_bias else []), grad_out)
    assert_close(got[0], exp[0], scale=m)
    assert_close(got[1], blocks_at(exp[1], bmask, b), scale=max(n, 1))  # every entry of every kept block
    if with_bias:
        assert_close(got[2], exp[2], scale=max(n, 1))


@pytest.mark.kernels(*LINEAR_KERNELS)
@pytest.mark.parametrize("x_shape", [(2, 3, 12), (12,), (2, 0, 12), (1, 1, 1, 12)], ids=str)
def test_linear_leading_batch_dims(backend, x_shape, dtype):
    g = gen(seed_of("bsr_lead", x_shape, dtype))
    W, bmask = make_bsr(2, 3, 4, (0.5, False, False), dtype, g)
    x = make_input(x_shape, dtype, g, "transposed" if len(x_shape) > 1 else "strided", requires_grad=True)
    bias = make_input((8,), dtype, g, requires_grad=True)
    y = bsr_linear(x, W, bias)
    assert y.shape == x_shape[:-1] + (8,)
    Wd = dense_of(W).requires_grad_(True)
    xd = x.detach().clone().requires_grad_(True)
    bd = bias.detach().clone().requires_grad_(True)
    y_ref = xd @ Wd.t() + bd
    assert_close(y, y_ref, scale=12)
    grad_out = make_input(y.shape, dtype, g)
    got = grads(y, [x, W.values, bias], grad_out)
    exp = grads(y_ref, [xd, Wd, bd], grad_out)
    assert_close(got[0], exp[0], scale=8)
    assert_close(got[1], blocks_at(exp[1], bmask, 4), scale=6)
    assert_close(got[2], exp[2], scale=6)


@pytest.mark.kernels(*LINEAR_KERNELS)
def test_linear_backends_agree(dtype):
    """cpp (CSR engine) and reference (block oracle) give the same outputs and gradients."""
    if not sparsekern.ops.HAS_EXTENSION:
        pytest.skip("cpp backend unavailable: sparsekern._C is not built")
    g = gen(seed_of("agree", dtype))
    W, _ = make_bsr(4, 3, 4, (0.5, True, True), dtype, g)
    x = make_input((5, 12), dtype, g, requires_grad=True)
    bias = make_input((16,), dtype, g, requires_grad=True)
    grad_out = make_input((5, 16), dtype, g)
    out = {}
    for name in ("cpp", "reference"):
        with sparsekern.backend(name):
            y = bsr_linear(x, W, bias)
            out[name] = (y,) + tuple(grads(y, [x, W.values, bias], grad_out))
    for a, c in zip(out["cpp"], out["reference"]):
        assert_close(a, c, scale=16)


def test_linear_gradcheck_cpp():
    if not sparsekern.ops.HAS_EXTENSION:
        pytest.skip("cpp backend unavailable: sparsekern._C is not built")
    g = gen(11)
    W, _ = make_bsr(2, 3, 2, (0.5, False, False), torch.float64, g)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    values = W.values.detach().clone().requires_grad_(True)

    def f(x, values, bias):
        return bsr_linear(x, BlockSparseMatrix(W.row_ptr, W.col_idx, values, W.shape), bias)

    with sparsekern.backend("cpp"):
        assert torch.autograd.gradcheck(f, (x, values, bias))


# -- bsr_sddmm -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", [(3, 5, 2, 7), (2, 2, 4, 1), (4, 3, 1, 5), (2, 3, 4, 0)],
                         ids=lambda c: "mb{}kb{}b{}d{}".format(*c))
@pytest.mark.parametrize("pattern", PATTERNS[:3], ids=_pattern_id)
def test_sddmm_matches_dense(backend, case, pattern, dtype):
    mb, kb, b, d = case
    g = gen(seed_of("bsr_sddmm", case, pattern, dtype))
    W, bmask = make_bsr(mb, kb, b, pattern, dtype, g)
    X = make_input((mb * b, d), dtype, g, "transposed")
    Y = make_input((kb * b, d), dtype, g)
    out = bsr_sddmm(W.row_ptr, W.col_idx, X, Y, b)
    assert out.shape == (W.nnzb, b, b)
    expected = blocks_at(X.double() @ Y.double().t(), bmask, b).to(dtype)
    assert_close(out, expected, scale=max(d, 1))


@pytest.mark.kernels(*LINEAR_KERNELS)
def test_sddmm_is_the_weight_gradient_of_linear(backend, dtype):
    g = gen(seed_of("sddmm_grad", dtype))
    W, _ = make_bsr(3, 2, 4, (0.5, True, False), dtype, g)
    x = make_input((7, 8), dtype, g)
    y = bsr_linear(x, W)
    grad_out = make_input(y.shape, dtype, g)
    (d_values,) = grads(y, [W.values], grad_out)
    assert_close(bsr_sddmm(W.row_ptr, W.col_idx, grad_out.t(), x.t(), 4), d_values, scale=7)


# -- bsr_conv2d ----------------------------------------------------------------------------

# (N, Cin, Cout, H, W, kernel, stride, padding, dilation, block, bias); Cout and Cin*kh*kw multiples of block.
CONV_CASES = (
    (2, 2, 4, 5, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, True),
    (1, 4, 8, 6, 6, (1, 1), (2, 2), (0, 0), (1, 1), 4, False),
    (0, 2, 4, 5, 5, (2, 2), (1, 1), (0, 0), (1, 1), 4, True),     # batch 0
    (2, 3, 6, 7, 5, (3, 1), (1, 2), (2, 0), (2, 1), 3, True),     # rectangular, dilation
    (3, 2, 2, 4, 4, (2, 2), (1, 1), (1, 1), (1, 1), 1, False),    # block 1
    (2, 2, 0, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), 2, True),     # Cout = 0
)


def _conv_id(c):
    n, cin, cout, h, w, ks, s, p, d, b, bias = c
    return f"N{n}-{cin}to{cout}-{h}x{w}-k{ks[0]}{ks[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}-b{b}" + \
        ("-bias" if bias else "")


@pytest.mark.kernels(*CONV_KERNELS)
@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_id)
@pytest.mark.parametrize("pattern", PATTERNS[1:3], ids=_pattern_id)
def test_conv2d_matches_dense_masked_conv(backend, case, pattern, dtype):
    n, cin, cout, h, w, ks, stride, padding, dilation, b, with_bias = case
    kcols = cin * ks[0] * ks[1]
    g = gen(seed_of("bsr_conv", case, pattern, dtype))
    W, bmask = make_bsr(cout // b, kcols // b, b, pattern, dtype, g, shape=(cout, cin) + ks)
    assert W.shape == (cout, cin) + ks
    x = make_input((n, cin, h, w), dtype, g, requires_grad=True)
    bias = make_input((cout,), dtype, g, requires_grad=True) if with_bias else None
    y = bsr_conv2d(x, W, bias, stride, padding, dilation)
    xd = x.detach().clone().requires_grad_(True)
    Wd = dense_of(W).reshape(cout, cin, *ks).requires_grad_(True)
    bd = bias.detach().clone().requires_grad_(True) if with_bias else None
    if cout == 0:  # F.conv2d rejects an empty weight
        y_ref = F.conv2d(xd, torch.zeros((1, cin) + ks, dtype=dtype), None, stride, padding, dilation)[:, :0]
        assert y.shape == y_ref.shape and y.dtype == dtype
        (d_x,) = grads(y, [x], torch.zeros_like(y))
        assert d_x.shape == x.shape and bool((d_x == 0).all())
        return
    y_ref = F.conv2d(xd, Wd, bd, stride, padding, dilation)
    assert_close(y, y_ref, scale=kcols)
    grad_out = make_input(y.shape, dtype, g)
    got = grads(y, [x, W.values] + ([bias] if with_bias else []), grad_out)
    exp = grads(y_ref, [xd, Wd] + ([bd] if with_bias else []), grad_out)
    spatial = max(1, n * y.shape[2] * y.shape[3])
    assert_close(got[0], exp[0], scale=cout * ks[0] * ks[1])
    assert_close(got[1], blocks_at(exp[1].reshape(cout, kcols), bmask, b), scale=spatial)
    if with_bias:
        assert_close(got[2], exp[2], scale=spatial)


def test_conv2d_gradcheck_cpp():
    if not sparsekern.ops.HAS_EXTENSION:
        pytest.skip("cpp backend unavailable: sparsekern._C is not built")
    g = gen(12)
    W, _ = make_bsr(2, 9, 2, (0.5, False, False), torch.float64, g, shape=(4, 2, 3, 3))
    x = torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    values = W.values.detach().clone().requires_grad_(True)

    def f(x, values, bias):
        return bsr_conv2d(x, BlockSparseMatrix(W.row_ptr, W.col_idx, values, W.shape), bias, 1, 1)

    with sparsekern.backend("cpp"):
        assert torch.autograd.gradcheck(f, (x, values, bias))


# -- bad inputs ----------------------------------------------------------------------------

@pytest.mark.kernels(*LINEAR_KERNELS)
def test_linear_bad_inputs_raise(backend):
    g = gen(13)
    W, _ = make_bsr(2, 3, 2, (0.5, False, False), torch.float32, g)  # (4, 6)
    x = torch.randn(3, 6)
    with pytest.raises(TypeError, match="bsr_linear: W must be a sparsekern.BlockSparseMatrix, got SparseMatrix"):
        bsr_linear(x, SparseMatrix.from_dense(torch.randn(4, 6)))
    with pytest.raises(TypeError, match="W must be a sparsekern.BlockSparseMatrix, got Tensor"):
        bsr_linear(x, torch.randn(4, 6))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        bsr_linear(x.tolist(), W)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        bsr_linear(torch.ones(3, 6, dtype=torch.int64), W)
    with pytest.raises(ValueError, match=r"x must have last dim 6.*\(3, 5\)"):
        bsr_linear(torch.randn(3, 5), W)
    with pytest.raises(ValueError, match="bias must have 4 entries"):
        bsr_linear(x, W, torch.randn(5))
    with pytest.raises(ValueError, match="bias must be 1-D"):
        bsr_linear(x, W, torch.randn(1, 4))
    with pytest.raises(TypeError, match="W.values has dtype torch.float32 but x has torch.float64"):
        bsr_linear(x.double(), W)
    with pytest.raises(TypeError, match="bias has dtype torch.float64"):
        bsr_linear(x, W, torch.randn(4, dtype=torch.float64))


@pytest.mark.kernels(*CONV_KERNELS)
def test_conv2d_bad_inputs_raise(backend):
    g = gen(14)
    W, _ = make_bsr(2, 9, 2, (0.5, False, False), torch.float32, g, shape=(4, 2, 3, 3))
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(TypeError, match="bsr_conv2d: W must be a sparsekern.BlockSparseMatrix"):
        bsr_conv2d(x, SparseMatrix.from_dense(torch.randn(4, 2, 3, 3)))
    W2, _ = make_bsr(2, 9, 2, (0.5, False, False), torch.float32, g)  # 2-D (4, 18)
    with pytest.raises(ValueError, match=r"bsr_conv2d: W must have a 4-D"):
        bsr_conv2d(x, W2)
    with pytest.raises(ValueError, match="x must be 4-D"):
        bsr_conv2d(torch.randn(2, 5, 5), W)
    with pytest.raises(ValueError, match="x must have 2 channels"):
        bsr_conv2d(torch.randn(1, 3, 5, 5), W)
    with pytest.raises(ValueError, match="bias must have 4 entries"):
        bsr_conv2d(x, W, torch.randn(3))
    with pytest.raises(TypeError, match="dtype"):
        bsr_conv2d(x.double(), W)


def test_sddmm_bad_inputs_raise():
    W, _ = make_bsr(2, 3, 2, (0.5, False, False), torch.float32, gen(15))
    X, Y = torch.randn(4, 5), torch.randn(6, 5)
    with pytest.raises(ValueError, match="X and Y must share their second dim"):
        bsr_sddmm(W.row_ptr, W.col_idx, X, torch.randn(6, 4), 2)
    with pytest.raises(ValueError, match="multiples of block=2"):
        bsr_sddmm(W.row_ptr, W.col_idx, torch.randn(5, 5), Y, 2)
    with pytest.raises(ValueError, match=r"row_ptr must have m\+1 = 5 entries \(X.shape\[0\]/block \+ 1 .*\), got 3"):
        bsr_sddmm(W.row_ptr, W.col_idx, torch.randn(8, 5), torch.randn(6, 5), 2)
    with pytest.raises(TypeError, match="Y has dtype torch.float64"):
        bsr_sddmm(W.row_ptr, W.col_idx, X, Y.double(), 2)
    with pytest.raises(ValueError, match="X must be 2-D"):
        bsr_sddmm(W.row_ptr, W.col_idx, X[None], Y, 2)


def _i64(v):
    return torch.tensor(v, dtype=torch.int64)


def _i32(v):
    return torch.tensor(v, dtype=torch.int32)


@pytest.mark.parametrize("row_ptr, col_idx, block, match", [
    (_i64([0, 2, 3]), _i32([0]), 2, r"row_ptr\[-1\] = 3 must equal nnz = 1"),  # claims 3 blocks, holds 1
    (_i64([0, 2, 1]), _i32([0]), 2, r"row_ptr must be non-decreasing, but row_ptr\[2\] < row_ptr\[1\]"),
    (_i64([1, 1, 1]), _i32([0]), 2, r"row_ptr\[0\] must be 0, got 1"),
    (_i64([0, 1, 2]), _i32([0, 3]), 2, r"col_idx must lie in \[0, 3\), got values in \[0, 3\]"),
    (_i64([0, 1, 2]), _i32([-1, 0]), 2, r"col_idx must lie in \[0, 3\), got values in \[-1, 0\]"),
    (_i64([0, 2, 2]), _i32([1, 1]), 2, r"col_idx must be strictly increasing within each row"),
    (_i64([0, 1, 2]), _i64([0, 1]), 2, r"col_idx must be int32, got torch.int64"),
    (_i64([0, 1, 2]), _i32([0, 1]), 0, r"block must be an int >= 1, got 0"),
    (_i64([0, 1, 2]), _i32([0, 1]), -1, r"block must be an int >= 1, got -1"),
    (_i64([0, 1, 2]), _i32([0, 1]), 2.0, r"block must be an int >= 1, got 2.0"),
])
def test_sddmm_bad_block_pattern_raises_naming_the_argument(row_ptr, col_idx, block, match):
    X, Y = torch.randn(4, 5), torch.randn(6, 5)  # a 2 x 3 grid of 2x2 blocks
    with pytest.raises(ValueError, match="bsr_sddmm: " + match):
        bsr_sddmm(row_ptr, col_idx, X, Y, block)


def test_sddmm_checked_pattern_still_runs():
    X, Y = torch.randn(4, 5), torch.randn(6, 5)
    out = bsr_sddmm(_i64([0, 1, 2]), _i32([2, 0]), X, Y, 2)
    assert_close(out[0], X[0:2] @ Y[4:6].t(), scale=5)
    assert_close(out[1], X[2:4] @ Y[0:2].t(), scale=5)
