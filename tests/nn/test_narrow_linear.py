"""FastNarrowLinear and its op (_narrow_linear, csrc/cpu/narrow_linear.cpp): the output and the gradients of x, weight
and bias are F.linear's for 1 to 16 outputs (output groups of 8 and 4, 12 in the 64-byte weight gradient, and their
remainders), on the 32-byte loops and the AVX-512 ones, in_features on and off the vector widths (1 to 1030), 0 to
300 rows, float32 and float64, with and without bias, non-contiguous x and output gradient; gradcheck and
gradgradcheck (the second order through ATen's products); NaN spread as F.linear spreads it; the same bits run to run
and at 1 and 2 threads; the module runs the kernel where it should and nn.Linear's forward elsewhere; fast_modules
swaps heads of at most 16 outputs only, and a sparse layer's full pattern (ERK's head) runs the kernel through its
route; the op's argument errors. The op runs its loops or MKL's GEMMs, whichever measured faster per shape: the
tests pin each way (`_set_dense_products`: 3 the loops, 1 the GEMMs) and check the measured choice too."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern import isa as sk_isa
from sparsekern.nn import FastNarrowLinear, fast_modules, plain_modules
from sparsekern.ops import dispatch

from sk_testing import gen, threads

needs_kernel = pytest.mark.skipif(not dispatch.extension_loaded, reason="needs the compiled extension sparsekern._C")
op = torch.ops.sparsekern

# (rows, in_features, out_features): the MLP's and BERT's heads, every group remainder, odd widths, one row, no rows.
SHAPES = ((256, 1024, 10), (64, 512, 2), (37, 77, 13), (5, 3, 1), (16, 100, 16), (3, 1030, 8), (1, 17, 9),
          (0, 24, 4), (300, 64, 5), (7, 8, 12), (2, 1, 3))


LOOPS, GEMMS = 3, 1  # _set_dense_products modes


@pytest.fixture(autouse=True)
def loops():
    """Each test runs the op's loops unless it pins another way (the measured choice could take MKL's GEMMs)."""
    if not dispatch.extension_loaded:
        yield
        return
    before = op._set_dense_products(LOOPS)
    try:
        yield
    finally:
        op._set_dense_products(before)


def _tol(dtype, k):
    eps = 1e-6 if dtype == torch.float32 else 1e-14
    return dict(rtol=eps * 10, atol=eps * 10 * max(k, 1) ** 0.5)


def _grads(fn, x, w, b, g):
    leaves = [t for t in (x, w, b) if t is not None]
    y = fn(x, w, b)
    return (y, *torch.autograd.grad(y, leaves, g))


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("isa", ("avx2", "avx512"))
@pytest.mark.parametrize("way", (LOOPS, GEMMS), ids=("loops", "gemms"))
def test_op_matches_linear(shape, dtype, bias, isa, way):
    if not sk_isa.supported(isa):
        pytest.skip(f"isa {isa}: this CPU lacks AVX-512F/BW/DQ/VL")
    op._set_dense_products(way)
    with sk_isa.use(isa):
        _op_matches_linear(shape, dtype, bias)


def _op_matches_linear(shape, dtype, bias):
    N, K, out = shape
    g = gen(N * 1000 + K * 10 + out)
    x = torch.randn(N, K, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(out, K, dtype=dtype, generator=g, requires_grad=True)
    b = torch.randn(out, dtype=dtype, generator=g, requires_grad=True) if bias else None
    grad = torch.randn(N, out, dtype=dtype, generator=g)
    got = _grads(op._narrow_linear, x, w, b, grad)
    expected = _grads(F.linear, x, w, b, grad)
    for a, e, terms in zip(got, expected, (K, out, N, N)):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, **_tol(dtype, terms))


@needs_kernel
def test_op_takes_strided_inputs():
    g = gen(1)
    x = torch.randn(40, 200, dtype=torch.float64, generator=g)[:, ::2].requires_grad_()  # x.stride() = (200, 2)
    w = torch.randn(6, 200, dtype=torch.float64, generator=g)[::2, :100].requires_grad_()
    b = torch.randn(6, dtype=torch.float64, generator=g)[::2].requires_grad_()
    grad = torch.randn(3, 40, dtype=torch.float64, generator=g).t()
    for a, e in zip(_grads(op._narrow_linear, x, w, b, grad), _grads(F.linear, x, w, b, grad)):
        torch.testing.assert_close(a, e)


@needs_kernel
def test_gradcheck_and_gradgradcheck():
    g = gen(2)
    x = torch.randn(9, 21, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 21, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(op._narrow_linear, (x, w, b))
    assert torch.autograd.gradgradcheck(op._narrow_linear, (x, w, b))


@needs_kernel
def test_nan_spreads_as_linear():
    x = torch.ones(4, 40)
    x[1, 3] = float("nan")
    w = torch.ones(3, 40)
    w[2, 5] = float("inf")
    got, expected = op._narrow_linear(x, w, None), F.linear(x, w)
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.isinf(), expected.isinf())


@needs_kernel
def test_same_bits_run_to_run_and_over_threads():
    g = gen(3)
    x = torch.randn(257, 1000, generator=g, requires_grad=True)
    w = torch.randn(10, 1000, generator=g, requires_grad=True)
    b = torch.randn(10, generator=g, requires_grad=True)
    grad = torch.randn(257, 10, generator=g)
    runs = []
    for n in (2, 2, 1):
        with threads(n):
            runs.append(_grads(op._narrow_linear, x, w, b, grad))
    for run in runs[1:]:
        for a, e in zip(run, runs[0]):
            assert torch.equal(a, e)


@needs_kernel
def test_the_measured_way_is_kept_per_shape_and_the_loops_run_deterministic():
    """Measured (mode 0), the op gives F.linear's results and the same bits call after call (the way chosen for a
    shape is kept); under deterministic algorithms it runs the loops: the same bits as pinned loops, at 1 and 2
    threads."""
    op._set_dense_products(0)
    g = gen(4)
    for n, k, out in ((257, 300, 10), (2048, 64, 16), (8, 40, 2)):
        x = torch.randn(n, k, generator=g, requires_grad=True)
        w = torch.randn(out, k, generator=g, requires_grad=True)
        b = torch.randn(out, generator=g, requires_grad=True)
        grad = torch.randn(n, out, generator=g)
        first = _grads(op._narrow_linear, x, w, b, grad)
        for a, e, terms in zip(first, _grads(F.linear, x, w, b, grad), (k, out, n, n)):
            torch.testing.assert_close(a, e, **_tol(torch.float32, terms))
        for a, e in zip(_grads(op._narrow_linear, x, w, b, grad), first):
            assert torch.equal(a, e)
        op._set_dense_products(LOOPS)
        pinned = _grads(op._narrow_linear, x, w, b, grad)
        op._set_dense_products(0)
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            for n_threads in (1, 2):
                with threads(n_threads):
                    for a, e in zip(_grads(op._narrow_linear, x, w, b, grad), pinned):
                        assert torch.equal(a, e)
        finally:
            torch.use_deterministic_algorithms(before)


def _ran_kernel(fn) -> bool:
    with torch.profiler.profile() as prof:
        fn()
    return any(e.name == "sparsekern::_narrow_linear" for e in prof.events())


@needs_kernel
def test_module_runs_the_kernel_where_it_should():
    head = nn.Linear(64, 10)
    fast_modules(head)
    assert type(head) is FastNarrowLinear
    x = torch.randn(3, 5, 64)
    assert _ran_kernel(lambda: head(x))
    assert head(x).shape == (3, 5, 10)
    torch.testing.assert_close(head(x), F.linear(x, head.weight, head.bias))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not _ran_kernel(lambda: head(x))
        assert head(x).dtype == torch.bfloat16  # autocast: nn.Linear's forward
    head.bfloat16()
    assert not _ran_kernel(lambda: head(x.to(torch.bfloat16)))  # bfloat16: nn.Linear's forward


def test_module_falls_back_on_dtype_mismatch():
    plain = nn.Linear(8, 4).double()
    x = torch.randn(2, 8)
    with pytest.raises(RuntimeError) as want:
        plain(x)
    head = copy.deepcopy(plain)
    fast_modules(head)
    assert type(head) is FastNarrowLinear
    ran = []

    def call():
        with pytest.raises(RuntimeError, match=re.escape(str(want.value))):  # nn.Linear's error, from its forward
            head(x)
        ran.append(True)
    assert not _ran_kernel(call) and ran


def test_fast_modules_swaps_narrow_linears_only():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.Linear(16, 17))
    names = fast_modules(model)
    assert names == ["2"] and type(model[2]) is FastNarrowLinear and type(model[3]) is nn.Linear
    state = copy.deepcopy(model.state_dict())
    assert plain_modules(model) == ["2"] and type(model[2]) is nn.Linear
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@needs_kernel
def test_sparse_full_pattern_head_runs_the_kernel():
    """A sparse head with a full pattern (as ERK keeps the MLP's 1024 -> 10 head) runs the narrow kernel through its
    route (the Python route on the first call, the kept C++ route after), and a training step's gradients match the
    plain model's."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    model = sparsekern.sparsify(copy.deepcopy(dense), 1.0, "uniform", init="dense")
    head = model[2]
    assert head.nnz == head.weight_shape.numel()
    head.kernel = "dense"  # as the measured choice takes it (the tests run `csr` unless pinned)
    x = torch.randn(32, 64, generator=gen(5))
    for _ in range(3):  # the first call measures and routes, the later ones run the kept route
        model.zero_grad()
        model(x).square().sum().backward()
    ref = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 10))
    with torch.no_grad():
        ref[0].weight.copy_(model[0].weight)
        ref[0].bias.copy_(model[0].bias)
        ref[2].weight.copy_(head.weight)
        ref[2].bias.copy_(head.bias)
    ref(x).square().sum().backward()
    torch.testing.assert_close(head.values.grad.reshape(10, 512), ref[2].weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(head.bias.grad, ref[2].bias.grad, rtol=1e-5, atol=1e-5)
    assert _ran_kernel(lambda: model(x))


@needs_kernel
def test_op_errors_name_the_argument():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match="x must be 2-D"):
        op._narrow_linear(x[None], w, None)
    with pytest.raises(ValueError, match="weight must have 1 to 16 rows"):
        op._narrow_linear(x, torch.randn(17, 8), None)
    with pytest.raises(ValueError, match="in_features = 8"):
        op._narrow_linear(x, torch.randn(3, 9), None)
    with pytest.raises(ValueError, match="weight must be x's dtype"):
        op._narrow_linear(x, w.double(), None)
    with pytest.raises(ValueError, match="x must be float32 or float64"):
        op._narrow_linear(x.half(), w.half(), None)
    with pytest.raises(ValueError, match="bias must be a 1-D CPU tensor of 3"):
        op._narrow_linear(x, w, torch.randn(4))
    with pytest.raises(ValueError, match="grad must be a CPU"):
        op._narrow_linear_backward(torch.randn(4, 2), x, w, [True, True, True])
