"""``.weight`` of the sparse modules: what code written for nn.Linear / nn.Conv2d reads and writes."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import SparseConv2d, SparseLinear, SparseWeightMixin

from sk_testing import gen


def _modules():
    return [SparseLinear(12, 7, density=0.3, generator=gen(1)),
            SparseConv2d(3, 4, 3, padding=1, density=0.3, generator=gen(2)),
            SparseLinear(8, 8, density=0.5, format="bsr", block=4, generator=gen(3))]


IDS = ["linear", "conv", "linear-bsr"]


@pytest.fixture
def materializations(monkeypatch):
    """How many times a dense weight was built."""
    count = [0]
    build = SparseWeightMixin.dense_weight

    def counted(self):
        count[0] += 1
        return build(self)
    monkeypatch.setattr(SparseWeightMixin, "dense_weight", counted)
    return count


@pytest.mark.parametrize("module", _modules(), ids=IDS)
def test_weight_is_the_dense_weight(module):
    w = module.weight
    assert w.shape == module.weight_shape and w.dtype == module.values.dtype and w.device == module.values.device
    assert torch.equal(w, module.dense_weight())
    assert not w[~module.mask()].any()
    (dv,) = torch.autograd.grad((w * torch.arange(w.numel()).reshape(w.shape)).sum(), module.values)
    assert torch.equal(dv, torch.arange(w.numel())[module.mask().reshape(-1)].to(dv.dtype))
    assert "weight" not in module.state_dict() and "weight" not in dict(module.named_parameters())


@pytest.mark.parametrize("module", _modules(), ids=IDS)
def test_reading_metadata_builds_nothing(module, materializations):
    w = module.weight
    meta = (w.shape, w.dtype, w.device, w.ndim, w.requires_grad, w.is_cuda, w.layout, w.size(0), w.dim(), w.numel())
    assert materializations[0] == 0
    assert meta[:5] == (module.weight_shape, module.values.dtype, module.values.device, len(module.weight_shape),
                        True)
    assert w.numel() == module.weight_shape.numel()
    float(w.detach().sum())  # using the data builds it, once per operation
    assert materializations[0] == 1


def test_dense_code_reading_weight_computes_the_same():
    lin, conv = SparseLinear(12, 7, density=0.3, generator=gen(4)), SparseConv2d(3, 4, 3, padding=1, generator=gen(5))
    x, img = torch.randn(5, 12, generator=gen(6)), torch.randn(2, 3, 6, 6, generator=gen(7))
    torch.testing.assert_close(F.linear(x.to(lin.weight.dtype), lin.weight, lin.bias), lin(x))
    torch.testing.assert_close(F.conv2d(img, conv.weight, conv.bias, conv.stride, conv.padding), conv(img))
    double = copy.deepcopy(lin).to(torch.float64)
    assert double.weight.dtype == torch.float64
    assert (lin.in_features, lin.out_features) == (12, 7)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups) == (3, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1)


def _writes():
    """(name, write(layer, dense weight scaled by 0.5)): the ways dense code writes a weight."""
    def assign_parameter(layer, t):
        layer.weight = nn.Parameter(t)

    def setitem(layer, t):
        with torch.no_grad():
            layer.weight[:] = t

    def copy_(layer, t):
        with torch.no_grad():
            layer.weight.copy_(t)
    return [("data.mul_", lambda layer, t: layer.weight.data.mul_(0.5)),
            ("no_grad.mul_", lambda layer, t: torch.no_grad()(lambda: layer.weight.mul_(0.5))()),
            ("copy_", copy_), ("data.copy_", lambda layer, t: layer.weight.data.copy_(t)),
            ("setitem", setitem), ("assign", assign_parameter),
            ("detach.mul_", lambda layer, t: layer.weight.detach().mul_(0.5)),
            ("out=", lambda layer, t: torch.mul(layer.weight.data, 0.5, out=layer.weight.data))]


@pytest.mark.parametrize("module", _modules(), ids=IDS)
@pytest.mark.parametrize("name, write", _writes(), ids=[n for n, _ in _writes()])
def test_writes_through_weight_reach_the_values(module, name, write):
    layer = copy.deepcopy(module)
    values = layer.values
    target = layer.dense_weight().detach() * 0.5
    write(layer, target.clone())
    assert layer.values is values  # the optimizer's Parameter stays the one the layer trains
    assert torch.equal(layer.dense_weight().detach(), target)


@pytest.mark.parametrize("module", _modules(), ids=IDS)
@pytest.mark.parametrize("name, write", _writes(), ids=[n for n, _ in _writes()])
def test_writes_outside_the_pattern_raise_and_change_nothing(module, name, write):
    layer = copy.deepcopy(module)
    before = layer.values.detach().clone()
    full = torch.ones(layer.weight_shape)
    if name in ("data.mul_", "no_grad.mul_", "detach.mul_", "out="):  # scaling keeps zeros: write a full tensor
        name, write = "add_", lambda layer, t: layer.weight.data.add_(t)
    with pytest.raises(ValueError, match=r"weight: \d+ entries outside the sparse pattern .* would be nonzero"):
        write(layer, full)
    assert torch.equal(layer.values.detach(), before)


def test_init_functions_and_freezing_through_weight():
    lin = SparseLinear(12, 7, density=0.3, generator=gen(8))
    nn.init.zeros_(lin.weight)
    assert not lin.values.any()
    nn.init.constant_(lin.weight, 0.0)
    with pytest.raises(ValueError, match="outside the sparse pattern"):
        nn.init.normal_(lin.weight)  # a dense init cannot be stored: clear error, nothing written
    assert not lin.values.any()
    lin.weight.requires_grad_(False)
    assert not lin.values.requires_grad and not lin.weight.requires_grad
    lin.weight.requires_grad = True
    assert lin.values.requires_grad


def test_weight_grad_is_the_scattered_values_grad():
    lin = SparseLinear(12, 7, density=0.3, generator=gen(9))
    assert lin.weight.grad is None
    lin(torch.randn(3, 12, generator=gen(10))).sum().backward()
    assert torch.equal(lin.weight.grad, lin.pattern.csr(lin.values.grad).to_dense())


@pytest.mark.parametrize("value, error, match", [
    (None, AttributeError, "can only be assigned a tensor of shape"),
    (torch.zeros(12, 7), ValueError, r"expected a tensor of shape \(7, 12\), got shape \(12, 7\)"),
], ids=["none", "wrong-shape"])
def test_assigning_a_bad_weight_raises_and_changes_nothing(value, error, match):
    lin = SparseLinear(12, 7, density=0.3, generator=gen(11))
    before = lin.values.detach().clone()
    with pytest.raises(error, match=match):
        lin.weight = value
    assert torch.equal(lin.values.detach(), before) and "weight" not in lin._parameters


def test_storage_changes_through_weight_raise():
    lin = SparseLinear(12, 7, density=0.3, generator=gen(12))
    with pytest.raises(RuntimeError, match="cannot change the storage of a sparse weight"):
        lin.weight.data = torch.zeros(7, 12)


def test_reading_weight_under_torch_compile_is_traced_whole():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = SparseLinear(16, 8, density=0.5, generator=gen(13))

        def forward(self, x):  # what Hugging Face models do: cast to the weight's dtype
            return F.linear(x.to(self.lin.weight.dtype), self.lin.weight, self.lin.bias) * self.lin.weight.shape[0]

    model, x = Model(), torch.randn(4, 16, generator=gen(14))
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x))
