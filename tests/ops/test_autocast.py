"""Mixed precision: the bfloat16 CPU kernels against the float64 reference over the shared
parametrization, and the ops and sparse modules under ``torch.autocast`` (output in the autocast
dtype as F.linear / F.conv2d give it, float32 master values with float32 gradients)."""
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import sparsekern
from sparsekern import reference
from sparsekern.block_sparse import BlockSparseMatrix
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.ops import (
    bsr_conv2d,
    bsr_linear,
    bsr_sddmm,
    masked_matmul,
    masked_sddmm,
    sddmm,
    sparse_conv2d,
    sparse_linear,
    spmm,
)

from sk_testing import (
    check_low_precision,
    gen,
    has_cpu_kernel,
    make_input,
    random_mask,
    random_sparse,
    seed_of,
    threads,
)

BF16 = torch.bfloat16
LINEAR = ("sparse_linear", "sddmm", "gather")
CONV = ("sparse_conv2d", "sparse_conv2d_backward_input", "sparse_conv2d_backward_weight")
ALL = ("spmm", "sddmm", "sparse_linear", "masked_matmul", "masked_sddmm", "gather") + CONV


def cpu_autocast(dtype=BF16):
    return torch.autocast("cpu", dtype=dtype)


# -- bf16 kernels over the shared parametrization ------------------------------------------------

@pytest.mark.kernels(*LINEAR)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_sparse_linear_bf16(backend, mkn, sparsity, layout, with_bias):
    m, k, n = mkn
    g = gen(seed_of("sparse_linear_bf16", mkn, sparsity, layout, with_bias))
    W = random_sparse((m, k), sparsity[0], BF16, g, sparsity[1], layout)
    x = make_input((n, k), BF16, g, layout, requires_grad=True)
    values = W.values.detach().requires_grad_(True)
    bias = make_input((m,), BF16, g, layout, requires_grad=True) if with_bias else None
    y, got = check_low_precision(lambda x_, v, b: sparse_linear(x_, W.with_values(v), b),
                                 lambda x_, v, b: reference.sparse_linear(x_, v, W.row_ptr, W.col_idx, b),
                                 [x, values, bias], g)
    assert y.dtype == BF16 and all(d.dtype == BF16 for d in got)


@pytest.mark.kernels("spmm", "sddmm", "gather")
def test_spmm_bf16(backend, mkn, sparsity, layout):
    m, k, n = mkn
    g = gen(seed_of("spmm_bf16", mkn, sparsity, layout))
    A = random_sparse((m, k), sparsity[0], BF16, g, sparsity[1], layout)
    B = make_input((k, n), BF16, g, layout, requires_grad=True)
    values = A.values.detach().requires_grad_(True)
    out, _ = check_low_precision(lambda v, B_: spmm(A.with_values(v), B_),
                                 lambda v, B_: reference.spmm(v, A.row_ptr, A.col_idx, B_), [values, B], g)
    assert out.dtype == BF16


@pytest.mark.kernels("sddmm", "spmm", "gather")
def test_sddmm_bf16(backend, mkn, sparsity, layout):
    m, k, n = mkn
    g = gen(seed_of("sddmm_bf16", mkn, sparsity, layout))
    P = random_sparse((m, k), sparsity[0], BF16, g, sparsity[1])
    X = make_input((m, n), BF16, g, layout, requires_grad=True)
    Y = make_input((k, n), BF16, g, layout, requires_grad=True)
    out, _ = check_low_precision(lambda X_, Y_: sddmm(P, X_, Y_),
                                 lambda X_, Y_: reference.sddmm(P.row_ptr, P.col_idx, X_, Y_), [X, Y], g)
    assert out.dtype == BF16


