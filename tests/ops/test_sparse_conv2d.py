"""sparse_conv2d: NCHW conv2d with a CSR weight, every available backend against the reference."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import sparsekern
from sparsekern import reference
from sparsekern.ops import sparse_conv2d

from sk_testing import DTYPES, FUZZ, LAYOUTS, assert_close, gen, grads, make_input, random_sparse, seed_of

OP = "sparse_conv2d"
BACKWARD = ("sparse_conv2d", "sparse_conv2d_backward_input", "sparse_conv2d_backward_weight")


def _ref(x, W, bias, stride, padding, dilation):
    return reference.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, list(W.shape[2:]), bias, list(stride),
                                   list(padding), list(dilation))


def _setup(case, sparsity, dtype, layout, seed, requires_grad=False):
    n, cin, cout, h, w, ks, stride, padding, dilation, with_bias = case
    density, empty_rows = sparsity
    g = gen(seed)
    W = random_sparse((cout, cin) + ks, density, dtype, g, empty_rows, layout, requires_grad=requires_grad)
    x = make_input((n, cin, h, w), dtype, g, layout, requires_grad=requires_grad)
    bias = make_input((cout,), dtype, g, layout, requires_grad=requires_grad) if with_bias else None
    return x, W, bias, stride, padding, dilation


def _cpu_kernel(x, W, stride, padding, dilation):
    """The CPU kernel sparse_conv2d runs for this conv (pointwise, batched or direct)."""
    return torch.ops.sparsekern._conv2d_cpu_kernel(list(x.shape), W.row_ptr, W.col_idx, list(W.shape[2:]),
                                                   list(stride), list(padding), list(dilation))


def test_forward(backend, conv_case, sparsity, dtype, layout):
    x, W, bias, stride, padding, dilation = _setup(conv_case, sparsity, dtype, layout,
                                                   seed_of(OP, conv_case, sparsity, dtype, layout))
    x_before = x.clone()
    y = sparse_conv2d(x, W, bias, stride, padding, dilation)
    expected = _ref(x, W, bias, stride, padding, dilation)
    assert_close(y, expected, scale=W.k)
    assert torch.equal(x, x_before), "sparse_conv2d modified x"
    if W.m:  # The oracle against F.conv2d on the dense weight (which rejects Cout = 0).
        torch.testing.assert_close(expected, F.conv2d(x, W.to_dense(), bias, stride, padding, dilation),
                                   rtol=1e-4, atol=1e-5 * W.k)
    else:
        assert y.shape == (x.shape[0], 0) + expected.shape[2:]


@pytest.mark.kernels(*BACKWARD)
def test_backward(backend, conv_case, sparsity, dtype, layout):
    x, W, bias, stride, padding, dilation = _setup(conv_case, sparsity, dtype, layout,
                                                   seed_of(OP, "bw", conv_case, sparsity, dtype, layout), True)
    y = sparse_conv2d(x, W, bias, stride, padding, dilation)
    g = gen(seed_of(OP, "grad_out", conv_case))
    grad_out = make_input(y.shape, dtype, g)
    inputs = [x, W.values] + ([bias] if bias is not None else [])
    got = grads(y, inputs, grad_out)
    exp = grads(_ref(x, W, bias, stride, padding, dilation), inputs, grad_out)
    n_out = y.shape[0] * y.shape[2] * y.shape[3]
    for a, e, s in zip(got, exp, [W.m * 9, n_out, n_out]):  # x, values, bias
        assert_close(a, e, scale=s)


@pytest.mark.kernels(*BACKWARD)
@pytest.mark.parametrize("wrt", ["x", "values", "bias"])
def test_backward_one_input(backend, wrt, dtype):
    case = (2, 3, 4, 6, 7, (3, 3), (2, 1), (1, 1), (1, 2), True)
    x, W, bias, stride, padding, dilation = _setup(case, (0.5, True), dtype, "contiguous", seed_of(OP, wrt))
    inp = {"x": x, "values": W.values, "bias": bias}[wrt]
    inp.requires_grad_(True)
    y = sparse_conv2d(x, W, bias, stride, padding, dilation)
    grad_out = make_input(y.shape, dtype, gen(1))
    (got,) = grads(y, [inp], grad_out)
    (exp,) = grads(_ref(x, W, bias, stride, padding, dilation), [inp], grad_out)
    assert_close(got, exp, scale=50)


def test_int_and_pair_arguments_agree(backend):
    x, W, bias, *_ = _setup((1, 2, 3, 7, 7, (3, 3), (1, 1), (0, 0), (1, 1), True), (0.5, False), torch.float64,
                            "contiguous", 51)
    assert torch.equal(sparse_conv2d(x, W, bias, 2, 1, 2), sparse_conv2d(x, W, bias, (2, 2), (1, 1), [2, 2]))
    y = sparse_conv2d(x, W)  # defaults: stride 1, padding 0, dilation 1, no bias
    assert_close(y, _ref(x, W, None, (1, 1), (0, 0), (1, 1)), scale=W.k)
    assert y.shape == (1, 3, 5, 5)


def test_zero_input_channels_give_the_bias(backend):
    """Cin = 0: no products, so every output pixel is the bias (F.conv2d itself returns 0 channels here)."""
    from sparsekern import SparseMatrix
    W = SparseMatrix.from_dense(torch.zeros(3, 0, 3, 3, dtype=torch.float64))
    bias = torch.arange(3, dtype=torch.float64)
    y = sparse_conv2d(torch.zeros(2, 0, 6, 5, dtype=torch.float64), W, bias, stride=2, padding=1)
    assert y.shape == (2, 3, 3, 3)
    assert torch.equal(y, bias.view(1, 3, 1, 1).expand(2, 3, 3, 3))


@pytest.mark.kernels(*BACKWARD)
@pytest.mark.parametrize("case", [
    (2, 2, 3, 5, 4, (3, 3), (1, 1), (1, 1), (1, 1), True),
    (1, 2, 2, 6, 5, (3, 2), (2, 1), (0, 1), (1, 2), False),
    (1, 3, 4, 3, 3, (1, 1), (1, 1), (0, 0), (1, 1), True),    # pointwise, one 9-pixel plane
    (3, 2, 3, 5, 5, (1, 1), (2, 2), (0, 0), (1, 1), False),   # pointwise, strided, planes grouped
    (4, 2, 3, 7, 7, (3, 3), (2, 2), (1, 1), (1, 1), True),    # batch-innermost, four stride phases
], ids=["3x3", "rect-stride-dilation", "1x1", "1x1-stride2", "3x3-stride2-phases"])
def test_gradcheck(backend, case):
    x, W, bias, stride, padding, dilation = _setup(case, (0.5, True), torch.float64, "transposed", 52)
    values = W.values.detach().clone().requires_grad_(True)
    x.requires_grad_(True)
    inputs = (x, values) + ((bias.detach().clone().requires_grad_(True),) if bias is not None else ())

    def f(x_, v, *b):
        return sparse_conv2d(x_, W.with_values(v), b[0] if b else None, stride, padding, dilation)

    assert torch.autograd.gradcheck(f, inputs)
    # Second derivatives: the backward's own ops carry formulas (without them torch only warned).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.autograd.gradgradcheck(f, inputs)


# -- bad input ---------------------------------------------------------------------------

def _W(dtype=torch.float32, shape=(4, 3, 3, 3)):
    return random_sparse(shape, 0.5, dtype, gen(53))


def _x(*shape, **kw):
    return torch.randn(*(shape or (2, 3, 8, 8)), **kw)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: ((_x(3, 8, 8), _W()), {}), ValueError, r"sparse_conv2d: x must be 4-D, got shape \(3, 8, 8\)"),
        (lambda: ((_x(), _W().to_dense()), {}), TypeError, r"sparse_conv2d: W must be a sparsekern.SparseMatrix"),
        (lambda: ((_x(dtype=torch.float64).int(), _W()), {}), TypeError,
         r"sparse_conv2d: x must be a floating-point tensor, got torch.int32"),
        (lambda: ((_x(), _W()), {"groups": 3}), ValueError, r"sparse_conv2d: only groups=1 is supported, got groups=3"),
        (lambda: ((_x(), _W(shape=(4, 27))), {}), ValueError,
         r"sparse_conv2d: W must have the dense shape \(Cout, Cin, kh, kw\), got \(4, 27\)"),
        (lambda: ((_x(2, 2, 8, 8), _W()), {}), ValueError,
         r"sparse_conv2d: x must have 3 channels \(W has shape \(4, 3, 3, 3\)\), got 2"),
        (lambda: ((_x(), _W()), {"stride": 0}), ValueError,
         r"sparse_conv2d: stride must be an int or a pair of ints >= 1, got 0"),
        (lambda: ((_x(), _W()), {"stride": (1, 2, 3)}), ValueError, r"sparse_conv2d: stride must be an int or a pair"),
        (lambda: ((_x(), _W()), {"padding": -1}), ValueError,
         r"sparse_conv2d: padding must be an int or a pair of ints >= 0, got -1"),
        (lambda: ((_x(), _W()), {"padding": "same"}), TypeError, r"sparse_conv2d: padding must be an int or a pair"),
        (lambda: ((_x(), _W()), {"dilation": (1, 0)}), ValueError,
         r"sparse_conv2d: dilation must be an int or a pair of ints >= 1, got \(1, 0\)"),
        (lambda: ((_x(2, 3, 2, 8), _W()), {}), ValueError,
         r"sparse_conv2d: input of size \(2, 8\) is too small for kernel \(3, 3\)"),
        (lambda: ((_x(2, 3, 5, 5), _W()), {"dilation": 3}), ValueError,
         r"sparse_conv2d: input of size \(5, 5\) is too small"),
        (lambda: ((_x(), _W(), torch.randn(1, 4)), {}), ValueError, r"sparse_conv2d: bias must be 1-D"),
        (lambda: ((_x(), _W(), torch.randn(3)), {}), ValueError,
         r"sparse_conv2d: bias must have 4 entries \(W has 4 output channels\), got 3"),
        (lambda: ((_x(), _W(), torch.randn(4, dtype=torch.float64)), {}), TypeError,
         r"sparse_conv2d: bias has dtype torch.float64 but x has torch.float32"),
        (lambda: ((_x(), _W(torch.float64)), {}), TypeError,
         r"sparse_conv2d: W.values has dtype torch.float64 but x has torch.float32"),
        (lambda: ((_x(device="meta"), _W()), {}), ValueError, r"sparse_conv2d: W.values is on cpu but x is on meta"),
    ],
    ids=["x-3d", "W-dense", "x-int", "groups", "W-2d", "channels", "stride-0", "stride-triple", "padding-neg",
         "padding-str", "dilation-0", "too-small", "too-small-dilated", "bias-2d", "bias-size", "bias-dtype",
         "W-dtype", "x-device"],
)
def test_bad_input(backend, make, exc, match):
    args, kwargs = make()
    with pytest.raises(exc, match=match):
        sparse_conv2d(*args, **kwargs)


def test_float16_on_cpp_is_a_type_error():
    # bfloat16 runs on the CPU kernels (tests/ops/test_autocast.py); float16 does not.
    x = torch.randn(2, 3, 8, 8, dtype=torch.float16)
    with sparsekern.backend("cpp"):
        with pytest.raises(TypeError, match=r"sparse_conv2d: x has dtype torch.float16, which the cpp backend"):
            sparse_conv2d(x, _W(torch.float16))


# -- pointwise (1x1, unpadded) convs: their own kernels (csrc/cpu/conv_pointwise.cpp) -----------

# (N, Cin, Cout, H, W, stride): each exercises one way those kernels read a batch.
POINTWISE = (
    (2, 19, 37, 9, 9, (1, 1)),      # flat, x packed (81-pixel planes: not whole vectors), y in place; ends overlapping
    (3, 8, 12, 10, 10, (1, 1)),     # flat, x packed, 100 pixels: two tiles of 7 and 6 vectors
    (2, 9, 11, 16, 16, (1, 1)),     # flat, read and written in place: 256-pixel planes are whole vectors
    (2, 6, 5, 17, 15, (2, 2)),      # stride 2: packed, 9x8 outputs, dx zero between them
    (5, 7, 9, 4, 4, (1, 1)),        # 4x4 planes, four images side by side and one alone
    (3, 5, 6, 7, 7, (1, 2)),        # 7x4 planes from stride (1, 2), grouped
    (13, 6, 9, 7, 7, (1, 1)),       # 7x7 planes, four images a group (AVX-512): three full groups and one image
    (8, 5, 7, 4, 4, (1, 1)),        # 4x4 planes, two groups of four
    (8, 6, 5, 2, 2, (1, 1)),        # 2x2 planes, all eight images in one group, its rows split over threads
    (1, 33, 70, 2, 3, (1, 1)),      # one image of 6 pixels: less than a vector, rows split over threads
    (1, 16, 40, 12, 12, (1, 1)),    # one image, flat (in place at float32): rows split over threads
    (4, 3, 4, 1, 1, (1, 1)),        # 1x1 planes
)


@pytest.mark.kernels(*BACKWARD)
@pytest.mark.parametrize("case", POINTWISE, ids=lambda c: f"N{c[0]}-{c[1]}to{c[2]}-{c[3]}x{c[4]}-s{c[5][0]}{c[5][1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sparsity", [(0.0, False), (0.9, False), (0.9, True), (1.0, False)], ids=str)
def test_pointwise(backend, case, dtype, sparsity, layout):
    n, cin, cout, h, w, stride = case
    full = (n, cin, cout, h, w, (1, 1), stride, (0, 0), (1, 1), True)
    x, W, bias, *_ = _setup(full, sparsity, dtype, layout, seed_of(OP, "pw", case, sparsity, dtype, layout), True)
    y = sparse_conv2d(x, W, bias, stride)
    if backend == "cpp":
        assert _cpu_kernel(x, W, stride, (0, 0), (1, 1)) == "pointwise"  # the kernels this test is for
    expected = _ref(x, W, bias, stride, (0, 0), (1, 1))
    grad_out = make_input(y.shape, dtype, gen(seed_of(OP, "pw-grad", case)), layout)
    inputs = [x, W.values, bias]
    if dtype == torch.bfloat16:  # float32 accumulation, rounded once: against the float64 reference
        ref = [t.detach().double().requires_grad_() for t in (x, W.values, bias)]
        W64 = sparsekern.SparseMatrix(W.row_ptr, W.col_idx, ref[1], W.shape)
        exp64 = _ref(ref[0], W64, ref[2], stride, (0, 0), (1, 1))
        torch.testing.assert_close(y.double(), exp64, rtol=2e-2, atol=2e-2 * max(1, W.k) ** 0.5)
        for a, e in zip(grads(y, inputs, grad_out), grads(exp64, ref, grad_out.double())):
            torch.testing.assert_close(a.double(), e, rtol=3e-2, atol=3e-2 * max(1, n * h * w) ** 0.5)
        return
    assert_close(y, expected, scale=W.k)
    n_out = y.shape[0] * y.shape[2] * y.shape[3]
    for a, e, s in zip(grads(y, inputs, grad_out), grads(expected, inputs, grad_out), [W.m, n_out, n_out]):
        assert_close(a, e, scale=s)


@pytest.mark.parametrize("case", [(4, 6, 5, 17, 15, (2, 2)), (3, 5, 6, 7, 7, (1, 2)), (1, 16, 24, 12, 13, (2, 3))],
                         ids=str)
def test_pointwise_strided_input_gradient_writes_every_pixel(case):
    """A strided 1x1 conv's input gradient is zero at the pixels no output reads: the kernel writes those zeros
    itself (no separate fill), so memory that held NaNs before must not show through, on every read path
    (flat images, grouped images, one image split by rows)."""
    n, cin, cout, h, w, stride = case
    g = gen(11)
    W = random_sparse((cout, cin, 1, 1), 0.5, torch.float32, g, False, "contiguous")
    x = torch.randn(n, cin, h, w, generator=g)
    dy = torch.randn(sparse_conv2d(x, W, None, stride).shape, generator=g)
    expected = torch.nn.grad.conv2d_input(x.shape, W.to_dense(), dy, stride=stride)
    for _ in range(3):
        junk = torch.full((n, cin, h, w), float("nan"))  # freed just before: the gradient's likely memory
        del junk
        dx = torch.ops.sparsekern.sparse_conv2d_backward_input(dy, W.values, W.row_ptr, W.col_idx, list(x.shape),
                                                               [1, 1], list(stride), [0, 0], [1, 1])
        assert _cpu_kernel(x, W, stride, (0, 0), (1, 1)) == "pointwise"
        torch.testing.assert_close(dx, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hw", [(9, 9), (3, 3)], ids=str)
def test_pointwise_non_finite(hw):
    """NaN and Inf reach exactly the results that read them, nonzero by nonzero: the overlapped end of a 9x9
    plane and the pad lanes of grouped 3x3 planes must not spread them (nor turn 0 * Inf into NaN)."""
    h, w = hw
    g = gen(7)
    W = random_sparse((6, 5, 1, 1), 0.6, torch.float64, g, False, "contiguous")
    x = torch.randn(3, 5, h, w, generator=g, dtype=torch.float64)
    x[1, 2, h - 1, w - 1] = float("inf")
    x[0, 4, 0, 1] = float("nan")
    dy = torch.randn(3, 6, h, w, generator=g, dtype=torch.float64)
    dy[2, 1, h - 1, 0] = float("inf")
    rows = torch.repeat_interleave(torch.arange(6), W.row_ptr.diff())
    cols, v = W.col_idx.long(), W.values.view(1, -1, 1, 1)
    ops = torch.ops.sparsekern
    y = ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, [1, 1], None, [1, 1], [0, 0], [1, 1])
    torch.testing.assert_close(y, x.new_zeros(3, 6, h, w).index_add_(1, rows, x[:, cols] * v), equal_nan=True)
    dx = ops.sparse_conv2d_backward_input(dy, W.values, W.row_ptr, W.col_idx, list(x.shape), [1, 1], [1, 1], [0, 0],
                                          [1, 1])
    torch.testing.assert_close(dx, x.new_zeros(x.shape).index_add_(1, cols, dy[:, rows] * v), equal_nan=True)
    dv = ops.sparse_conv2d_backward_weight(dy, x, W.row_ptr, W.col_idx, [1, 1], [1, 1], [0, 0], [1, 1])
    torch.testing.assert_close(dv, (dy[:, rows] * x[:, cols]).sum((0, 2, 3)), equal_nan=True)


# -- convs on small planes: the batch-innermost kernels (csrc/cpu/conv_batched.cpp) -------------------------

# (N, Cin, Cout, H, W, kernel, stride, padding, dilation): planes of at most 64 outputs, rows of N*OW >= 8
# elements (and N times the columns of every phase of the input gradient).
BATCHED = (
    (16, 5, 7, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1)),   # ResNet's 7x7 layers: rows of 112, two tiles
    (3, 4, 6, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)),    # rows of 15: the last vector overlaps
    (2, 3, 4, 6, 7, (3, 5), (1, 1), (1, 2), (1, 1)),    # rectangular kernel and padding
    (4, 2, 3, 6, 6, (3, 3), (1, 1), (2, 2), (2, 2)),    # dilation 2
    (8, 3, 5, 4, 4, (3, 3), (1, 1), (0, 0), (1, 1)),    # no padding: 2x2 outputs
    (2, 6, 3, 8, 8, (2, 2), (1, 1), (1, 0), (1, 1)),    # even kernel, padding on one axis
    (16, 5, 7, 7, 7, (3, 3), (2, 2), (1, 1), (1, 1)),   # ResNet's 7x7 -> 4x4 stride-2 layer: four phases
    (8, 4, 6, 14, 14, (3, 3), (2, 2), (1, 1), (1, 1)),  # 14x14 -> 7x7
    (4, 3, 5, 9, 8, (3, 3), (2, 1), (1, 1), (1, 1)),    # stride on one axis, odd height
    (3, 3, 4, 11, 11, (5, 5), (3, 3), (2, 2), (1, 1)),  # stride 3: nine phases, some with one tap row
    (4, 2, 3, 9, 9, (3, 3), (2, 2), (2, 2), (2, 2)),    # stride 2 and dilation 2: every tap in phase (0, 0)
    (8, 3, 5, 8, 8, (2, 2), (2, 2), (0, 0), (1, 1)),    # 2x2 stride-2 patches: one tap per phase
    (4, 3, 4, 5, 5, (3, 3), (2, 2), (3, 3), (1, 1)),    # padding wider than the kernel's reach
    # Rows of 8+ columns for 8+ images: the packing's 8 x 8 register transposes, and their tails of columns and images.
    (16, 4, 6, 12, 12, (3, 3), (1, 1), (1, 1), (1, 1)),  # stride 1: a block of 8 columns and 4 more, two of images
    (11, 3, 5, 20, 19, (3, 3), (2, 2), (1, 1), (1, 1)),  # stride 2: deinterleaved blocks, 3 images and columns after
    (9, 2, 3, 17, 35, (3, 3), (2, 2), (0, 0), (1, 1)),   # stride 2, no padding: the last block's reads end the row
    (8, 2, 3, 21, 37, (5, 5), (2, 2), (2, 2), (1, 1)),   # stride 2, even padding: dX rows in blocks of 16
    # 8+ channels: channels_last tensors packed and written in blocks of 8 channels x 8 images, and their tails.
    (11, 12, 20, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1)),  # a block of channels and 4 more, of images and 3 more
    (16, 16, 8, 9, 9, (3, 3), (2, 2), (1, 1), (1, 1)),   # stride 2: four phases of whole blocks
    # Short rows share a tile (conv_batched.cpp's grid_tiles): runs of 1-4 vectors, 2 or 4 to a tile, and the rest.
    (8, 3, 5, 6, 4, (3, 3), (1, 1), (1, 1), (1, 1)),     # rows of 4 columns x 8 images: four runs, then two
    (16, 3, 4, 5, 3, (3, 3), (1, 1), (1, 1), (1, 1)),    # rows of 3 x 16: two runs of 3 vectors, twice, then one
)


@pytest.mark.kernels(*BACKWARD)
@pytest.mark.parametrize("case", BATCHED,
                         ids=lambda c: f"N{c[0]}-{c[1]}to{c[2]}-{c[3]}x{c[4]}-k{c[5]}-s{c[6]}-p{c[7]}-d{c[8]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sparsity", [(0.0, False), (0.9, False), (0.9, True), (1.0, False)], ids=str)
@pytest.mark.parametrize("pin", ["batched", "direct"])
def test_pinned_kernel(backend, case, dtype, sparsity, layout, pin, monkeypatch):
    """Each CPU kernel of these convs, pinned (SPARSEKERN_CONV_KERNEL), where the geometry rule or a measurement
    would pick the other: the batch-innermost layouts, and the direct kernel's stride-2 packing of wide rows."""
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", pin)
    n, cin, cout, h, w, ks, stride, padding, dilation = case
    full = (n, cin, cout, h, w, ks, stride, padding, dilation, True)
    x, W, bias, *_ = _setup(full, sparsity, dtype, layout, seed_of(OP, "bt", case, sparsity, dtype, layout), True)
    y = sparse_conv2d(x, W, bias, stride, padding, dilation)
    if backend == "cpp":
        assert _cpu_kernel(x, W, stride, padding, dilation) == pin  # the kernels this test is for
    grad_out = make_input(y.shape, dtype, gen(seed_of(OP, "bt-grad", case)), layout)
    inputs = [x, W.values, bias]
    if dtype == torch.bfloat16:  # float32 accumulation, rounded once: against the float64 reference
        ref = [t.detach().double().requires_grad_() for t in (x, W.values, bias)]
        W64 = sparsekern.SparseMatrix(W.row_ptr, W.col_idx, ref[1], W.shape)
        exp64 = _ref(ref[0], W64, ref[2], stride, padding, dilation)
        torch.testing.assert_close(y.double(), exp64, rtol=2e-2, atol=2e-2 * max(1, W.k) ** 0.5)
        for a, e in zip(grads(y, inputs, grad_out), grads(exp64, ref, grad_out.double())):
            torch.testing.assert_close(a.double(), e, rtol=3e-2, atol=3e-2 * max(1, n * h * w) ** 0.5)
        return
    expected = _ref(x, W, bias, stride, padding, dilation)
    assert_close(y, expected, scale=W.k)
    n_out = y.shape[0] * y.shape[2] * y.shape[3]
    for a, e, s in zip(grads(y, inputs, grad_out), grads(expected, inputs, grad_out), [W.m * 9, n_out, n_out]):
        assert_close(a, e, scale=s)


