"""The CSR engine's two vector widths (sparsekern.isa): avx2 (32-byte loops) and avx512 (64-byte loops),
each against the reference, for sparse_linear, spmm and sddmm over the shared parametrization plus shapes
whose batch fills the 64- and 128-byte tiles, at densities below the engine's dense fallback (0.3)."""
import os
import subprocess
import sys

import pytest
import torch

import sparsekern
from sparsekern import isa as sk_isa, reference
from sparsekern.ops import sddmm, sparse_linear, spmm

from sk_testing import assert_close, gen, grads, has_cpu_kernel, make_input, random_sparse, seed_of

ISAS = ("avx2", "avx512")
OPS = ("sparse_linear", "spmm", "sddmm")

# Batches of 16..32 fp32 columns run the 64-byte loops at 1 and 2 vectors per tile row, 33 and more at 4
# (256-byte tiles; 128-byte ones on the 32-byte loops), 64 fills one 256-byte tile, 100 and 257 span several
# with a ragged last one; k and m not multiples of 8 or 16.
WIDE_MKN = ((20, 37, 16), (33, 48, 32), (9, 70, 33), (24, 50, 64), (40, 130, 100), (17, 19, 257))
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
        assert sk_isa.get() == "avx2"
    assert sk_isa.get() == before


def _isa_at_load(value):
    env = dict(os.environ, SPARSEKERN_ISA=value)
    code = "import sparsekern.isa; print(sparsekern.isa.get())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1], out.stderr


def test_environment_variable_is_read_at_load():
    _skip_without_kernels()
    assert _isa_at_load("avx2")[0] == "avx2"
    auto = _isa_at_load("auto")[0]
    assert auto in ISAS
    isa, err = _isa_at_load("avx1024")
    assert isa == auto and "SPARSEKERN_ISA=avx1024 ignored" in err
    if sk_isa.supported("avx512"):
        assert _isa_at_load("avx512")[0] == "avx512"
