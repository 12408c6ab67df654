"""SparseLinear and SparseConv2d against nn.Linear / nn.Conv2d with the masked weight."""
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import SparseConv2d, SparseLinear, random_mask as sk_random_mask

from sk_testing import assert_close, gen, make_input, random_mask, seed_of

LINEAR_KERNELS = ("sparse_linear", "sddmm")
CONV_KERNELS = ("sparse_conv2d", "sparse_conv2d_backward_input", "sparse_conv2d_backward_weight")


def _linear(in_f, out_f, bias, dtype, seed):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)


def _conv(cin, cout, ks, stride, padding, dilation, bias, dtype, seed):
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, ks, stride, padding, dilation, bias=bias, dtype=dtype)


# -- SparseLinear ------------------------------------------------------------------------

@pytest.mark.kernels(*LINEAR_KERNELS)
@pytest.mark.parametrize("in_f,out_f,x_shape", [(13, 5, (4, 13)), (16, 1, (2, 3, 16)), (7, 6, (7,)), (9, 4, (0, 9))],
                         ids=str)
@pytest.mark.parametrize("density,empty_rows", [(0.0, False), (0.5, False), (0.5, True), (1.0, False)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_from_dense_matches_masked_dense(backend, in_f, out_f, x_shape, density, empty_rows, bias, dtype):
    seed = seed_of("lin", in_f, out_f, x_shape, density, empty_rows, bias, dtype)
    lin = _linear(in_f, out_f, bias, dtype, seed)
    mask = random_mask((out_f, in_f), density, gen(seed), empty_rows)
    sparse = SparseLinear.from_dense(lin, mask)
    assert sparse.nnz == int(mask.sum()) and torch.equal(sparse.mask(), mask)
    # The dense reference: lin with its weight masked.
    masked_w = (lin.weight.detach() * mask).requires_grad_(True)
    b = lin.bias.detach().clone().requires_grad_(True) if bias else None
    x = make_input(x_shape, dtype, gen(seed + 1), requires_grad=True)
    y = sparse(x)
    y_ref = F.linear(x, masked_w, b)
    assert_close(y, y_ref, scale=in_f)
    grad_out = make_input(y.shape, dtype, gen(seed + 2))
    dense_inputs = [x, masked_w] + ([b] if bias else [])
    sparse_inputs = [x, sparse.values] + ([sparse.bias] if bias else [])
    got = torch.autograd.grad(y, sparse_inputs, grad_out, allow_unused=True, materialize_grads=True)
    exp = torch.autograd.grad(y_ref, dense_inputs, grad_out, allow_unused=True, materialize_grads=True)
    assert_close(got[0], exp[0], scale=out_f)           # d x
    assert_close(got[1], exp[1][mask], scale=10)        # d values == dense weight grad at the mask
    if bias:
        assert_close(got[2], exp[2], scale=10)          # d bias


@pytest.mark.kernels(*LINEAR_KERNELS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_first_layer_training_step(backend, bias):
    """A first layer: the input needs no gradient; values (and bias) get the dense gradients at the mask."""
    lin = _linear(8, 5, bias, torch.float32, 30)
    mask = random_mask((5, 8), 0.5, gen(30))
    sparse = SparseLinear.from_dense(lin, mask)
    x = torch.randn(6, 8, generator=gen(31))
    sparse(x).pow(2).sum().backward()
    masked = nn.Linear(8, 5, bias=bias)
    with torch.no_grad():
        masked.weight.copy_(lin.weight * mask)
        if bias:
            masked.bias.copy_(lin.bias)
    masked(x).pow(2).sum().backward()
    assert_close(sparse.values.grad, masked.weight.grad[mask], scale=10)
    if bias:
        assert_close(sparse.bias.grad, masked.bias.grad, scale=10)


def test_linear_parameters_are_values_and_bias():
    sparse = SparseLinear(8, 4, density=0.5, generator=gen(1))
    names = {n for n, _ in sparse.named_parameters()}
    assert names == {"values", "bias"}
    buffers = {n for n, _ in sparse.named_buffers()}
    assert buffers == {"pattern.row_ptr", "pattern.col_idx", "pattern.t_row_ptr", "pattern.t_col_idx", "pattern.t_perm"}
    assert set(sparse.state_dict()) == {"values", "bias", "row_ptr", "col_idx"}  # derived data is not saved
    assert sparse.values.shape == (16,) and sparse.values.requires_grad
    assert "density=0.5000" in repr(sparse) and "nnz=16" in repr(sparse)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.33, 0.5, 0.9, 0.99, 1.0])
def test_empty_construction_has_exact_nnz(density):
    lin = SparseLinear(17, 6, density=density, generator=gen(2))
    assert lin.nnz == round(density * 17 * 6)
    assert int(lin.mask().sum()) == lin.nnz
    assert lin.density == lin.nnz / (17 * 6)
    conv = SparseConv2d(3, 5, 3, density=density, generator=gen(3))
    assert conv.nnz == round(density * 5 * 3 * 3 * 3)
    assert conv.mask().shape == (5, 3, 3, 3)
    assert int(conv.mask().sum()) == conv.nnz


def test_empty_construction_is_seeded_and_dtype_aware():
    a = SparseLinear(10, 4, density=0.3, generator=gen(4))
    b = SparseLinear(10, 4, density=0.3, generator=gen(4))
    c = SparseLinear(10, 4, density=0.3, generator=gen(5))
    assert torch.equal(a.mask(), b.mask())
    assert not torch.equal(a.mask(), c.mask())
    d = SparseLinear(10, 4, density=0.3, dtype=torch.float64, bias=False)
    assert d.values.dtype == torch.float64 and d.bias is None
    # Initialized as nn.Linear: kaiming-uniform bound 1/sqrt(in_features).
    assert float(a.values.detach().abs().max()) <= 1 / math.sqrt(10)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_to_dense_roundtrip(bias):
    lin = _linear(11, 5, bias, torch.float32, 6)
    mask = random_mask((5, 11), 0.4, gen(6), empty_rows=True)
    sparse = SparseLinear.from_dense(lin, mask)
    back = sparse.to_dense()
    assert isinstance(back, nn.Linear) and back.weight.shape == (5, 11)
    assert torch.equal(back.weight, lin.weight.detach() * mask)
    if bias:
        assert torch.equal(back.bias, lin.bias)
    else:
        assert back.bias is None
    again = SparseLinear.from_dense(back)  # mask=None: the nonzeros, i.e. the same pattern
    assert torch.equal(again.mask(), mask)
    assert torch.equal(again.values, sparse.values)
    x = torch.randn(3, 11, generator=gen(7))
    assert_close(again(x).detach(), back(x).detach(), scale=11)


def test_dense_weight_is_exactly_zero_outside_mask():
    lin = SparseLinear(12, 7, density=0.3, generator=gen(8))
    with torch.no_grad():
        lin.values.add_(1.0)  # no stored value is 0
    w = lin.dense_weight()
    mask = lin.mask()
    assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))
    assert bool((w[mask] != 0).all())
    assert torch.equal(w[mask], lin.values.detach())
    # Differentiable in values.
    (dv,) = torch.autograd.grad(w.sum(), lin.values)
    assert torch.equal(dv, torch.ones_like(dv))
    conv = SparseConv2d(3, 4, 3, density=0.3, generator=gen(9))
    wc, mc = conv.dense_weight(), conv.mask()
    assert wc.shape == (4, 3, 3, 3)
    assert torch.equal(wc[~mc], torch.zeros(int((~mc).sum())))