@pytest.mark.parametrize("case", [(2, 19, 37, 9, 9, (1, 1), (0, 0), (1, 1)), (3, 8, 5, 9, 9, (1, 1), (0, 0), (2, 2)),
                                  (16, 5, 7, 7, 7, (3, 3), (1, 1), (1, 1)), (4, 2, 3, 6, 6, (3, 3), (2, 2), (2, 2)),
                                  (16, 5, 7, 7, 7, (3, 3), (1, 1), (2, 2)), (8, 6, 5, 14, 14, (3, 3), (1, 1), (2, 2)),
                                  (4, 3, 4, 9, 8, (3, 3), (1, 1), (2, 1))],
                         ids=str)
def test_kernels_agree_with_direct(case, monkeypatch):
    """The pointwise and batch-innermost kernels against the direct one (SPARSEKERN_CONV_KERNEL=direct),
    forward and both gradients, on the same float64 inputs."""
    n, cin, cout, h, w, ks, padding, stride = case
    g = gen(seed_of(OP, "agree", case))
    W = random_sparse((cout, cin) + ks, 0.3, torch.float64, g, False, "contiguous")
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64)
    ops, geo = torch.ops.sparsekern, (list(stride), list(padding), [1, 1])
    y = ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, list(ks), None, *geo)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    results = {}
    for pin in ("batched", "direct"):
        monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", pin)
        results[pin] = (ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, list(ks), None, *geo),
                        ops.sparse_conv2d_backward_input(dy, W.values, W.row_ptr, W.col_idx, list(x.shape), list(ks),
                                                         *geo),
                        ops.sparse_conv2d_backward_weight(dy, x, W.row_ptr, W.col_idx, list(ks), *geo))
    for a, b in zip(results["batched"], results["direct"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", BATCHED,
                         ids=lambda c: f"N{c[0]}-{c[1]}to{c[2]}-{c[3]}x{c[4]}-k{c[5]}-s{c[6]}-p{c[7]}-d{c[8]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pin", ["batched", "auto"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_both_gradients_at_once(case, dtype, pin, layout, monkeypatch):
    """The conv node's backward (_sparse_conv2d_backward), which packs dY once for both gradients where both passes
    run the batch-innermost kernel (the weight gradient then reads the input gradient's bordered copy), against the
    two passes apart and the float64 reference."""
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", pin)
    n, cin, cout, h, w, ks, stride, padding, dilation = case
    g = gen(seed_of(OP, "both", case, dtype, layout))
    W = random_sparse((cout, cin) + ks, 0.4, dtype, g, False, "contiguous")
    x = make_input((n, cin, h, w), dtype, g, layout)
    ops, geo = torch.ops.sparsekern, (list(ks), list(stride), list(padding), list(dilation))
    y = ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, list(ks), None, *geo[1:])
    dy = make_input(y.shape, dtype, g, layout)
    runs = ops._fused_backward_runs()
    dx, gv = ops._sparse_conv2d_backward(dy, x, W.values, W.row_ptr, W.col_idx, *geo)
    if pin == "batched":
        assert ops._fused_backward_runs() == runs + 1  # the one-pack path ran
    dx_apart = ops.sparse_conv2d_backward_input(dy, W.values, W.row_ptr, W.col_idx, list(x.shape), *geo)
    gv_apart = ops.sparse_conv2d_backward_weight(dy, x, W.row_ptr, W.col_idx, *geo)
    torch.testing.assert_close(dx, dx_apart, rtol=0, atol=0)
    torch.testing.assert_close(gv, gv_apart, rtol=1e-6, atol=1e-6 * n * h * w)
    W64 = sparsekern.SparseMatrix(W.row_ptr, W.col_idx, W.values.double(), W.shape)
    x64 = x.double().requires_grad_()
    v64 = W64.values.requires_grad_()
    ex, ev = torch.autograd.grad(_ref(x64, W64, None, stride, padding, dilation), [x64, v64], dy.double())
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(dx.double(), ex, rtol=tol, atol=tol * W.m)
    torch.testing.assert_close(gv.double(), ev, rtol=tol, atol=tol * n * h * w)


@pytest.mark.parametrize("case", [(16, 5, 7, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1)),   # 7 or 14 tiles over the threads
                                  (16, 6, 2, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1)),   # fewer rows than threads
                                  (16, 5, 9, 14, 14, (3, 3), (2, 2), (1, 1), (1, 1)),  # stride 2: 7x7 phases
                                  (8, 4, 5, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1)),    # runs of 4 vectors, 2 a tile
                                  (3, 4, 6, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1))],   # one tile
                         ids=lambda c: f"N{c[0]}-{c[1]}to{c[2]}-{c[3]}x{c[4]}-s{c[6]}")
