"""fast_modules (sparsify(fast_modules=True)): FastBatchNorm2d computes what nn.BatchNorm2d computes (output, the
gradients of x, weight and bias, running statistics, num_batches_tracked) over plane sizes below, at and above
both vector widths, float32 and float64, affine or not, every momentum rule, at both ISAs; FastMaxPool2d gives
ATen's values and indices (ties, NaN, -inf, odd and tiny planes) and gradients; the kernels run where they should
(their autograd nodes) and the nn modules' forwards everywhere else; gradcheck and gradgradcheck; inputs whose mean
dwarfs their spread; the class change in place and undone, through sparsify, densify, state dicts and deep copies;
the private ops' argument errors."""
import copy
import io
import math

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern import isa as sk_isa
from sparsekern.nn import FastBatchNorm2d, FastMaxPool2d, fast_modules, plain_modules
from sparsekern.ops import dispatch

from sk_testing import gen

needs_kernel = pytest.mark.skipif(not dispatch.extension_loaded, reason="needs the compiled extension sparsekern._C")

# (N, C, H, W): planes of 1, 3, 7, 16 (one 64-byte float32 vector), 49, 196 and 3136 elements; one image; one pixel
# per image with several images.
SHAPES = ((4, 3, 1, 1), (2, 5, 1, 3), (3, 4, 7, 1), (2, 6, 4, 4), (4, 8, 7, 7), (1, 3, 14, 14), (2, 2, 56, 56),
          (5, 33, 3, 5))


def _pair(C, dtype=torch.float32, **kwargs):
    plain = nn.BatchNorm2d(C, **kwargs).to(dtype)
    if plain.affine:
        with torch.no_grad():
            plain.weight.uniform_(0.5, 1.5, generator=gen(1))
            plain.bias.uniform_(-1, 1, generator=gen(2))
    fast = copy.deepcopy(plain)
    assert fast_modules(fast) == [""]
    return plain, fast


def _uses_kernel(y: torch.Tensor) -> bool:
    return y.grad_fn is not None and "BatchNormTrain" in y.grad_fn.name()


def _step(bn, x, g):
    xs = x.detach().clone().requires_grad_(True)
    y = bn(xs)
    y.backward(g)
    return y, xs.grad


def _check_same(plain, fast, x, steps=2):
    for s in range(steps):
        g = torch.randn(x.shape, dtype=x.dtype, generator=gen(10 + s))
        plain.zero_grad(), fast.zero_grad()
        y0, dx0 = _step(plain, x, g)
        y1, dx1 = _step(fast, x, g)
        tol = dict(rtol=1e-4, atol=1e-5) if x.dtype == torch.float32 else dict(rtol=1e-10, atol=1e-11)
        torch.testing.assert_close(y1, y0, **tol)
        torch.testing.assert_close(dx1, dx0, **tol)
        if plain.affine:
            scale = math.sqrt(x.numel() / x.shape[1])  # sums over a channel's values
            torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=tol["rtol"], atol=tol["atol"] * scale)
            torch.testing.assert_close(fast.bias.grad, plain.bias.grad, rtol=tol["rtol"], atol=tol["atol"] * scale)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            a, b = getattr(fast, name), getattr(plain, name)
            if b is None:
                assert a is None
            else:
                torch.testing.assert_close(a, b, **tol)
    return y1


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("isa", ("avx2", "avx512"))
def test_matches_batch_norm(shape, dtype, isa):
    if not sk_isa.supported(isa):
        pytest.skip(f"isa {isa}: not on this CPU or build")
    x = (torch.randn(shape, generator=gen(0)) * 3 + 2).to(dtype)
    plain, fast = _pair(shape[1], dtype)
    with sk_isa.use(isa):
        y = _check_same(plain, fast, x)
    assert _uses_kernel(y)


@needs_kernel
@pytest.mark.parametrize("kwargs", (dict(affine=False), dict(momentum=None), dict(momentum=0.3),
                                    dict(track_running_stats=False), dict(eps=1e-2)), ids=str)
def test_options_as_batch_norm(kwargs):
    x = torch.randn(4, 6, 5, 5, generator=gen(3)) * 2 - 1
    plain, fast = _pair(6, **kwargs)
    y = _check_same(plain, fast, x, steps=3)
    assert _uses_kernel(y)


