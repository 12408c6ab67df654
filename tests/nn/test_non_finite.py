"""A NaN/Inf where the weight stores nothing gives the same result whichever kernel runs the layer: the
dense kernel (0 * NaN = NaN) hands such calls, forward and input gradient, to the sparse kernel."""
import pytest
import torch

from sparsekern.nn import SparseConv2d, SparseLinear, kernel_choice

from sk_testing import gen


@pytest.fixture(autouse=True)
def _each_dense_node(dense_node):
    """Every test runs with the extension's dense-kernel node and with the Python one."""


def _linear(out_features=6, bias=True):
    """A layer that stores nothing in input column 0 (6 outputs: the output is the smaller tensor the
    dense kernel's check reads, 20: the input)."""
    layer = SparseLinear(10, out_features, bias=bias, density=0.5, generator=gen(1))
    mask = layer.mask().clone()
    mask[:, 0] = False
    layer.set_pattern(mask)
    return layer, torch.randn(4, 10, generator=gen(2)), (slice(None), 0)


def _conv(out_channels=4, bias=True):
    """A conv that stores nothing for input channel 0 (4 output channels: the input is the smaller
    tensor, 2: the output)."""
    layer = SparseConv2d(3, out_channels, 3, padding=1, bias=bias, density=0.5, generator=gen(3))
    mask = layer.mask().clone()
    mask[:, 0] = False
    layer.set_pattern(mask)
    return layer, torch.randn(2, 3, 5, 5, generator=gen(4)), (slice(None), 0, 2, 2)


def _linear_wide():
    return _linear(20)


def _conv_narrow():
    return _conv(2)


def _linear_tokens():  # (batch, tokens, features), as a transformer's layers take it
    layer, x, _ = _linear(20)
    return layer, x.reshape(2, 2, 10), (slice(None), slice(None), 0)


def _linear_no_bias():  # the input gradient's check reads its feature 0, not the bias gradient
    return _linear(bias=False)


def _conv_no_bias():
    return _conv(bias=False)


MAKERS = [_linear, _linear_wide, _linear_tokens, _conv, _conv_narrow, _linear_no_bias, _conv_no_bias]
IDS = ["linear", "linear-wide", "linear-tokens", "conv", "conv-narrow", "linear-no-bias", "conv-no-bias"]


def _run(layer, x, kernel, grad_out=None):
    layer.kernel = kernel
    x = x.clone().requires_grad_(True)
    y = layer(x)
    g = torch.ones_like(y) if grad_out is None else grad_out
    dx, dv = torch.autograd.grad(y, (x, layer.values), g)
    layer.kernel = "auto"
    return y.detach(), dx, dv


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_non_finite_input_where_nothing_is_stored(make, value):
    layer, x, where = make()
    x[where] = value
    want = _run(layer, x, "csr")
    assert torch.isfinite(want[0]).all() and torch.isfinite(want[1]).all()  # the sparse kernel never reads it
    for kernel in layer.candidates():
        got = _run(layer, x, kernel)
        for a, b, what in zip(got, want, ("output", "input gradient", "values gradient")):
            torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, k=kernel, w=what: f"{k} {w}: {m}")


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_non_finite_output_gradient_where_nothing_is_stored(make):
    layer, x, _ = make()
    y = layer(x)
    g = torch.randn(y.shape, generator=gen(5))
    # Output 0's row of the weight made empty: its NaN gradient reaches no input under the sparse kernel.
    mask = layer.mask().clone()
    mask[0] = False
    layer.set_pattern(mask)
    g.select(layer.feature_dim, 0).fill_(float("nan"))  # output feature 0
    want = _run(layer, x, "csr", g)
    assert torch.isfinite(want[1]).all()
    for kernel in layer.candidates():
        got = _run(layer, x, kernel, g)
        torch.testing.assert_close(got[1], want[1], equal_nan=True, msg=lambda m, k=kernel: f"{k} input gradient: {m}")


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_forced_dense_everywhere_gives_the_sparse_answer(make, monkeypatch):
    monkeypatch.setattr(kernel_choice, "_forced", None)
    layer, x, where = make()
    x[where] = float("nan")
    want = _run(layer, x, "csr")
    kernel_choice.set_kernel("dense")
    try:
        got = _run(layer, x, "auto")
    finally:
        kernel_choice.set_kernel(None)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_finite_inputs_keep_the_dense_kernel(make, monkeypatch):
    """Forward and both gradients from the dense op alone: no sparse kernel is called."""
    layer, x, _ = make()
    calls = []
    run, dense = layer.run_kernel, layer.dense_forward
    monkeypatch.setattr(layer, "run_kernel", lambda kernel, inp: calls.append(kernel) or run(kernel, inp))
    monkeypatch.setattr(layer, "dense_forward", lambda *args: calls.append("dense_forward") or dense(*args))
    got = _run(layer, x, "dense")
    assert calls == ([] if kernel_choice._fused(x, layer.values) else ["dense_forward"])
    for a, b in zip(got, _run(layer, x, "csr")):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make", [_linear, _conv], ids=["linear", "conv"])