def test_batched_results_do_not_depend_on_the_thread_count(case, monkeypatch):
    """The batch-innermost kernel's gathers split each pass's tiles and rows over the threads by their work: every
    output element is still one row's sums over one tile, in the same order, so the forward and the input gradient
    are bit for bit the same at 1 to 5 threads (and match the reference)."""
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", "batched")
    n, cin, cout, h, w, ks, stride, padding, dilation = case
    g = gen(seed_of(OP, "threads", case))
    W = random_sparse((cout, cin) + ks, 0.4, torch.float32, g, False, "contiguous")
    x = torch.randn(n, cin, h, w, generator=g)
    ops, geo = torch.ops.sparsekern, (list(ks), list(stride), list(padding), list(dilation))
    dy = torch.randn(ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, list(ks), None, *geo[1:]).shape, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3, 4, 5):
            torch.set_num_threads(t)
            results.append((ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, list(ks), None, *geo[1:]),
                            ops.sparse_conv2d_backward_input(dy, W.values, W.row_ptr, W.col_idx, list(x.shape), *geo)))
    finally:
        torch.set_num_threads(threads)
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            assert torch.equal(a, b)
    xr, vr = x.double().requires_grad_(), W.values.double().requires_grad_()
    yr = _ref(xr, sparsekern.SparseMatrix(W.row_ptr, W.col_idx, vr, W.shape), None, stride, padding, dilation)
    (dxr,) = torch.autograd.grad(yr, [xr], dy.double())
    torch.testing.assert_close(results[0][0].double(), yr.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(results[0][1].double(), dxr, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", BATCHED[:3] + BATCHED[6:8] + BATCHED[13:15],
                         ids=lambda c: f"N{c[0]}-{c[1]}to{c[2]}-{c[3]}x{c[4]}-k{c[5]}-s{c[6]}-p{c[7]}-d{c[8]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pin", ["batched", "direct"])
def test_the_forwards_packed_input_serves_the_backward(case, dtype, pin, monkeypatch):
    """The conv node's forward (_sparse_conv2d_keep) hands back x as the batch-innermost kernel packed it where the
    weight gradient runs that kernel too (an empty tensor elsewhere), and the backward given it computes what it
    computes packing x anew; a packed x of another size is not read."""
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", pin)
    n, cin, cout, h, w, ks, stride, padding, dilation = case
    g = gen(seed_of(OP, "keep", case, dtype))
    W = random_sparse((cout, cin) + ks, 0.4, dtype, g, False, "contiguous")
    x = make_input((n, cin, h, w), dtype, g, "contiguous")
    ops, geo = torch.ops.sparsekern, (list(ks), list(stride), list(padding), list(dilation))
    y, x_packed = ops._sparse_conv2d_keep(x, W.values, W.row_ptr, W.col_idx, list(ks), None, *geo[1:])
    torch.testing.assert_close(y, ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, list(ks), None, *geo[1:]),
                               rtol=0, atol=0)
    assert (x_packed.numel() > 0) == (pin == "batched" and stride != (1, 1))  # kept for strided convs only
    dy = make_input(y.shape, dtype, g, "contiguous")
    fresh = ops._sparse_conv2d_backward(dy, x, W.values, W.row_ptr, W.col_idx, *geo)
    kept = ops._sparse_conv2d_backward(dy, x, W.values, W.row_ptr, W.col_idx, *geo, x_packed=x_packed)
    wrong = ops._sparse_conv2d_backward(dy, x, W.values, W.row_ptr, W.col_idx, *geo, x_packed=x_packed[:-1])
    for a, b, c in zip(fresh, kept, wrong):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    if x_packed.numel() > 0:  # it is read: a doubled copy doubles the weight gradient, and only that
        dx2, gv2 = ops._sparse_conv2d_backward(dy, x, W.values, W.row_ptr, W.col_idx, *geo, x_packed=x_packed * 2)
        torch.testing.assert_close(dx2, fresh[0], rtol=0, atol=0)
        torch.testing.assert_close(gv2, fresh[1] * 2, rtol=1e-6, atol=1e-6)


