"""spmm: out = A @ B, every available backend against sparsekern.reference.spmm."""
import pytest
import torch
from hypothesis import given, strategies as st

import sparsekern
from sparsekern import reference
from sparsekern.ops import spmm

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
    threads as threads_of,
)

OP = "spmm"
BACKWARD = ("spmm", "sddmm")


def _ref(A, B):
    return reference.spmm(A.values, A.row_ptr, A.col_idx, B)


def test_forward(backend, mkn, sparsity, dtype, layout):
    m, k, n = mkn
    density, empty_rows = sparsity
    g = gen(seed_of(OP, mkn, sparsity, dtype, layout))
    A = random_sparse((m, k), density, dtype, g, empty_rows, layout)
    B = make_input((k, n), dtype, g, layout)
    A_values, B_before = A.values.clone(), B.clone()
    out = spmm(A, B)
    assert_close(out, _ref(A, B), scale=k)
    assert torch.equal(A.values, A_values) and torch.equal(B, B_before), "spmm modified its inputs"
    # The oracle itself against the dense product.
    torch.testing.assert_close(_ref(A, B), A.to_dense() @ B, **{"rtol": 1e-4, "atol": 1e-5 * max(k, 1)})


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)  # the C++ kernel's tiling; the reference has none
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_operand_beyond_l2(backend, dtype, threads, layout):
    """B packed into 10-20 batch tiles of 2304 rows (2.9-5.9 MB, beyond L2): the CPU kernel runs each tile
    whole (every row) on one thread instead of row parts that each sweep every tile."""
    g = gen(seed_of(OP, "whole-tiles", dtype, threads, layout))
    A = random_sparse((40, 2304), 0.05, dtype, g, True, layout)
    B = make_input((2304, 320), dtype, g, layout)
    with threads_of(threads):
        out = spmm(A, B)
    assert_close(out, _ref(A, B), scale=2304)


@pytest.mark.parametrize("backend", ["cpp"], indirect=True)  # the C++ kernel's tiling; the reference has none
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("n", [560, 800, 1000])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_split_evenly_by_columns(backend, dtype, n, threads):
    """Batches of an odd number of tiles (800 = 12.5 tiles of 64 floats): each thread takes an equal share
    of the columns, whole tiles and a narrower last one, packed and run at that tile's own width."""
    g = gen(seed_of(OP, "column-shares", dtype, n, threads))
    A = random_sparse((48, 96), 0.1, dtype, g, True)
    B = make_input((96, n), dtype, g)
    with threads_of(threads):
        out = spmm(A, B)
    assert_close(out, _ref(A, B), scale=96)


@pytest.mark.kernels(*BACKWARD)
def test_backward(backend, mkn, sparsity, dtype, layout):
    m, k, n = mkn
    density, empty_rows = sparsity
    g = gen(seed_of(OP, "bw", mkn, sparsity, dtype, layout))
    A = random_sparse((m, k), density, dtype, g, empty_rows, layout, requires_grad=True)
    B = make_input((k, n), dtype, g, layout, requires_grad=True)
    out = spmm(A, B)
    grad_out = make_input(out.shape, dtype, g)
    d_values, d_B = grads(out, [A.values, B], grad_out)
    e_values, e_B = grads(_ref(A, B), [A.values, B], grad_out)
    assert_close(d_values, e_values, scale=n)
    assert_close(d_B, e_B, scale=m)


@pytest.mark.kernels(*BACKWARD)
@pytest.mark.parametrize("wrt", ["values", "B"])
def test_backward_one_input(backend, wrt, dtype):
    """Only one input requires grad: the other gradient is not computed, this one is still right."""
    g = gen(seed_of(OP, wrt, dtype))
    A = random_sparse((7, 10), 0.4, dtype, g, empty_rows=True, requires_grad=wrt == "values")
    B = make_input((10, 3), dtype, g, requires_grad=wrt == "B")
    x = A.values if wrt == "values" else B
    out = spmm(A, B)
    grad_out = make_input(out.shape, dtype, g)
    (got,) = grads(out, [x], grad_out)
    (exp,) = grads(_ref(A, B), [x], grad_out)
    assert_close(got, exp, scale=10)


@pytest.mark.kernels(*BACKWARD)
def test_gradcheck(backend):
    g = gen(11)
    A = random_sparse((4, 5), 0.5, torch.float64, g, empty_rows=True)
    values = A.values.detach().clone().requires_grad_(True)
    B = make_input((5, 3), torch.float64, g, "strided", requires_grad=True)
    assert A.row_ptr[2] == A.row_ptr[1]  # row 1 is empty
    assert torch.autograd.gradcheck(lambda v, b: spmm(A.with_values(v), b), (values, B))