@pytest.mark.kernels("masked_matmul", "masked_sddmm")
def test_masked_matmul_bf16(backend, mkn, sparsity, layout):
    m, k, n = mkn
    g = gen(seed_of("masked_bf16", mkn, sparsity, layout))
    mask = random_mask((m, k), sparsity[0], g, sparsity[1])
    x = make_input((n, k), BF16, g, layout, requires_grad=True)
    weight = make_input((m, k), BF16, g, layout, requires_grad=True)
    out, _ = check_low_precision(lambda x_, w: masked_matmul(x_, w, mask),
                                 lambda x_, w: reference.masked_matmul(x_, w, mask), [x, weight], g)
    assert out.dtype == BF16
    X = make_input((m, n), BF16, g, layout, requires_grad=True)
    Y = make_input((k, n), BF16, g, layout, requires_grad=True)
    out, _ = check_low_precision(lambda X_, Y_: masked_sddmm(X_, Y_, mask),
                                 lambda X_, Y_: reference.masked_sddmm(X_, Y_, mask), [X, Y], g)
    assert out.dtype == BF16


@pytest.mark.kernels(*CONV)
def test_sparse_conv2d_bf16(backend, conv_case, sparsity, layout):
    n, cin, cout, h, w, ks, stride, padding, dilation, with_bias = conv_case
    g = gen(seed_of("conv_bf16", conv_case, sparsity, layout))
    W = random_sparse((cout, cin) + ks, sparsity[0], BF16, g, sparsity[1], layout)
    x = make_input((n, cin, h, w), BF16, g, layout, requires_grad=True)
    values = W.values.detach().requires_grad_(True)
    bias = make_input((cout,), BF16, g, layout, requires_grad=True) if with_bias else None
    geometry = (list(stride), list(padding), list(dilation))
    y, got = check_low_precision(
        lambda x_, v, b: sparse_conv2d(x_, W.with_values(v), b, stride, padding, dilation),
        lambda x_, v, b: reference.sparse_conv2d(x_, v, W.row_ptr, W.col_idx, list(ks), b, *geometry),
        [x, values, bias], g)
    assert y.dtype == BF16 and all(d.dtype == BF16 for d in got)


# -- the bf16 path is the float32 path, rounded once ---------------------------------------------

def _rounded(fn, *args):
    """fn on the float32 copies of bf16 args, rounded to bf16 (what the bf16 kernels must give)."""
    return fn(*[a.float() if isinstance(a, torch.Tensor) and a.dtype == BF16 else a for a in args]).to(BF16)


@pytest.mark.skipif(not has_cpu_kernel("sparse_conv2d"), reason="needs the compiled CPU kernels")
@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_bf16_kernels_are_the_float32_kernels_rounded_once(n_threads, layout):
    """Same packing, tiles and summation order as float32, one rounding at the end: bit-identical to
    the float32 kernel on the widened inputs. (Densities below the dense-GEMM threshold.)"""
    ops = torch.ops.sparsekern
    g = gen(seed_of("rounded_once", n_threads, layout))
    with threads(n_threads):
        for (m, k, n) in ((7, 33, 5), (96, 130, 70), (200, 300, 40)):
            W = random_sparse((m, k), 0.15, BF16, g, empty_rows=True)
            x = make_input((n, k), BF16, g, layout)
            bias = make_input((m,), BF16, g)
            mask = W.mask()
            args = (W.values, W.row_ptr, W.col_idx)
            assert torch.equal(ops.sparse_linear(x, *args, bias), _rounded(ops.sparse_linear, x, *args, bias))
            assert torch.equal(ops.spmm(*args, x.t()), _rounded(ops.spmm, *args, x.t()))
            X, Y = make_input((m, n), BF16, g, layout), make_input((k, n), BF16, g, layout)
            assert torch.equal(ops.sddmm(W.row_ptr, W.col_idx, X, Y), _rounded(ops.sddmm, W.row_ptr, W.col_idx, X, Y))
            weight = make_input((m, k), BF16, g, layout)
            assert torch.equal(ops.masked_matmul(x, weight, mask), _rounded(ops.masked_matmul, x, weight, mask))
            assert torch.equal(ops.masked_sddmm(X, Y, mask), _rounded(ops.masked_sddmm, X, Y, mask))
        for (nb, cin, cout, hw, stride) in ((1, 8, 12, 9, 1), (3, 16, 24, 10, 2)):
            W = random_sparse((cout, cin, 3, 3), 0.2, BF16, g, empty_rows=True)
            x = make_input((nb, cin, hw, hw), BF16, g, layout)
            bias = make_input((cout,), BF16, g)
            geometry = ([3, 3], bias, [stride] * 2, [1, 1], [1, 1])
            y = ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, *geometry)
            assert torch.equal(y, _rounded(ops.sparse_conv2d, x, W.values, W.row_ptr, W.col_idx, *geometry))
            dy = make_input(y.shape, BF16, g)
            rest = ([3, 3], [stride] * 2, [1, 1], [1, 1])
            dx = ops.sparse_conv2d_backward_input(dy, W.values, W.row_ptr, W.col_idx, list(x.shape), *rest)
            assert torch.equal(dx, _rounded(ops.sparse_conv2d_backward_input, dy, W.values, W.row_ptr, W.col_idx,
                                            list(x.shape), *rest))
            dv = ops.sparse_conv2d_backward_weight(dy, x, W.row_ptr, W.col_idx, *rest)
            assert torch.equal(dv, _rounded(ops.sparse_conv2d_backward_weight, dy, x, W.row_ptr, W.col_idx, *rest))


