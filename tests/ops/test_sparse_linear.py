"""sparse_linear: y = x @ W^T + bias, every available backend against sparsekern.reference.sparse_linear."""
import pytest
import torch
from hypothesis import given, strategies as st

import sparsekern
from sparsekern import reference
from sparsekern.ops import sparse_linear

from sk_testing import (
    DTYPES,
    FUZZ,
    LAYOUTS,
    assert_close,
    gen,
    grads,
    has_cpu_kernel,
    make_input,
    random_sparse,
    seed_of,
)

OP = "sparse_linear"
BACKWARD = ("sparse_linear", "sddmm")


def _ref(x, W, bias):
    return reference.sparse_linear(x, W.values, W.row_ptr, W.col_idx, bias)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_forward(backend, mkn, sparsity, dtype, layout, with_bias):
    # W (m, k) = (out_features, in_features), x (n, k).
    m, k, n = mkn
    density, empty_rows = sparsity
    g = gen(seed_of(OP, mkn, sparsity, dtype, layout, with_bias))
    W = random_sparse((m, k), density, dtype, g, empty_rows, layout)
    x = make_input((n, k), dtype, g, layout)
    bias = make_input((m,), dtype, g, layout) if with_bias else None
    x_before = x.clone()
    y = sparse_linear(x, W, bias)
    assert_close(y, _ref(x, W, bias), scale=k)
    assert torch.equal(x, x_before), "sparse_linear modified x"
    expected_dense = torch.nn.functional.linear(x, W.to_dense(), bias)
    torch.testing.assert_close(_ref(x, W, bias), expected_dense, rtol=1e-4, atol=1e-5 * max(k, 1))


@pytest.mark.kernels(*BACKWARD)
def test_backward(backend, mkn, sparsity, dtype, layout):
    m, k, n = mkn
    density, empty_rows = sparsity
    g = gen(seed_of(OP, "bw", mkn, sparsity, dtype, layout))
    W = random_sparse((m, k), density, dtype, g, empty_rows, layout, requires_grad=True)
    x = make_input((n, k), dtype, g, layout, requires_grad=True)
    bias = make_input((m,), dtype, g, layout, requires_grad=True)
    y = sparse_linear(x, W, bias)
    grad_out = make_input(y.shape, dtype, g)
    d_x, d_values, d_bias = grads(y, [x, W.values, bias], grad_out)
    e_x, e_values, e_bias = grads(_ref(x, W, bias), [x, W.values, bias], grad_out)
    assert_close(d_x, e_x, scale=m)
    assert_close(d_values, e_values, scale=n)
    assert_close(d_bias, e_bias, scale=n)


