"""The one shared parametrization of the sparsekern tests, input builders, tolerances and backend helpers.

The fixtures over the parametrization (mkn, sparsity, dtype, layout, conv_case) and the ``backend``
fixture live in tests/conftest.py. Test modules import the helpers from this module: importing them
`from conftest` is ambiguous, since subfolders (tests/dst/) have a conftest.py of their own.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterable, Optional, Sequence, Tuple

import torch
from hypothesis import HealthCheck, settings

import sparsekern
from sparsekern import SparseMatrix

# Tiny shapes on a shared 2-core machine: with 2 intra-op threads the OpenMP workers spin
# against other processes and a 16x33 matmul takes ~30 ms instead of ~0.1 ms. The suite runs
# single-threaded; tests of a kernel's parallel path use `threads(2)` on shapes big enough.
torch.set_num_threads(int(os.environ.get("SPARSEKERN_TEST_THREADS", "1")))


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Hypothesis: reproducible in CI (derandomized, no example database on disk); run with
# `--hypothesis-profile=explore` for fresh random examples.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("explore", database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile("ci")
FUZZ = settings(max_examples=25)

# ----------------------------------------------------------------------------------------
# The shared parametrization
# ----------------------------------------------------------------------------------------

CPU_BACKENDS = ("reference", "cpp")

DTYPES = (torch.float32, torch.float64)

# (m, k, n): a logical (m, k) sparse matrix and a batch / column count n.
MKN = (
    (1, 7, 3),     # one row
    (5, 13, 1),    # batch 1, k odd
    (9, 24, 0),    # batch 0, k a multiple of 8 but not of 16
    (16, 33, 5),   # k not a multiple of 8 or 16
    (12, 16, 17),  # k a multiple of 16, n > 16
    (0, 6, 4),     # empty matrix: m = 0
    (5, 0, 3),     # empty matrix: k = 0
    (0, 0, 2),     # m = k = 0
)

# (density, force_empty_rows)
SPARSITIES = (
    (0.0, False),
    (0.5, False),
    (0.9, False),
    (0.99, False),
    (1.0, False),
    (0.5, True),
    (1.0, True),
)

# How a dense input is laid out in memory: contiguous, a transposed view, a slice with step.
LAYOUTS = ("contiguous", "transposed", "strided")


def _mkn_id(p):
    return "m{}k{}n{}".format(*p)


def _sparsity_id(p):
    d, empty = p
    return f"d{d:g}" + ("-emptyrows" if empty else "")


def _dtype_id(d):
    return str(d).replace("torch.", "")


# Convolution geometries: (N, Cin, Cout, H, W, kernel, stride, padding, dilation, bias).
CONV_CASES = (
    (2, 3, 4, 6, 5, (1, 1), (1, 1), (0, 0), (1, 1), True),    # 1x1
    (1, 2, 3, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), False),   # batch 1, 3x3 "same"
    (2, 3, 5, 8, 6, (3, 3), (2, 2), (0, 0), (1, 1), True),    # stride 2
    (2, 2, 3, 9, 9, (5, 5), (1, 1), (2, 2), (1, 1), True),    # 5x5, padding 2
    (1, 3, 2, 9, 8, (3, 3), (1, 1), (2, 2), (2, 2), False),   # dilation 2
    (2, 2, 3, 7, 10, (3, 5), (2, 1), (1, 2), (1, 2), True),   # rectangular everything
    (2, 3, 4, 5, 6, (1, 3), (1, 2), (0, 1), (1, 1), False),   # rectangular kernel 1x3
    (0, 3, 2, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), True),    # batch 0
    (2, 3, 0, 5, 5, (3, 3), (1, 1), (0, 0), (1, 1), False),   # Cout = 0: empty weight
    (1, 17, 3, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), True),   # Cin*kh*kw = 153, not a multiple of 8
)


def _conv_id(c):
    n, cin, cout, h, w, k, s, p, d, b = c
    bias = "-bias" if b else ""
    return f"N{n}-{cin}to{cout}-{h}x{w}-k{k[0]}x{k[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}{bias}"


# ----------------------------------------------------------------------------------------
# Tolerances and comparison
# ----------------------------------------------------------------------------------------

_TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def tol(dtype: torch.dtype) -> dict:
    return _TOL[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> None:
    """Same shape, dtype and device, values within the dtype's tolerance (atol scaled by ``scale``,
    e.g. by the length of the dot products)."""
    assert isinstance(actual, torch.Tensor)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"dtype {actual.dtype} != expected {expected.dtype}"
    t = tol(expected.dtype)
    torch.testing.assert_close(actual, expected, rtol=t["rtol"], atol=t["atol"] * max(1.0, scale))


# 16-bit dtypes: one rounding's relative error (half an ulp). Their kernels accumulate in float32, so
# a result is within a few roundings of the exact value *relative to the magnitude* of its terms
# (the op on |inputs|), not to the value: check_low_precision bounds errors by that.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, eps: float) -> None:
    """|actual - expected| <= eps * bound elementwise (and a 1e-6 floor), same shape."""
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    err = (actual.double() - expected.double()).abs()
    limit = eps * bound.double() + 1e-6
    bad = err > limit
    if bad.any():
        worst = int((err - limit).argmax())
        got, want, size = (t.flatten()[worst].item() for t in (actual, expected, bound))
        raise AssertionError(f"{int(bad.sum())} of {err.numel()} entries off by more than {eps:g} x the magnitude; "
                             f"worst: got {got}, expected {want}, magnitude {size}")


def check_low_precision(fn, ref, inputs, g: torch.Generator, dtype: torch.dtype = torch.bfloat16,
                        roundings: int = 4):
    """``fn(*inputs)`` (16-bit inputs, or float32 ones that autocast casts to ``dtype``) against ``ref``
    on float64 copies of the inputs: the output and the gradients of the inputs that require grad are
    within ``roundings`` unit roundoffs of ``dtype`` times the magnitude (``ref`` on |inputs|, and its
    gradients for |grad_out|; exact for ops linear in each input). Returns (output, gradients)."""
    out = fn(*inputs)
    exact = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    absolute = [None if t is None else t.detach().double().abs().requires_grad_(t.requires_grad) for t in inputs]
    expected, bound = ref(*exact), ref(*absolute)
    eps = roundings * UNIT_ROUNDOFF[dtype]
    assert_within(out, expected, bound, eps)
    wrt = [i for i, t in enumerate(inputs) if t is not None and t.requires_grad]
    if not wrt:
        return out, []
    grad_out = make_input(out.shape, out.dtype, g)
    got = grads(out, [inputs[i] for i in wrt], grad_out)
    want = grads(expected, [exact[i] for i in wrt], grad_out.double())
    bounds = grads(bound, [absolute[i] for i in wrt], grad_out.double().abs())
    for a, e, b in zip(got, want, bounds):
        assert_within(a, e, b, eps)
    return out, got


# ----------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def seed_of(*parts) -> int:
    """A deterministic seed from test parameters (hash() of str is salted per process)."""
    h = 0
    for ch in repr(parts):
        h = (h * 131 + ord(ch)) % (2 ** 31 - 1)
    return h


def random_mask(shape: Sequence[int], density: float, g: torch.Generator, empty_rows: bool = False) -> torch.Tensor:
    """Bool mask of ``shape`` with exactly round(density * numel) True entries, uniformly placed.

    With ``empty_rows``, rows 1, 4, 7, ... (of dim 0; and the last row when there are > 2) are
    cleared afterwards, so the pattern has empty rows between non-empty ones.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=g)[: int(round(density * numel))]] = True
    mask = flat.reshape(shape)
    if empty_rows and shape[0] > 1:
        rows = torch.arange(shape[0]) % 3 == 1
        if shape[0] > 2:
            rows[-1] = True
        mask[rows] = False
    return mask


