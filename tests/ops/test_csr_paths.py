"""The CPU CSR engine's ways through a product, against the reference. The gather path: SpMM and SDDMM whose
pattern has few nonzeros per column of the dense operand (a classifier head: 10 x 1024 at density 0.1,
512 -> 2) read that operand's batch items where they lie (x's rows) instead of packing it; shapes on both
sides of the switch (a fraction of a nonzero per column, and many), every dtype, batch sizes around its
8-item passes, empty rows, bias, a NaN/Inf in x, and the gradients. Whole tiles (each thread packing its
own batch tiles) and row parts (over an operand packed whole): batch widths of 1 to 18 tiles on 1 and 2 threads."""
import pytest
import torch

import sparsekern
from sparsekern import reference
from sparsekern.ops import sddmm, sparse_linear, spmm

from sk_testing import assert_close, gen, has_cpu_kernel, make_input, random_sparse, seed_of, threads

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# (m, k, density): 0.05-0.4 nonzeros per column of x (the gather path), then 12-24 (the packed tiles).
SHAPES = ((2, 96, 0.1), (10, 128, 0.04), (3, 200, 0.05), (1, 64, 0.4), (48, 40, 0.25), (96, 64, 0.25))
BATCHES = (1, 7, 8, 9, 37)


@pytest.fixture(autouse=True)
def cpp_backend():
    for op in ("spmm", "sddmm", "sparse_linear"):
        if not has_cpu_kernel(op):
            pytest.skip(f"needs the compiled CPU kernel of {op}")
    with sparsekern.backend("cpp"):
        yield


@pytest.mark.parametrize("empty_rows", (False, True))
@pytest.mark.parametrize("bias", (False, True))
@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "m{}k{}d{}".format(*s))
def test_sparse_linear_and_weight_gradient(shape, dtype, n, bias, empty_rows):
    m, k, density = shape
    g = gen(seed_of("gather-linear", shape, dtype, n, bias, empty_rows))
    W = random_sparse((m, k), density, dtype, g, empty_rows)
    x = make_input((n, k), dtype, g)
    b = make_input((m,), dtype, g) if bias else None
    assert_close(sparse_linear(x, W, b), reference.sparse_linear(x, W.values, W.row_ptr, W.col_idx, b), scale=k)
    # The weight gradient as sparse_linear's backward asks for it: X = grad^T, Y = x^T (batch items contiguous).
    grad = make_input((n, m), dtype, g)
    got = sddmm(W, grad.t(), x.t())
    assert_close(got, reference.sddmm(W.row_ptr, W.col_idx, grad.t(), x.t()), scale=n)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "strided"))
def test_spmm_and_sddmm_over_column_major_operands(dtype, layout):
    """B (k, n) and Y (k, n) as transposed views, X in any layout: the path reads each batch item in place."""
    g = gen(seed_of("gather-views", dtype, layout))
    m, k, n = 4, 150, 21
    W = random_sparse((m, k), 0.1, dtype, g)
    B = make_input((n, k), dtype, g).t()
    assert_close(spmm(W, B), reference.spmm(W.values, W.row_ptr, W.col_idx, B), scale=k)
    X = make_input((m, n), dtype, g, layout)
    assert_close(sddmm(W, X, B), reference.sddmm(W.row_ptr, W.col_idx, X, B), scale=n)


@pytest.mark.parametrize("nthreads", (1, 2))
def test_results_do_not_depend_on_the_thread_count(nthreads):
    g = gen(seed_of("gather-threads"))
    m, k, n = 10, 1024, 300  # 0.5 nonzeros per column of x (both products gather), enough work to run in parallel
    W = random_sparse((m, k), 0.05, torch.float32, g)
    x = make_input((n, k), torch.float32, g)
    grad = make_input((n, m), torch.float32, g)
    with threads(1):
        y1, v1 = sparse_linear(x, W), sddmm(W, grad.t(), x.t())
    with threads(nthreads):
        y2, v2 = sparse_linear(x, W), sddmm(W, grad.t(), x.t())
    assert torch.equal(y1, y2) and torch.equal(v1, v2)


def test_a_nonfinite_input_reaches_only_the_outputs_that_read_it():
    g = gen(seed_of("gather-nonfinite"))
    m, k, n = 3, 200, 9
    W = random_sparse((m, k), 0.05, torch.float32, g)
    x = make_input((n, k), torch.float32, g)
    stored = W.col_idx.long()
    unread = sorted(set(range(k)) - set(stored.tolist()))[0]
    expected = reference.sparse_linear(x, W.values, W.row_ptr, W.col_idx)
    readers = torch.repeat_interleave(torch.arange(m), W.row_ptr.diff())[W.col_idx.long() == stored[0]]
    expected[0, readers] = float("nan")
    x[0, stored[0]] = float("nan")
    x[1, unread] = float("inf")
    got = sparse_linear(x, W)
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert torch.isfinite(got[1:]).all()


@pytest.mark.parametrize("shape", ((2, 24, 0.1), (6, 20, 0.05)), ids=lambda s: "m{}k{}d{}".format(*s))
def test_gradcheck(shape):
    m, k, density = shape
    g = gen(seed_of("gather-gradcheck", shape))
    W = random_sparse((m, k), density, torch.float64, g, requires_grad=True)
    x = make_input((5, k), torch.float64, g, requires_grad=True)
    b = make_input((m,), torch.float64, g, requires_grad=True)

    def f(x, values, b):
        return sparse_linear(x, W.with_values(values), b)

    assert torch.autograd.gradcheck(f, (x, W.values, b))


@pytest.mark.parametrize("nthreads", (1, 2))
@pytest.mark.parametrize("n", (16, 64, 79, 128, 192, 200, 256, 576))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_whole_tiles_and_row_parts(dtype, n, nthreads):
    """Tiles are 32-64 elements wide, so these batches give 1-18 tiles: spread evenly over 2 threads or not. x's
    45 features and batches of 79 and 200 leave both edges of the packing's 16 x 16 transposes."""
    g = gen(seed_of("csr-modes", dtype, n))
    m, k = 70, 45
    W = random_sparse((m, k), 0.3, dtype, g, empty_rows=True)
    x = make_input((n, k), dtype, g)
    b = make_input((m,), dtype, g)
    grad = make_input((n, m), dtype, g)
    with threads(nthreads):
        y = sparse_linear(x, W, b)
        v = sddmm(W, grad.t(), x.t())
    assert_close(y, reference.sparse_linear(x, W.values, W.row_ptr, W.col_idx, b), scale=k)
    assert_close(v, reference.sddmm(W.row_ptr, W.col_idx, grad.t(), x.t()), scale=n)
