"""Triton sparse_conv2d and its backward ops against float64 torch conv2d (sparsekern.reference) and
its autograd. On a CPU the kernels run under TRITON_INTERPRET=1 (with the first autotune config; the
*_every_config tests run the others), so shapes stay small."""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from triton_testing import CONFIG_DTYPES, DEVICE, DTYPES, OutOfResources, assert_close, forced_config, needs_gpu

import sparsekern.triton_kernels.sparse_conv2d as sc  # defines the ops (same module name as the ops layer uses)
from sparsekern import reference
from sparsekern.sparse_matrix import csr_from_mask

ops = torch.ops.sparsekern_triton

# (N, Cin, Cout, H, W, kernel, stride, padding, dilation, bias, density, channels_last)
CASES = [
    (2, 3, 4, 6, 5, (1, 1), (1, 1), (0, 0), (1, 1), True, 0.5, False),     # 1x1
    (1, 2, 3, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), False, 0.9, True),     # 3x3 "same", channels_last
    (2, 3, 5, 8, 6, (3, 3), (2, 2), (0, 0), (1, 1), True, 1.0, False),     # stride 2, dense pattern
    (2, 2, 3, 9, 9, (5, 5), (1, 1), (2, 2), (1, 1), True, 0.5, True),      # 5x5, padding 2
    (1, 3, 2, 9, 8, (3, 3), (1, 1), (2, 2), (2, 2), False, 0.5, False),    # dilation 2
    (2, 2, 3, 7, 10, (3, 5), (2, 1), (1, 2), (1, 2), True, 0.5, True),     # rectangular everything
    (2, 3, 4, 5, 7, (3, 1), (1, 2), (1, 0), (1, 1), False, 0.9, False),    # 3x1 kernel
    (1, 17, 3, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1), True, 0.5, False),    # Cin*kh*kw = 153
    (2, 5, 6, 11, 9, (3, 3), (2, 2), (1, 1), (1, 1), True, 0.5, True),     # stride 2 + padding, odd sizes
    (1, 4, 4, 8, 7, (3, 3), (3, 2), (0, 1), (2, 1), False, 0.5, False),    # stride 3
]


def _case_id(c):
    n, cin, cout, h, w, k, s, p, d, b, dens, cl = c
    return (f"N{n}-{cin}to{cout}-{h}x{w}-k{k[0]}{k[1]}-s{s[0]}{s[1]}-p{p[0]}{p[1]}-d{d[0]}{d[1]}-dens{dens:g}"
            + ("-bias" if b else "") + ("-cl" if cl else ""))


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _weight(cout, cin, k, density, g, empty_rows=()):
    """CSR (values fp64 on the CPU, row_ptr, col_idx) of a random masked (Cout, Cin, kh, kw) weight."""
    kc = cin * k[0] * k[1]
    mask = torch.rand(cout, kc, generator=g) < density
    if density >= 1.0:
        mask[:] = True
    mask[list(empty_rows)] = False
    dense = torch.randn(cout, kc, generator=g, dtype=torch.float64) / math.sqrt(max(1, density * kc))
    row_ptr, col_idx = csr_from_mask(mask)
    return dense[mask], row_ptr.to(DEVICE), col_idx.to(DEVICE)


def _as(t, dtype, channels_last=False):
    t = t.to(DEVICE, dtype)
    return t.to(memory_format=torch.channels_last) if channels_last else t


def _reference(x, values, row_ptr, col_idx, k, bias, s, p, d, grad_out):
    """float64 reference output, d x and d values (by torch autograd), from the rounded inputs."""
    x64 = x.detach().double().requires_grad_()
    v64 = values.detach().double().requires_grad_()
    b64 = None if bias is None else bias.double()
    out = reference.sparse_conv2d(x64, v64, row_ptr, col_idx, k, b64, s, p, d)
    if out.numel() == 0:
        return out.detach(), torch.zeros_like(x64), torch.zeros_like(v64)
    dx, dv = torch.autograd.grad(out, [x64, v64], grad_out.double(), allow_unused=True, materialize_grads=True)
    return out.detach(), dx, dv


