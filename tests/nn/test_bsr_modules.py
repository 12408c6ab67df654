"""SparseLinear / SparseConv2d with format="bsr" (whole b x b blocks) and sparsify(..., format="bsr")."""
import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern import BlockSparseMatrix
from sparsekern.block_sparse import block_mask_of, expand_block_mask
from sparsekern.models.resnet_cifar import CifarResNet
from sparsekern.nn import SparseConv2d, SparseLinear, SparseWeightMixin
from sparsekern.sparsity import densities

from sk_testing import assert_close, gen, make_input, random_mask, seed_of

LINEAR_KERNELS = ("sparse_linear", "sddmm", "gather")
CONV_KERNELS = ("sparse_conv2d", "sparse_conv2d_backward_input", "sparse_conv2d_backward_weight")


def _mask2d(module):
    m = module.weight_shape[0]
    return module.mask().reshape(m, math.prod(module.weight_shape[1:]))


def assert_block_aligned(module):
    b = module.block
    mask2d = _mask2d(module)
    assert torch.equal(expand_block_mask(block_mask_of(mask2d, b), b), mask2d), "pattern is not made of whole blocks"
    W = module.block_weight()
    assert isinstance(W, BlockSparseMatrix) and W.block == b and W.shape == module.weight_shape
    BlockSparseMatrix(W.row_ptr, W.col_idx, W.values, W.shape)  # a valid BSR
    assert torch.equal(W.block_mask(), block_mask_of(mask2d, b))
    assert torch.equal(W.to_dense(), module.dense_weight())  # the blocks hold the module's values
    assert W.nnz == module.nnz


def _grads_match(sparse, dense, x, y, y_ref, scale):
    """Gradients of the sparse module (x, values, bias) against those of its dense equivalent."""
    grad_out = make_input(y.shape, y.dtype, gen(99))
    d_sparse = torch.autograd.grad(y, [x, sparse.values] + ([sparse.bias] if sparse.bias is not None else []),
                                   grad_out)
    d_dense = torch.autograd.grad(y_ref, [x, dense.weight] + ([dense.bias] if dense.bias is not None else []),
                                  grad_out)
    assert_close(d_sparse[0], d_dense[0], scale=scale)
    # d values = the dense weight's gradient at the (block) pattern, in row-major order.
    assert_close(d_sparse[1], d_dense[1][sparse.mask()], scale=scale)
    if sparse.bias is not None:
        assert_close(d_sparse[2], d_dense[2], scale=scale)


# -- SparseLinear --------------------------------------------------------------------------

