"""FastDepthwiseConv2d and its op (_depthwise_conv2d, csrc/cpu/depthwise_conv.cpp): the output and the gradients of x,
weight and bias are F.conv2d's over plane sizes from 1x1 to 56x56 (smaller than, equal to and larger than the
kernel), square and oblong kernels of 1x1 to 9x9, every padding from 0 to kernel - 1, channel counts on and off the
channel blocks, float32 and float64, NCHW and channels_last, with and without bias; strided weight, bias and output
gradient; gradcheck and gradgradcheck (the second order through ATen's backward); NaN and Inf spread as F.conv2d
spreads them; the weight gradient bit for bit the same run to run; empty batches; the module runs the kernels where
it should and nn.Conv2d's forward everywhere else; fast_modules swaps depthwise convs only, plain_modules and state
dicts; a ConvNeXt step with and without; the op's argument errors."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern.models import ConvNeXt
from sparsekern.nn import FastDepthwiseConv2d, fast_modules, plain_modules
from sparsekern.ops import dispatch

from sk_testing import gen

needs_kernel = pytest.mark.skipif(not dispatch.extension_loaded, reason="needs the compiled extension sparsekern._C")
op = torch.ops.sparsekern

# (N, C, H, W, kh, kw, ph, pw): ConvNeXt's stages at 64x64 (16x16 to 2x2 with 7x7), a 1x1 plane, channel counts off
# the 16-channel blocks (17, 33, 40), oblong planes and kernels, even kernels, no padding, 1x1 kernels, 9x9.
SHAPES = ((2, 96, 16, 16, 7, 7, 3, 3), (2, 20, 4, 4, 7, 7, 3, 3), (3, 17, 2, 2, 7, 7, 3, 3), (1, 5, 1, 1, 7, 7, 3, 3),
          (2, 33, 9, 4, 3, 5, 0, 2), (2, 3, 6, 6, 2, 2, 1, 0), (2, 16, 4, 5, 1, 1, 0, 0), (1, 40, 30, 33, 5, 3, 2, 1),
          (2, 8, 13, 11, 9, 9, 4, 4), (1, 4, 56, 56, 7, 7, 3, 3), (2, 6, 8, 8, 5, 5, 0, 4))


def _ids(s):
    return "x".join(map(str, s[:4])) + f"-k{s[4]}x{s[5]}-p{s[6]}{s[7]}"


def _inputs(shape, dtype, layout, bias=True, seed=0):
    N, C, H, W, kh, kw, _, _ = shape
    x = torch.randn(N, C, H, W, dtype=dtype, generator=gen(seed))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(C, 1, kh, kw, dtype=dtype, generator=gen(seed + 1))
    b = torch.randn(C, dtype=dtype, generator=gen(seed + 2)) if bias else None
    return x, w, b


def _tol(dtype, terms):
    eps = 1e-6 if dtype == torch.float32 else 1e-14
    return dict(rtol=eps * 10, atol=eps * 10 * terms ** 0.5)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "nobias"))
def test_op_matches_conv2d(shape, dtype, layout, bias):
    x, w, b = _inputs(shape, dtype, layout, bias)
    padding = list(shape[6:])
    leaves = [t.requires_grad_(True) for t in (x, w, b) if t is not None]
    y = op._depthwise_conv2d(x, w, b, padding)
    ref = F.conv2d(x, w, b, padding=padding, groups=shape[1])
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.shape == ref.shape and y.is_contiguous(memory_format=fmt)
    g = torch.randn(ref.shape, dtype=dtype, generator=gen(5))
    grads = torch.autograd.grad(y, leaves, g)
    refs = torch.autograd.grad(ref, leaves, g)
    N, _, H, W, kh, kw = shape[:6]
    torch.testing.assert_close(y, ref, **_tol(dtype, kh * kw))
    torch.testing.assert_close(grads[0], refs[0], **_tol(dtype, kh * kw))
    for got, want in zip(grads[1:], refs[1:]):  # sums over a channel's N x Ho x Wo outputs
        torch.testing.assert_close(got, want, **_tol(dtype, N * H * W))


@needs_kernel
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("shape", ((2, 3, 5, 4, 3, 3, 1, 1), (1, 18, 3, 3, 5, 5, 2, 1), (2, 2, 2, 2, 7, 7, 3, 3)),
                         ids=_ids)
def test_gradcheck_and_gradgradcheck(layout, shape):
    x, w, b = _inputs(shape, torch.float64, layout)
    for t in (x, w, b):
        t.requires_grad_(True)
    fn = lambda x_, w_, b_: op._depthwise_conv2d(x_, w_, b_, list(shape[6:]))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


@needs_kernel
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_non_contiguous_weight_bias_and_grad(layout):
    """weight, bias and the output gradient as strided views (x itself must be NCHW or channels_last: the error
    test below) give what their contiguous copies give."""
    x, w, b = _inputs((2, 20, 9, 8, 5, 5, 2, 2), torch.float32, layout)
    w_t = w.transpose(2, 3).contiguous().transpose(2, 3)  # the same values, kernel dims swapped in memory
    b_s = torch.stack([b, b], 1)[:, 0]  # stride 2
    assert not w_t.is_contiguous() and not b_s.is_contiguous()
    y = op._depthwise_conv2d(x, w_t, b_s, [2, 2])
    torch.testing.assert_close(y, op._depthwise_conv2d(x, w, b, [2, 2]), rtol=0, atol=0)
    g = torch.randn(2, 8, 9, 20, generator=gen(15)).permute(0, 3, 2, 1)  # (2, 20, 9, 8), neither layout
    got = op._depthwise_conv2d_backward(g, x, w_t, [2, 2], [True, True, True])
    want = op._depthwise_conv2d_backward(g.contiguous(), x, w, [2, 2], [True, True, True])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    ref = torch.autograd.grad(F.conv2d(x.requires_grad_(True), w, b, padding=2, groups=20), x, g)[0]
    torch.testing.assert_close(got[0], ref, **_tol(torch.float32, 25))


@needs_kernel
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_non_finite_values_spread_as_in_conv2d(layout):
    shape = (2, 18, 9, 10, 7, 7, 3, 3)
    x, w, b = _inputs(shape, torch.float32, layout)
    flat = x.view(-1) if layout == "nchw" else x.permute(0, 2, 3, 1).reshape(-1)
    flat[40] = float("nan")
    flat[777] = float("inf")
    x.requires_grad_(True)
    y = op._depthwise_conv2d(x, w, b, [3, 3])
    ref = F.conv2d(x, w, b, padding=3, groups=18)
    assert torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.isinf(), ref.isinf())
    g = torch.randn(ref.shape, generator=gen(6))
    g.view(-1)[123] = float("nan")
    dx, = torch.autograd.grad(y, x, g)
    rdx, = torch.autograd.grad(ref, x, g)
    assert torch.equal(dx.isfinite(), rdx.isfinite())
    torch.testing.assert_close(dx, rdx, equal_nan=True, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_gradients_are_the_same_run_to_run(layout):
    x, w, b = _inputs((4, 40, 12, 12, 7, 7, 3, 3), torch.float32, layout)
    g = torch.randn(4, 40, 12, 12, generator=gen(7))
    first = op._depthwise_conv2d_backward(g, x, w, [3, 3], [True, True, True])
    for _ in range(3):
        again = op._depthwise_conv2d_backward(g, x, w, [3, 3], [True, True, True])
        assert all(torch.equal(a, f) for a, f in zip(again, first))


@needs_kernel
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
def test_empty_batch(layout):
    x, w, b = _inputs((0, 20, 6, 6, 7, 7, 3, 3), torch.float32, layout)
    y = op._depthwise_conv2d(x, w, b, [3, 3])
    assert y.shape == (0, 20, 6, 6)
    dx, dw, db = op._depthwise_conv2d_backward(torch.zeros(0, 20, 6, 6), x, w, [3, 3], [True, True, True])
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros_like(w)) and torch.equal(db, torch.zeros(20))


@needs_kernel
def test_backward_computes_what_the_mask_asks():
    x, w, _ = _inputs((2, 20, 6, 6, 5, 5, 2, 2), torch.float32, "channels_last")
    g = torch.randn(2, 20, 6, 6, generator=gen(8))
    full = op._depthwise_conv2d_backward(g, x, w, [2, 2], [True, True, True])
    for mask in ([True, False, False], [False, True, False], [False, False, True], [False, True, True]):
        part = op._depthwise_conv2d_backward(g, x, w, [2, 2], mask)
        for asked, got, want in zip(mask, part, full):
            if asked:
                assert torch.equal(got, want)
            else:
                assert got is None


def _uses_kernel(y: torch.Tensor) -> bool:
    return y.grad_fn is not None and "DepthwiseConv" in y.grad_fn.name()


def _fast_twin(conv: nn.Conv2d) -> nn.Conv2d:
    fast = copy.deepcopy(conv)
    fast_modules(fast)
    return fast


def _check_step_runs_kernel_and_matches(plain: nn.Conv2d, fast: nn.Conv2d, x: torch.Tensor) -> None:
    """A fwd+bwd of each on x: the fast one runs the kernel, and its output and gradients are the plain one's."""
    outs = []
    for m in (plain, fast):
        xs = x.clone().requires_grad_(True)
        y = m(xs)
        y.backward(torch.ones_like(y))
        outs.append((y, xs.grad, m.weight.grad, m.bias.grad))
    assert _uses_kernel(outs[1][0])
    for got, want in zip(outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("padding", (3, "same", "valid", (1, 2)))
def test_module_matches_conv2d(layout, padding):
    torch.manual_seed(0)
    plain = nn.Conv2d(24, 24, 7, padding=padding, groups=24)
    fast = _fast_twin(plain)
    assert type(fast) is FastDepthwiseConv2d
    x = torch.randn(2, 24, 10, 9, generator=gen(9))
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    _check_step_runs_kernel_and_matches(plain, fast, x)


@needs_kernel
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("case", ("kernel3_channels_last", "kernel3_small_plane", "kernel2", "stride2", "dilation2",
                                  "same_even", "bfloat16", "3d", "sliced", "wide_padding",
                                  "large_channels_last_no_grad", "float64_weight"))
def test_module_falls_back_elsewhere(case):
    args = dict(in_channels=16, out_channels=16, kernel_size=7, padding=3, groups=16)
    x = torch.randn(2, 16, 12, 12, generator=gen(10))
    if case == "kernel3_channels_last":
        args.update(kernel_size=3, padding=1)
        x = x.to(memory_format=torch.channels_last)
    elif case == "kernel3_small_plane":
        args.update(kernel_size=3, padding=1)
        x = x[:, :, :11, :11].contiguous()
    elif case == "kernel2":  # 4 taps: not even on NCHW planes
        args.update(kernel_size=2, padding=1)
    elif case == "stride2":
        args.update(stride=2)
    elif case == "dilation2":
        args.update(dilation=2)
    elif case == "same_even":
        args.update(kernel_size=6, padding="same")
    elif case == "3d":
        x = x[0]
    elif case == "sliced":
        x = x[:, :, :, 1:]
    elif case == "wide_padding":
        args.update(padding=7)
    elif case == "large_channels_last_no_grad":
        x = torch.randn(1, 16, 40, 40, generator=gen(11)).to(memory_format=torch.channels_last)
    plain = nn.Conv2d(**args)
    if case == "bfloat16":
        plain, x = plain.bfloat16(), x.bfloat16()
    fast = _fast_twin(plain)
    assert type(fast) is FastDepthwiseConv2d
    if case == "float64_weight":
        plain.double()  # the input stays float32: nn.Conv2d's own error
        with pytest.raises(RuntimeError) as want:
            plain(x)
        fast.double()
        with pytest.raises(RuntimeError, match=re.escape(str(want.value))):
            fast(x)
        return
    if case == "large_channels_last_no_grad":
        with torch.no_grad():
            y = fast(x)
        torch.testing.assert_close(y, plain(x).detach())
        assert _uses_kernel(fast(x))  # with gradients: the kernels
        return
    y = fast(x.requires_grad_(True))
    assert not _uses_kernel(y)
    torch.testing.assert_close(y, plain(x), rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("size", (12, 28))
def test_module_runs_3x3_kernels_on_nchw_planes_of_12x12_and_up(size):
    plain = nn.Conv2d(24, 24, 3, padding=1, groups=24)
    fast = _fast_twin(plain)
    x = torch.randn(2, 24, size, size, generator=gen(14))
    _check_step_runs_kernel_and_matches(plain, fast, x)


def test_fast_modules_swaps_depthwise_convs_only():
    model = nn.Sequential(nn.Conv2d(8, 8, 7, padding=3, groups=8),  # depthwise: swapped
                          nn.Conv2d(8, 16, 3, padding=1),  # dense: left
                          nn.Conv2d(16, 32, 7, padding=3, groups=16),  # channel multiplier 2: left
                          nn.Conv2d(32, 32, 5, padding=2, groups=32, padding_mode="reflect"),  # not zero padding: left
                          nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise 3x3: swapped
                          nn.BatchNorm2d(32))
    state = copy.deepcopy(model.state_dict())
    assert fast_modules(model) == ["0", "4", "5"]
    assert [type(m).__name__ for m in model] == ["FastDepthwiseConv2d", "Conv2d", "Conv2d", "Conv2d",
                                                 "FastDepthwiseConv2d", "FastBatchNorm2d"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values()))
    assert plain_modules(model) == ["0", "4", "5"]
    assert all(type(m) in (nn.Conv2d, nn.BatchNorm2d) for m in model)


@needs_kernel
def test_sparse_convnext_step_matches_plain_depthwise_convs():
    torch.manual_seed(0)
    base = ConvNeXt(10, depths=(1, 1), dims=(16, 32))
    models = [sparsekern.sparsify(copy.deepcopy(base), 0.3, "erk", init="dense", fast_modules=fast,
                                  generator=torch.Generator().manual_seed(0)) for fast in (False, True)]
    assert not any(isinstance(m, FastDepthwiseConv2d) for m in models[0].modules())
    assert sum(isinstance(m, FastDepthwiseConv2d) for m in models[1].modules()) == 2
    x = torch.randn(4, 3, 32, 32, generator=gen(12))
    y = torch.randint(0, 10, (4,), generator=gen(13))
    losses = []
    for m in models:
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p0), (_, p1) in zip(models[0].named_parameters(), models[1].named_parameters()):
        torch.testing.assert_close(p1.grad, p0.grad, rtol=1e-4, atol=1e-5, msg=name)