@needs_kernel
def test_large_mean_against_spread():
    """Sums shifted by a value of the channel: no cancellation where the mean is 1e4 times the spread."""
    x = torch.randn(8, 4, 9, 9, generator=gen(4), dtype=torch.float64) * 1e-2 + 100.0
    plain, fast = _pair(4, torch.float64)
    _check_same(plain, fast, x.float().double())
    plain, fast = _pair(4)
    y = fast(x.float())
    ref = plain(x.float())
    torch.testing.assert_close(y, ref, rtol=1e-3, atol=2e-3)  # float32 x near 100 holds 1e-5 of its spread of 1e-2


@needs_kernel
def test_non_finite_values_spread_as_in_batch_norm():
    x = torch.randn(2, 3, 4, 4, generator=gen(5))
    x[1, 0, 2, 3] = float("nan")
    x[0, 2, 0, 0] = float("inf")
    plain, fast = _pair(3)
    y0, y1 = plain(x), fast(x)
    assert _uses_kernel(y1)
    torch.testing.assert_close(y1, y0, equal_nan=True)
    assert torch.isnan(y1[:, 0]).all() and torch.isnan(y1[:, 2]).all() and torch.isfinite(y1[:, 1]).all()


@needs_kernel
def test_gradcheck_and_gradgradcheck():
    x = torch.randn(3, 2, 3, 4, dtype=torch.float64, generator=gen(6), requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, generator=gen(7)).add_(0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, generator=gen(8), requires_grad=True)

    def f(x, w, b):
        return torch.ops.sparsekern._batch_norm_train(x, w, b, None, None, None, 0.1, 1e-5)[0]
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@needs_kernel
@pytest.mark.parametrize("momentum", (0.25, None))
def test_statistics_are_batch_norm_s(momentum):
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64, generator=gen(9), requires_grad=True)
    rm, rv, n = torch.full((5,), 0.5, dtype=torch.float64), torch.full((5,), 2.0, dtype=torch.float64), torch.tensor(3)
    versions = rm._version, rv._version, n._version
    _, mean, invstd = torch.ops.sparsekern._batch_norm_train(x, None, None, rm, rv, n, momentum, 1e-3)
    ref_var, ref_mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(invstd, (ref_var + 1e-3).rsqrt())
    assert not mean.requires_grad and not invstd.requires_grad
    f = 0.25 if momentum else 1 / 4
    count = x.numel() // 5
    torch.testing.assert_close(rm, (1 - f) * 0.5 + f * ref_mean)
    torch.testing.assert_close(rv, (1 - f) * 2.0 + f * ref_var * count / (count - 1))
    assert n.item() == 4
    assert (rm._version, rv._version, n._version) > versions


@needs_kernel
@pytest.mark.parametrize("case", ("eval", "channels_last", "strided", "bfloat16", "no_grad_eval", "one_value"))
def test_falls_back_to_batch_norm_elsewhere(case):
    x = torch.randn(4, 3, 5, 5, generator=gen(11))
    plain, fast = _pair(3)
    if case == "eval":
        plain.eval(), fast.eval()
    elif case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case == "strided":
        x = x[:, :, ::2]
    elif case == "bfloat16":
        plain, fast = plain.bfloat16(), fast.bfloat16()
        x = x.bfloat16()
    elif case == "no_grad_eval":
        plain.eval(), fast.eval()
        x.requires_grad_(False)
    elif case == "one_value":
        x = x[:1, :, :1, :1]
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            fast(x)
        return
    y0, y1 = plain(x), fast(x)
    assert not _uses_kernel(y1)
    torch.testing.assert_close(y1, y0)
    torch.testing.assert_close(fast.running_mean, plain.running_mean)


@needs_kernel
def test_sparse_resnet_step_matches_plain_batch_norm():
    """A sparse ResNet's training steps with and without the fast batch norm: same loss, gradients, statistics (in
    float64: at init the network amplifies float32 rounding differences in its first layers' gradients to 1e-3)."""
    from sparsekern.models import get_model
    torch.manual_seed(0)
    model = sparsekern.sparsify(get_model("resnet20", 10), 0.2, generator=gen(12)).double()
    fast = copy.deepcopy(model)
    assert len(fast_modules(fast)) == len([m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]) > 0
    x = torch.randn(8, 3, 32, 32, generator=gen(13), dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=gen(14))
    for _ in range(2):
        losses = []
        for m in (model, fast):
            m.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0])
        for (name, p0), p1 in zip(model.named_parameters(), fast.parameters()):
            # Rounding differences pass through the whole network; compared as a whole tensor's relative error.
            err = ((p1.grad - p0.grad).norm() / p0.grad.norm()).item()
            assert err < 1e-9, f"{name}: relative error {err:.2e}"
    for b0, b1 in zip(model.buffers(), fast.buffers()):
        torch.testing.assert_close(b1, b0)