@pytest.mark.kernels(*LINEAR_KERNELS)
@pytest.mark.parametrize("in_f,out_f,b", [(32, 16, 8), (12, 8, 4), (6, 4, 2), (5, 3, 1)], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_bsr_matches_its_dense_module(backend, in_f, out_f, b, density, bias, dtype):
    seed = seed_of("lin", in_f, out_f, b, density, bias, dtype)
    torch.manual_seed(seed)
    layer = SparseLinear(in_f, out_f, bias=bias, density=density, dtype=dtype, format="bsr", block=b,
                         generator=gen(seed))
    assert layer.format == "bsr" and layer.block == b
    blocks = (out_f // b) * (in_f // b)
    n_blocks = int(round(density * blocks))
    assert layer.nnz == n_blocks * b * b
    assert layer.block_weight().nnzb == n_blocks
    assert_block_aligned(layer)
    assert "format='bsr'" in repr(layer) and f"block={b}" in repr(layer)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Linear) and torch.equal(dense.weight, layer.dense_weight().detach())
    x = make_input((2, 3, in_f), dtype, gen(seed + 1), requires_grad=True)
    y = layer(x)
    y_ref = dense(x)
    assert_close(y, y_ref, scale=in_f)
    _grads_match(layer, dense, x, y, y_ref, scale=6)


def test_linear_bsr_initial_patterns_are_random_and_seeded():
    def mask(seed):
        return SparseLinear(32, 32, density=0.25, format="bsr", block=4, generator=gen(seed)).mask()
    assert torch.equal(mask(1), mask(1))
    assert not torch.equal(mask(1), mask(2))


# -- SparseConv2d --------------------------------------------------------------------------

@pytest.mark.kernels(*CONV_KERNELS)
@pytest.mark.parametrize("cin,cout,ks,stride,padding,b", [
    (4, 8, 3, 1, 1, 4),        # (8, 36): 2 x 9 blocks
    (2, 6, (1, 3), 2, (0, 1), 3),  # (6, 6)
    (8, 8, 1, 1, 0, 8),        # one block
], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0])
def test_conv_bsr_matches_its_dense_module(backend, cin, cout, ks, stride, padding, b, density, dtype):
    seed = seed_of("conv", cin, cout, ks, stride, padding, b, density, dtype)
    torch.manual_seed(seed)
    layer = SparseConv2d(cin, cout, ks, stride, padding, density=density, dtype=dtype, format="bsr", block=b,
                         generator=gen(seed))
    kcols = math.prod(layer.weight_shape[1:])
    n_blocks = int(round(density * (cout // b) * (kcols // b)))
    assert layer.nnz == n_blocks * b * b
    assert_block_aligned(layer)
    dense = layer.to_dense()
    assert isinstance(dense, nn.Conv2d) and dense.stride == layer.stride and dense.padding == layer.padding
    x = make_input((2, cin, 6, 5), dtype, gen(seed + 1), requires_grad=True)
    y = layer(x)
    y_ref = dense(x)
    assert_close(y, y_ref, scale=kcols)
    _grads_match(layer, dense, x, y, y_ref, scale=60)


# -- from_dense, set_pattern, update_pattern_ --------------------------------------------------

def test_from_dense_expands_a_mask_to_whole_blocks():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8, dtype=torch.float64)
    mask = torch.zeros(8, 16, dtype=torch.bool)
    mask[0, 5] = mask[6, 15] = mask[7, 12] = True  # blocks (0, 1) and (1, 3) of a 2 x 4 grid
    layer = SparseLinear.from_dense(lin, mask, format="bsr", block=4)
    bmask = torch.tensor([[False, True, False, False], [False, False, False, True]])
    expected_mask = expand_block_mask(bmask, 4)
    assert layer.format == "bsr" and layer.block == 4 and layer.nnz == 32
    assert torch.equal(layer.mask(), expected_mask)
    # All b*b weights of a kept block come from the dense layer, not only those of the mask.
    assert torch.equal(layer.dense_weight(), lin.weight.detach() * expected_mask)
    assert torch.equal(layer.bias, lin.bias)
    assert_block_aligned(layer)
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.linear(x, lin.weight * expected_mask, lin.bias))
    # No mask: the weight's nonzeros, expanded.
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[5, 9] = 1.0
    layer = SparseLinear.from_dense(lin, format="bsr", block=4)
    assert layer.nnz == 16 and torch.equal(layer.mask()[4:8, 8:12], torch.ones(4, 4, dtype=torch.bool))


def test_conv_from_dense_expands_a_mask_to_whole_blocks():
    torch.manual_seed(1)
    conv = nn.Conv2d(2, 4, 3, padding=1)  # (4, 18)
    mask = random_mask(conv.weight.shape, 0.1, gen(1))
    layer = SparseConv2d.from_dense(conv, mask, format="bsr", block=2)
    expected = expand_block_mask(block_mask_of(mask.reshape(4, 18), 2), 2).reshape(conv.weight.shape)
    assert torch.equal(layer.mask(), expected)
    assert torch.equal(layer.dense_weight(), conv.weight.detach() * expected)
    assert_block_aligned(layer)
    x = torch.randn(2, 2, 5, 5)
    assert_close(layer(x), F.conv2d(x, conv.weight * expected, conv.bias, 1, 1), scale=18)


def test_set_pattern_rejects_a_mask_not_made_of_whole_blocks():
    layer = SparseLinear(16, 8, density=0.5, format="bsr", block=4, generator=gen(2))
    before = layer.mask().clone()
    bad = expand_block_mask(torch.tensor([[True, False, False, False], [False, False, True, False]]), 4)
    bad[0, 0] = False  # a block with a hole
    with pytest.raises(ValueError, match=r"set_pattern: format='bsr' needs a mask made of whole 4x4 blocks"):
        layer.set_pattern(bad)
    with pytest.raises(ValueError, match=r"update_pattern_: format='bsr' needs a mask made of whole 4x4 blocks"):
        layer.update_pattern_(bad, torch.zeros(int(bad.sum())))
    assert torch.equal(layer.mask(), before)  # unchanged
    assert_block_aligned(layer)


def test_set_pattern_with_blocks_refreshes_the_blocks():
    layer = SparseLinear(16, 8, density=0.5, format="bsr", block=4, generator=gen(3))
    old_weight = layer.dense_weight().detach().clone()
    old_mask = layer.mask().clone()
    old_bmask = block_mask_of(old_mask, 4)
    new_bmask = ~old_bmask
    new_bmask[0, 0] = old_bmask[0, 0] = True  # one kept block, the rest flipped
    new_mask = expand_block_mask(new_bmask, 4)
    layer.set_pattern(new_mask)
    assert torch.equal(layer.mask(), new_mask) and layer.nnz == int(new_mask.sum())
    assert layer.block_weight().nnzb == int(new_bmask.sum())
    assert_block_aligned(layer)
    # Values: the current weight where still active, zero where newly active.
    assert torch.equal(layer.dense_weight().detach(), old_weight * new_mask)
    x = torch.randn(2, 16)
    assert_close(layer(x), layer.to_dense()(x), scale=16)


def test_update_pattern_in_place_with_positions_refreshes_the_blocks():
    layer = SparseLinear(16, 8, density=0.5, format="bsr", block=4, generator=gen(4))
    values = layer.values
    bmask = torch.tensor([[True, False, True, False], [False, True, False, True]])
    new_mask = expand_block_mask(bmask, 4)
    new_values = torch.randn(int(new_mask.sum()))
    layer.update_pattern_(None, new_values, positions=new_mask.reshape(-1).nonzero().squeeze(1))
    assert layer.values is values  # same nnz: written in place
    assert torch.equal(layer.mask(), new_mask)
    assert torch.equal(layer.values.detach(), new_values)
    assert_block_aligned(layer)
    # Non-aligned positions are rejected.
    bad = new_mask.clone()
    bad[0, 0], bad[0, 4] = False, True
    with pytest.raises(ValueError, match="whole 4x4 blocks"):
        layer.update_pattern_(None, new_values, positions=bad.reshape(-1).nonzero().squeeze(1))


# -- state_dict, dtype ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_state_dict_round_trip_into_a_fresh_module_of_another_nnz(kind):
    if kind == "linear":
        def make(density, seed):
            return SparseLinear(16, 8, density=density, format="bsr", block=4, generator=gen(seed))
        x = torch.randn(3, 16)
    else:
        def make(density, seed):
            return SparseConv2d(4, 8, 3, padding=1, density=density, format="bsr", block=4, generator=gen(seed))
        x = torch.randn(2, 4, 5, 5)
    torch.manual_seed(5)
    src = make(0.5, 5)
    dst = make(0.25, 6)
    assert dst.nnz != src.nnz
    buffer = io.BytesIO()
    torch.save(src.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)
    assert not any(key.startswith("b_") for key in state)  # the block layout is derived, not saved
    optimizer = torch.optim.SGD(dst.parameters(), lr=0.1)
    dst.load_state_dict(state)
    assert dst.nnz == src.nnz and torch.equal(dst.mask(), src.mask())
    assert torch.equal(dst.values, src.values) and torch.equal(dst.bias, src.bias)
    assert any(p is dst.values for p in optimizer.param_groups[0]["params"])  # the same Parameter
    assert_block_aligned(dst)
    Ws, Wd = src.block_weight(), dst.block_weight()
    for a, c in zip((Ws.row_ptr, Ws.col_idx, Ws.values) + Ws.transpose_pattern(),
                    (Wd.row_ptr, Wd.col_idx, Wd.values) + Wd.transpose_pattern()):
        assert torch.equal(a, c)
    assert torch.equal(dst(x), src(x))
    dst(x).sum().backward()
    assert dst.values.grad.shape == (src.nnz,)


def test_load_state_dict_rejects_a_non_aligned_pattern():
    csr = SparseLinear(16, 8, density=0.5, generator=gen(7))
    layer = SparseLinear(16, 8, density=0.5, format="bsr", block=4, generator=gen(8))
    assert not torch.equal(expand_block_mask(block_mask_of(csr.mask(), 4), 4), csr.mask())
    mask, values, order = layer.mask().clone(), layer.values.detach().clone(), layer.pattern.b_order.clone()
    with pytest.raises(RuntimeError, match=r"checkpoint pattern: format='bsr' needs a mask made of whole 4x4 blocks"):
        layer.load_state_dict(csr.state_dict())
    # Rejected before anything was copied: the module is as it was.
    assert torch.equal(layer.mask(), mask) and torch.equal(layer.values.detach(), values)
    assert torch.equal(layer.pattern.b_order, order)


@pytest.mark.kernels(*(LINEAR_KERNELS + CONV_KERNELS))
def test_to_float64(backend):
    torch.manual_seed(9)
    for layer, x in ((SparseLinear(16, 8, density=0.5, format="bsr", block=4, generator=gen(9)),
                      torch.randn(3, 16, dtype=torch.float64)),
                     (SparseConv2d(4, 8, 3, padding=1, density=0.5, format="bsr", block=4, generator=gen(10)),
                      torch.randn(2, 4, 5, 5, dtype=torch.float64))):
        mask, values = layer.mask().clone(), layer.values.detach().clone()
        layer64 = layer.to(torch.float64)
        assert layer64.values.dtype == torch.float64 and layer64.bias.dtype == torch.float64
        assert layer64.row_ptr.dtype == torch.int64 and layer64.col_idx.dtype == torch.int32
        assert layer64.pattern.b_order.dtype == torch.int64  # index buffers are not converted
        assert torch.equal(layer64.mask(), mask) and torch.equal(layer64.values.detach(), values.double())
        assert layer64.block_weight().dtype == torch.float64
        assert_block_aligned(layer64)
        y = layer64(x)
        assert y.dtype == torch.float64
        assert_close(y, layer64.to_dense()(x), scale=36)


# -- errors --------------------------------------------------------------------------------

def test_bad_format_or_block_is_a_clear_error():
    with pytest.raises(ValueError, match=r"block=4 needs both weight dims \(rows 8, columns 10\)"):
        SparseLinear(10, 8, format="bsr", block=4)
    with pytest.raises(ValueError, match=r"block=4 needs both weight dims \(rows 6, columns 16\)"):
        SparseLinear(16, 6, format="bsr", block=4)
    with pytest.raises(ValueError, match=r"columns 27"):
        SparseConv2d(3, 8, 3, format="bsr", block=4)
    with pytest.raises(ValueError, match="format must be one of"):
        SparseLinear(16, 8, format="coo")
    for block in (0, -4, 4.0, True):
        with pytest.raises(ValueError, match="block must be a positive int"):
            SparseLinear(16, 8, format="bsr", block=block)
    with pytest.raises(ValueError, match=r"SparseLinear: format='bsr' with block=3"):
        SparseLinear.from_dense(nn.Linear(16, 8), format="bsr", block=3)
    with pytest.raises(ValueError, match="format must be one of"):
        SparseConv2d.from_dense(nn.Conv2d(4, 8, 1), format="dense")
    with pytest.raises(RuntimeError, match="block_weight: the module's format is 'csr'"):
        SparseLinear(16, 8, density=0.5).block_weight()
    # format="csr" ignores block (any shape works).
    layer = SparseLinear(10, 7, density=0.5, format="csr", block=4)
    assert layer.format == "csr" and layer.block == 1


# -- sparsify ------------------------------------------------------------------------------

class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)       # 27 columns: stays CSR
        self.conv = nn.Conv2d(16, 16, 3, padding=1)      # (16, 144): BSR
        self.fc1 = nn.Linear(16 * 4 * 4, 32)            # (32, 256): BSR
        self.fc2 = nn.Linear(32, 10)                    # 10 rows: stays CSR

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _dense_twin(model):
    """The same model with every sparse layer replaced by its dense equivalent."""
    import copy
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, SparseWeightMixin):
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, module.to_dense().train(module.training))
    return twin


