"""The CUDA kernels (csrc/cuda) on a GPU: every op through torch.ops.sparsekern on CUDA tensors against
sparsekern.reference, over shapes, dtypes (fp32, fp64, fp16, bf16), sparsities (0, 0.5, 0.9, 0.99, 1,
empty rows) and layouts, plus the backward passes through the public ops with the cuda backend.
Skipped (never passed) without a CUDA device or without the CUDA kernels in sparsekern._C.
"""

import pytest
import torch

import sparsekern
from sparsekern import reference
from sparsekern.ops import dispatch

from sk_testing import gen, make_input, random_sparse, seed_of


def _cuda_kernels_built() -> bool:
    try:
        return bool(sparsekern.ops.HAS_EXTENSION
                    and torch._C._dispatch_has_kernel_for_dispatch_key("sparsekern::spmm", "CUDA"))
    except RuntimeError:
        return False


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not _cuda_kernels_built(),
                       reason="sparsekern._C has no CUDA kernels (built with a CPU torch or without nvcc)"),
]

DEV = torch.device("cuda")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SPARSITIES = ((0.0, False), (0.5, False), (0.9, False), (0.99, False), (1.0, False), (0.5, True), (1.0, True))
# (m, k, n): tiny and odd shapes, both SpMM kernels (rows: narrow or very sparse; panel: wide, m >= 64).
MKN = ((1, 7, 3), (5, 13, 1), (9, 24, 0), (16, 33, 5), (0, 6, 4), (5, 0, 3), (70, 45, 130), (300, 257, 190),
       (130, 600, 33))
RTOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _ids(p):
    return "-".join(str(x) for x in p) if isinstance(p, tuple) else str(p).replace("torch.", "")


def _close(got, want, scale, dtype):
    """|got - want| <= rtol * (scale + |want|), scale the sum of |terms| of each output (float64)."""
    assert got.shape == want.shape and got.dtype == dtype, (got.shape, want.shape, got.dtype, dtype)
    err = (got.double().cpu() - want.double().cpu()).abs()
    bound = RTOL[dtype] * (scale.double().cpu() + want.double().cpu().abs()) + 1e-30
    bad = ~(err <= bound)
    assert not bool(bad.any()), (f"{int(bad.sum())} of {bad.numel()} entries off; "
                                 f"worst {float((err - bound).max()):.3g}"
                                 f" at {tuple(int(i) for i in (bad.nonzero()[0] if bad.any() else []))}")


def _csr(shape, density, dtype, seed, empty_rows=False, layout="contiguous"):
    W = random_sparse(shape, density, torch.float64, gen(seed), empty_rows, layout)
    vals = W.values.to(dtype)
    return W, vals.to(DEV), W.row_ptr.to(DEV), W.col_idx.to(DEV)


def _dense(W64, vals):
    """Dense float64 weight from the (rounded) values actually used."""
    return reference.csr_to_dense(vals.double().cpu(), W64.row_ptr, W64.col_idx, W64.shape2d[1])


def _input(shape, dtype, seed, layout="contiguous"):
    """make_input's layout (transposed: a transposed view) in dtype on the GPU (.to keeps the strides)."""
    return make_input(shape, torch.float64, gen(seed), layout).to(dtype).to(DEV)