def test_class_changes_in_place_and_back():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.SyncBatchNorm(4),
                          nn.Sequential(nn.BatchNorm2d(4), nn.MaxPool2d(3, 2, 1)), nn.BatchNorm1d(4))
    bn = model[1]
    params, seen = list(bn.parameters()), []
    hook = bn.register_forward_hook(lambda m, i, o: seen.append(type(m)))
    assert fast_modules(model) == ["1", "4.0", "4.1"]
    assert model[1] is bn and type(bn) is FastBatchNorm2d and isinstance(bn, nn.BatchNorm2d)
    assert list(bn.parameters()) == params
    bn(torch.randn(2, 4, 3, 3))
    assert seen == [FastBatchNorm2d]
    hook.remove()
    assert type(model[3]) is nn.SyncBatchNorm and type(model[5]) is nn.BatchNorm1d
    assert fast_modules(model) == []  # already fast
    assert type(model[4][1]) is FastMaxPool2d
    state = model.state_dict()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded[1]) is FastBatchNorm2d
    assert type(copy.deepcopy(model)[4][0]) is FastBatchNorm2d
    assert plain_modules(model) == ["1", "4.0", "4.1"]
    assert type(bn) is nn.BatchNorm2d and type(model[4][1]) is nn.MaxPool2d
    assert model.state_dict().keys() == state.keys()


def test_sparsify_and_densify():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(8, 4, 1))
    sparse = sparsekern.sparsify(model, 0.5, fast_modules=True, inplace=False, generator=gen(15))
    assert type(sparse[1]) is FastBatchNorm2d and type(sparse[3]) is FastMaxPool2d
    assert type(model[1]) is nn.BatchNorm2d and type(model[3]) is nn.MaxPool2d
    assert type(sparsekern.sparsify(model, 0.5, inplace=False, generator=gen(15))[1]) is nn.BatchNorm2d
    dense = sparsekern.densify(sparse)
    assert type(dense[1]) is nn.BatchNorm2d and type(dense[3]) is nn.MaxPool2d and type(dense[0]) is nn.Conv2d


@pytest.mark.parametrize("fn", (fast_modules, plain_modules))
def test_model_errors(fn):
    with pytest.raises(TypeError, match=f"{fn.__name__}: model must be an nn.Module, got int"):
        fn(3)


def test_sparsify_flag_must_be_bool():
    with pytest.raises(TypeError, match="sparsify: fast_modules must be a bool, got int"):
        sparsekern.sparsify(nn.Linear(4, 4), 0.5, fast_modules=1)


@needs_kernel
@pytest.mark.parametrize("case, match", [
    ("running_alone", "running_mean and running_var must be given together"),
    ("count_alone", "num_batches_tracked needs running_mean and running_var"),
    ("count_dtype", "num_batches_tracked must be one int64, got Float of shape \\[1\\]"),
    ("running_shape", "running_var must be a contiguous vector of the 3 channels, got shape \\[2\\]"),
    ("3d", r"x must be 4-D \(N, C, H, W\), got 3-D"),
    ("channels_last", r"x must be contiguous \(NCHW\)"),
    ("int", "x must be float32 or float64, got Int"),
    ("one", "expected more than 1 value per channel when training"),
    ("weight_shape", "weight must be a contiguous vector of the 3 channels, got shape \\[4\\]"),
    ("bias_dtype", "bias must be Float as x is, got Double"),
])
def test_op_errors(case, match):
    x = torch.randn(2, 3, 4, 4)
    w, b = torch.ones(3), torch.zeros(3)
    rm, rv, n = None, None, None
    if case == "running_alone":
        rm = torch.zeros(3)
    elif case == "count_alone":
        n = torch.tensor(0)
    elif case == "count_dtype":
        rm, rv, n = torch.zeros(3), torch.ones(3), torch.zeros(1)
    elif case == "running_shape":
        rm, rv = torch.zeros(3), torch.ones(2)
    elif case == "3d":
        x = x[0]
    elif case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case == "int":
        x = x.int()
    elif case == "one":
        x = x[:1, :, :1, :1].contiguous()
    elif case == "weight_shape":
        w = torch.ones(4)
    elif case == "bias_dtype":
        b = b.double()
    with pytest.raises(ValueError, match=match):
        torch.ops.sparsekern._batch_norm_train(x, w, b, rm, rv, n, 0.1, 1e-5)