def test_a_full_pattern_runs_dense_unchecked_and_agrees(make, monkeypatch):
    layer, x, where = make()
    layer.set_pattern(torch.ones_like(layer.mask()))  # every weight stored: the sparse kernels read all of x
    x[where] = float("nan")
    want = _run(layer, x, "csr")
    checks = []
    monkeypatch.setattr(kernel_choice, "_all_finite", lambda t: checks.append(t) or True)
    got = _run(layer, x, "dense")
    assert checks == []
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_a_kept_dense_route_hands_non_finite_calls_to_the_sparse_kernel(make):
    """The dense kernel on a kept route (kernel_choice._dense_fast: the op called straight, after a first call)
    checks as the first call does: a NaN where the weight stores nothing, in the input or in the output's
    gradient, still gives the sparse kernel's answer."""
    layer, x, where = make()
    _run(layer, x, "dense")  # the first call keeps the route and the op's arguments
    y = layer(x)  # (the same key as below: the route is kept, not rebuilt)
    bad = x.clone()
    bad[where] = float("nan")
    for a, b in zip(_run(layer, bad, "dense"), _run(layer, bad, "csr")):
        torch.testing.assert_close(a, b, equal_nan=True)
    g = torch.ones(y.shape)
    g.select(layer.feature_dim, 0).fill_(float("nan"))  # output feature 0
    got, want = _run(layer, x, "dense", g), _run(layer, x, "csr", g)
    torch.testing.assert_close(got[1], want[1], equal_nan=True)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("make", [_conv, _conv_narrow, _conv_no_bias], ids=["conv", "conv-narrow", "conv-no-bias"])
def test_channels_last_non_finite_input_and_output_gradient(make, value):
    """The checks read a channel of a channels_last tensor (every C-th entry) as they read an NCHW one."""
    layer, x, where = make()
    bad = x.clone()
    bad[where] = value
    bad = _channels_last(bad)
    assert not bad.is_contiguous()
    want = _run(layer, bad.contiguous(), "csr")
    for kernel in layer.candidates():
        for a, b in zip(_run(layer, bad, kernel), want):
            torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, k=kernel: f"{k}: {m}")
    y = layer(x)
    mask = layer.mask().clone()
    mask[0] = False
    layer.set_pattern(mask)
    g = torch.randn(y.shape, generator=gen(6))
    g.select(layer.feature_dim, 0).fill_(value)  # output feature 0
    want = _run(layer, x, "csr", g)
    for kernel in layer.candidates():
        got = _run(layer, _channels_last(x), kernel, _channels_last(g))
        torch.testing.assert_close(got[1], want[1], equal_nan=True, msg=lambda m, k=kernel: f"{k} input gradient: {m}")


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_non_finite_output_gradient_with_frozen_values(make):
    """Without a weight gradient (values frozen) nor a bias gradient to prove the output's gradient finite, the
    dense kernel reads the input gradient's feature 0."""
    layer, x, _ = make()
    y = layer(x)
    mask = layer.mask().clone()
    mask[0] = False
    layer.set_pattern(mask)
    layer.values.requires_grad_(False)
    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    g = torch.randn(y.shape, generator=gen(7))
    g.select(layer.feature_dim, 0).fill_(float("nan"))  # output feature 0
    grads = {}
    for kernel in ("csr", *layer.candidates()):
        layer.kernel = kernel
        xs = x.clone().requires_grad_(True)
        grads[kernel] = torch.autograd.grad(layer(xs), xs, g)[0]
    layer.kernel = "auto"
    assert torch.isfinite(grads["csr"]).all()
    for kernel, got in grads.items():
        torch.testing.assert_close(got, grads["csr"], msg=lambda m, k=kernel: f"{k}: {m}")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", [(0, 0, 0), (1, 2, 4), (0, 4, 4)], ids=["corner", "inside", "far-corner"])
def test_weight_gradient_proof_catches_one_bad_output_gradient_entry(where, value):
    """One NaN or Inf in the output's gradient, at any position (corners read padding at some taps), of a row the
    weight leaves empty: the dense kernel's weight-gradient check catches it (no bias to prove it instead)."""
    layer, x, _ = _conv_no_bias()
    y = layer(x)
    mask = layer.mask().clone()
    mask[1] = False
    layer.set_pattern(mask)
    g = torch.randn(y.shape, generator=gen(8))
    g[(where[0], 1, where[1], where[2])] = value
    want = _run(layer, x, "csr", g)
    assert torch.isfinite(want[1]).all()
    got = _run(layer, x, "dense", g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)