def _run_all(x, values, row_ptr, col_idx, k, bias, s, p, d, dtype, g):
    """The three ops, checked against the reference on the same (rounded) inputs."""
    out = ops.sparse_conv2d(x, values, row_ptr, col_idx, list(k), bias, list(s), list(p), list(d))
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grad_out = _as(grad_out, dtype, x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    ref_out, ref_dx, ref_dv = _reference(x, values, row_ptr, col_idx, k, bias, s, p, d, grad_out)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, dtype)
    dx = ops.sparse_conv2d_backward_input(grad_out, values, row_ptr, col_idx, list(x.shape), list(k), list(s),
                                          list(p), list(d))
    assert dx.dtype == dtype and dx.shape == x.shape
    assert_close(dx, ref_dx, dtype)
    dv = ops.sparse_conv2d_backward_weight(grad_out, x, row_ptr, col_idx, list(k), list(s), list(p), list(d))
    assert dv.dtype == dtype and dv.shape == values.shape
    assert_close(dv, ref_dv, dtype)
    return out, dx


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_sparse_conv2d_and_backward(case, dtype):
    n, cin, cout, h, w, k, s, p, d, has_bias, density, cl = case
    g = _gen(case, dtype)
    values, row_ptr, col_idx = _weight(cout, cin, k, density, g)
    x = _as(torch.randn(n, cin, h, w, generator=g, dtype=torch.float64), dtype, cl)
    bias = _as(torch.randn(cout, generator=g, dtype=torch.float64), dtype) if has_bias else None
    out, dx = _run_all(x, _as(values, dtype), row_ptr, col_idx, k, bias, s, p, d, dtype, g)
    # The output (and dx) follow the input's memory format.
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    assert dx.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.5, 0.9, 1.0])
def test_densities_and_empty_rows(density, dtype):
    """Rows 1 and 4 empty (bias only), the others at the given density; density 0 is nnz = 0."""
    n, cin, cout, h, w, k, s, p, d = 2, 3, 6, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1)
    g = _gen("densities", density, dtype)
    values, row_ptr, col_idx = _weight(cout, cin, k, density, g, empty_rows=(1, 4))
    x = _as(torch.randn(n, cin, h, w, generator=g, dtype=torch.float64), dtype)
    bias = _as(torch.randn(cout, generator=g, dtype=torch.float64), dtype)
    out, _ = _run_all(x, _as(values, dtype), row_ptr, col_idx, k, bias, s, p, d, dtype, g)
    assert_close(out[:, [1, 4]], bias[[1, 4]].double().view(1, 2, 1, 1).expand(n, 2, h, w), dtype)


def test_several_row_groups(monkeypatch):
    """Groups of 16 rows: Cout = Cin = 40 gives 3 groups, the last one partial; rows 32..39 empty, so
    the forward's last group has no union column (bias only) and the wgrad's tiles past it idle."""
    monkeypatch.setattr(sc, "_MAX_GROUP", 16)
    n, cin, cout, h, w, k, s, p, d = 2, 40, 40, 5, 4, (3, 3), (2, 1), (1, 1), (1, 1)
    g = _gen("groups")
    values, row_ptr, col_idx = _weight(cout, cin, k, 0.1, g, empty_rows=range(32, 40))
    x = _as(torch.randn(n, cin, h, w, generator=g, dtype=torch.float64), torch.float32)
    bias = _as(torch.randn(cout, generator=g, dtype=torch.float64), torch.float32)
    _run_all(x, _as(values, torch.float32), row_ptr, col_idx, k, bias, s, p, d, torch.float32, g)


def test_wgrad_split_over_pixels(monkeypatch):
    """backward_weight with M = N*Ho*Wo cut into many slices (a slice length that is no multiple of the
    pixel block), each writing its own partial sums."""
    monkeypatch.setattr(sc, "_M_QUANTUM", 48)
    monkeypatch.setattr(sc, "_num_sms", lambda device: 64)
    n, cin, cout, h, w, k, s, p, d = 3, 4, 5, 9, 8, (3, 3), (1, 1), (1, 1), (1, 1)
    g = _gen("split")
    values, row_ptr, col_idx = _weight(cout, cin, k, 0.5, g)
    x = _as(torch.randn(n, cin, h, w, generator=g, dtype=torch.float64), torch.float32)
    grad_out = _as(torch.randn(n, cout, h, w, generator=g, dtype=torch.float64), torch.float32)
    vals = _as(values, torch.float32)
    _, _, ref_dv = _reference(x, vals, row_ptr, col_idx, k, None, s, p, d, grad_out)
    dv = ops.sparse_conv2d_backward_weight(grad_out, x, row_ptr, col_idx, list(k), list(s), list(p), list(d))
    assert_close(dv, ref_dv, torch.float32)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "channels_last"])