# -- FastMaxPool2d ---------------------------------------------------------------------------------------------------

def _uses_pool_kernel(y: torch.Tensor) -> bool:
    return y.grad_fn is not None and "MaxPool" in y.grad_fn.name() and "MaxPool2DWithIndices" not in y.grad_fn.name()


# Planes: ResNet stems' even sizes, odd ones (the last window half padding), one row or column, 1x1, and rows of 1-3
# vectors of outputs.
POOL_SHAPES = ((2, 3, 56, 56), (1, 2, 7, 9), (2, 2, 1, 5), (1, 3, 6, 1), (2, 1, 1, 1), (1, 2, 2, 2), (1, 1, 5, 65),
               (1, 2, 33, 40))


@needs_kernel
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("values", ("random", "ties", "special"))
def test_max_pool_matches_aten(shape, dtype, values):
    x = torch.randn(shape, generator=gen(20), dtype=dtype)
    if values == "ties":  # after a ReLU, and a few equal positive values
        x = x.clamp_min(0).round()
    elif values == "special":
        flat = x.view(-1)
        flat[::7] = float("-inf")
        flat[3::11] = float("nan")
        flat[5::13] = float("inf")
    y, idx = torch.ops.sparsekern._max_pool2d_3x3s2(x)
    ref, ref_idx = torch.ops.aten.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1])
    torch.testing.assert_close(y, ref, equal_nan=True, rtol=0, atol=0)
    assert torch.equal(idx, ref_idx)


@needs_kernel
def test_max_pool_module_and_gradients():
    x = torch.randn(2, 3, 9, 8, generator=gen(21)).clamp_min(0)  # ties of zeros, as after a stem's ReLU
    plain = nn.MaxPool2d(3, 2, 1)
    fast = copy.deepcopy(plain)
    fast_modules(fast)
    g = torch.randn(2, 3, 5, 4, generator=gen(22))
    y0, dx0 = _step(plain, x, g)
    y1, dx1 = _step(fast, x, g)
    assert _uses_pool_kernel(y1)
    assert torch.equal(y1, y0) and torch.equal(dx1, dx0)
    xd = torch.randn(1, 2, 5, 6, dtype=torch.float64, generator=gen(23), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.sparsekern._max_pool2d_3x3s2(t)[0], (xd,))
    assert torch.autograd.gradgradcheck(lambda t: torch.ops.sparsekern._max_pool2d_3x3s2(t)[0], (xd,))


@needs_kernel
@pytest.mark.parametrize("case", ("kernel2", "stride1", "padding0", "dilation", "ceil", "indices", "channels_last",
                                  "bfloat16", "3d"))
def test_max_pool_falls_back_elsewhere(case):
    x = torch.randn(2, 3, 8, 8, generator=gen(24))
    args = dict(kernel_size=3, stride=2, padding=1)
    if case == "kernel2":
        args.update(kernel_size=2, padding=0)
    elif case == "stride1":
        args.update(stride=1)
    elif case == "padding0":
        args.update(padding=0)
    elif case == "dilation":
        args.update(dilation=2)
    elif case == "ceil":
        args.update(ceil_mode=True)
    elif case == "indices":
        args.update(return_indices=True)
    elif case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case == "bfloat16":
        x = x.bfloat16()
    elif case == "3d":
        x = x[0]
    plain = nn.MaxPool2d(**args)
    fast = copy.deepcopy(plain)
    fast_modules(fast)
    xs = x.clone().requires_grad_(True)
    y0, y1 = plain(x), fast(xs)
    if case == "indices":
        assert torch.equal(y1[1], y0[1])
        y0, y1 = y0[0], y1[0]
    assert not _uses_pool_kernel(y1)
    assert torch.equal(y1, y0)


@needs_kernel
@pytest.mark.parametrize("case, match", [
    ("3d", r"x must be 4-D \(N, C, H, W\), got 3-D"),
    ("channels_last", r"x must be contiguous \(NCHW\)"),
    ("int", "x must be float32 or float64, got Int"),
    ("empty", "x must have planes of at least 1x1"),
])
def test_max_pool_op_errors(case, match):
    x = torch.randn(2, 3, 4, 4)
    if case == "3d":
        x = x[0]
    elif case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case == "int":
        x = x.int()
    elif case == "empty":
        x = x[:, :, :0]
    with pytest.raises(ValueError, match=match):
        torch.ops.sparsekern._max_pool2d_3x3s2(x)
