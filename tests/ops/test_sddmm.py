"""sddmm: values[p] = dot(X[i], Y[j]) at the pattern, every available backend against the reference."""
import pytest
import torch
from hypothesis import given, strategies as st

import sparsekern
from sparsekern import reference
from sparsekern.ops import sddmm

from sk_testing import (
    DTYPES,
    FUZZ,
    LAYOUTS,
    assert_close,
    gen,
    grads,
    make_input,
    random_sparse,
    seed_of,
    threads as threads_of,
)

OP = "sddmm"
BACKWARD = ("sddmm", "spmm")


def _ref(P, X, Y):
    return reference.sddmm(P.row_ptr, P.col_idx, X, Y)


def test_forward(backend, mkn, sparsity, dtype, layout):
    # Pattern (m, k); X (m, d), Y (k, d) with d = n (the inner dimension of the dot products).
    m, k, d = mkn
    density, empty_rows = sparsity
    g = gen(seed_of(OP, mkn, sparsity, dtype, layout))
    P = random_sparse((m, k), density, dtype, g, empty_rows)
    X = make_input((m, d), dtype, g, layout)
    Y = make_input((k, d), dtype, g, layout)
    X_before, Y_before = X.clone(), Y.clone()
    out = sddmm(P, X, Y)
    assert out.shape == (P.nnz,)
    assert_close(out, _ref(P, X, Y), scale=d)
    assert torch.equal(X, X_before) and torch.equal(Y, Y_before), "sddmm modified its inputs"
    # The oracle against the dense product sampled at the pattern.
    torch.testing.assert_close(_ref(P, X, Y), (X @ Y.t())[P.mask()], rtol=1e-4, atol=1e-5 * max(d, 1))


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)  # the C++ kernel's tiling; the reference has none
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_operand_beyond_l2(backend, dtype, threads, layout):
    """Y packed into 10-20 batch tiles of 2304 rows (2.9-5.9 MB, beyond L2): on 2 threads each takes a run
    of whole tiles and sums its share of the inner dimension into its own values, added up at the end."""
    g = gen(seed_of(OP, "whole-tiles", dtype, threads, layout))
    P = random_sparse((40, 2304), 0.05, dtype, g, True)
    X = make_input((40, 320), dtype, g, layout)
    Y = make_input((2304, 320), dtype, g, layout)
    with threads_of(threads):
        out = sddmm(P, X, Y)
    assert_close(out, _ref(P, X, Y), scale=320)


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)  # the C++ kernel's tiling; the reference has none
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("d", [560, 800, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inner_dimension_split_evenly_by_columns(backend, dtype, d, threads):
    """An inner dimension of an odd number of tiles: each thread sums an equal share of it (whole tiles and a
    narrower last one) into its own values."""
    g = gen(seed_of(OP, "column-shares", dtype, d, threads))
    P = random_sparse((48, 96), 0.1, dtype, g, True)
    X = make_input((48, d), dtype, g)
    Y = make_input((96, d), dtype, g)
    with threads_of(threads):
        out = sddmm(P, X, Y)
    assert_close(out, _ref(P, X, Y), scale=d)


@pytest.mark.kernels(*BACKWARD)
def test_backward(backend, mkn, sparsity, dtype, layout):
    m, k, d = mkn
    density, empty_rows = sparsity
    g = gen(seed_of(OP, "bw", mkn, sparsity, dtype, layout))
    P = random_sparse((m, k), density, dtype, g, empty_rows)
    X = make_input((m, d), dtype, g, layout, requires_grad=True)
    Y = make_input((k, d), dtype, g, layout, requires_grad=True)
    out = sddmm(P, X, Y)
    grad_out = make_input(out.shape, dtype, g)
    d_X, d_Y = grads(out, [X, Y], grad_out)
    e_X, e_Y = grads(_ref(P, X, Y), [X, Y], grad_out)
    assert_close(d_X, e_X, scale=k)
    assert_close(d_Y, e_Y, scale=m)


@pytest.mark.kernels(*BACKWARD)
@pytest.mark.parametrize("wrt", ["X", "Y"])
def test_backward_one_input(backend, wrt, dtype):
    g = gen(seed_of(OP, wrt, dtype))
    P = random_sparse((6, 9), 0.4, dtype, g, empty_rows=True)
    X = make_input((6, 4), dtype, g, requires_grad=wrt == "X")
    Y = make_input((9, 4), dtype, g, requires_grad=wrt == "Y")
    x = X if wrt == "X" else Y
    out = sddmm(P, X, Y)
    grad_out = make_input(out.shape, dtype, g)
    (got,) = grads(out, [x], grad_out)
    (exp,) = grads(_ref(P, X, Y), [x], grad_out)
    assert_close(got, exp, scale=9)


@pytest.mark.kernels(*BACKWARD)
def test_gradcheck(backend):
    g = gen(21)
    P = random_sparse((4, 5), 0.5, torch.float64, g, empty_rows=True)
    X = make_input((4, 3), torch.float64, g, "transposed", requires_grad=True)
    Y = make_input((5, 3), torch.float64, g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: sddmm(P, x, y), (X, Y))


# -- bad input ---------------------------------------------------------------------------

def _P():
    return random_sparse((3, 4), 0.5, torch.float32, gen(22))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (_P().to_dense(), torch.randn(3, 2), torch.randn(4, 2)), TypeError,
         r"sddmm: pattern must be a sparsekern.SparseMatrix"),
        (lambda: (_P(), torch.randn(3), torch.randn(4, 2)), ValueError, r"sddmm: X must be 2-D"),
        (lambda: (_P(), torch.randn(3, 2), torch.randn(4, 2, 1)), ValueError, r"sddmm: Y must be 2-D"),
        (lambda: (_P(), torch.randn(2, 2), torch.randn(4, 2)), ValueError,
         r"sddmm: X must have 3 rows \(pattern is 3x4\), got 2"),
        (lambda: (_P(), torch.randn(3, 2), torch.randn(5, 2)), ValueError,
         r"sddmm: Y must have 4 rows \(pattern is 3x4\), got 5"),
        (lambda: (_P(), torch.randn(3, 2), torch.randn(4, 3)), ValueError,
         r"sddmm: X and Y must have the same number of columns, got 2 and 3"),
        (lambda: (_P(), torch.ones(3, 2, dtype=torch.int32), torch.ones(4, 2, dtype=torch.int32)), TypeError,
         r"sddmm: X must be a floating-point tensor, got torch.int32"),
        (lambda: (_P(), torch.randn(3, 2), torch.randn(4, 2, dtype=torch.float64)), TypeError,
         r"sddmm: Y has dtype torch.float64 but X has torch.float32"),
        (lambda: (_P(), torch.randn(3, 2), torch.randn(4, 2, device="meta")), ValueError,
         r"sddmm: Y is on meta but X is on cpu"),
        (lambda: (_P(), torch.randn(3, 2, device="meta"), torch.randn(4, 2, device="meta")), ValueError,
         r"sddmm: pattern is on cpu but X is on meta"),
    ],
    ids=["pattern-dense", "X-1d", "Y-3d", "X-rows", "Y-rows", "cols-mismatch", "int", "dtype-mismatch",
         "device-mismatch", "pattern-device"],
)
def test_bad_input(backend, make, exc, match):
    P, X, Y = make()
    with pytest.raises(exc, match=match):
        sddmm(P, X, Y)