# ---- spmm / sparse_linear / sddmm -------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=_ids)
@pytest.mark.parametrize("mkn", MKN, ids=_ids)
def test_spmm(mkn, sparsity, dtype, layout):
    m, k, n = mkn
    W, vals, rp, ci = _csr((m, k), sparsity[0], dtype, seed_of("spmm", mkn, sparsity), sparsity[1])
    B = _input((k, n), dtype, seed_of("B", mkn), layout)
    out = torch.ops.sparsekern.spmm(vals, rp, ci, B)
    A = _dense(W, vals)
    _close(out, A @ B.double().cpu(), A.abs() @ B.double().cpu().abs(), dtype)


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=_ids)
@pytest.mark.parametrize("mkn", MKN, ids=_ids)
def test_sparse_linear(mkn, sparsity, dtype, layout, with_bias):
    m, k, n = mkn  # W (m, k), x (n, k)
    W, vals, rp, ci = _csr((m, k), sparsity[0], dtype, seed_of("lin", mkn, sparsity), sparsity[1])
    x = _input((n, k), dtype, seed_of("x", mkn), layout)
    bias = _input((m,), dtype, seed_of("b", m)) if with_bias else None
    y = torch.ops.sparsekern.sparse_linear(x, vals, rp, ci, bias)
    A, xd = _dense(W, vals), x.double().cpu()
    want = xd @ A.t() + (0 if bias is None else bias.double().cpu())
    scale = xd.abs() @ A.abs().t() + (0 if bias is None else bias.double().cpu().abs())
    _close(y, want, scale, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=_ids)
@pytest.mark.parametrize("mkd", ((1, 7, 3), (5, 13, 1), (9, 24, 0), (0, 6, 4), (130, 140, 20), (40, 300, 257)),
                         ids=_ids)
def test_sddmm(mkd, sparsity, dtype, layout):
    m, k, d = mkd
    W, _, rp, ci = _csr((m, k), sparsity[0], dtype, seed_of("sddmm", mkd, sparsity), sparsity[1])
    X = _input((m, d), dtype, seed_of("X", mkd), layout)
    Y = _input((k, d), dtype, seed_of("Y", mkd), layout)
    vals = torch.ops.sparsekern.sddmm(rp, ci, X, Y)
    Xd, Yd = X.double().cpu(), Y.double().cpu()
    want = reference.sddmm(W.row_ptr, W.col_idx, Xd, Yd)
    scale = reference.sddmm(W.row_ptr, W.col_idx, Xd.abs(), Yd.abs())
    _close(vals, want, scale, dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=_ids)
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=_ids)
def test_sparse_linear_backward(sparsity, dtype):
    """Through the public op with the cuda backend: dx = dy @ W (the same kernel over the cached
    transpose, values through gather), dW = sddmm(dy^T, x^T) at the pattern, db = dy.sum(0)."""
    if "cuda" not in dispatch.available("sparse_linear", "cuda"):
        pytest.skip("the dispatcher does not offer the cuda backend yet")
    g = gen(seed_of("linbw", sparsity, dtype))
    W = random_sparse((150, 90), sparsity[0], dtype, g, sparsity[1], requires_grad=True).to(DEV)
    x = make_input((70, 90), dtype, g).to(DEV).requires_grad_(True)
    bias = make_input((150,), dtype, g).to(DEV).requires_grad_(True)
    with sparsekern.backend("cuda"):
        y = sparsekern.ops.sparse_linear(x, W, bias)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, W.values, bias], gy)
    want_y = reference.sparse_linear(x, W.values, W.row_ptr, W.col_idx, bias)
    want = torch.autograd.grad(want_y, [x, W.values, bias], gy)
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", (torch.float32,), ids=_ids)
def test_spmm_backward(dtype):
    if "cuda" not in dispatch.available("spmm", "cuda"):
        pytest.skip("the dispatcher does not offer the cuda backend yet")
    g = gen(seed_of("spmmbw"))
    A = random_sparse((80, 120), 0.3, dtype, g, True, requires_grad=True).to(DEV)
    B = make_input((120, 50), dtype, g).to(DEV).requires_grad_(True)
    with sparsekern.backend("cuda"):
        out = sparsekern.ops.spmm(A, B)
        go = torch.randn_like(out)
        got = torch.autograd.grad(out, [A.values, B], go)
    want_out = reference.spmm(A.values, A.row_ptr, A.col_idx, B)
    want = torch.autograd.grad(want_out, [A.values, B], go)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---- masked ops ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=_ids)