def make_input(shape: Sequence[int], dtype: torch.dtype, g: torch.Generator, layout: str = "contiguous",
               requires_grad: bool = False) -> torch.Tensor:
    """A standard-normal tensor of ``shape`` laid out as ``layout``.

    The result is a view of a fresh leaf (which requires grad if asked), so its gradient can be
    taken with ``torch.autograd.grad(out, [view])`` without losing the layout.
    ``transposed``: the last two dims are swapped in memory (for 4-D: NHWC memory, i.e. channels last);
    ``strided``: a slice with step 2 of the last dim. 1-D ``transposed`` is a strided view.
    """
    shape = tuple(shape)
    if layout == "contiguous":
        base = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        base.requires_grad_(requires_grad)
        return base
    if layout == "transposed" and len(shape) >= 2:
        if len(shape) == 4:
            n, c, h, w = shape
            base = torch.randn((n, h, w, c), generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
            return base.permute(0, 3, 1, 2)
        swapped = shape[:-2] + (shape[-1], shape[-2])
        base = torch.randn(swapped, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
        return base.transpose(-1, -2)
    if layout in ("strided", "transposed"):
        wide = shape[:-1] + (2 * shape[-1] + 1,)
        base = torch.randn(wide, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)
        return base[..., 1::2]
    raise ValueError(f"unknown layout {layout!r}")


def random_sparse(shape: Sequence[int], density: float, dtype: torch.dtype = torch.float32,
                  g: Optional[torch.Generator] = None, empty_rows: bool = False, layout: str = "contiguous",
                  requires_grad: bool = False) -> SparseMatrix:
    """A validated SparseMatrix of dense ``shape`` (2-D or 4-D conv) with a seeded random pattern.

    ``layout`` != contiguous gives non-contiguous ``values`` (a slice with step); with
    ``requires_grad`` the values are a view of a leaf that requires grad.
    """
    g = gen(0) if g is None else g
    mask = random_mask(shape, density, g, empty_rows)
    m = shape[0]
    k = math.prod(shape[1:])
    row_ptr, col_idx = sparsekern.sparse_matrix.csr_from_mask(mask.reshape(m, k))
    nnz = col_idx.numel()
    values = make_input((nnz,), dtype, g, "contiguous" if layout == "contiguous" else "strided", requires_grad)
    W = SparseMatrix(row_ptr, col_idx, values, shape)  # validated
    return W


def dense_of(W: SparseMatrix) -> torch.Tensor:
    """Dense weight of W built independently of SparseMatrix.to_dense (for checking it)."""
    m, k = W.shape2d
    rows = [[0.0] * k for _ in range(m)]
    rp = W.row_ptr.tolist()
    ci = W.col_idx.tolist()
    vals = W.values.detach().double().tolist()
    for i in range(m):
        for p in range(rp[i], rp[i + 1]):
            rows[i][ci[p]] = vals[p]
    return torch.tensor(rows, dtype=torch.float64).reshape(m, k).to(W.dtype).reshape(W.shape)


def grads(out: torch.Tensor, inputs: Iterable[torch.Tensor], grad_out: torch.Tensor):
    """d<out, grad_out>/d inputs; inputs the output does not depend on get zeros."""
    return torch.autograd.grad(out, list(inputs), grad_out, allow_unused=True, materialize_grads=True)


# ----------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------


def has_cpu_kernel(op: str) -> bool:
    if not sparsekern.ops.HAS_EXTENSION:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", "CPU"))
    except RuntimeError:  # schema not registered at all
        return False


def _kernels_needed(request) -> Tuple[str, ...]:
    marker = request.node.get_closest_marker("kernels")
    if marker is not None:
        return tuple(marker.args)
    op = getattr(request.module, "OP", None)
    return (op,) if op else ()