def test_float16_on_cpp_is_a_type_error():
    # bfloat16 runs on the CPU kernels (tests/ops/test_autocast.py); float16 does not.
    X, Y = torch.randn(3, 2, dtype=torch.float16), torch.randn(4, 2, dtype=torch.float16)
    with sparsekern.backend("cpp"):
        match = r"sddmm: X has dtype torch.float16, which the cpp backend does not support"
        with pytest.raises(TypeError, match=match):
            sddmm(_P(), X, Y)


# -- property-based fuzz -----------------------------------------------------------------

@pytest.mark.kernels(*BACKWARD)
@FUZZ
@given(m=st.integers(0, 7), k=st.integers(0, 19), d=st.integers(0, 6),
       density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), empty_rows=st.booleans(),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2 ** 16))
def test_fuzz(backend, m, k, d, density, empty_rows, dtype, layout, seed):
    g = gen(seed)
    P = random_sparse((m, k), density, dtype, g, empty_rows)
    X = make_input((m, d), dtype, g, layout, requires_grad=True)
    Y = make_input((k, d), dtype, g, layout, requires_grad=True)
    out = sddmm(P, X, Y)
    expected = _ref(P, X, Y)
    assert_close(out, expected, scale=d)
    grad_out = make_input(out.shape, dtype, g)
    for got, exp, s in zip(grads(out, [X, Y], grad_out), grads(expected, [X, Y], grad_out), (k, m)):
        assert_close(got, exp, scale=s)