@needs_kernel
@pytest.mark.parametrize("case, match", [
    ("3d", r"x must be 4-D \(N, C, H, W\), got 3-D"),
    ("sliced", r"x must be contiguous \(NCHW\) or channels_last"),
    ("int", "x must be float32 or float64, got Int"),
    ("weight_dtype", "weight must have x's dtype Float, got Double"),
    ("weight_shape", r"weight must be \(C, 1, kh, kw\) with C = x.size\(1\) = 6"),
    ("bias_shape", r"bias must be \(C\) with C = 6"),
    ("padding", r"padding must lie in \[0, kernel size - 1\]"),
    ("no_output", "leaves no output for planes of 2x5"),
    ("padding_entries", "padding must have 2 entries"),
])
def test_op_errors(case, match):
    x, w, b = torch.randn(2, 6, 4, 5), torch.randn(6, 1, 3, 3), torch.randn(6)
    padding = [1, 1]
    if case == "3d":
        x = x[0]
    elif case == "sliced":
        x = x[:, :, :, 1:]
    elif case == "int":
        x = x.int()
    elif case == "weight_dtype":
        w = w.double()
    elif case == "weight_shape":
        w = torch.randn(6, 2, 3, 3)
    elif case == "bias_shape":
        b = torch.randn(5)
    elif case == "padding":
        padding = [3, 1]
    elif case == "no_output":
        x, padding = x[:, :, :2].contiguous(), [0, 0]
    elif case == "padding_entries":
        padding = [1]
    with pytest.raises((ValueError, RuntimeError), match=match):
        op._depthwise_conv2d(x, w, b, padding)


@needs_kernel
def test_backward_op_errors():
    x, w = torch.randn(2, 6, 4, 5), torch.randn(6, 1, 3, 3)
    with pytest.raises(ValueError, match=r"grad must be \(2, 6, 4, 5\), the output's shape"):
        op._depthwise_conv2d_backward(torch.randn(2, 6, 4, 4), x, w, [1, 1], [True, True, True])
    with pytest.raises(ValueError, match="grad must be a CPU tensor of x's dtype Float"):
        op._depthwise_conv2d_backward(torch.randn(2, 6, 4, 5).double(), x, w, [1, 1], [True, True, True])