# -- the ops under autocast ----------------------------------------------------------------------

def _op_cases():
    """(name, fn, ref, inputs builder): float32 inputs, two of them requiring grad."""
    def linear(g):
        W = random_sparse((12, 40), 0.3, torch.float32, g, empty_rows=True)
        v = W.values.detach().requires_grad_(True)
        return (lambda x, v_, b: sparse_linear(x, W.with_values(v_), b),
                lambda x, v_, b: reference.sparse_linear(x, v_, W.row_ptr, W.col_idx, b),
                [make_input((2, 3, 40), torch.float32, g, requires_grad=True), v,
                 make_input((12,), torch.float32, g, requires_grad=True)])

    def spmm_(g):
        A = random_sparse((12, 40), 0.3, torch.float32, g)
        v = A.values.detach().requires_grad_(True)
        return (lambda v_, B: spmm(A.with_values(v_), B), lambda v_, B: reference.spmm(v_, A.row_ptr, A.col_idx, B),
                [v, make_input((40, 9), torch.float32, g, "transposed", requires_grad=True)])

    def sddmm_(g):
        P = random_sparse((12, 40), 0.3, torch.float32, g)
        return (lambda X, Y: sddmm(P, X, Y), lambda X, Y: reference.sddmm(P.row_ptr, P.col_idx, X, Y),
                [make_input((12, 9), torch.float32, g, requires_grad=True),
                 make_input((40, 9), torch.float32, g, requires_grad=True)])

    def masked(g):
        mask = random_mask((12, 40), 0.3, g)
        return (lambda x, w: masked_matmul(x, w, mask), lambda x, w: reference.masked_matmul(x, w, mask),
                [make_input((5, 40), torch.float32, g, requires_grad=True),
                 make_input((12, 40), torch.float32, g, requires_grad=True)])

    def masked_sddmm_(g):
        mask = random_mask((12, 40), 0.3, g)
        return (lambda X, Y: masked_sddmm(X, Y, mask), lambda X, Y: reference.masked_sddmm(X, Y, mask),
                [make_input((12, 9), torch.float32, g, requires_grad=True),
                 make_input((40, 9), torch.float32, g, requires_grad=True)])

    def conv(g):
        W = random_sparse((6, 4, 3, 3), 0.4, torch.float32, g)
        v = W.values.detach().requires_grad_(True)
        return (lambda x, v_, b: sparse_conv2d(x, W.with_values(v_), b, 2, 1),
                lambda x, v_, b: reference.sparse_conv2d(x, v_, W.row_ptr, W.col_idx, [3, 3], b, [2, 2], [1, 1],
                                                         [1, 1]),
                [make_input((2, 4, 9, 8), torch.float32, g, "transposed", requires_grad=True), v,
                 make_input((6,), torch.float32, g, requires_grad=True)])

    def bsr_weight(g, shape):
        mask = random_mask((shape[0] // 4, shape[1] // 4), 0.5, g).repeat_interleave(4, 0).repeat_interleave(4, 1)
        B = BlockSparseMatrix.from_dense(torch.randn(shape, generator=g), 4, mask)
        v = B.values.detach().requires_grad_(True)
        return (lambda v_: BlockSparseMatrix(B.row_ptr, B.col_idx, v_, B.shape, validate=False)), B, v

    def bsr(g):
        with_values, W, v = bsr_weight(g, (8, 12))
        return (lambda x, v_: bsr_linear(x, with_values(v_)),
                lambda x, v_: reference.bsr_linear(x, v_, W.row_ptr, W.col_idx),
                [make_input((5, 12), torch.float32, g, requires_grad=True), v])

    def bsr_sddmm_(g):
        _, W, _ = bsr_weight(g, (8, 12))
        return (lambda X, Y: bsr_sddmm(W.row_ptr, W.col_idx, X, Y, 4),
                lambda X, Y: reference.bsr_sddmm(W.row_ptr, W.col_idx, X, Y, 4),
                [make_input((8, 5), torch.float32, g, requires_grad=True),
                 make_input((12, 5), torch.float32, g, requires_grad=True)])

    def bsr_conv(g):
        with_values, W, v = bsr_weight(g, (8, 8))

        def conv(x, v_):
            return bsr_conv2d(x, BlockSparseMatrix(W.row_ptr, W.col_idx, v_, (8, 2, 2, 2), validate=False), None, 1, 1)
        return (conv,
                lambda x, v_: F.conv2d(x, reference.bsr_to_dense(v_, W.row_ptr, W.col_idx, 8).reshape(8, 2, 2, 2),
                                       None, 1, 1),
                [make_input((2, 2, 5, 5), torch.float32, g, requires_grad=True), v])

    return {"sparse_linear": linear, "spmm": spmm_, "sddmm": sddmm_, "masked_matmul": masked,
            "masked_sddmm": masked_sddmm_, "sparse_conv2d": conv, "bsr_linear": bsr, "bsr_sddmm": bsr_sddmm_,
            "bsr_conv2d": bsr_conv}


@pytest.mark.kernels(*ALL)
@pytest.mark.parametrize("op", list(_op_cases()))
def test_op_under_autocast(backend, op):
    """float32 inputs under CPU bf16 autocast: a bf16 output within bf16 roundings of the float64
    result, float32 gradients for the float32 inputs."""
    g = gen(seed_of("autocast", op))
    fn, ref, inputs = _op_cases()[op](g)
    with cpu_autocast():
        out, got = check_low_precision(fn, ref, inputs, g)
    assert out.dtype == BF16
    assert [d.dtype for d in got] == [torch.float32] * len(got)


def test_ops_called_directly_under_autocast():
    """The rule is the op's (its Autocast dispatch key), not the Python wrapper's: torch.ops calls with
    mixed float32 / bf16 inputs run in bf16."""
    if not has_cpu_kernel("sparse_linear"):
        pytest.skip("needs the compiled CPU kernels")
    g = gen(61)
    W = random_sparse((6, 10), 0.5, torch.float32, g)
    x = make_input((3, 10), BF16, g)
    ops = torch.ops.sparsekern
    with cpu_autocast():
        assert ops.sparse_linear(x, W.values, W.row_ptr, W.col_idx).dtype == BF16
        assert ops.spmm(W.values, W.row_ptr, W.col_idx, x.t().float()).dtype == BF16
        assert ops.sddmm(W.row_ptr, W.col_idx, x.float()[:, :6].t(), x[:, :10].t()).dtype == BF16
        y = ops.sparse_conv2d(make_input((1, 10, 4, 4), torch.float32, g), W.values, W.row_ptr, W.col_idx, [1, 1],
                              None, [1, 1], [0, 0], [1, 1])
        assert y.dtype == BF16
        # gather (a backward helper) is no autocast op: it keeps the dtype it is given.
        assert ops.gather(W.values, torch.arange(3)).dtype == torch.float32


def test_mixed_dtypes_need_autocast(backend):
    """Outside autocast, bf16 activations and float32 values are an error, as in F.linear."""
    W = random_sparse((4, 6), 0.5, torch.float32, gen(62))
    x = torch.randn(2, 6).to(BF16)
    with pytest.raises(TypeError, match=r"sparse_linear: W.values has dtype torch.float32 but x has torch.bfloat16"):
        sparse_linear(x, W)
    with cpu_autocast():
        assert sparse_linear(x, W).dtype == BF16


def test_float64_is_left_alone(backend):
    """Autocast leaves float64 as it is (as F.linear does); float64 x with float32 values is an error then,
    named with the dtype autocast gives the values."""
    W = random_sparse((4, 6), 0.5, torch.float64, gen(63))
    x = torch.randn(2, 6, dtype=torch.float64)
    with cpu_autocast():
        assert sparse_linear(x, W).dtype == torch.float64
        with pytest.raises(TypeError, match=r"W.values has dtype torch.float32 \(torch.bfloat16 under autocast\) "
                                            r"but x has torch.float64"):
            sparse_linear(x, W.to(torch.float32))


@pytest.mark.kernels(*LINEAR)
def test_gradcheck_through_the_autocast_kernel(backend):
    """float64 passes through the Autocast dispatch kernel untouched: gradients stay exact."""
    g = gen(64)
    W = random_sparse((4, 5), 0.5, torch.float64, g, empty_rows=True)
    values = W.values.detach().clone().requires_grad_(True)
    x = make_input((3, 5), torch.float64, g, "transposed", requires_grad=True)
    bias = make_input((4,), torch.float64, g, requires_grad=True)
    with cpu_autocast():
        assert torch.autograd.gradcheck(lambda x_, v, b: sparse_linear(x_, W.with_values(v), b), (x, values, bias))
        Wc = random_sparse((3, 2, 3, 3), 0.5, torch.float64, g)
        xc = make_input((1, 2, 5, 5), torch.float64, g, requires_grad=True)
        vc = Wc.values.detach().clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x_, v: sparse_conv2d(x_, Wc.with_values(v), None, 1, 1), (xc, vc))


def test_float16_autocast_on_cpp_is_a_type_error():
    """CPU float16 autocast: the CPU kernels have no float16; the error names the dtype autocast gives."""
    if not has_cpu_kernel("sparse_linear"):
        pytest.skip("needs the compiled CPU kernels")
    W = random_sparse((4, 6), 0.5, torch.float32, gen(65))
    with sparsekern.backend("cpp"), cpu_autocast(torch.float16):
        with pytest.raises(TypeError, match=r"sparse_linear: x has dtype torch.float32 \(torch.float16 under "
                                            r"autocast\), which the cpp backend does not support"):
            sparse_linear(torch.randn(2, 6), W)


def test_float16_autocast_on_reference():
    W = random_sparse((4, 6), 0.5, torch.float32, gen(66))
    x = torch.randn(2, 6)
    with sparsekern.backend("reference"), cpu_autocast(torch.float16):
        assert sparse_linear(x, W).dtype == F.linear(x, W.to_dense()).dtype == torch.float16


# -- the modules ---------------------------------------------------------------------------------

def _module(kind, fmt):
    torch.manual_seed(0)
    if kind == "linear":
        return SparseLinear(32, 16, density=0.4, format=fmt, block=8, generator=gen(70))
    return SparseConv2d(8, 8, 3, stride=2, padding=1, density=0.4, format=fmt, block=8, generator=gen(71))


def _dense_forward(module, x, values, bias):
    """F.linear / F.conv2d with the module's weight at ``values``: the oracle of the module."""
    w = module.sparse_weight().with_values(values).to_dense()
    if isinstance(module, SparseLinear):
        return F.linear(x, w, bias)
    return F.conv2d(x, w, bias, module.stride, module.padding, module.dilation)


MODULE_CASES = [("linear", "csr"), ("linear", "bsr"), ("conv", "csr"), ("conv", "bsr")]


@pytest.mark.kernels(*ALL)
@pytest.mark.parametrize("kind,fmt", MODULE_CASES, ids=["-".join(c) for c in MODULE_CASES])
def test_module_under_autocast(backend, kind, fmt):
    """SparseLinear / SparseConv2d under CPU bf16 autocast: the output dtype F.linear / F.conv2d give under
    the same autocast (bf16), float32 master values with float32 gradients, all within bf16 roundings of
    the float64 dense module."""
    module = _module(kind, fmt)
    g = gen(seed_of("module", kind, fmt))
    x = make_input((4, 3, 32) if kind == "linear" else (2, 8, 7, 6), torch.float32, g, requires_grad=True)
    with cpu_autocast():
        y, got = check_low_precision(lambda x_, v, b: module(x_), lambda x_, v, b: _dense_forward(module, x_, v, b),
                                     [x, module.values, module.bias], g)
        assert y.dtype == _dense_forward(module, x, module.values, module.bias).dtype == BF16
    assert [d.dtype for d in got] == [torch.float32] * 3
    with cpu_autocast():
        loss = module(x).float().square().sum()
    loss.backward()
    assert module.values.dtype == module.values.grad.dtype == module.bias.grad.dtype == torch.float32


@pytest.mark.kernels(*ALL)
@pytest.mark.parametrize("kind,fmt", MODULE_CASES, ids=["-".join(c) for c in MODULE_CASES])
def test_bf16_module(backend, kind, fmt):
    """A module converted with .to(torch.bfloat16): bf16 forward and backward, as nn.Linear / nn.Conv2d."""
    module = _module(kind, fmt).to(BF16)
    g = gen(seed_of("bf16 module", kind, fmt))
    x = make_input((4, 3, 32) if kind == "linear" else (2, 8, 7, 6), BF16, g, requires_grad=True)
    y, got = check_low_precision(lambda x_, v, b: module(x_), lambda x_, v, b: _dense_forward(module, x_, v, b),
                                 [x, module.values, module.bias], g)
    assert y.dtype == BF16 and [d.dtype for d in got] == [BF16] * 3


# -- tracing: fake kernels and torch.compile under autocast --------------------------------------

def test_fake_kernels_under_autocast():
    """Shape inference (FakeTensorMode: torch.compile's) gives the autocast dtype, through the Autocast key."""
    if not has_cpu_kernel("sparse_linear"):
        pytest.skip("needs the compiled CPU kernels (the fake kernels belong to the C++ schemas)")
    W = random_sparse((6, 10), 0.5, torch.float32, gen(80))
    Wc = random_sparse((4, 3, 3, 3), 0.5, torch.float32, gen(81))
    ops = torch.ops.sparsekern
    with FakeTensorMode() as mode:
        vals, rp, ci = (mode.from_tensor(t) for t in (W.values, W.row_ptr, W.col_idx))
        cvals, crp, cci = (mode.from_tensor(t) for t in (Wc.values, Wc.row_ptr, Wc.col_idx))
        x = torch.empty(5, 10)
        with cpu_autocast():
            assert ops.sparse_linear(x, vals, rp, ci).dtype == BF16
            assert ops.spmm(vals, rp, ci, x.t()).dtype == BF16
            assert ops.sddmm(rp, ci, torch.empty(6, 5), x.t()).dtype == BF16
            assert ops.masked_matmul(x, torch.empty(6, 10), torch.ones(6, 10, dtype=torch.bool)).dtype == BF16
            assert ops.masked_sddmm(torch.empty(6, 5), x, torch.ones(6, 10, dtype=torch.bool)).dtype == BF16
            y = ops.sparse_conv2d(torch.empty(2, 3, 8, 8), cvals, crp, cci, [3, 3], None, [1, 1], [1, 1], [1, 1])
            assert y.dtype == BF16 and y.shape == (2, 4, 8, 8)
        assert ops.sparse_linear(x, vals, rp, ci).dtype == torch.float32


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.kernels(*LINEAR)
def test_compiled_module_under_autocast(backend, _fresh_dynamo):
    """torch.compile (aot_eager) of a SparseLinear step under autocast equals eager."""
    module = _module("linear", "csr")
    x = make_input((5, 32), torch.float32, gen(82), requires_grad=True)

    def step(x_):
        with cpu_autocast():
            y = module(x_)
        return y.float().square().sum(), y

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        loss, y = fn(x)
        results.append((y.detach(), torch.autograd.grad(loss, [x, module.values, module.bias])))
    (y_e, g_e), (y_c, g_c) = results
    assert y_c.dtype == y_e.dtype == BF16
    torch.testing.assert_close(y_c, y_e)
    for c, e in zip(g_c, g_e):
        assert c.dtype == e.dtype == torch.float32
        torch.testing.assert_close(c, e)
