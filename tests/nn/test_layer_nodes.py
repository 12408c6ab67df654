"""The extension's private layer nodes (csrc/cpu/dense_kernel.cpp, csr_nodes.cpp) reject bad arguments with an
error naming them, before writing anything; the layers only call them with checked inputs."""
import pytest
import torch

from sparsekern.ops import dispatch

from sk_testing import threads

pytestmark = pytest.mark.skipif(not dispatch.extension_loaded, reason="no compiled extension")


def _csr(rows, cols, density=0.5, seed=0):
    mask = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) < density
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), mask.sum(1).cumsum(0)])
    col_idx = mask.nonzero()[:, 1].to(torch.int32)
    return row_ptr, col_idx


def _dense_kernel(x, values, row_ptr, col_idx, weight, geometry=([], [], []), check=True):
    return torch.ops.sparsekern._dense_kernel(x, values, None, row_ptr, col_idx, None, None, None, weight,
                                              *geometry, check)


def test_dense_kernel_matches_the_dense_op_and_reports_non_finite_outputs():
    row_ptr, col_idx = _csr(4, 6)
    values = torch.randn(col_idx.numel())
    weight = torch.zeros(4, 6)
    x = torch.randn(3, 6)
    y, finite = _dense_kernel(x, values, row_ptr, col_idx, weight)
    dense = torch.zeros(4, 6)
    dense[torch.repeat_interleave(torch.arange(4), row_ptr.diff()), col_idx.long()] = values
    torch.testing.assert_close(y, x @ dense.t())
    assert finite
    torch.testing.assert_close(weight, dense)  # the buffer holds the scattered weight
    x[1, 2] = float("nan")
    assert not _dense_kernel(x, values, row_ptr, col_idx, weight)[1]
    assert _dense_kernel(x, values, row_ptr, col_idx, weight, check=False)[1]  # unchecked: reported finite


@pytest.mark.parametrize("bad,match", [
    ("values", "values must be 1-D with nnz"),
    ("row_ptr", "row_ptr has"),
    ("col_idx", "col_idx"),
    ("weight_dim", "weight must be 2-D"),
    ("geometry", "stride, padding and dilation"),
    ("dtype", "one dtype"),
])
def test_dense_kernel_rejects_bad_arguments(bad, match):
    row_ptr, col_idx = _csr(4, 6)
    values, weight, x, geometry = torch.randn(col_idx.numel()), torch.zeros(4, 6), torch.randn(3, 6), ([], [], [])
    if bad == "values":
        values = torch.randn(col_idx.numel() + 1)
    elif bad == "row_ptr":
        row_ptr = row_ptr[:-1]
    elif bad == "col_idx":
        col_idx = col_idx.clone()
        col_idx[-1] = 6  # out of range for 6 columns
    elif bad == "weight_dim":
        weight = torch.zeros(4, 6, 1)
    elif bad == "geometry":
        geometry = ([1, 1], [0, 0], [1, 1])
    elif bad == "dtype":
        values = values.double()
    before = weight.clone()
    with pytest.raises((ValueError, RuntimeError), match=match):
        _dense_kernel(x, values, row_ptr, col_idx, weight, geometry)
    if bad not in ("col_idx",):  # checked before the scatter writes: the buffer is untouched
        torch.testing.assert_close(weight, before)


def test_csr_nodes_agree_with_the_ops():
    from sparsekern.ops import sparse_linear, spmm
    from sparsekern.sparse_matrix import SparseMatrix
    row_ptr, col_idx = _csr(5, 7, seed=1)
    W = SparseMatrix(row_ptr, col_idx, torch.randn(col_idx.numel()), (5, 7))
    x = torch.randn(4, 7)
    bias = torch.randn(5)
    torch.testing.assert_close(
        torch.ops.sparsekern._sparse_linear_node(x, W.values, bias, row_ptr, col_idx, *W.transpose_pattern()),
        sparse_linear(x, W, bias))
    B = torch.randn(7, 3)
    torch.testing.assert_close(
        torch.ops.sparsekern._spmm_node(W.values, row_ptr, col_idx, B, *W.transpose_pattern()), spmm(W, B))
    torch.testing.assert_close(
        torch.ops.sparsekern._sparse_linear_relu_node(x, W.values, bias, row_ptr, col_idx, *W.transpose_pattern()),
        sparse_linear(x, W, bias).relu())
    for node in (torch.ops.sparsekern._sparse_linear_node, torch.ops.sparsekern._sparse_linear_relu_node):
        with pytest.raises((ValueError, RuntimeError), match="x has 6 columns"):
            node(torch.randn(4, 6), W.values, bias, row_ptr, col_idx, *W.transpose_pattern())


def _op_calls(fn):
    """How many times each op ran in fn() (torch.profiler)."""
    with torch.profiler.profile() as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages()}


@pytest.mark.parametrize("node", ["linear", "linear_relu", "spmm"])
def test_csr_nodes_gather_the_transposed_values_once_where_the_one_pass_backward_declines(node):
    """Where the one-pass backward declines (here: one batch tile for two threads) the input gradient and the
    values' gradient run apart: the transpose's values are gathered once for both, and the gradients match a float64
    dense product's."""
    from sparsekern.sparse_matrix import SparseMatrix
    g = torch.Generator().manual_seed(11)
    row_ptr, col_idx = _csr(96, 200, density=0.3, seed=3)
    values = torch.randn(col_idx.numel(), generator=g, requires_grad=True)
    W = SparseMatrix(row_ptr, col_idx, values, (96, 200))
    # The dense oracle: W scattered in float64 (index_put is differentiable in the values).
    values64 = values.detach().double().requires_grad_(True)
    rows = torch.repeat_interleave(torch.arange(96), row_ptr.diff())
    dense = torch.zeros(96 * 200, dtype=torch.float64).index_put((rows * 200 + col_idx.long(),), values64).view(96, 200)
    if node == "spmm":
        x = torch.randn(200, 3, generator=g, requires_grad=True)
        got = torch.ops.sparsekern._spmm_node(values, row_ptr, col_idx, x, *W.transpose_pattern())
        x64 = x.detach().double().requires_grad_(True)
        want = dense @ x64
    else:
        x = torch.randn(3, 200, generator=g, requires_grad=True)
        op = torch.ops.sparsekern._sparse_linear_node if node == "linear" else \
            torch.ops.sparsekern._sparse_linear_relu_node
        got = op(x, values, None, row_ptr, col_idx, *W.transpose_pattern())
        x64 = x.detach().double().requires_grad_(True)
        want = x64 @ dense.t()
        want = want.relu() if node == "linear_relu" else want
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-4)
    grad_out = torch.randn(got.shape, generator=g)
    grads = []
    with threads(2):
        calls = _op_calls(lambda: grads.extend(torch.autograd.grad(got, (x, values), grad_out)))
    assert calls.get("sparsekern::sddmm") == 1  # the products apart: the one-pass backward declined
    assert calls.get("sparsekern::gather") == 1
    for a, b in zip(grads, torch.autograd.grad(want, (x64, values64), grad_out.double())):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)
