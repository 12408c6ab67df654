"""The read-only ``.weight`` of the sparse modules: what code written for nn.Linear / nn.Conv2d reads."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.nn import SparseConv2d, SparseLinear

from sk_testing import gen


def _modules():
    return [SparseLinear(12, 7, density=0.3, generator=gen(1)),
            SparseConv2d(3, 4, 3, padding=1, density=0.3, generator=gen(2)),
            SparseLinear(8, 8, density=0.5, format="bsr", block=4, generator=gen(3))]


@pytest.mark.parametrize("module", _modules(), ids=["linear", "conv", "linear-bsr"])
def test_weight_is_the_dense_weight(module):
    w = module.weight
    assert w.shape == module.weight_shape and w.dtype == module.values.dtype and w.device == module.values.device
    assert torch.equal(w, module.dense_weight())
    assert not w[~module.mask()].any()
    (dv,) = torch.autograd.grad((w * torch.arange(w.numel()).reshape(w.shape)).sum(), module.values)
    assert torch.equal(dv, torch.arange(w.numel())[module.mask().reshape(-1)].to(dv.dtype))
    assert "weight" not in module.state_dict() and "weight" not in dict(module.named_parameters())


def test_dense_code_reading_weight_computes_the_same():
    lin, conv = SparseLinear(12, 7, density=0.3, generator=gen(4)), SparseConv2d(3, 4, 3, padding=1, generator=gen(5))
    x, img = torch.randn(5, 12, generator=gen(6)), torch.randn(2, 3, 6, 6, generator=gen(7))
    torch.testing.assert_close(F.linear(x.to(lin.weight.dtype), lin.weight, lin.bias), lin(x))
    torch.testing.assert_close(F.conv2d(img, conv.weight, conv.bias, conv.stride, conv.padding), conv(img))
    double = copy.deepcopy(lin).to(torch.float64)
    assert double.weight.dtype == torch.float64


@pytest.mark.parametrize("value", [torch.zeros(7, 12), nn.Parameter(torch.zeros(7, 12)), None],
                         ids=["tensor", "parameter", "none"])
def test_assigning_weight_raises_and_changes_nothing(value):
    lin = SparseLinear(12, 7, density=0.3, generator=gen(8))
    before = lin.dense_weight().detach().clone()
    with pytest.raises(AttributeError, match="read-only.*values.*set_pattern"):
        lin.weight = value
    assert torch.equal(lin.weight, before) and "weight" not in lin._parameters


def test_weight_is_a_materialized_copy():
    lin = SparseLinear(12, 7, density=0.3, generator=gen(9))
    before = lin.values.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)  # a fresh tensor each read: the module's values are untouched
    assert torch.equal(lin.values, before)
