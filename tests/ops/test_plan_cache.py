"""The CPU conv kernels' cache of pattern-derived plans (csrc/cpu/plan_cache.h): a plan is reused only while
its pattern tensors live unchanged; an in-place write, new tensors, another geometry or the debug switch
never run a stale plan."""
import pytest
import torch
import torch.nn.functional as F

import sparsekern  # noqa: F401  (loads the extension)
from sparsekern import isa as sk_isa

ops = torch.ops.sparsekern

# (kernel pinned, N, Cin, Cout, H, W, kernel size, stride, padding)
GEOMETRIES = {
    "direct": (2, 6, 5, 9, 9, 3, 1, 1),
    "direct-stride": (2, 6, 5, 9, 9, 3, 2, 1),
    "batched": (4, 6, 5, 4, 4, 3, 1, 1),
    "batched-stride": (4, 6, 5, 7, 7, 3, 2, 1),
    "pointwise": (2, 6, 5, 5, 5, 1, 1, 0),
}


def _pin(name):
    return "auto" if name.startswith("pointwise") else name.split("-")[0]


def _pattern(cout, cols, per_row, seed):
    g = torch.Generator().manual_seed(seed)
    col_idx = torch.cat([torch.randperm(cols, generator=g)[:per_row].sort().values for _ in range(cout)])
    row_ptr = torch.arange(cout + 1, dtype=torch.int64) * per_row
    return row_ptr, col_idx.to(torch.int32)


def _dense(values, row_ptr, col_idx, shape):
    w = torch.zeros(shape[0], shape[1] * shape[2] * shape[3], dtype=values.dtype)
    rows = torch.repeat_interleave(torch.arange(shape[0]), row_ptr.diff())
    w[rows, col_idx.long()] = values
    return w.view(shape)


def _passes(x, values, row_ptr, col_idx, k, s, p, grad_out):
    """Forward, grad input and grad weight through the raw CPU ops."""
    ks, st, pd, dl = [k, k], [s, s], [p, p], [1, 1]
    y = ops.sparse_conv2d(x, values, row_ptr, col_idx, ks, None, st, pd, dl)
    dx = ops.sparse_conv2d_backward_input(grad_out, values, row_ptr, col_idx, list(x.shape), ks, st, pd, dl)
    gv = ops.sparse_conv2d_backward_weight(grad_out, x, row_ptr, col_idx, ks, st, pd, dl)
    return y, dx, gv


def _expected(x, values, row_ptr, col_idx, cout, k, s, p, grad_out):
    w = _dense(values, row_ptr, col_idx, (cout, x.shape[1], k, k)).requires_grad_()
    xr = x.clone().requires_grad_()
    y = F.conv2d(xr, w, None, s, p)
    y.backward(grad_out)
    rows = torch.repeat_interleave(torch.arange(cout), row_ptr.diff())
    return y.detach(), xr.grad, w.grad.view(cout, -1)[rows, col_idx.long()]


def _plans(name, x, grad_out):
    """Plans one forward + backward builds: forward and weight gradient share one, the input gradient has its own;
    but the direct kernel's weight gradient keeps 32-byte vectors on rows that end in an overlapped 64-byte one
    (sparse_conv2d.cpp, tap_width), and then has a plan of its own."""
    row = grad_out.shape[3] * x.element_size()
    return 3 if name.startswith("direct") and sk_isa.get() == "avx512" and row >= 64 and row % 64 else 2


