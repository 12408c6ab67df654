"""masked_matmul (x @ (weight*mask)^T) and masked_sddmm ((X @ Y^T)*mask), every available backend
against sparsekern.reference."""
import pytest
import torch
from hypothesis import given, strategies as st

import sparsekern
from sparsekern import reference
from sparsekern.ops import masked_matmul, masked_sddmm

from sk_testing import DTYPES, FUZZ, LAYOUTS, assert_close, gen, grads, make_input, random_mask, seed_of

OP = "masked_matmul"
BACKWARD = ("masked_matmul", "masked_sddmm")


def _mask(shape, density, g, empty_rows, layout):
    """A bool mask, as a transposed view for the non-contiguous layouts."""
    mask = random_mask(shape, density, g, empty_rows)
    return mask if layout == "contiguous" else mask.t().contiguous().t()  # column-major view


# -- masked_matmul -----------------------------------------------------------------------

def test_forward(backend, mkn, sparsity, dtype, layout):
    m, k, n = mkn
    density, empty_rows = sparsity
    g = gen(seed_of(OP, mkn, sparsity, dtype, layout))
    mask = _mask((m, k), density, g, empty_rows, layout)
    weight = make_input((m, k), dtype, g, layout)
    x = make_input((n, k), dtype, g, layout)
    before = (x.clone(), weight.clone(), mask.clone())
    y = masked_matmul(x, weight, mask)
    assert_close(y, reference.masked_matmul(x, weight, mask), scale=k)
    assert all(torch.equal(a, b) for a, b in zip((x, weight, mask), before)), "masked_matmul modified its inputs"
    torch.testing.assert_close(reference.masked_matmul(x, weight, mask), x @ (weight * mask).t(),
                               rtol=1e-4, atol=1e-5 * max(k, 1))


def test_weight_outside_mask_is_ignored(backend, dtype):
    """Values outside the mask (even inf/NaN) never reach the output."""
    g = gen(41)
    mask = random_mask((6, 9), 0.5, g, empty_rows=True)
    weight = make_input((6, 9), dtype, g)
    poisoned = weight.masked_fill(~mask, float("nan"))
    x = make_input((4, 9), dtype, g)
    y = masked_matmul(x, poisoned, mask)
    assert not torch.isnan(y).any()
    assert_close(y, reference.masked_matmul(x, weight, mask), scale=9)


@pytest.mark.kernels(*BACKWARD)
def test_backward(backend, mkn, sparsity, dtype, layout):
    m, k, n = mkn
    density, empty_rows = sparsity
    g = gen(seed_of(OP, "bw", mkn, sparsity, dtype, layout))
    mask = _mask((m, k), density, g, empty_rows, layout)
    weight = make_input((m, k), dtype, g, layout, requires_grad=True)
    x = make_input((n, k), dtype, g, layout, requires_grad=True)
    y = masked_matmul(x, weight, mask)
    grad_out = make_input(y.shape, dtype, g)
    d_x, d_w = grads(y, [x, weight], grad_out)
    e_x, e_w = grads(reference.masked_matmul(x, weight, mask), [x, weight], grad_out)
    assert_close(d_x, e_x, scale=m)
    assert_close(d_w, e_w, scale=n)
    assert torch.equal(d_w[~mask], torch.zeros_like(d_w[~mask])), "weight gradient is nonzero outside the mask"


@pytest.mark.kernels(*BACKWARD)
@pytest.mark.parametrize("x_shape", [(9,), (2, 3, 9), (0, 9), (3, 0, 9)], ids=str)
def test_leading_batch_dims(backend, x_shape, dtype):
    g = gen(seed_of(OP, x_shape, dtype))
    mask = random_mask((5, 9), 0.5, g, empty_rows=True)
    weight = make_input((5, 9), dtype, g, requires_grad=True)
    x = make_input(x_shape, dtype, g, "strided", requires_grad=True)
    y = masked_matmul(x, weight, mask)
    assert y.shape == x_shape[:-1] + (5,)
    expected = reference.masked_matmul(x, weight, mask)
    assert_close(y, expected, scale=9)
    grad_out = make_input(y.shape, dtype, g)
    for got, exp in zip(grads(y, [x, weight], grad_out), grads(expected, [x, weight], grad_out)):
        assert_close(got, exp, scale=9)


