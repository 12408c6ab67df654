"""What a user does with a sparse layer's output and around it, on every kernel: in-place ops on the output (a
view of a buffer the dense op made must not reach autograd as a view: wav2vec2 writes masked frames into its
feature projection's output, VGG-style nets run ReLU(inplace=True) on a conv's output), and a layer whose first call
ran under torch.inference_mode training afterwards, under autocast and plainly (no cached pattern tensor may be an
inference tensor: the dense route's scatter saves them for backward), and an empty batch (a data loader's last,
filtered batch) through forward and backward."""
import pytest
import torch

from sparsekern.nn import SparseConv2d, SparseLinear, kernel_choice as kc

from sk_testing import assert_close, gen

# (name, factory of a layer and an input)
LINEARS = [
    ("linear-2d-8", lambda: (SparseLinear(16, 8, density=0.5, generator=gen(1)), torch.randn(6, 16, generator=gen(2)))),
    ("linear-3d-8", lambda: (SparseLinear(16, 8, density=0.5, generator=gen(3)),
                             torch.randn(2, 5, 16, generator=gen(4)))),
    ("linear-3d-32", lambda: (SparseLinear(16, 32, density=0.5, generator=gen(5)),
                              torch.randn(2, 5, 16, generator=gen(6)))),
    ("linear-3d-100", lambda: (SparseLinear(16, 100, density=0.5, generator=gen(7)),
                               torch.randn(2, 5, 16, generator=gen(8)))),
]
CONVS = [
    (f"conv-{k}x{k}-{'cl' if cl else 'nchw'}",
     lambda k=k, cl=cl: (SparseConv2d(8, 16, k, padding=k // 2, density=0.5, generator=gen(10 + k)),
                         torch.randn(2, 8, 6, 6, generator=gen(20 + k)).contiguous(
                             memory_format=torch.channels_last if cl else torch.contiguous_format)))
    for k in (1, 3) for cl in (False, True)]
CASES = [(name, make, kernel) for name, make in LINEARS for kernel in ("csr", "dense")] + \
        [(name, make, kernel) for name, make in CONVS for kernel in ("csr", "dense", "gemm")]


@pytest.fixture(autouse=True)
def fresh_choices():
    kc.clear_cache()
    yield
    kc.clear_cache()


def _in_place(y):
    y.mul_(2.0)
    y.select(-1 if y.dim() != 4 else 1, 0).fill_(0.5)  # an indexed write into the output
    return y.relu_()


def _twin_grads(layer, x, g):
    dense = layer.to_dense()
    xs = x.detach().clone().requires_grad_()
    y = _in_place(dense(xs))
    y.backward(g)
    return y.detach(), xs.grad, dense.weight.grad[layer.mask()], dense.bias.grad


@pytest.mark.parametrize("name,make,kernel", CASES, ids=[f"{n}-{k}" for n, _, k in CASES])
def test_in_place_ops_on_the_output_keep_the_gradients(name, make, kernel):
    layer, x = make()
    layer.kernel = kernel
    g = None
    for _ in range(3):  # the first call measures nothing (pinned) but builds the route; the later ones keep it
        layer.zero_grad(set_to_none=True)
        xs = x.detach().clone().requires_grad_()
        y = _in_place(layer(xs))
        if g is None:
            g = torch.randn(y.shape, generator=gen(9))
        y.backward(g)
        want = _twin_grads(layer, x, g)
        for got, exp in zip((y.detach(), xs.grad, layer.values.grad, layer.bias.grad), want):
            assert_close(got, exp, scale=10.0)


@pytest.mark.parametrize("name,make,kernel", CASES, ids=[f"{n}-{k}" for n, _, k in CASES])
def test_a_layer_first_called_under_inference_mode_then_trains(name, make, kernel):
    layer, x = make()
    layer.kernel = kernel
    with torch.inference_mode():
        first = layer(x)
    assert not layer.pattern.positions().is_inference()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.detach().clone().requires_grad_())
    y.float().square().sum().backward()
    assert layer.values.grad is not None and torch.isfinite(layer.values.grad).all()
    layer.zero_grad(set_to_none=True)
    xs = x.detach().clone().requires_grad_()
    y = layer(xs)
    g = torch.randn(y.shape, generator=gen(9))
    y.backward(g)
    dense = layer.to_dense()
    xd = x.detach().clone().requires_grad_()
    yd = dense(xd)
    yd.backward(g)
    assert_close(first, yd.detach(), scale=10.0)
    assert_close(xs.grad, xd.grad, scale=10.0)
    assert_close(layer.values.grad, dense.weight.grad[layer.mask()], scale=10.0)


def test_a_pattern_changed_under_inference_mode_keeps_normal_buffers():
    """A pattern replaced inside an inference_mode block (a DST step run there) gets buffers a later training step
    can save for backward."""
    layer = SparseLinear(12, 10, density=0.5, generator=gen(30))
    mask = torch.rand(10, 12, generator=gen(31)) < 0.3
    with torch.inference_mode():
        layer.update_pattern_(mask, torch.randn(int(mask.sum()), generator=gen(32)))
    for name, buf in layer.pattern.named_buffers():
        assert not buf.is_inference(), name
    for kernel in ("csr", "dense"):
        layer.kernel = kernel
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(torch.randn(4, 12, generator=gen(33), requires_grad=True))
        y.float().sum().backward()
        layer(torch.randn(4, 12, generator=gen(34), requires_grad=True)).sum().backward()


@pytest.mark.parametrize("name,make,kernel", CASES, ids=[f"{n}-{k}" for n, _, k in CASES])
def test_an_empty_batch_trains(name, make, kernel):
    layer, x = make()
    layer.kernel = kernel
    empty = x[:0]
    for _ in range(2):  # the first call routes; the second takes the kept route
        layer.zero_grad(set_to_none=True)
        xs = empty.detach().clone().requires_grad_()
        y = layer(xs)
        assert y.shape == layer.to_dense()(empty).shape
        y.sum().backward()
        assert xs.grad.shape == empty.shape
        assert not layer.values.grad.any() and not layer.bias.grad.any()
