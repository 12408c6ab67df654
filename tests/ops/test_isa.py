"""The CPU kernels' two vector widths (sparsekern.isa): avx2 (32-byte loops) and avx512 (64-byte loops),
each against the reference, for sparse_linear, spmm and sddmm over the shared parametrization plus shapes
whose batch fills the 64- and 128-byte tiles, at densities below the engine's dense fallback (0.3); and the
conv loops (pointwise, batch-innermost and direct kernels) against F.conv2d, over planes, runs and rows that
fill whole 64-byte vectors, end in an overlapped one, or are too short for one (the 32-byte loops run)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparsekern
from sparsekern import isa as sk_isa, reference
from sparsekern.ops import sddmm, sparse_conv2d, sparse_linear, spmm

from sk_testing import assert_close, gen, grads, has_cpu_kernel, make_input, random_sparse, seed_of

ISAS = ("avx2", "avx512")
OPS = ("sparse_linear", "spmm", "sddmm")

# Batches of 16..32 fp32 columns run the 64-byte loops at 1 and 2 vectors per tile row, 33 and more at 4
# (256-byte tiles; 128-byte ones on the 32-byte loops), 64 fills one 256-byte tile, 100 and 257 span several
# with a ragged last one; k and m not multiples of 8 or 16. 48 x 80 x 200: whole 16 x 16 blocks (the 64-byte loops'
# transposed store and packing) and a ragged tile beside them.
WIDE_MKN = ((20, 37, 16), (33, 48, 32), (9, 70, 33), (24, 50, 64), (40, 130, 100), (17, 19, 257), (48, 80, 200))
WIDE_SPARSITIES = ((0.1, False), (0.25, True))


def _skip_without_kernels():
    if not sparsekern.ops.HAS_EXTENSION:
        pytest.skip("needs the compiled extension sparsekern._C (sparsekern.ops.HAS_EXTENSION is False)")
    missing = [op for op in OPS if not has_cpu_kernel(op)]
    if missing:
        pytest.skip(f"needs the compiled CPU kernels of {missing}")


@pytest.fixture(params=ISAS)
def isa(request):
    _skip_without_kernels()
    name = request.param
    if not sk_isa.supported(name):
        pytest.skip(f"isa {name}: this CPU lacks AVX-512F/BW/DQ/VL (or the build has no 512-bit loops)")
    with sparsekern.backend("cpp"), sk_isa.use(name) as now:
        assert now == name
        yield name


def _check_ops(mkn, sparsity, dtype, layout, tag):
    m, k, n = mkn
    density, empty_rows = sparsity
    g = gen(seed_of("isa", tag, mkn, sparsity, dtype, layout))
    W = random_sparse((m, k), density, dtype, g, empty_rows, layout, requires_grad=True)
    # sparse_linear forward, dx (a CSR SpMM on W^T) and dW (an SDDMM), bias included.
    x = make_input((n, k), dtype, g, layout, requires_grad=True)
    bias = make_input((m,), dtype, g, layout, requires_grad=True)
    y = sparse_linear(x, W, bias)
    expected = reference.sparse_linear(x, W.values, W.row_ptr, W.col_idx, bias)
    assert_close(y, expected, scale=k)
    grad_out = make_input(y.shape, dtype, g)
    for got, exp, s in zip(grads(y, [x, W.values], grad_out), grads(expected, [x, W.values], grad_out), (m, n)):
        assert_close(got, exp, scale=s)
    # spmm and sddmm as ops of their own (B, X, Y in the given layout).
    B = make_input((k, n), dtype, g, layout)
    assert_close(spmm(W, B), reference.spmm(W.values, W.row_ptr, W.col_idx, B), scale=k)
    X = make_input((m, n), dtype, g, layout)
    Y = make_input((k, n), dtype, g, layout)
    assert_close(sddmm(W, X, Y), reference.sddmm(W.row_ptr, W.col_idx, X, Y), scale=n)


def test_shared_parametrization(isa, mkn, sparsity, dtype, layout):
    _check_ops(mkn, sparsity, dtype, layout, "shared")


@pytest.mark.parametrize("mkn", WIDE_MKN, ids=lambda p: "m{}k{}n{}".format(*p))
@pytest.mark.parametrize("sparsity", WIDE_SPARSITIES, ids=lambda p: f"d{p[0]:g}" + ("-emptyrows" if p[1] else ""))
def test_wide_tiles(isa, mkn, sparsity, dtype, layout):
    _check_ops(mkn, sparsity, dtype, layout, "wide")


@pytest.mark.parametrize("mkn", WIDE_MKN, ids=lambda p: "m{}k{}n{}".format(*p))
@pytest.mark.parametrize("sparsity", ((0.1, True), (0.0, False), (0.7, False)), ids=lambda p: f"d{p[0]:g}")
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "node"])
def test_fused_relu_is_applied_as_the_engine_stores(isa, mkn, sparsity, dtype, layout, grad):
    """The ReLU fused into sparse_linear (the layer's C++ node) is applied by the engine as it stores the product,
    at either width, in the tile loops (0.1), the no-nonzero fill (0.0: the bias alone) and the dense fallback (0.7);
    a NaN stays NaN as clamp_min keeps it, and the node's gradients match the op's followed by a ReLU."""
    m, k, n = mkn
    g = gen(seed_of("isa", "relu", mkn, sparsity, dtype, layout))
    W = random_sparse((m, k), sparsity[0], dtype, g, sparsity[1], requires_grad=grad)
    x = make_input((n, k), dtype, g, layout, requires_grad=grad)
    bias = make_input((m,), dtype, g, requires_grad=grad)
    if not grad:
        with torch.no_grad():
            x[n // 2, k // 3] = float("nan")
    with torch.set_grad_enabled(grad):
        y = torch.ops.sparsekern._sparse_linear_relu_node(x, W.values, bias, W.row_ptr, W.col_idx,
                                                          *W.transpose_pattern())
        # The unfused op then the ReLU, bit for bit (a NaN where the op reads one; the reference's dense product
        # would spread it over the row), and the reference.
        unfused = sparse_linear(x, W, bias).relu()
        expected = reference.sparse_linear(x, W.values, W.row_ptr, W.col_idx, bias).relu()
    torch.testing.assert_close(y, unfused, rtol=0, atol=0, equal_nan=True)
    assert not (y < 0).any()
    if grad:
        assert_close(y, expected, scale=k)
        grad_out = make_input(y.shape, dtype, g)
        for got, exp, s in zip(grads(y, [x, W.values, bias], grad_out),
                               grads(expected, [x, W.values, bias], grad_out), (m, n, n)):
            assert_close(got, exp, scale=s)


@pytest.mark.parametrize("mkn", [(40, 130, 100), (48, 80, 200)], ids=lambda p: "m{}k{}n{}".format(*p))
def test_fused_relu_in_bfloat16(isa, mkn):
    """bf16 runs the float32 loops and rounds on store: the fused ReLU clamps before the rounding, which keeps the
    sign, so it matches the unfused op then the ReLU bit for bit."""
    m, k, n = mkn
    g = gen(seed_of("isa", "relu-bf16", mkn))
    W = random_sparse((m, k), 0.1, torch.bfloat16, g, empty_rows=True)
    x = make_input((n, k), torch.bfloat16, g, "contiguous")
    bias = make_input((m,), torch.bfloat16, g)
    with torch.no_grad():
        y = torch.ops.sparsekern._sparse_linear_relu_node(x, W.values, bias, W.row_ptr, W.col_idx,
                                                          *W.transpose_pattern())
        torch.testing.assert_close(y, sparse_linear(x, W, bias).relu(), rtol=0, atol=0)
    assert y.dtype == torch.bfloat16 and not (y < 0).any()


def test_bfloat16(isa):
    """bf16 runs the float32 loops of either width: the same rounded result as float32 then rounded."""
    g = gen(seed_of("isa", "bf16"))
    W = random_sparse((40, 130), 0.1, torch.bfloat16, g, empty_rows=True)
    x = make_input((100, 130), torch.bfloat16, g, "transposed")
    y = sparse_linear(x, W)
    exp = reference.sparse_linear(x.float(), W.values.float(), W.row_ptr, W.col_idx).to(torch.bfloat16)
    torch.testing.assert_close(y.float(), exp.float(), rtol=1.6e-2, atol=1e-2)


def test_both_widths_agree_on_a_large_layer():
    """One 512-wide layer, batch 256, both widths: the same sums up to float32 reassociation."""
    _skip_without_kernels()
    if not sk_isa.supported("avx512"):
        pytest.skip("this CPU lacks AVX-512F/BW/DQ/VL: only the avx2 loops run")
    g = gen(seed_of("isa", "agree"))
    W = random_sparse((512, 512), 0.1, torch.float32, g, requires_grad=True)
    x = make_input((256, 512), torch.float32, g, requires_grad=True)
    grad_out = make_input((256, 512), torch.float32, g)
    results = []
    with sparsekern.backend("cpp"):
        for name in ISAS:
            with sk_isa.use(name):
                y = sparse_linear(x, W)
                results.append((y, *grads(y, [x, W.values], grad_out)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_set_isa_checks_its_argument():
    _skip_without_kernels()
    with pytest.raises(RuntimeError, match=r"_set_isa: isa must be 'auto', 'avx2' or 'avx512', got 'sse'"):
        sk_isa.set("sse")
    assert not sk_isa.supported("sse")
    assert sk_isa.supported("avx2") and sk_isa.supported("auto")
    if not sk_isa.supported("avx512"):
        with pytest.raises(RuntimeError, match=r"_set_isa: isa 'avx512' needs a CPU with AVX-512"):
            sk_isa.set("avx512")


def test_use_restores_the_previous_isa():
    _skip_without_kernels()
    before = sk_isa.get()
    with sk_isa.use("avx2"):
        assert sk_isa.get() == sk_isa.current() == "avx2"
    assert sk_isa.get() == sk_isa.current() == before


def _isa_at_load(value):
    env = dict(os.environ, SPARSEKERN_ISA=value)
    code = "import sparsekern.isa as i; print(i.get(), i.build())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    isa, build = out.stdout.strip().splitlines()[-1].split()
    return isa, build, out.stderr


def _best_build():
    with sk_isa.use("auto"):
        return sk_isa.build()


def _avx2_build(best):
    """The build an ISA of avx2 runs: the CPU's best, at most x86-64-v3."""
    return sk_isa.BUILDS[min(sk_isa.BUILDS.index(best), 1)]


def test_environment_variable_is_read_at_load():
    _skip_without_kernels()
    best = _best_build()
    assert _isa_at_load("avx2")[:2] == ("avx2", _avx2_build(best))
    auto, build, _ = _isa_at_load("auto")
    assert auto in ISAS and build == best
    isa, build, err = _isa_at_load("avx1024")
    assert (isa, build) == (auto, best) and "SPARSEKERN_ISA=avx1024 ignored" in err
    if sk_isa.supported("avx512"):
        assert _isa_at_load("avx512")[:2] == ("avx512", "x86-64-v4")


@pytest.mark.skipif(os.environ.get("SPARSEKERN_EXPECT_NO_AVX512") != "1",
                    reason="for `make test-no-avx512`, on a CPU without AVX-512 (valgrind's)")
def test_a_cpu_without_avx512_runs_the_avx2_loops_and_v3_build():
    """What `make test-no-avx512` runs on: a CPU that lacks AVX-512 (valgrind's emulated one), where torch and
    sparsekern pick their AVX2 code by themselves, as on an AVX2 host, and any AVX-512 instruction left in a path
    they run stops the process (SIGILL)."""
    _skip_without_kernels()
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert not sk_isa.supported("avx512")
    assert (sk_isa.get(), sk_isa.build()) == ("avx2", "x86-64-v3")


def test_the_build_follows_the_isa():
    """Under avx2 every cloned loop runs the x86-64-v3 build, the code an AVX2 host runs (16 vector registers, no
    EVEX), not the v4 build's 32-byte loops; set and use switch it with the ISA."""
    _skip_without_kernels()
    before, best = sk_isa.build(), _best_build()
    assert best in sk_isa.BUILDS and sk_isa.build() == before
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert best in ("x86-64-v3", "x86-64-v4")
    with sk_isa.use("avx2"):
        assert sk_isa.build() == _avx2_build(best)
    if sk_isa.supported("avx512"):
        with sk_isa.use("avx512"):
            assert sk_isa.build() == best == "x86-64-v4"
    assert sk_isa.build() == before


def test_every_cloned_kernel_under_each_build(isa):
    """The cloned loops outside the CSR engine and the conv tiles (batch norm, max pooling, depthwise conv, the
    narrow linear, the fused GELU, top-k, the gather SpMM and SDDMM) under each ISA's build, against torch."""
    from sparsekern.nn import SparseLinear
    from sparsekern.nn.fast_modules import FastBatchNorm2d, FastDepthwiseConv2d, FastMaxPool2d, FastNarrowLinear
    assert sk_isa.build() == (_avx2_build(_best_build()) if isa == "avx2" else "x86-64-v4")
    g = gen(seed_of("isa", "builds"))

    def twins(fast, plain, x):
        plain.load_state_dict(fast.state_dict())
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [fast(xs[0]), plain(xs[1])]
        grad_out = make_input(ys[1].shape, x.dtype, g)
        for y in ys:
            y.backward(grad_out)
        torch.testing.assert_close(ys[0], ys[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-5, atol=1e-5)

    twins(FastBatchNorm2d(16), torch.nn.BatchNorm2d(16), make_input((4, 16, 9, 9), torch.float32, g))
    twins(FastMaxPool2d(3, 2, 1), torch.nn.MaxPool2d(3, 2, 1), make_input((2, 8, 13, 13), torch.float32, g))
    twins(FastDepthwiseConv2d(16, 16, 5, padding=2, groups=16), torch.nn.Conv2d(16, 16, 5, padding=2, groups=16),
          make_input((2, 16, 14, 14), torch.float32, g))
    twins(FastNarrowLinear(70, 10), torch.nn.Linear(70, 10), make_input((37, 70), torch.float32, g))
    # The fused GELU (SparseLinear's activation) against F.gelu of the reference.
    layer = SparseLinear(64, 48, density=0.2, activation="gelu")
    x = make_input((33, 64), torch.float32, g)
    expected = F.gelu(F.linear(x, layer.dense_weight().detach(), layer.bias.detach()))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # Top-k: the same selected scores as torch.topk.
    scores = make_input((5000,), torch.float32, g)
    picked = sparsekern.ops.topk_select(scores, 123)
    torch.testing.assert_close(torch.sort(scores[picked]).values, torch.sort(torch.topk(scores, 123).values).values)
    # The gather SpMM and SDDMM: so sparse a pattern that a product runs them, not the tiles.
    W = random_sparse((64, 512), 0.002, torch.float32, g, empty_rows=True)
    B = make_input((512, 24), torch.float32, g)
    assert_close(spmm(W, B), reference.spmm(W.values, W.row_ptr, W.col_idx, B), scale=512)
    X, Y = make_input((64, 24), torch.float32, g), make_input((512, 24), torch.float32, g)
    assert_close(sddmm(W, X, Y), reference.sddmm(W.row_ptr, W.col_idx, X, Y), scale=24)


# (kernel pin, N, Cin, Cout, H, W, kernel, stride, padding, dilation).
# batched: 1x1 convs run the pointwise kernel (planes of 4x4 and 7x7 grouped several images to a row, 14x14 flat
# with an overlapped last vector, stride 2 packed), 3x3 ones the batch-innermost kernel, whose runs of OW*N columns
# fill 64-byte vectors, overlap, or (N=1, 5 columns) are too short for one.
# direct: output rows of 16-64 fp32 columns fill 64-byte vectors (32, 16), end in an overlapped one (20, 28, 33)
# or leave the 64-byte loops to narrower rows (12); stride 2 splits the input gradient into phases 20 wide; one
# image runs the channel-parallel branch; 96 input channels cut the rows into blocks of planes.
CONV_CASES = (("batched", 3, 8, 12, 4, 4, 1, 1, 0, 1), ("batched", 2, 16, 8, 7, 7, 1, 1, 0, 1),
              ("batched", 2, 8, 8, 14, 14, 1, 1, 0, 1), ("batched", 4, 8, 6, 9, 9, 1, 2, 0, 1),
              ("batched", 4, 6, 8, 7, 7, 3, 1, 1, 1), ("batched", 3, 5, 7, 9, 9, 3, 2, 1, 1),
              ("batched", 1, 4, 4, 5, 5, 3, 1, 1, 1), ("batched", 16, 8, 8, 4, 4, 3, 1, 1, 1),
              ("direct", 2, 4, 6, 16, 16, 3, 1, 1, 1), ("direct", 3, 5, 4, 20, 20, 3, 1, 1, 1),
              ("direct", 2, 3, 5, 28, 30, (1, 3), 1, (0, 1), 1), ("direct", 1, 4, 3, 33, 35, 3, 1, 0, 1),
              ("direct", 2, 3, 4, 40, 40, 3, 2, 1, 1), ("direct", 2, 3, 4, 24, 24, 3, 1, 2, 2),
              ("direct", 2, 4, 4, 12, 12, 5, 1, 2, 1), ("direct", 2, 96, 8, 18, 18, 3, 1, 1, 1))


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "{}-n{}c{}o{}h{}w{}k{}s{}p{}d{}".format(*c))
@pytest.mark.parametrize("conv_dtype", (torch.float32, torch.float64, torch.bfloat16), ids=str)
def test_conv_tiles(isa, case, conv_dtype, monkeypatch):
    """Forward, input and weight gradient of the conv kernels' loops at either width against F.conv2d
    (float64): the pointwise and batch-innermost tile loops, and the direct kernel's (64-byte vectors where
    every output row holds one)."""
    pin, n, cin, cout, h, w, k, stride, pad, dil = case
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", pin)
    g = gen(seed_of("isa", "conv", case, conv_dtype))
    ks = k if isinstance(k, tuple) else (k, k)
    W = random_sparse((cout, cin, *ks), 0.2 if pin == "batched" else 0.3, conv_dtype, g, empty_rows=True,
                      requires_grad=True)
    x = make_input((n, cin, h, w), conv_dtype, g, requires_grad=True)
    bias = make_input((cout,), conv_dtype, g, requires_grad=True)
    y = sparse_conv2d(x, W, bias, stride, pad, dil)
    dense = W.to_dense().detach().double().requires_grad_(True)
    xd, bd = x.detach().double().requires_grad_(True), bias.detach().double().requires_grad_(True)
    expected = F.conv2d(xd, dense, bd, stride, pad, dil)
    tol = dict(rtol=2e-2, atol=5e-2) if conv_dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), expected, **tol)
    grad_out = make_input(y.shape, conv_dtype, g)
    gx, gv, gb = grads(y, [x, W.values, bias], grad_out)
    ex, ew, eb = grads(expected, [xd, dense, bd], grad_out.double())
    rows = torch.repeat_interleave(torch.arange(cout), W.row_ptr.diff())
    ev = ew.reshape(cout, -1)[rows, W.col_idx.long()]
    for got, exp in ((gx, ex), (gv, ev), (gb, eb)):
        torch.testing.assert_close(got.double(), exp, **tol)