def test_op_without_cached_transpose():
    """Calling the registered op directly (no t_* arguments): its backward builds the transpose."""
    missing = [op for op in BACKWARD if not has_cpu_kernel(op)]
    if missing:
        pytest.skip(f"needs the compiled CPU kernels of {missing} (torch.ops.sparsekern.*)")
    g = gen(12)
    A = random_sparse((6, 8), 0.5, torch.float64, g, empty_rows=True)
    values = A.values.detach().clone().requires_grad_(True)
    B = make_input((8, 4), torch.float64, g, requires_grad=True)
    out = torch.ops.sparsekern.spmm(values, A.row_ptr, A.col_idx, B)
    grad_out = make_input(out.shape, torch.float64, g)
    got = grads(out, [values, B], grad_out)
    exp = grads(reference.spmm(values, A.row_ptr, A.col_idx, B), [values, B], grad_out)
    for a, e in zip(got, exp):
        assert_close(a, e)


# -- bad input ---------------------------------------------------------------------------

def _A(dtype=torch.float32):
    return random_sparse((3, 4), 0.5, dtype, gen(13))


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (_A().to_dense(), torch.randn(4, 2)), TypeError,
         r"spmm: A must be a sparsekern.SparseMatrix, got Tensor"),
        (lambda: (_A(), torch.randn(4)), ValueError, r"spmm: B must be 2-D, got shape \(4,\)"),
        (lambda: (_A(), torch.randn(4, 2, 1)), ValueError, r"spmm: B must be 2-D"),
        (lambda: (_A(), torch.randn(5, 2)), ValueError, r"spmm: B must have 4 rows \(A is 3x4\), got 5"),
        (lambda: (_A(), torch.ones(4, 2, dtype=torch.int64)), TypeError,
         r"spmm: B must be a floating-point tensor, got torch.int64"),
        (lambda: (_A(torch.float64), torch.randn(4, 2)), TypeError,
         r"spmm: B has dtype torch.float32 but A.values has torch.float64"),
        (lambda: (_A(), torch.randn(4, 2, device="meta")), ValueError, r"spmm: B is on meta but A.values is on cpu"),
        (lambda: (_A(), [[1.0]] * 4), TypeError, r"spmm: B must be a torch.Tensor, got list"),
    ],
    ids=["A-dense", "B-1d", "B-3d", "B-rows", "B-int", "dtype-mismatch", "device-mismatch", "B-list"],
)
def test_bad_input(backend, make, exc, match):
    A, B = make()
    with pytest.raises(exc, match=match):
        spmm(A, B)


def test_float16_on_cpp_is_a_type_error():
    # bfloat16 runs on the CPU kernels (tests/ops/test_autocast.py); float16 does not.
    A = _A(torch.float16)
    B = torch.randn(4, 2, dtype=torch.float16)
    with sparsekern.backend("cpp"):  # the wrapper rejects the dtype before any kernel runs
        with pytest.raises(TypeError, match=r"spmm: B has dtype torch.float16, which the cpp backend does not support"):
            spmm(A, B)


def test_bfloat16_on_reference():
    A = _A(torch.bfloat16)
    B = torch.randn(4, 2, dtype=torch.bfloat16, generator=gen(14))
    with sparsekern.backend("reference"):
        out = spmm(A, B)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), A.to_dense().float() @ B.float(), rtol=2e-2, atol=2e-2)


# -- property-based fuzz -----------------------------------------------------------------

@pytest.mark.kernels(*BACKWARD)
@FUZZ
@given(m=st.integers(0, 7), k=st.integers(0, 19), n=st.integers(0, 5),
       density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), empty_rows=st.booleans(),
       dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2 ** 16))
def test_fuzz(backend, m, k, n, density, empty_rows, dtype, layout, seed):
    g = gen(seed)
    A = random_sparse((m, k), density, dtype, g, empty_rows, layout, requires_grad=True)
    B = make_input((k, n), dtype, g, layout, requires_grad=True)
    out = spmm(A, B)
    expected = _ref(A, B)
    assert_close(out, expected, scale=k)
    grad_out = make_input(out.shape, dtype, g)
    for got, exp, s in zip(grads(out, [A.values, B], grad_out), grads(expected, [A.values, B], grad_out), (n, m)):
        assert_close(got, exp, scale=s)