def test_bfloat16(cl):
    """bf16 everywhere (on a CPU through the interpreter's fp32 upcast of the dot tiles)."""
    dtype = torch.bfloat16
    n, cin, cout, h, w, k, s, p, d = 2, 3, 4, 7, 6, (3, 3), (2, 1), (1, 1), (1, 1)
    g = _gen("bf16", cl)
    values, row_ptr, col_idx = _weight(cout, cin, k, 0.5, g)
    x = _as(torch.randn(n, cin, h, w, generator=g, dtype=torch.float64), dtype, cl)
    bias = _as(torch.randn(cout, generator=g, dtype=torch.float64), dtype)
    _run_all(x, _as(values, dtype), row_ptr, col_idx, k, bias, s, p, d, dtype, g)


@pytest.mark.parametrize("layout", ["strided", "int32-row_ptr", "expanded-grad"])
def test_strided_inputs_and_int32_row_ptr(layout):
    """x and grad_out as non-contiguous views (neither NCHW nor channels_last), values a strided view;
    or an int32 row_ptr and int64 col_idx; or grad_out with zero strides (the gradient of out.sum())."""
    dtype = torch.float32
    n, cin, cout, h, w, k, s, p, d = 2, 3, 5, 6, 7, (3, 3), (1, 2), (1, 1), (1, 1)
    g = _gen("layout", layout)
    values, row_ptr, col_idx = _weight(cout, cin, k, 0.5, g)
    if layout == "strided":
        x = _as(torch.randn(n, cin + 2, h, 2 * w, generator=g, dtype=torch.float64), dtype)[:, 1:cin + 1, :, ::2]
        vals = _as(torch.randn(2 * values.numel(), generator=g, dtype=torch.float64), dtype)[::2]
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    else:
        x = _as(torch.randn(n, cin, h, w, generator=g, dtype=torch.float64), dtype)
        vals = _as(values, dtype)
        row_ptr, col_idx = row_ptr.to(torch.int32), col_idx.to(torch.int64)
    out = ops.sparse_conv2d(x, vals, row_ptr, col_idx, list(k), None, list(s), list(p), list(d))
    go_base = torch.randn(n, cout, out.shape[2], 2 * out.shape[3] + 1, generator=g, dtype=torch.float64)
    grad_out = _as(go_base, dtype)[..., 1::2] if layout == "strided" else _as(go_base[..., :out.shape[3]], dtype)
    if layout == "expanded-grad":
        grad_out = torch.full((), 0.75, dtype=dtype, device=DEVICE).expand(out.shape)
    ref_out, ref_dx, ref_dv = _reference(x, vals, row_ptr, col_idx, k, None, s, p, d, grad_out)
    assert_close(out, ref_out, dtype)
    dx = ops.sparse_conv2d_backward_input(grad_out, vals, row_ptr, col_idx, list(x.shape), list(k), list(s),
                                          list(p), list(d))
    assert_close(dx, ref_dx, dtype)
    dv = ops.sparse_conv2d_backward_weight(grad_out, x, row_ptr, col_idx, list(k), list(s), list(p), list(d))
    assert_close(dv, ref_dv, dtype)


@pytest.mark.parametrize("shape", ["batch0", "cout0", "cin0"])
def test_zero_size(shape):
    """Zero batch / Cout = 0 / Cin = 0: right shapes, zeros, and the bias where there is an output."""
    n, cin, cout = {"batch0": (0, 3, 4), "cout0": (2, 3, 0), "cin0": (2, 0, 4)}[shape]
    k, s, p, d = (3, 3), (1, 1), (1, 1), (1, 1)
    g = _gen("zero", shape)
    values, row_ptr, col_idx = _weight(cout, cin, k, 0.5, g)
    x = _as(torch.randn(n, cin, 5, 6, generator=g, dtype=torch.float64), torch.float32)
    bias = _as(torch.randn(cout, generator=g, dtype=torch.float64), torch.float32)
    vals = _as(values, torch.float32)
    if shape != "cin0":
        _run_all(x, vals, row_ptr, col_idx, k, bias, s, p, d, torch.float32, g)
        return
    # torch's conv2d returns (N, 0, H, W) for zero input channels: the expected values are written out.
    out = ops.sparse_conv2d(x, vals, row_ptr, col_idx, list(k), bias, list(s), list(p), list(d))
    assert_close(out, bias.view(1, cout, 1, 1).expand(n, cout, 5, 6), torch.float32)
    grad_out = torch.randn_like(out)
    dx = ops.sparse_conv2d_backward_input(grad_out, vals, row_ptr, col_idx, list(x.shape), list(k), list(s),
                                          list(p), list(d))
    assert dx.shape == x.shape
    dv = ops.sparse_conv2d_backward_weight(grad_out, x, row_ptr, col_idx, list(k), list(s), list(p), list(d))
    assert dv.shape == (0,)