@pytest.mark.kernels(*LINEAR_KERNELS)
def test_linear_state_dict_into_other_density(backend, tmp_path):
    src = SparseLinear(14, 6, density=0.3, generator=gen(10))
    dst = SparseLinear(14, 6, density=0.8, generator=gen(11))
    assert dst.nnz != src.nnz
    x = torch.randn(5, 14, generator=gen(12))
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst.load_state_dict(torch.load(buf))
    assert dst.nnz == src.nnz and torch.equal(dst.mask(), src.mask())
    assert isinstance(dst.values, nn.Parameter) and dst.values.requires_grad
    assert torch.equal(dst(x), src(x))
    # Backward works on the loaded module (the cached transpose was loaded with the pattern).
    xg = x.clone().requires_grad_(True)
    (dx_dst,) = torch.autograd.grad(dst(xg).sum(), xg)
    (dx_src,) = torch.autograd.grad(src(xg).sum(), xg)
    assert torch.equal(dx_dst, dx_src)


def test_load_state_dict_validates_pattern():
    src = SparseLinear(6, 3, density=0.5, generator=gen(13))
    state = src.state_dict()
    state["col_idx"] = state["col_idx"].clone()
    state["col_idx"][0] = 6  # out of range
    dst = SparseLinear(6, 3, density=0.5, generator=gen(14))
    with pytest.raises(RuntimeError, match=r"col_idx must lie in \[0, 6\)"):  # as torch reports load errors
        dst.load_state_dict(state)


