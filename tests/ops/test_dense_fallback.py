"""The CPU CSR engine's dense fallback (a GEMM from density dense_above() = 0.6 on) gives the sparse
answer: a NaN or Inf in a dense operand reaches only the outputs whose nonzeros read it, at densities
below and above the threshold alike (as torch.sparse). Its threshold is a process-wide setting, taken
from SPARSEKERN_DENSE_ABOVE when sparsekern loads."""
import os
import subprocess
import sys

import pytest
import torch

import sparsekern
from sparsekern.ops import sparse_linear, spmm

from sk_testing import gen, has_cpu_kernel, make_input, random_sparse, seed_of, tol

BELOW, ABOVE = 0.1, 0.7  # densities on either side of the default threshold
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


@pytest.fixture(autouse=True)
def cpp_backend():
    for op in ("spmm", "sparse_linear"):
        if not has_cpu_kernel(op):
            pytest.skip(f"needs the compiled CPU kernel of {op}")
    assert BELOW < torch.ops.sparsekern._dense_above() <= ABOVE, "the densities must straddle the threshold"
    with sparsekern.backend("cpp"):
        yield


def _rows(W):
    return torch.repeat_interleave(torch.arange(W.m), W.row_ptr.diff())


def _sparse_product(W, B):
    """A @ B in float64 summing only the stored nonzeros (the implicit zeros read nothing)."""
    contrib = W.values.detach().double()[:, None] * B.detach().double()[W.col_idx.long()]
    return torch.zeros(W.m, B.shape[1], dtype=torch.float64).index_add_(0, _rows(W), contrib)


def _poison(t, g, count=3):
    """t (a view) with NaN, +Inf and -Inf written at random positions; returns the positions' rows."""
    flat = torch.randperm(t.numel(), generator=g)[:count]
    rows, cols = flat // t.shape[1], flat % t.shape[1]
    with torch.no_grad():
        for value, r, c in zip((float("nan"), float("inf"), float("-inf")), rows.tolist(), cols.tolist()):
            t[r, c] = value
    return rows


def _check(got, expected, dtype, k):
    t = tol(dtype)
    finite = torch.isfinite(expected)
    assert not finite.all(), "the poisoned entries must reach some outputs"
    assert finite.any(), "some outputs must not read a poisoned entry"
    torch.testing.assert_close(got.double(), expected, rtol=t["rtol"], atol=t["atol"] * k, equal_nan=True)


@pytest.mark.parametrize("density", (BELOW, ABOVE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ("contiguous", "transposed", "strided"))
def test_spmm_nonfinite_B(density, dtype, layout):
    g = gen(seed_of("nonfinite-spmm", density, dtype, layout))
    m, k, n = 48, 40, 37
    W = random_sparse((m, k), density, dtype, g)
    B = make_input((k, n), dtype, g, layout)
    _poison(B, g)
    _check(spmm(W, B), _sparse_product(W, B), dtype, k)


@pytest.mark.parametrize("density", (BELOW, ABOVE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_linear_nonfinite_x(density, dtype):
    g = gen(seed_of("nonfinite-linear", density, dtype))
    m, k, n = 40, 48, 33
    W = random_sparse((m, k), density, dtype, g)
    x = make_input((n, k), dtype, g)
    bias = make_input((m,), dtype, g)
    _poison(x, g)
    expected = _sparse_product(W, x.t()).t() + bias.double()
    _check(sparse_linear(x, W, bias), expected, dtype, k)


@pytest.mark.parametrize("density", (BELOW, ABOVE))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_linear_nonfinite_grad_input(density, dtype):
    """dx = dy @ W (a CSR product on W's transpose): a NaN or Inf in dy reaches dx's columns that row's
    nonzeros touch, not all of dx."""
    g = gen(seed_of("nonfinite-dx", density, dtype))
    m, k, n = 40, 48, 33
    W = random_sparse((m, k), density, dtype, g)
    x = make_input((n, k), dtype, g, requires_grad=True)
    grad_out = make_input((n, m), dtype, g)
    _poison(grad_out, g)
    (dx,) = torch.autograd.grad(sparse_linear(x, W), [x], grad_out)
    # dx^T (k, n) = W^T (k, m) @ dy^T (m, n), summed over W's nonzeros.
    contrib = W.values.detach().double()[:, None] * grad_out.double().t()[_rows(W)]
    expected = torch.zeros(k, n, dtype=torch.float64).index_add_(0, W.col_idx.long(), contrib).t()
    _check(dx, expected, dtype, m)


def test_set_dense_above_checks_its_argument():
    before = torch.ops.sparsekern._dense_above()
    for bad in (float("nan"), -0.5):
        with pytest.raises(RuntimeError, match=r"_set_dense_above: threshold must be a density >= 0"):
            torch.ops.sparsekern._set_dense_above(bad)
    assert torch.ops.sparsekern._dense_above() == before


def test_forced_paths_agree_on_finite_inputs():
    """Threshold 0 (every product dense) and 2 (none): the same result up to rounding."""
    g = gen(seed_of("forced"))
    W = random_sparse((30, 50), 0.2, torch.float64, g)
    B = make_input((50, 9), torch.float64, g)
    before = torch.ops.sparsekern._dense_above()
    try:
        results = []
        for threshold in (0.0, 2.0):
            assert torch.ops.sparsekern._set_dense_above(threshold) == threshold
            results.append(spmm(W, B))
    finally:
        torch.ops.sparsekern._set_dense_above(before)
    torch.testing.assert_close(results[0], results[1])


def _dense_above_in_subprocess(env_value):
    env = dict(os.environ, SPARSEKERN_DENSE_ABOVE=env_value)
    code = "import warnings, torch, sparsekern.ops; print(torch.ops.sparsekern._dense_above())"
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip().splitlines()[-1]), done.stderr


def test_env_sets_the_threshold():
    assert _dense_above_in_subprocess("0.75")[0] == 0.75


def test_env_bad_value_warns_and_keeps_the_default():
    default = torch.ops.sparsekern._dense_above()
    value, stderr = _dense_above_in_subprocess("dense")
    assert value == default
    assert "SPARSEKERN_DENSE_ABOVE='dense' ignored" in stderr