def test_conv_kernel_pin_rejects_unknown(monkeypatch):
    W = random_sparse((3, 2, 3, 3), 0.5, torch.float32, gen(1), False, "contiguous")
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="SPARSEKERN_CONV_KERNEL must be auto, direct or batched, got 'fast'"):
        sparse_conv2d(torch.randn(1, 2, 5, 5), W, padding=1)


@pytest.mark.parametrize("stride", [1, 2], ids=["stride1", "stride2"])
@pytest.mark.parametrize("pin", ["batched", "direct"])
def test_conv_non_finite(pin, stride, monkeypatch):
    """NaN and Inf reach exactly the results that read them, nonzero by nonzero (zero borders read as 0):
    the batch-innermost layout, its borders, phases and overlapped row ends must not spread them, nor the
    direct kernel's packed rows."""
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", pin)
    g = gen(11)
    W = random_sparse((6, 5, 3, 3), 0.4, torch.float64, g, False, "contiguous")
    x = torch.randn(4, 5, 5, 5, generator=g, dtype=torch.float64)
    x[1, 2, 4, 4], x[0, 4, 0, 1], x[3, 1, 2, 2] = float("inf"), float("nan"), float("nan")
    o = (5 + 2 - 3) // stride + 1
    dy = torch.randn(4, 6, o, o, generator=g, dtype=torch.float64)
    dy[2, 1, o - 1, 0] = float("inf")
    rows = torch.repeat_interleave(torch.arange(6), W.row_ptr.diff())
    cols, v = W.col_idx.long(), W.values.view(1, -1, 1)
    ops, geo = torch.ops.sparsekern, ([3, 3], [stride, stride], [1, 1], [1, 1])
    xc = F.unfold(x, 3, padding=1, stride=stride)  # (N, Cin*9, o*o): column j of W reads row cols[j]
    assert _cpu_kernel(x, W, *geo[1:]) == pin
    y = ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, [3, 3], None, *geo[1:])
    exp = x.new_zeros(4, 6, o * o).index_add_(1, rows, xc[:, cols] * v).view(4, 6, o, o)
    torch.testing.assert_close(y, exp, equal_nan=True)
    dyf = dy.view(4, 6, o * o)
    dx = ops.sparse_conv2d_backward_input(dy, W.values, W.row_ptr, W.col_idx, list(x.shape), *geo)
    dcols = x.new_zeros(4, 45, o * o).index_add_(1, cols, dyf[:, rows] * v)
    torch.testing.assert_close(dx, F.fold(dcols, (5, 5), 3, padding=1, stride=stride), equal_nan=True)
    dv = ops.sparse_conv2d_backward_weight(dy, x, W.row_ptr, W.col_idx, *geo)
    torch.testing.assert_close(dv, (dyf[:, rows] * xc[:, cols]).sum((0, 2)), equal_nan=True)