# -- every autotune config ------------------------------------------------------------------------
# The autotuner only runs its winner afterwards, the interpreter only the first config: each config
# once, through the ops' own launchers (forced_config). "small" (also the CPU's), groups of 16 rows:
# Cout = 20 is a full and a partial group (row 7 empty), Cin = 9 one partial group; the forward's
# 2*7*21 = 294 output pixels and the backward_input's 2*13*21 = 546 input pixels are a tail after 1 to 8
# tiles of BLOCK_P 64 / 128 / 256; the groups' union columns, 80 and 64 (forward, wgrad) and 166
# (backward_input), a tail after 1 to 5 chunks of BLOCK_K 32 / 64 (or a whole number of them); the
# wgrad's M = 294 is cut into slices of 256 (1 to 4 BLOCK_M steps, then 38 pixels: a tail). Stride 2 and
# padding: the masked gathers of both directions.
# (N, Cin, Cout, H, W, kernel, stride, padding, dilation, density, max group, channels_last)
EVERY_CONFIG_SHAPES = [
    pytest.param((2, 9, 20, 13, 21, (3, 3), (2, 1), (1, 1), (1, 1), 0.3, 16, False), id="small"),
    pytest.param((8, 64, 96, 28, 28, (3, 3), (1, 1), (1, 1), (1, 1), 0.3, 128, True), id="realistic",
                 marks=needs_gpu),
]


def _every_config_inputs(monkeypatch, shape, dtype):
    n, cin, cout, h, w, k, s, p, d, density, max_group, cl = shape
    monkeypatch.setattr(sc, "_MAX_GROUP", max_group)
    g = _gen("every-config", shape, dtype)
    values, row_ptr, col_idx = _weight(cout, cin, k, density, g, empty_rows=(7,))
    x = _as(torch.randn(n, cin, h, w, generator=g, dtype=torch.float64), dtype, cl)
    bias = _as(torch.randn(cout, generator=g, dtype=torch.float64), dtype)
    oh, ow = sc._out_hw(h, w, k, s, p, d)
    grad_out = _as(torch.randn(n, cout, oh, ow, generator=g, dtype=torch.float64), dtype, cl)
    vals = _as(values, dtype)
    geometry = (list(k), list(s), list(p), list(d))
    return x, vals, row_ptr, col_idx, bias, grad_out, geometry, _reference(x, vals, row_ptr, col_idx, k, bias, s, p, d,
                                                                           grad_out)


@pytest.mark.parametrize("shape", EVERY_CONFIG_SHAPES)
@pytest.mark.parametrize("config", sc._conv_configs(), ids=str)
def test_conv_every_config(config, shape, monkeypatch):
    """_conv_kernel: the forward (bias) and backward_input (TRANSPOSED)."""
    for dtype in CONFIG_DTYPES:
        x, vals, row_ptr, col_idx, bias, grad_out, (k, s, p, d), (ref_out, ref_dx, _) = \
            _every_config_inputs(monkeypatch, shape, dtype)
        try:
            with forced_config(sc, sc._conv_kernel, config):
                out = ops.sparse_conv2d(x, vals, row_ptr, col_idx, k, bias, s, p, d)
                dx = ops.sparse_conv2d_backward_input(grad_out, vals, row_ptr, col_idx, list(x.shape), k, s, p, d)
        except OutOfResources:  # over the GPU's shared memory: the autotuner drops it
            continue
        assert_close(out, ref_out, dtype)
        assert_close(dx, ref_dx, dtype)


@pytest.mark.parametrize("shape", EVERY_CONFIG_SHAPES)
@pytest.mark.parametrize("config", sc._wgrad_configs(), ids=str)
def test_wgrad_every_config(config, shape, monkeypatch):
    """_wgrad_kernel: backward_weight."""
    for dtype in CONFIG_DTYPES:
        x, vals, row_ptr, col_idx, _, grad_out, (k, s, p, d), (_, _, ref_dv) = \
            _every_config_inputs(monkeypatch, shape, dtype)
        try:
            with forced_config(sc, sc._wgrad_kernel, config):
                dv = ops.sparse_conv2d_backward_weight(grad_out, x, row_ptr, col_idx, k, s, p, d)
        except OutOfResources:  # over the GPU's shared memory: the autotuner drops it
            continue
        assert_close(dv, ref_dv, dtype)