@pytest.mark.kernels(*BACKWARD)
def test_gradcheck(backend):
    g = gen(42)
    mask = random_mask((4, 5), 0.5, g, empty_rows=True)
    weight = make_input((4, 5), torch.float64, g, requires_grad=True)
    x = make_input((3, 5), torch.float64, g, "transposed", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_, w: masked_matmul(x_, w, mask), (x, weight))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 4), torch.randn(4), torch.ones(4, dtype=torch.bool)), ValueError,
         r"masked_matmul: weight must be 2-D"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.ones(3, 4)), TypeError,
         r"masked_matmul: mask must be a bool tensor, got torch.float32"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.ones(4, 3, dtype=torch.bool)), ValueError,
         r"masked_matmul: mask shape \(4, 3\) must equal weight shape \(3, 4\)"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool, device="meta")), ValueError,
         r"masked_matmul: mask is on meta but weight is on cpu"),
        (lambda: (torch.randn(2, 5), torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool)), ValueError,
         r"masked_matmul: x must have last dim 4 \(weight has 4 columns\), got shape \(2, 5\)"),
        (lambda: (torch.tensor(1.0), torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool)), ValueError,
         r"masked_matmul: x must have last dim 4"),
        (lambda: (torch.ones(2, 4, dtype=torch.int32), torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool)),
         TypeError, r"masked_matmul: x must be a floating-point tensor, got torch.int32"),
        (lambda: (torch.randn(2, 4), torch.ones(3, 4, dtype=torch.int64), torch.ones(3, 4, dtype=torch.bool)),
         TypeError, r"masked_matmul: weight has dtype torch.int64 but x has torch.float32"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.bool)),
         TypeError, r"masked_matmul: weight has dtype torch.float64 but x has torch.float32"),
        (lambda: (torch.randn(2, 4, device="meta"), torch.randn(3, 4), torch.ones(3, 4, dtype=torch.bool)), ValueError,
         r"masked_matmul: weight is on cpu but x is on meta"),
        (lambda: (torch.randn(2, 4), "w", torch.ones(3, 4, dtype=torch.bool)), TypeError,
         r"masked_matmul: weight must be a torch.Tensor, got str"),
    ],
    ids=["weight-1d", "mask-float", "mask-shape", "mask-device", "x-lastdim", "x-0d", "x-int", "weight-int",
         "dtype-mismatch", "x-device", "weight-str"],
)
def test_bad_input(backend, make, exc, match):
    x, weight, mask = make()
    with pytest.raises(exc, match=match):
        masked_matmul(x, weight, mask)


def test_float16_on_cpp_is_a_type_error():
    # bfloat16 runs on the CPU kernels (tests/ops/test_autocast.py); float16 does not.
    x, w = torch.randn(2, 4, dtype=torch.float16), torch.randn(3, 4, dtype=torch.float16)
    with sparsekern.backend("cpp"):
        with pytest.raises(TypeError, match=r"masked_matmul: x has dtype torch.float16, which the cpp backend"):
            masked_matmul(x, w, torch.ones(3, 4, dtype=torch.bool))


# -- masked_sddmm ------------------------------------------------------------------------

@pytest.mark.kernels("masked_sddmm")
def test_sddmm_forward(backend, mkn, sparsity, dtype, layout):
    m, k, d = mkn
    density, empty_rows = sparsity
    g = gen(seed_of("masked_sddmm", mkn, sparsity, dtype, layout))
    mask = _mask((m, k), density, g, empty_rows, layout)
    X = make_input((m, d), dtype, g, layout)
    Y = make_input((k, d), dtype, g, layout)
    out = masked_sddmm(X, Y, mask)
    assert_close(out, reference.masked_sddmm(X, Y, mask), scale=d)
    # Exactly 0 outside the mask (not merely small).
    assert torch.equal(out[~mask], torch.zeros_like(out[~mask]))
    torch.testing.assert_close(reference.masked_sddmm(X, Y, mask), (X @ Y.t()) * mask, rtol=1e-4,
                               atol=1e-5 * max(d, 1))


@pytest.mark.kernels(*BACKWARD)
def test_sddmm_backward(backend, mkn, sparsity, dtype, layout):
    m, k, d = mkn
    density, empty_rows = sparsity
    g = gen(seed_of("masked_sddmm", "bw", mkn, sparsity, dtype, layout))
    mask = _mask((m, k), density, g, empty_rows, layout)
    X = make_input((m, d), dtype, g, layout, requires_grad=True)
    Y = make_input((k, d), dtype, g, layout, requires_grad=True)
    out = masked_sddmm(X, Y, mask)
    grad_out = make_input(out.shape, dtype, g, layout)
    d_X, d_Y = grads(out, [X, Y], grad_out)
    e_X, e_Y = grads(reference.masked_sddmm(X, Y, mask), [X, Y], grad_out)
    assert_close(d_X, e_X, scale=k)
    assert_close(d_Y, e_Y, scale=m)