# -- property-based fuzz -----------------------------------------------------------------

@pytest.mark.kernels(*BACKWARD)
@FUZZ
@given(n=st.integers(0, 2), cin=st.integers(1, 4), cout=st.integers(0, 4), h=st.integers(1, 9), w=st.integers(1, 9),
       kh=st.sampled_from([1, 2, 3, 5]), kw=st.sampled_from([1, 3, 4]), sh=st.integers(1, 3), sw=st.integers(1, 2),
       ph=st.integers(0, 2), pw=st.integers(0, 2), dh=st.integers(1, 2), dw=st.integers(1, 2),
       with_bias=st.booleans(), density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), empty_rows=st.booleans(),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2 ** 16))
def test_fuzz(backend, n, cin, cout, h, w, kh, kw, sh, sw, ph, pw, dh, dw, with_bias, density, empty_rows, dtype,
              layout, seed):
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    # Grow the input until the output is non-empty (a too-small input is an error, tested above).
    h += max(0, 1 - ho) * sh
    w += max(0, 1 - wo) * sw
    case = (n, cin, cout, h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw), with_bias)
    x, W, bias, stride, padding, dilation = _setup(case, (density, empty_rows), dtype, layout, seed, True)
    y = sparse_conv2d(x, W, bias, stride, padding, dilation)
    expected = _ref(x, W, bias, stride, padding, dilation)
    assert_close(y, expected, scale=W.k)
    grad_out = make_input(y.shape, dtype, gen(seed + 1))
    inputs = [x, W.values] + ([bias] if with_bias else [])
    for got, exp in zip(grads(y, inputs, grad_out), grads(expected, inputs, grad_out)):
        assert_close(got, exp, scale=100)