@pytest.mark.parametrize("density", (0.0, 0.3, 1.0))
def test_masked(density, dtype):
    g = gen(seed_of("masked", density))
    mask = (torch.rand(70, 50, generator=g) < density).to(DEV)
    w = torch.randn(70, 50, generator=g, dtype=torch.float64).to(DEV)
    x = torch.randn(33, 50, generator=g, dtype=torch.float64).to(DEV)
    y = torch.ops.sparsekern.masked_matmul(x.to(dtype), w.to(dtype), mask)
    wd = torch.where(mask, w.to(dtype).double(), 0.0)
    _close(y, x.to(dtype).double() @ wd.t(), x.to(dtype).double().abs() @ wd.abs().t(), dtype)
    X = torch.randn(70, 20, generator=g, dtype=torch.float64).to(DEV).to(dtype)
    Y = torch.randn(50, 20, generator=g, dtype=torch.float64).to(DEV).to(dtype)
    out = torch.ops.sparsekern.masked_sddmm(X, Y, mask)
    want = torch.where(mask, X.double() @ Y.double().t(), 0.0)
    _close(out, want, torch.where(mask, X.double().abs() @ Y.double().abs().t(), 0.0), dtype)
    assert bool((out[~mask] == 0).all())


# ---- sparse_conv2d ----------------------------------------------------------------------------------
CONV = ((2, 3, 4, 6, 5, (1, 1), (1, 1), (0, 0), (1, 1), True), (1, 2, 3, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), False),
        (2, 3, 5, 8, 6, (3, 3), (2, 2), (0, 0), (1, 1), True), (2, 2, 3, 9, 9, (5, 5), (1, 1), (2, 2), (1, 1), True),
        (1, 3, 2, 9, 8, (3, 3), (1, 1), (2, 2), (2, 2), False), (2, 2, 3, 7, 10, (3, 5), (2, 1), (1, 2), (1, 2), True),
        (0, 3, 2, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1), True), (2, 3, 0, 5, 5, (3, 3), (1, 1), (0, 0), (1, 1), False),
        (4, 64, 96, 14, 14, (3, 3), (1, 1), (1, 1), (1, 1), True))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("density", (0.0, 0.5, 0.9, 1.0))
@pytest.mark.parametrize("case", CONV, ids=_ids)
def test_sparse_conv2d(case, density, dtype):
    n, cin, cout, h, w, ks, st, pad, dil, with_bias = case
    g = gen(seed_of("conv", case, density))
    W = random_sparse((cout, cin) + ks, density, torch.float64, g)
    vals = W.values.to(dtype).to(DEV)
    rp, ci = W.row_ptr.to(DEV), W.col_idx.to(DEV)
    x = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64).to(dtype).to(DEV)
    bias = torch.randn(cout, generator=g, dtype=torch.float64).to(dtype).to(DEV) if with_bias else None
    args = (list(ks), list(st), list(pad), list(dil))
    y = torch.ops.sparsekern.sparse_conv2d(x, vals, rp, ci, list(ks), bias, *args[1:])
    xd = x.double().requires_grad_(True)
    want = reference.sparse_conv2d(xd, vals.double(), rp, ci, list(ks), None if bias is None else bias.double(),
                                   *args[1:])
    scale = reference.sparse_conv2d(xd.detach().abs(), vals.double().abs(), rp, ci, list(ks),
                                    None if bias is None else bias.double().abs(), *args[1:])
    _close(y, want.detach(), scale, dtype)
    # backward kernels
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).to(DEV)
    dx = torch.ops.sparsekern.sparse_conv2d_backward_input(gy, vals, rp, ci, list(x.shape), *args)
    dv = torch.ops.sparsekern.sparse_conv2d_backward_weight(gy, x, rp, ci, *args)
    vd = vals.double().requires_grad_(True)
    out = reference.sparse_conv2d(xd, vd, rp, ci, list(ks), None, *args[1:])
    e_dx, e_dv = torch.autograd.grad(out, [xd, vd], gy.double(), allow_unused=True, materialize_grads=True)
    xa = xd.detach().abs().requires_grad_(True)
    va = vd.detach().abs().requires_grad_(True)
    s_dx, s_dv = torch.autograd.grad(reference.sparse_conv2d(xa, va, rp, ci, list(ks), None, *args[1:]), [xa, va],
                                     gy.double().abs(), allow_unused=True, materialize_grads=True)
    _close(dx, e_dx, s_dx, dtype)
    _close(dv, e_dv, s_dv, dtype)