def _check(x, values, row_ptr, col_idx, geom, grad_out):
    n, cin, cout, h, w, k, s, p = geom
    got = _passes(x, values, row_ptr, col_idx, k, s, p, grad_out)
    want = _expected(x, values, row_ptr, col_idx, cout, k, s, p, grad_out)
    for name, a, b in zip(("forward", "grad input", "grad weight"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} differs from F.conv2d")


@pytest.fixture
def setup(request, monkeypatch):
    name = request.param
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", _pin(name))
    geom = GEOMETRIES[name]
    n, cin, cout, h, w, k, s, p = geom
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64)
    oh, ow = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    grad_out = torch.randn(n, cout, oh, ow, generator=g, dtype=torch.float64)
    per_row = max(1, cin * k * k // 3)
    row_ptr, col_idx = _pattern(cout, cin * k * k, per_row, seed=1)
    values = torch.randn(col_idx.numel(), generator=g, dtype=torch.float64)
    kernel = ops._conv2d_cpu_kernel(list(x.shape), row_ptr, col_idx, [k, k], [s, s], [p, p], [1, 1])
    assert kernel == name.split("-")[0], f"{name} geometry runs the {kernel} kernel"
    return geom, x, grad_out, row_ptr, col_idx, values, per_row


@pytest.mark.parametrize("setup", list(GEOMETRIES), indirect=True)
def test_repeated_calls_reuse_their_plans(setup, request):
    geom, x, grad_out, row_ptr, col_idx, values, _ = setup
    ops._plan_cache_clear()
    _check(x, values, row_ptr, col_idx, geom, grad_out)
    entries, nbytes = ops._plan_cache_stats()
    assert entries == _plans(request.node.callspec.params["setup"], x, grad_out) and nbytes > 0
    for _ in range(2):
        values = values * 1.5  # new values every step: the plans do not depend on them
        _check(x, values, row_ptr, col_idx, geom, grad_out)
    assert ops._plan_cache_stats()[0] == entries


@pytest.mark.parametrize("setup", list(GEOMETRIES), indirect=True)
def test_pattern_written_in_place_is_not_stale(setup):
    geom, x, grad_out, row_ptr, col_idx, values, per_row = setup
    _check(x, values, row_ptr, col_idx, geom, grad_out)
    _, other = _pattern(geom[2], geom[1] * geom[5] ** 2, per_row, seed=2)
    assert not torch.equal(other, col_idx)
    col_idx.copy_(other)  # what a DST update does: same tensors, new entries (the version counter moves)
    _check(x, values, row_ptr, col_idx, geom, grad_out)
    # row_ptr written in place too: rows of other lengths (+1, -1, ...), the same nnz, columns ascending.
    cout, cols = geom[2], geom[1] * geom[5] ** 2
    lengths = [per_row + (1 if r % 2 == 0 else -1) for r in range(cout)]
    lengths[-1] += per_row * cout - sum(lengths)
    g = torch.Generator().manual_seed(4)
    rows = [torch.randperm(cols, generator=g)[:n].sort().values for n in lengths]
    row_ptr.copy_(torch.tensor([0] + lengths).cumsum(0))
    col_idx.copy_(torch.cat(rows).to(torch.int32))
    _check(x, values, row_ptr, col_idx, geom, grad_out)


@pytest.mark.parametrize("setup", list(GEOMETRIES), indirect=True)
def test_new_pattern_tensors_and_other_batch_sizes(setup):
    geom, x, grad_out, row_ptr, col_idx, values, per_row = setup
    _check(x, values, row_ptr, col_idx, geom, grad_out)
    row2, col2 = _pattern(geom[2], geom[1] * geom[5] ** 2, per_row, seed=3)
    _check(x, values, row2, col2, geom, grad_out)
    _check(x[:1].repeat(3, 1, 1, 1), values, row_ptr, col_idx, geom, grad_out[:1].repeat(3, 1, 1, 1))


@pytest.mark.parametrize("setup", ["direct", "batched", "pointwise"], indirect=True)
def test_debug_switch_and_inference_tensors_cache_nothing(setup):
    geom, x, grad_out, row_ptr, col_idx, values, _ = setup
    ops._plan_cache_clear()
    before = ops._set_check_patterns(True)
    try:
        _check(x, values, row_ptr, col_idx, geom, grad_out)
    finally:
        ops._set_check_patterns(before)
    assert ops._plan_cache_stats()[0] == 0
    with torch.inference_mode():
        r, c = row_ptr.clone(), col_idx.clone()  # inference tensors: no version counter to trust
    assert r.is_inference()
    _check(x, values, r, c, geom, grad_out)
    assert ops._plan_cache_stats()[0] == 0


@pytest.mark.parametrize("setup", ["direct", "batched", "pointwise"], indirect=True)
def test_bad_col_idx_raises_after_a_cached_call(setup):
    geom, x, grad_out, row_ptr, col_idx, values, _ = setup
    _check(x, values, row_ptr, col_idx, geom, grad_out)
    n, cin, cout, h, w, k, s, p = geom
    bad = col_idx.clone()
    bad[-1] = cin * k * k  # one past the last column
    with pytest.raises(RuntimeError, match="col_idx"):
        _passes(x, values, row_ptr, bad, k, s, p, grad_out)
    col_idx[-1] = cin * k * k  # in place, on the cached tensor
    ks, st, pd, dl = [k, k], [s, s], [p, p], [1, 1]
    calls = (lambda: ops.sparse_conv2d(x, values, row_ptr, col_idx, ks, None, st, pd, dl),
             lambda: ops.sparse_conv2d_backward_input(grad_out, values, row_ptr, col_idx, list(x.shape), ks, st, pd,
                                                      dl),
             lambda: ops.sparse_conv2d_backward_weight(grad_out, x, row_ptr, col_idx, ks, st, pd, dl))
    for call in calls:  # forward, grad input, grad weight
        with pytest.raises(RuntimeError, match="col_idx"):
            call()


def test_sparse_module_step_hits_the_cache():
    """A SparseConv2d training step builds its plans once and finds them in the next step."""
    torch.manual_seed(0)
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, bias=False)), 0.2,
                                distribution="uniform", init="dense")
    model[0].kernel = "csr"
    x = torch.randn(4, 16, 6, 6, requires_grad=True)
    ops._plan_cache_clear()
    model(x).sum().backward()
    entries = ops._plan_cache_stats()[0]
    assert entries >= 2
    model(x).sum().backward()
    assert ops._plan_cache_stats()[0] == entries