def _three_passes(x, dy, W, geo):
    """The forward, input gradient and weight gradient ops of a 3x3 conv (geo: stride, padding, dilation)."""
    ops = torch.ops.sparsekern
    return (ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, [3, 3], None, *geo),
            ops.sparse_conv2d_backward_input(dy, W.values, W.row_ptr, W.col_idx, list(x.shape), [3, 3], *geo),
            ops.sparse_conv2d_backward_weight(dy, x, W.row_ptr, W.col_idx, [3, 3], *geo))


def _conv_and_grads(x, W, stride, g):
    """F.conv2d of x by W's dense weight (3x3, padding 1), a random dY, and the input and values gradients."""
    wd = W.to_dense().requires_grad_()
    xr = x.clone().requires_grad_()
    y = F.conv2d(xr, wd, None, stride, 1)
    dy = torch.randn(y.shape, generator=g, dtype=x.dtype)
    y.backward(dy)
    rows = torch.repeat_interleave(torch.arange(W.shape[0]), W.row_ptr.diff())
    return y.detach(), dy, xr.grad, wd.grad.view(W.shape[0], -1)[rows, W.col_idx.long()]


@pytest.mark.parametrize("case", [(8, 64, 64, 14, (1, 1)), (8, 64, 96, 14, (2, 2)), (16, 128, 128, 7, (1, 1))], ids=str)
def test_measured_kernel_choice(case, monkeypatch):
    """Unpinned, a pass large enough to measure times the direct and batch-innermost kernels on its first call
    and keeps the faster: the first call (which runs both, the weight gradient re-zeroed between them) and
    the later ones agree with F.conv2d, and the choice is one of the two."""
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", "auto")
    n, cin, cout, hw, stride = case
    g = gen(seed_of(OP, "measured", case))
    W = random_sparse((cout, cin, 3, 3), 0.3, torch.float64, g, False, "contiguous")
    x = torch.randn(n, cin, hw, hw, generator=g, dtype=torch.float64)
    geo = (list(stride), [1, 1], [1, 1])
    y_ref, dy, dx_ref, gv_ref = _conv_and_grads(x, W, stride, g)
    for _ in range(2):  # the first call measures, the second runs the choice
        for got, want in zip(_three_passes(x, dy, W, geo), (y_ref, dx_ref, gv_ref)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert _cpu_kernel(x, W, stride, (1, 1), (1, 1)) in ("direct", "batched")


@pytest.mark.parametrize("case", [(8, 64, 64, 14, (1, 1)), (8, 64, 96, 14, (2, 2))], ids=str)
def test_measured_kernel_choice_channels_last(case, monkeypatch):
    """A channels_last conv's passes are measured apart from the NCHW ones (the batch-innermost kernel reads and
    writes that layout, the direct one goes through NCHW copies): an NCHW call's choice leaves the channels_last
    one unmeasured; the measuring call and the later ones agree with F.conv2d, and the ops' outputs are channels_last
    whichever kernel wrote them (their fake kernels say so: torch.compile checks it)."""
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", "auto")
    n, cin, cout, hw, stride = case
    g = gen(seed_of(OP, "measured-cl", case))
    W = random_sparse((cout, cin, 3, 3), 0.29, torch.float32, g, False, "contiguous")  # float32: what the report reads
    x = torch.randn(n, cin, hw, hw, generator=g)
    ops, geo = torch.ops.sparsekern, (list(stride), [1, 1], [1, 1])
    kernels = [ops._conv2d_cpu_kernel(list(x.shape), W.row_ptr, W.col_idx, [3, 3], *geo, q, True) for q in range(3)]
    y_ref, dy, dx_ref, gv_ref = _conv_and_grads(x, W, stride, g)
    ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, [3, 3], None, *geo)  # measures the NCHW forward
    assert ops._conv2d_cpu_kernel(list(x.shape), W.row_ptr, W.col_idx, [3, 3], *geo, 0, True) == kernels[0]
    x_cl, dy_cl = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    for _ in range(2):  # the first call measures, the second runs the choice
        y, dx, gv = _three_passes(x_cl, dy_cl, W, geo)
        for got, want in zip((y, dx, gv), (y_ref, dx_ref, gv_ref)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
        for out in (y, dx):
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("pin", ["batched", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_channels_last_ops_return_channels_last(pin, dtype, monkeypatch):
    """The ops on channels_last x and dY return channels_last y and dX whichever kernel runs (the direct one writes
    NCHW, copied); the conv node's fused backward returns its kernel's layout (the batch-innermost kernel's
    channels_last, the direct one's NCHW). All equal the NCHW inputs' results."""
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", pin)
    g = gen(seed_of(OP, "cl-layout", pin, dtype))
    W = random_sparse((20, 12, 3, 3), 0.4, dtype, g, False, "contiguous")
    x = torch.randn(11, 12, 7, 7, generator=g, dtype=torch.float64).to(dtype)
    ops, geo = torch.ops.sparsekern, ([3, 3], [1, 1], [1, 1], [1, 1])
    y = ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, [3, 3], None, *geo[1:])
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
    x_cl, dy_cl = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    got = (ops.sparse_conv2d(x_cl, W.values, W.row_ptr, W.col_idx, [3, 3], None, *geo[1:]),
           ops.sparse_conv2d_backward_input(dy_cl, W.values, W.row_ptr, W.col_idx, list(x.shape), *geo),
           *ops._sparse_conv2d_backward(dy_cl, x_cl, W.values, W.row_ptr, W.col_idx, *geo),
           ops.sparse_conv2d_backward_weight(dy_cl, x_cl, W.row_ptr, W.col_idx, *geo))
    want = (y, ops.sparse_conv2d_backward_input(dy, W.values, W.row_ptr, W.col_idx, list(x.shape), *geo),
            *ops._sparse_conv2d_backward(dy, x, W.values, W.row_ptr, W.col_idx, *geo),
            ops.sparse_conv2d_backward_weight(dy, x, W.row_ptr, W.col_idx, *geo))
    for i, (a, b) in enumerate(zip(got, want)):
        if i < 2:  # the ops' y and dX
            assert a.is_contiguous(memory_format=torch.channels_last)
        elif i == 2:  # the fused backward's dX
            assert a.is_contiguous(memory_format=torch.channels_last) == (pin == "batched")
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_deterministic_algorithms_keep_the_rule(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) a pass large enough to be measured is not: it runs the
    geometry rule's kernel (the one reported before any call), so repeated calls give identical bits."""
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", "auto")
    g = gen(seed_of(OP, "deterministic"))
    W = random_sparse((64, 64, 3, 3), 0.2, torch.float32, g, False, "contiguous")
    x = torch.randn(7, 64, 12, 12, generator=g)  # 7 x 144 outputs x 7.4K nonzeros: above the measuring threshold
    ops, geo = torch.ops.sparsekern, ([1, 1], [1, 1], [1, 1])
    rule = _cpu_kernel(x, W, *geo)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        ys = [ops.sparse_conv2d(x, W.values, W.row_ptr, W.col_idx, [3, 3], None, *geo) for _ in range(2)]
        assert _cpu_kernel(x, W, *geo) == rule
    finally:
        torch.use_deterministic_algorithms(before)
    assert torch.equal(ys[0], ys[1])
    assert _cpu_kernel(x, W, *geo) == rule  # nothing was measured and recorded


@pytest.mark.kernels(*BACKWARD)
@pytest.mark.parametrize("case", [(2, 3, 5, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), True),  # direct
                                  (2, 4, 6, 8, 8, (1, 1), (1, 1), (0, 0), (1, 1), False),  # pointwise
                                  (3, 8, 4, 4, 4, (2, 2), (2, 2), (0, 0), (1, 1), True)],  # small planes, stride 2
                         ids=["3x3", "1x1", "2x2-s2"])
def test_channels_last_keeps_its_layout(backend, case):
    """A channels_last input gets a channels_last output and input gradient (as F.conv2d gives), equal to the
    NCHW input's: the layers after a conv keep their layout."""
    x, W, bias, stride, padding, dilation = _setup(case, (0.5, True), torch.float64, "contiguous", 11, True)
    x_cl = x.detach().to(memory_format=torch.channels_last).requires_grad_(True)
    y = sparse_conv2d(x, W, bias, stride, padding, dilation)
    y_cl = sparse_conv2d(x_cl, W, bias, stride, padding, dilation)
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y)
    grad_out = torch.randn(y.shape, dtype=y.dtype, generator=gen(12))
    (dx,) = torch.autograd.grad(y, x, grad_out)
    (dx_cl,) = torch.autograd.grad(y_cl, x_cl, grad_out)
    if backend != "reference":  # the reference's input gradient is whatever its composite's autograd gives
        assert dx_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(dx_cl, dx)