@pytest.mark.kernels(*LINEAR_KERNELS)
def test_set_pattern_keeps_surviving_values_and_zeros_new_ones(backend):
    lin = SparseLinear(10, 6, density=0.5, generator=gen(15))
    with torch.no_grad():
        lin.values.add_(torch.sign(lin.values) + (lin.values == 0))  # no stored value is 0
    old_w = lin.dense_weight().detach().clone()
    old_mask = lin.mask()
    new_mask = random_mask((6, 10), 0.5, gen(16), empty_rows=True)
    lin.set_pattern(new_mask)
    assert torch.equal(lin.mask(), new_mask)
    assert lin.nnz == int(new_mask.sum())
    w = lin.dense_weight().detach()
    kept = new_mask & old_mask
    grown = new_mask & ~old_mask
    assert torch.equal(w[kept], old_w[kept])
    assert torch.equal(w[grown], torch.zeros(int(grown.sum())))
    assert torch.equal(w[~new_mask], torch.zeros(int((~new_mask).sum())))
    assert isinstance(lin.values, nn.Parameter) and lin.values.requires_grad
    # The cached transpose was rebuilt for the new pattern.
    W = lin.sparse_weight()
    assert torch.equal(W.t().to_dense(), w.t())
    # And the module still computes the masked dense layer, gradients included.
    x = torch.randn(4, 10, generator=gen(17), requires_grad=True)
    y = lin(x)
    assert_close(y, F.linear(x, w, lin.bias), scale=10)
    (dv,) = torch.autograd.grad(y.sum(), lin.values)
    assert_close(dv, (torch.ones(4, 6).t() @ x.detach())[new_mask], scale=10)


def test_set_pattern_with_dense_values():
    lin = SparseLinear(5, 3, density=0.4, generator=gen(18))
    dense = torch.arange(15, dtype=torch.float32).reshape(3, 5) + 1
    mask = torch.ones(3, 5, dtype=torch.bool)
    lin.set_pattern(mask, dense)
    assert torch.equal(lin.dense_weight().detach(), dense)


@pytest.mark.kernels(*LINEAR_KERNELS)
def test_sgd_step_matches_masked_dense(backend):
    """A pruned weight stays pruned: one SGD step equals the dense step with a masked gradient."""
    lin = _linear(9, 4, True, torch.float64, 19)
    mask = random_mask((4, 9), 0.4, gen(19))
    sparse = SparseLinear.from_dense(lin, mask)
    with torch.no_grad():
        lin.weight.mul_(mask)
    x = torch.randn(6, 9, generator=gen(20), dtype=torch.float64)
    opt_s = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    opt_d = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(2):
        opt_s.zero_grad(), opt_d.zero_grad()
        sparse(x).pow(2).sum().backward()
        lin(x).pow(2).sum().backward()
        lin.weight.grad.mul_(mask)
        opt_s.step(), opt_d.step()
    assert_close(sparse.dense_weight().detach(), lin.weight.detach())
    assert_close(sparse.bias.detach(), lin.bias.detach())