@pytest.mark.kernels(*BACKWARD)
@pytest.mark.parametrize("x_shape", [(13,), (2, 3, 13), (0, 13), (2, 0, 13), (1, 1, 1, 13)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_leading_batch_dims(backend, x_shape, with_bias, dtype):
    g = gen(seed_of(OP, x_shape, with_bias, dtype))
    W = random_sparse((5, 13), 0.5, dtype, g, empty_rows=True, requires_grad=True)
    x = make_input(x_shape, dtype, g, "transposed" if len(x_shape) > 1 else "strided", requires_grad=True)
    bias = make_input((5,), dtype, g, requires_grad=True) if with_bias else None
    y = sparse_linear(x, W, bias)
    assert y.shape == x_shape[:-1] + (5,)
    expected = _ref(x, W, bias)
    assert_close(y, expected, scale=13)
    grad_out = make_input(y.shape, dtype, g)
    inputs = [x, W.values] + ([bias] if with_bias else [])
    for got, exp in zip(grads(y, inputs, grad_out), grads(expected, inputs, grad_out)):
        assert_close(got, exp, scale=13)


@pytest.mark.kernels(*BACKWARD)
@pytest.mark.parametrize("wrt,with_bias", [("x", True), ("x", False), ("values", True), ("values", False),
                                           ("bias", True)])
def test_backward_one_input(backend, wrt, with_bias, dtype):
    """Only one input needs a gradient. values-only without bias is a first layer without bias: every
    optional argument of the op is None then (the dispatcher drops them, needs_input_grad is short)."""
    g = gen(seed_of(OP, wrt, with_bias, dtype))
    W = random_sparse((6, 10), 0.3, dtype, g, empty_rows=True, requires_grad=wrt == "values")
    x = make_input((4, 10), dtype, g, requires_grad=wrt == "x")
    bias = make_input((6,), dtype, g, requires_grad=wrt == "bias") if with_bias else None
    inp = {"x": x, "values": W.values, "bias": bias}[wrt]
    y = sparse_linear(x, W, bias)
    grad_out = make_input(y.shape, dtype, g)
    (got,) = grads(y, [inp], grad_out)
    (exp,) = grads(_ref(x, W, bias), [inp], grad_out)
    assert_close(got, exp, scale=10)


def test_transpose_only_built_when_x_needs_grad(backend):
    """The cached transpose is built on demand (x needs a gradient), and then reused."""
    W = random_sparse((5, 7), 0.5, torch.float32, gen(31))
    x = torch.randn(3, 7)
    sparse_linear(x, W)
    assert W._transpose is None
    sparse_linear(x.requires_grad_(), W)
    cached = W._transpose
    assert cached is not None
    sparse_linear(x, W)
    assert W._transpose is cached


@pytest.mark.kernels(*BACKWARD)
def test_gradcheck(backend):
    g = gen(32)
    W = random_sparse((4, 5), 0.5, torch.float64, g, empty_rows=True)
    values = W.values.detach().clone().requires_grad_(True)
    x = make_input((2, 3, 5), torch.float64, g, "transposed", requires_grad=True)
    bias = make_input((4,), torch.float64, g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, v, b: sparse_linear(x_, W.with_values(v), b), (x, values, bias))


def test_op_needs_transpose_for_dx():
    """The registered op called without the cached transpose cannot give dx: a clear error."""
    if not has_cpu_kernel(OP):
        pytest.skip("needs the compiled CPU kernel of sparsekern::sparse_linear (torch.ops.sparsekern.*)")
    W = random_sparse((4, 5), 0.5, torch.float32, gen(33))
    x = torch.randn(2, 5, requires_grad=True)
    y = torch.ops.sparsekern.sparse_linear(x, W.values, W.row_ptr, W.col_idx)
    with pytest.raises(RuntimeError, match=r"sparse_linear: the gradient of x needs W's transpose"):
        y.sum().backward()


# -- bad input ---------------------------------------------------------------------------

def _W(dtype=torch.float32, shape=(3, 4)):
    return random_sparse(shape, 0.5, dtype, gen(34))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 4), _W().to_dense(), None), TypeError,
         r"sparse_linear: W must be a sparsekern.SparseMatrix"),
        (lambda: (torch.randn(2, 4), _W(shape=(3, 1, 2, 2)), None), ValueError,
         r"sparse_linear: W must be a 2-D \(out_features, in_features\) matrix"),
        (lambda: (torch.randn(2, 5), _W(), None), ValueError,
         r"sparse_linear: x must have last dim 4 \(W has 4 columns\), got shape \(2, 5\)"),
        (lambda: (torch.tensor(1.0), _W(), None), ValueError, r"sparse_linear: x must have last dim 4"),
        (lambda: (torch.ones(2, 4, dtype=torch.int64), _W(), None), TypeError,
         r"sparse_linear: x must be a floating-point tensor, got torch.int64"),
        (lambda: (torch.randn(2, 4), _W(), torch.randn(1, 3)), ValueError, r"sparse_linear: bias must be 1-D"),
        (lambda: (torch.randn(2, 4), _W(), torch.randn(4)), ValueError,
         r"sparse_linear: bias must have 3 entries \(W has 3 rows\), got 4"),
        (lambda: (torch.randn(2, 4), _W(), torch.randn(3, dtype=torch.float64)), TypeError,
         r"sparse_linear: bias has dtype torch.float64 but x has torch.float32"),
        (lambda: (torch.randn(2, 4, dtype=torch.float64), _W(), None), TypeError,
         r"sparse_linear: W.values has dtype torch.float32 but x has torch.float64"),
        (lambda: (torch.randn(2, 4, device="meta"), _W(), None), ValueError,
         r"sparse_linear: W.values is on cpu but x is on meta"),
        (lambda: (torch.randn(2, 4), _W(), torch.randn(3, device="meta")), ValueError,
         r"sparse_linear: bias is on meta but x is on cpu"),
        (lambda: ([[1.0] * 4], _W(), None), TypeError, r"sparse_linear: x must be a torch.Tensor, got list"),
    ],
    ids=["W-dense", "W-4d", "x-lastdim", "x-0d", "x-int", "bias-2d", "bias-size", "bias-dtype", "W-dtype", "x-device",
         "bias-device", "x-list"],
)
def test_bad_input(backend, make, exc, match):
    x, W, bias = make()
    with pytest.raises(exc, match=match):
        sparse_linear(x, W, bias)


def test_float16_on_cpp_is_a_type_error():
    # bfloat16 runs on the CPU kernels (tests/ops/test_autocast.py); float16 does not.
    x = torch.randn(2, 4, dtype=torch.float16)
    with sparsekern.backend("cpp"):
        with pytest.raises(TypeError, match=r"sparse_linear: x has dtype torch.float16, which the cpp backend"):
            sparse_linear(x, _W(torch.float16))


# -- property-based fuzz -----------------------------------------------------------------

@pytest.mark.kernels(*BACKWARD)
@FUZZ
@given(m=st.integers(0, 7), k=st.integers(0, 19), batch=st.lists(st.integers(0, 3), min_size=0, max_size=2),
       density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), empty_rows=st.booleans(), with_bias=st.booleans(),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2 ** 16))
def test_fuzz(backend, m, k, batch, density, empty_rows, with_bias, dtype, layout, seed):
    g = gen(seed)
    W = random_sparse((m, k), density, dtype, g, empty_rows, layout, requires_grad=True)
    x = make_input(tuple(batch) + (k,), dtype, g, layout, requires_grad=True)
    bias = make_input((m,), dtype, g, requires_grad=True) if with_bias else None
    y = sparse_linear(x, W, bias)
    expected = _ref(x, W, bias)
    assert_close(y, expected, scale=k)
    grad_out = make_input(y.shape, dtype, g)
    inputs = [x, W.values] + ([bias] if with_bias else [])
    for got, exp in zip(grads(y, inputs, grad_out), grads(expected, inputs, grad_out)):
        assert_close(got, exp, scale=max(k, m, 1) * 4)