@pytest.mark.parametrize("wants", ["both", "values", "x", "none", "no_grad"])
def test_the_conv_node_keeps_the_packed_input_only_for_a_backward_that_uses_it(wants, monkeypatch):
    """The conv node on the batch-innermost kernel, after a first call has measured nothing (pinned): calls that want
    both gradients, one of them, none, or record no graph all run and give the reference's results."""
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", "batched")
    g = gen(seed_of(OP, "node-keep", wants))
    W = random_sparse((6, 5, 3, 3), 0.4, torch.float32, g, False, "contiguous")
    x = torch.randn(16, 5, 9, 9, generator=g)
    values = W.values.detach().clone().requires_grad_(wants in ("both", "values", "no_grad"))
    xs = x.clone().requires_grad_(wants in ("both", "x", "no_grad"))
    node = torch.ops.sparsekern._sparse_conv2d_node
    args = (W.row_ptr, W.col_idx, [3, 3], [2, 2], [1, 1], [1, 1])  # strided: the kept copy's case
    for _ in range(2):
        if wants == "no_grad":
            with torch.no_grad():
                y = node(xs, values, None, *args)
            assert y.grad_fn is None
        else:
            y = node(xs, values, None, *args)
    W64 = sparsekern.SparseMatrix(W.row_ptr, W.col_idx, W.values.double(), W.shape)
    torch.testing.assert_close(y.double(), _ref(x.double(), W64, None, (2, 2), (1, 1), (1, 1)), rtol=1e-4, atol=1e-4)
    if wants in ("none", "no_grad"):
        return
    dy = torch.randn(y.shape, generator=g)
    y.backward(dy)
    x64 = x.double().requires_grad_()
    v64 = W64.values.requires_grad_()
    ex, ev = torch.autograd.grad(_ref(x64, W64, None, (2, 2), (1, 1), (1, 1)), [x64, v64], dy.double())
    if xs.requires_grad:
        torch.testing.assert_close(xs.grad.double(), ex, rtol=1e-4, atol=1e-4)
    if values.requires_grad:
        torch.testing.assert_close(values.grad.double(), ev, rtol=1e-4, atol=1e-3)