# -- SparseConv2d ------------------------------------------------------------------------

CONV_GEOMETRIES = [
    # (cin, cout, kernel, stride, padding, dilation, x_shape)
    (3, 4, 3, 1, 1, 1, (2, 3, 7, 6)),
    (2, 5, (3, 5), (2, 1), (1, 2), (1, 2), (1, 2, 8, 9)),
    (4, 3, 1, 2, 0, 1, (2, 4, 5, 5)),
    (2, 3, 5, 1, 2, 2, (0, 2, 9, 9)),
]


@pytest.mark.kernels(*CONV_KERNELS)
@pytest.mark.parametrize("geometry", CONV_GEOMETRIES, ids=lambda g: f"{g[0]}to{g[1]}-k{g[2]}-s{g[3]}")
@pytest.mark.parametrize("density,empty_rows", [(0.0, False), (0.5, True), (1.0, False)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_conv_from_dense_matches_masked_dense(backend, geometry, density, empty_rows, bias, dtype):
    cin, cout, ks, stride, padding, dilation, x_shape = geometry
    seed = seed_of("conv", geometry, density, empty_rows, bias, dtype)
    conv = _conv(cin, cout, ks, stride, padding, dilation, bias, dtype, seed)
    mask = random_mask(conv.weight.shape, density, gen(seed), empty_rows)
    sparse = SparseConv2d.from_dense(conv, mask)
    assert torch.equal(sparse.mask(), mask)
    masked_w = (conv.weight.detach() * mask).requires_grad_(True)
    b = conv.bias.detach().clone().requires_grad_(True) if bias else None
    x = make_input(x_shape, dtype, gen(seed + 1), requires_grad=True)
    y = sparse(x)
    y_ref = F.conv2d(x, masked_w, b, conv.stride, conv.padding, conv.dilation)
    k = sparse.sparse_weight().k
    assert_close(y, y_ref, scale=k)
    grad_out = make_input(y.shape, dtype, gen(seed + 2))
    got = torch.autograd.grad(y, [x, sparse.values] + ([sparse.bias] if bias else []), grad_out,
                              allow_unused=True, materialize_grads=True)
    exp = torch.autograd.grad(y_ref, [x, masked_w] + ([b] if bias else []), grad_out,
                              allow_unused=True, materialize_grads=True)
    assert_close(got[0], exp[0], scale=k)
    assert_close(got[1], exp[1][mask], scale=100)  # d values == dense weight grad at the mask
    if bias:
        assert_close(got[2], exp[2], scale=100)


@pytest.mark.parametrize("kernel", ["csr", "gemm", "dense"])
def test_conv_takes_an_unbatched_input_as_conv2d_does(kernel):
    torch.manual_seed(24)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    sparse = SparseConv2d.from_dense(conv, random_mask(conv.weight.shape, 0.5, gen(24)))
    sparse.kernel = kernel
    back = sparse.to_dense()
    x = torch.randn(3, 7, 7, generator=gen(25), requires_grad=True)
    y = sparse(x)
    assert y.shape == back(x).shape == (4, 4, 4)
    g = torch.randn(y.shape, generator=gen(26))
    got = torch.autograd.grad(y, (x, sparse.values, sparse.bias), g)
    y_ref = back(x)
    exp = torch.autograd.grad(y_ref, (x, back.weight, back.bias), g)
    assert_close(y, y_ref, scale=27)
    assert_close(got[0], exp[0], scale=27)
    assert_close(got[1], exp[1][sparse.mask()], scale=100)
    assert_close(got[2], exp[2], scale=100)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kernel", ["csr", "gemm", "dense"])
@pytest.mark.parametrize("geometry", [(3, 1, 0), (1, 1, 0), (1, 2, 0), (7, 2, 3)], ids=lambda g: f"k{g[0]}-s{g[1]}")
def test_conv_in_inference_mode_as_under_no_grad(geometry, kernel, layout):
    """Inference mode skips the autograd kernels: the layer nodes' plain kernels take every operand form."""
    ks, stride, padding = geometry
    sparse = SparseConv2d(6, 8, ks, stride=stride, padding=padding, density=0.3, generator=gen(27)).eval()
    sparse.kernel = kernel
    x = torch.randn(3, 6, 9, 9, generator=gen(28))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = sparse(x)
    with torch.inference_mode():
        got = sparse(x)
    assert_close(got, want, scale=6 * ks * ks)
    assert_close(got, sparse.to_dense()(x).detach(), scale=6 * ks * ks)


@pytest.mark.kernels(*CONV_KERNELS)
def test_conv_to_dense_roundtrip_and_same_padding(backend):
    torch.manual_seed(21)
    conv = nn.Conv2d(3, 4, 3, padding="same", dilation=2)
    mask = random_mask(conv.weight.shape, 0.5, gen(21))
    sparse = SparseConv2d.from_dense(conv, mask)
    assert sparse.padding == (2, 2)
    back = sparse.to_dense()
    assert isinstance(back, nn.Conv2d)
    assert (back.kernel_size, back.stride, back.padding, back.dilation) == ((3, 3), (1, 1), (2, 2), (2, 2))
    assert torch.equal(back.weight, conv.weight.detach() * mask)
    assert torch.equal(back.bias, conv.bias)
    x = torch.randn(2, 3, 6, 6, generator=gen(22))
    y = sparse(x)
    assert y.shape == (2, 4, 6, 6)
    assert_close(y.detach(), back(x).detach(), scale=27)
    assert "kernel_size=(3, 3)" in repr(sparse) and "density=0.5" in repr(sparse)


@pytest.mark.kernels(*CONV_KERNELS)
def test_conv_state_dict_into_other_density(backend):
    src = SparseConv2d(3, 4, 3, padding=1, density=0.2, generator=gen(23))
    dst = SparseConv2d(3, 4, 3, padding=1, density=0.9, generator=gen(24))
    dst.load_state_dict(src.state_dict())
    assert dst.nnz == src.nnz and torch.equal(dst.mask(), src.mask())
    x = torch.randn(2, 3, 5, 5, generator=gen(25))
    assert torch.equal(dst(x), src(x))


def test_conv_set_pattern():
    conv = SparseConv2d(2, 3, 3, density=0.5, generator=gen(26))
    with torch.no_grad():
        conv.values.copy_(torch.arange(1, conv.nnz + 1, dtype=torch.float32))
    old_w, old_mask = conv.dense_weight().detach().clone(), conv.mask()
    new_mask = random_mask((3, 2, 3, 3), 0.5, gen(27))
    conv.set_pattern(new_mask)
    w = conv.dense_weight().detach()
    assert torch.equal(conv.mask(), new_mask)
    assert torch.equal(w[new_mask & old_mask], old_w[new_mask & old_mask])
    assert torch.equal(w[new_mask & ~old_mask], torch.zeros(int((new_mask & ~old_mask).sum())))


# -- errors ------------------------------------------------------------------------------

def test_conv_groups_not_supported():
    with pytest.raises(ValueError, match=r"SparseConv2d: only groups=1 is supported, got groups=2"):
        SparseConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"SparseConv2d: only groups=1 is supported, got groups=2"):
        SparseConv2d.from_dense(nn.Conv2d(4, 6, 3, groups=2))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding,stride", [(1, 1), ((2, 1), 2), ("same", 1)], ids=["p1", "p21-s2", "same"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_conv_padding_modes_match_nn_conv2d(mode, padding, stride, channels_last):
    """reflect, replicate and circular padding (style-transfer and super-resolution nets): the input padded by
    F.pad as nn.Conv2d pads it, the kernels unpadded; every kernel gives the dense twin's output and gradients,
    batched and unbatched; to_dense gives the nn.Conv2d back; sparsify takes such convs."""
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, padding_mode=mode)
    torch.manual_seed(seed_of(mode, str(padding)))
    layer = SparseConv2d.from_dense(conv, mask=random_mask((6, 4, 3, 3), 0.5, gen(3)))
    assert layer.padding_mode == mode and layer.padding == (0, 0)
    assert f"padding_mode={mode!r}" in repr(layer)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d) and dense.padding_mode == mode and dense.padding == layer.input_padding
    x = torch.randn(2, 4, 7, 8, generator=gen(4))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = None
    for kernel in ("csr", "gemm", "dense", "auto"):
        layer.kernel = kernel
        for _ in range(2):  # the first call routes; the second takes the kept route
            layer.zero_grad(set_to_none=True)
            xs = x.detach().clone().requires_grad_()
            y = layer(xs)
            if g is None:
                g = torch.randn(y.shape, generator=gen(5))
            y.backward(g)
            dense.zero_grad(set_to_none=True)
            xd = x.detach().clone().requires_grad_()
            yd = dense(xd)
            yd.backward(g)
            assert_close(y, yd)
            assert_close(xs.grad, xd.grad)
            assert_close(layer.values.grad, dense.weight.grad[layer.mask()])
            assert_close(layer.bias.grad, dense.bias.grad)
        with torch.no_grad():
            assert_close(layer(x[0]), dense(x[0]))  # unbatched (C, H, W)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, padding_mode=mode), nn.ReLU())
    from sparsekern import sparsify
    sparsify(model, 0.5, "uniform")
    assert isinstance(model[0], SparseConv2d) and model[0].padding_mode == mode