@pytest.mark.kernels(*BACKWARD)
def test_sddmm_gradcheck(backend):
    g = gen(43)
    mask = random_mask((4, 5), 0.5, g, empty_rows=True)
    X = make_input((4, 3), torch.float64, g, requires_grad=True)
    Y = make_input((5, 3), torch.float64, g, "strided", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: masked_sddmm(a, b, mask), (X, Y))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(3), torch.randn(4, 2), torch.ones(3, 4, dtype=torch.bool)), ValueError,
         r"masked_sddmm: X must be 2-D"),
        (lambda: (torch.randn(3, 2), torch.randn(4, 2, 1), torch.ones(3, 4, dtype=torch.bool)), ValueError,
         r"masked_sddmm: Y must be 2-D"),
        (lambda: (torch.randn(3, 2), torch.randn(4, 2), torch.ones(12, dtype=torch.bool)), ValueError,
         r"masked_sddmm: mask must be 2-D"),
        (lambda: (torch.randn(3, 2), torch.randn(4, 2), torch.ones(3, 4, dtype=torch.uint8)), TypeError,
         r"masked_sddmm: mask must be a bool tensor, got torch.uint8"),
        (lambda: (torch.randn(3, 2), torch.randn(4, 2), torch.ones(4, 3, dtype=torch.bool)), ValueError,
         r"masked_sddmm: mask must have shape \(3, 4\), got \(4, 3\)"),
        (lambda: (torch.randn(3, 2), torch.randn(4, 3), torch.ones(3, 4, dtype=torch.bool)), ValueError,
         r"masked_sddmm: X and Y must have the same number of columns, got 2 and 3"),
        (lambda: (torch.ones(3, 2, dtype=torch.int64), torch.ones(4, 2, dtype=torch.int64),
                  torch.ones(3, 4, dtype=torch.bool)),
         TypeError, r"masked_sddmm: X must be a floating-point tensor, got torch.int64"),
        (lambda: (torch.randn(3, 2), torch.randn(4, 2, dtype=torch.float64), torch.ones(3, 4, dtype=torch.bool)),
         TypeError, r"masked_sddmm: Y has dtype torch.float64 but X has torch.float32"),
        (lambda: (torch.randn(3, 2), torch.randn(4, 2, device="meta"), torch.ones(3, 4, dtype=torch.bool)), ValueError,
         r"masked_sddmm: Y is on meta but X is on cpu"),
    ],
    ids=["X-1d", "Y-3d", "mask-1d", "mask-uint8", "mask-shape", "cols-mismatch", "int", "dtype-mismatch", "device"],
)
def test_sddmm_bad_input(backend, make, exc, match):
    X, Y, mask = make()
    with pytest.raises(exc, match=match):
        masked_sddmm(X, Y, mask)


def test_sddmm_float16_on_cpp_is_a_type_error():
    # bfloat16 runs on the CPU kernels (tests/ops/test_autocast.py); float16 does not.
    X, Y = torch.randn(3, 2, dtype=torch.float16), torch.randn(4, 2, dtype=torch.float16)
    with sparsekern.backend("cpp"):
        with pytest.raises(TypeError, match=r"masked_sddmm: X has dtype torch.float16, which the cpp backend"):
            masked_sddmm(X, Y, torch.ones(3, 4, dtype=torch.bool))


# -- property-based fuzz -----------------------------------------------------------------

@pytest.mark.kernels(*BACKWARD)
@FUZZ
@given(m=st.integers(0, 7), k=st.integers(0, 17), n=st.integers(0, 5),
       density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), empty_rows=st.booleans(),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2 ** 16))
def test_fuzz(backend, m, k, n, density, empty_rows, dtype, layout, seed):
    g = gen(seed)
    mask = _mask((m, k), density, g, empty_rows, layout)
    weight = make_input((m, k), dtype, g, layout, requires_grad=True)
    x = make_input((n, k), dtype, g, layout, requires_grad=True)
    y = masked_matmul(x, weight, mask)
    expected = reference.masked_matmul(x, weight, mask)
    assert_close(y, expected, scale=k)
    grad_out = make_input(y.shape, dtype, g)
    for got, exp in zip(grads(y, [x, weight], grad_out), grads(expected, [x, weight], grad_out)):
        assert_close(got, exp, scale=max(m, n, 1))
    # masked_sddmm on the same mask: X (m, n), Y (k, n).
    X = make_input((m, n), dtype, g, layout, requires_grad=True)
    Y = make_input((k, n), dtype, g, layout, requires_grad=True)
    out = masked_sddmm(X, Y, mask)
    expected = reference.masked_sddmm(X, Y, mask)
    assert_close(out, expected, scale=n)
    grad_out = make_input(out.shape, dtype, g)
    for got, exp in zip(grads(out, [X, Y], grad_out), grads(expected, [X, Y], grad_out)):
        assert_close(got, exp, scale=max(m, k, 1))