@pytest.mark.parametrize("block", [8, 16])
def test_sparsify_bsr_small_net(block):
    torch.manual_seed(10)
    model = SmallNet()
    layer_densities = densities(model, 0.2, "erk")
    with pytest.warns(UserWarning, match=rf"block={block}; these layers are CSR instead: \['stem', 'fc2'\]"):
        sparsekern.sparsify(model, 0.2, generator=gen(block), format="bsr", block=block)
    formats = {name: (m.format, m.block) for name, m in model.named_modules() if isinstance(m, SparseWeightMixin)}
    assert formats == {"stem": ("csr", 1), "conv": ("bsr", block), "fc1": ("bsr", block), "fc2": ("csr", 1)}
    for name in ("conv", "fc1"):
        layer = model.get_submodule(name)
        m, k = layer.weight_shape[0], math.prod(layer.weight_shape[1:])
        n_blocks = int(round(layer_densities[name] * (m // block) * (k // block)))
        assert layer.nnz == n_blocks * block * block, name
        assert_block_aligned(layer)
    for name in ("stem", "fc2"):
        layer = model.get_submodule(name)
        assert layer.nnz == int(round(layer_densities[name] * math.prod(layer.weight_shape)))
    # Forward equals the dense twin; backward reaches every sparse layer.
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    assert_close(y, _dense_twin(model)(x), scale=300)
    y.square().sum().backward()
    for name, layer in model.named_modules():
        if isinstance(layer, SparseWeightMixin):
            assert layer.values.grad is not None and bool(torch.isfinite(layer.values.grad).all()), name
    assert float(model.fc1.values.grad.abs().sum()) > 0


def test_sparsify_bsr_resnet():
    torch.manual_seed(11)
    model = CifarResNet(depth=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparsekern.sparsify(model, 0.3, generator=gen(11), format="bsr", block=16)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1 and "['conv1', 'fc']" in messages[0]
    sparse = {name: m for name, m in model.named_modules() if isinstance(m, SparseWeightMixin)}
    assert {n for n, m in sparse.items() if m.format == "csr"} == {"conv1", "fc"}
    assert len([m for m in sparse.values() if m.format == "bsr"]) == 6
    for m in sparse.values():
        if m.format == "bsr":
            assert m.block == 16
            assert_block_aligned(m)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    y = model(x)
    assert y.shape == (2, 10)
    assert_close(y, _dense_twin(model)(x), scale=500)
    model.train()
    F.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    for name, m in sparse.items():
        assert m.values.grad is not None and m.values.grad.shape == m.values.shape, name


def test_sparsify_bsr_not_inplace_and_csr_default():
    model = SmallNet()
    with pytest.warns(UserWarning):
        out = sparsekern.sparsify(model, 0.5, generator=gen(0), inplace=False, format="bsr", block=8)
    assert isinstance(model.conv, nn.Conv2d) and out.conv.format == "bsr"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # format="csr" never warns about blocks
        csr = sparsekern.sparsify(SmallNet(), 0.5, generator=gen(0))
    assert all(m.format == "csr" for m in csr.modules() if isinstance(m, SparseWeightMixin))
    with pytest.raises(ValueError, match="sparsify: format must be one of"):
        sparsekern.sparsify(SmallNet(), 0.5, format="block")