def test_conv_same_padding_with_even_kernel_not_supported():
    with pytest.raises(ValueError, match=r"SparseConv2d: padding='same' with an even effective kernel size"):
        SparseConv2d.from_dense(nn.Conv2d(2, 2, 2, padding="same"))


@pytest.mark.parametrize("cls,module", [(SparseLinear, lambda: nn.Linear(5, 3)),
                                        (SparseConv2d, lambda: nn.Conv2d(2, 3, 3))], ids=["linear", "conv"])
def test_from_dense_mask_errors(cls, module):
    mod = module()
    shape = tuple(mod.weight.shape)
    wrong = torch.ones(shape[::-1], dtype=torch.bool)
    expected = rf"weight's shape {shape}, got torch.bool of shape {shape[::-1]}".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=rf"{cls.__name__}.from_dense: mask must be a bool tensor of the {expected}"):
        cls.from_dense(mod, wrong)
    with pytest.raises(ValueError, match=rf"{cls.__name__}.from_dense: mask must be a bool tensor.*got torch.float32"):
        cls.from_dense(mod, torch.ones(shape))
    sparse = cls.from_dense(mod, torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match=rf"{cls.__name__}.set_pattern: mask must be a bool tensor of shape"):
        sparse.set_pattern(wrong)


def test_from_dense_wrong_module_type():
    with pytest.raises(TypeError, match=r"SparseLinear.from_dense: module must be nn.Linear, got Conv2d"):
        SparseLinear.from_dense(nn.Conv2d(2, 2, 1))
    with pytest.raises(TypeError, match=r"SparseConv2d.from_dense: module must be nn.Conv2d, got Linear"):
        SparseConv2d.from_dense(nn.Linear(2, 2))


def test_random_mask_density_range():
    with pytest.raises(ValueError, match=r"random_mask: density must lie in \[0, 1\], got 1.5"):
        sk_random_mask((3, 3), 1.5)
    with pytest.raises(ValueError, match=r"SparseLinear: density must be a number in \[0, 1\], got -0.1"):
        SparseLinear(3, 3, density=-0.1)
    m = sk_random_mask((4, 5, 3), 0.25, gen(28))
    assert m.dtype == torch.bool and m.shape == (4, 5, 3) and int(m.sum()) == 15


def test_module_wrong_input_shape():
    lin = SparseLinear(5, 3, density=0.5)
    with pytest.raises(ValueError, match=r"sparse_linear: x must have last dim 5"):
        lin(torch.randn(2, 4))
    conv = SparseConv2d(3, 2, 3, density=0.5)
    with pytest.raises(ValueError, match=r"sparse_conv2d: x must have 3 channels"):
        conv(torch.randn(1, 2, 5, 5))