def test_schemas_mirror_the_cpp_ops():
    """Same argument names, order, kinds and defaults as the sparsekern:: schemas (csrc/ops.cpp)."""
    if not hasattr(torch.ops.sparsekern, "sparse_conv2d"):
        pytest.skip("sparsekern::sparse_conv2d is not defined (compiled extension not built)")

    def kind(t):
        t = str(t)
        return "int[]" if t.startswith(("int[", "SymInt[", "List[int]")) else t

    for name in ("sparse_conv2d", "sparse_conv2d_backward_input", "sparse_conv2d_backward_weight"):
        ours = getattr(ops, name).default._schema
        theirs = getattr(torch.ops.sparsekern, name).default._schema
        assert [(a.name, kind(a.type), a.default_value) for a in ours.arguments] == \
               [(a.name, kind(a.type), a.default_value) for a in theirs.arguments], name
        assert [str(r.type) for r in ours.returns] == [str(r.type) for r in theirs.returns]


# -- GPU only -----------------------------------------------------------------------------------

@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,cl", [(torch.float16, False), (torch.bfloat16, True), (torch.float32, False)],
                         ids=["fp16-nchw", "bf16-channels_last", "fp32-nchw"])  # each autotunes 3 kernels
@pytest.mark.parametrize("layer", ["1x1-256to64", "3x3-64to64"])
def test_resnet50_layer(layer, dtype, cl):
    """ResNet-50 stage-1 layers at batch 64, 56x56, 50% unstructured sparsity, against dense cuDNN."""
    cin, cout, k, p = (256, 64, (1, 1), (0, 0)) if layer.startswith("1x1") else (64, 64, (3, 3), (1, 1))
    s, d = (1, 1), (1, 1)
    g = _gen("resnet", layer, dtype, cl)
    values, row_ptr, col_idx = _weight(cout, cin, k, 0.5, g)
    x = _as(torch.randn(64, cin, 56, 56, generator=g), dtype, cl)
    bias = _as(torch.randn(cout, generator=g), dtype)
    vals = _as(values, dtype)
    dense = reference.csr_to_dense(vals.float(), row_ptr, col_idx, cin * k[0] * k[1]).view(cout, cin, *k)
    xf = x.float().requires_grad_()
    wf = dense.clone().requires_grad_()
    with torch.backends.cudnn.flags(allow_tf32=False):
        ref = F.conv2d(xf, wf, bias.float(), s, p, d)
    grad_out = _as(torch.randn(ref.shape, generator=g), dtype, cl)
    ref_dx, ref_dw = torch.autograd.grad(ref, [xf, wf], grad_out.float())
    rows = torch.repeat_interleave(torch.arange(cout, device=DEVICE), row_ptr[1:] - row_ptr[:-1])
    ref_dv = ref_dw.reshape(cout, -1)[rows, col_idx.long()]

    out = ops.sparse_conv2d(x, vals, row_ptr, col_idx, list(k), bias, list(s), list(p), list(d))
    dx = ops.sparse_conv2d_backward_input(grad_out, vals, row_ptr, col_idx, list(x.shape), list(k), list(s),
                                          list(p), list(d))
    dv = ops.sparse_conv2d_backward_weight(grad_out, x, row_ptr, col_idx, list(k), list(s), list(p), list(d))
    # Relative to the output scale: reductions of 256..576 (forward, dx) and 200704 terms (dW).
    for got, want in ((out, ref), (dx, ref_dx), (dv, ref_dv)):
        err = (got.double() - want.double()).abs().max() / want.double().abs().max()
        assert err < {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype], err
    assert out.is_contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


@needs_gpu
@pytest.mark.gpu
def test_opcheck_gpu():
    """Schema, fake-tensor and AOT-dispatch checks (the interpreter cannot run under fake tensors)."""
    g = _gen("opcheck")
    values, row_ptr, col_idx = _weight(8, 4, (3, 3), 0.5, g)
    x = _as(torch.randn(2, 4, 9, 7, generator=g), torch.float16)
    vals, bias = _as(values, torch.float16), _as(torch.randn(8, generator=g), torch.float16)
    geo = ([3, 3], [2, 1], [1, 1], [1, 1])
    out = ops.sparse_conv2d(x, vals, row_ptr, col_idx, geo[0], bias, *geo[1:])
    go = torch.randn_like(out)
    torch.library.opcheck(ops.sparse_conv2d, (x, vals, row_ptr, col_idx, geo[0], bias, *geo[1:]))
    torch.library.opcheck(ops.sparse_conv2d_backward_input, (go, vals, row_ptr, col_idx, list(x.shape), *geo))
    torch.library.opcheck(ops.sparse_conv2d_backward_weight, (go, x, row_ptr, col_idx, *geo))