@pytest.mark.parametrize("pin,n,hw,inf_at", [("batched", 4, 5, (1, 2, 4, 4)), ("direct", 3, 20, (1, 2, 7, 3))])
def test_conv_widths_agree_with_inf_in_overlapped_lanes(pin, n, hw, inf_at, monkeypatch):
    """An Inf the weight gradient reads twice (in a vector and in the overlapped last one: a 5x5 plane's batch
    runs, a 20-wide row) counts once at either width: no 0 * Inf = NaN from the lanes a vector does not own."""
    _skip_without_kernels()
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", pin)
    g = gen(seed_of("isa", "conv-inf", pin))
    W = random_sparse((6, 5, 3, 3), 0.4, torch.float64, g)
    x = torch.randn(n, 5, hw, hw, generator=g, dtype=torch.float64)
    x[inf_at] = float("inf")
    dy = torch.randn(n, 6, hw, hw, generator=g, dtype=torch.float64)
    geo = ([1, 1], [1, 1], [1, 1])
    rows = torch.repeat_interleave(torch.arange(6), W.row_ptr.diff())
    xc = F.unfold(x, 3, padding=1)
    expected = (dy.view(n, 6, hw * hw)[:, rows] * xc[:, W.col_idx.long()]).sum((0, 2))
    for name in ISAS:
        if not sk_isa.supported(name):
            continue
        with sk_isa.use(name):
            dv = torch.ops.sparsekern.sparse_conv2d_backward_weight(dy, x, W.row_ptr, W.col_idx, [3, 3], *geo)
        torch.testing.assert_close(dv, expected, equal_nan=True)