# ---- gather, topk_select ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("n", (0, 1, 1000, 100_003))
def test_gather(n, dtype):
    g = gen(seed_of("gather", n))
    src = torch.randn(5000, generator=g).to(dtype).to(DEV)
    index = torch.randint(0, 5000, (n,), generator=g).to(DEV)
    assert torch.equal(torch.ops.sparsekern.gather(src, index), src[index])
    assert torch.equal(torch.ops.sparsekern.gather(src[::2], index // 2), src[::2][index // 2])


def _topk_ref(scores, k, largest, cand):
    return reference.topk_select(scores.cpu(), k, largest, None if cand is None else cand.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
@pytest.mark.parametrize("with_cand", [False, True], ids=["all", "cand"])
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
@pytest.mark.parametrize("n", (0, 1, 5, 1000, 100_000, 3_000_000))
def test_topk_select(n, largest, with_cand, dtype):
    g = gen(seed_of("topk", n, largest, with_cand))
    scores = torch.randn(n, generator=g, dtype=torch.float64)
    if n > 10:
        scores[: n // 3] = torch.randint(-3, 4, (n // 3,), generator=g).double()  # many ties, +0.0 and -0.0
        scores[: n // 6] *= -1
    scores = scores.to(dtype).to(DEV)
    cand = (torch.rand(n, generator=g) < 0.6).to(DEV) if with_cand else None
    ncand = n if cand is None else int(cand.sum())
    for k in sorted({0, min(1, ncand), ncand // 2, ncand}):
        got = torch.ops.sparsekern.topk_select(scores, k, largest, cand)
        assert got.dtype == torch.int64 and got.device.type == "cuda"
        assert torch.equal(got.cpu(), _topk_ref(scores, k, largest, cand)), f"k={k}"


def test_topk_select_errors():
    s = torch.tensor([1.0, float("nan"), 2.0], device=DEV)
    with pytest.raises(ValueError, match="NaN at index 1"):
        torch.ops.sparsekern.topk_select(s, 1, True, None)
    # a NaN outside the candidates is ignored
    cand = torch.tensor([True, False, True], device=DEV)
    assert torch.ops.sparsekern.topk_select(s, 1, True, cand).tolist() == [2]
    with pytest.raises(RuntimeError, match="larger than the number of candidates"):
        torch.ops.sparsekern.topk_select(s, 3, True, cand)


# ---- the benchmark shape: correct, and timed against cuBLAS (printed, not asserted) --------------------

@pytest.mark.slow
def test_sparse_linear_benchmark_shape(capsys):
    torch.manual_seed(0)
    m = k = 4096
    n = 8192
    W = random_sparse((m, k), 0.1, torch.float32, gen(0)).to(DEV)
    x = torch.randn(n, k, device=DEV)
    y = torch.ops.sparsekern.sparse_linear(x, W.values, W.row_ptr, W.col_idx, None)
    dense = W.to_dense()
    torch.testing.assert_close(y, x @ dense.t(), rtol=1e-4, atol=1e-3)

    def bench(fn, reps=20):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    t_sparse = bench(lambda: torch.ops.sparsekern.sparse_linear(x, W.values, W.row_ptr, W.col_idx, None))
    t_dense = bench(lambda: x @ dense.t())
    with capsys.disabled():
        print(f"\nsparse_linear 4096x4096 d=0.1 x 8192 fp32: {t_sparse:.3f} ms, cuBLAS {t_dense:.3f} ms, "
              f"speedup {t_dense / t_sparse:.2f}x (TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})")
