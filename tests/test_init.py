"""Sparsity-aware init: every unit's output variance is the dense network's whatever its fan-in."""
import math
import re

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.init import initialize_, sparse_init_
from sparsekern.nn import SparseConv2d, SparseLinear

N_IN, N_OUT, DRAWS, BATCH = 1024, 64, 200, 512


def _per_unit_variance(layer, reinit, x):
    """Each output unit's variance over inputs and over ``DRAWS`` fresh inits of the weights."""
    with torch.no_grad():
        layer.bias.zero_()
        outputs = []
        for _ in range(DRAWS):
            reinit(layer)
            outputs.append(layer(x))
        return torch.cat(outputs).var(0)


def test_per_unit_output_variance_at_95_percent_sparsity_matches_dense():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, N_IN, generator=g)  # zero-mean inputs: no cross terms to add noise
    dense = _per_unit_variance(nn.Linear(N_IN, N_OUT),
                               lambda m: nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=g), x)
    reference = float(dense.mean())
    sparse = SparseLinear(N_IN, N_OUT, density=0.05, generator=g)
    fan_in = sparse.row_ptr[1:] - sparse.row_ptr[:-1]
    assert int(fan_in.max()) > 1.5 * int(fan_in.min())  # units of very different fan-in
    variance = _per_unit_variance(sparse, lambda m: sparse_init_(m, generator=g), x)
    ratio = variance / reference
    assert float((ratio - 1).abs().max()) < 0.10, f"per-unit variance / dense in [{ratio.min()}, {ratio.max()}]"
    # The dense init, masked, loses 95 % of it: the test tells the two apart.
    masked = _per_unit_variance(sparse, lambda m: m.values.copy_(
        m.values.new_empty(m.nnz).normal_(0, math.sqrt(2 / N_IN), generator=g)), x)
    assert float(masked.mean()) / reference < 0.1


def test_each_weight_has_its_units_std():
    g = torch.Generator().manual_seed(1)
    layer = SparseLinear(400, 8, density=0.5, generator=g)
    sparse_init_(layer, nonlinearity="linear", distribution="uniform", generator=g)
    fan_in = (layer.row_ptr[1:] - layer.row_ptr[:-1]).double()
    rows = layer.sparse_weight().row_indices()
    values = layer.values.detach().double()
    assert bool((values.abs() <= math.sqrt(3) / fan_in[rows].sqrt() + 1e-7).all())  # uniform bound
    per_row = torch.zeros(8, dtype=torch.float64).index_add_(0, rows, values ** 2)
    torch.testing.assert_close(per_row, torch.ones(8, dtype=torch.float64), rtol=0.25, atol=0)


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_std_is_gain_over_the_units_active_connections_kernel_positions_included(mode):
    conv = SparseConv2d(4, 6, 3, density=0.3, generator=torch.Generator().manual_seed(2))
    sparse_init_(conv, nonlinearity="relu", mode=mode, generator=torch.Generator().manual_seed(3))
    mask = conv.mask()  # (Cout, Cin, kh, kw)
    if mode == "fan_in":  # per output channel: its active (input channel, kernel position) pairs
        fans = mask.sum((1, 2, 3))[:, None, None, None].expand_as(mask)
    else:  # per input channel: its active (output channel, kernel position) pairs
        fans = mask.sum((0, 2, 3))[None, :, None, None].expand_as(mask)
    draw = torch.randn(conv.nnz, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected = draw * math.sqrt(2.0) / fans[mask].double().sqrt()
    torch.testing.assert_close(conv.values.detach().double(), expected, rtol=1e-6, atol=1e-7)


def test_units_without_inputs_stay_zero():
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    layer = SparseLinear.from_dense(nn.Linear(5, 3), mask)
    sparse_init_(layer)
    weight = layer.dense_weight()
    assert bool((weight[1] == 0).all()) and bool((weight[0] != 0).all())
    assert bool(torch.isfinite(weight).all())


def test_sparsify_init_sparse_uses_it():
    torch.manual_seed(0)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(2000, 16)), 0.1, generator=torch.Generator().manual_seed(0))
    fan_in = (model[0].row_ptr[1:] - model[0].row_ptr[:-1]).double()
    per_row = torch.zeros(16, dtype=torch.float64).index_add_(
        0, model[0].sparse_weight().row_indices(), model[0].values.detach().double() ** 2)
    assert int(fan_in.min()) > 150
    assert float(per_row.mean()) / 2 == pytest.approx(1.0, rel=0.1)  # relu gain^2 = 2 per unit


def test_bad_input_is_a_clear_error():
    layer = SparseLinear(4, 4, density=0.5)
    with pytest.raises(TypeError, match="sparse layer"):
        sparse_init_(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="mode must be one of"):
        sparse_init_(layer, mode="fan_avg")
    with pytest.raises(ValueError, match="distribution must be one of"):
        sparse_init_(layer, distribution="cauchy")


@pytest.mark.parametrize("init", ["sparse", "dense", "layer"])
@pytest.mark.parametrize("density", [float("nan"), 0.0, -0.5, 1.5, "0.5", True])
def test_initialize_rejects_a_density_outside_0_1(density, init):
    layer = SparseLinear(4, 4, density=0.5)
    before = layer.values.detach().clone()
    with pytest.raises(ValueError, match=re.escape(f"initialize_: density must lie in (0, 1], got {density!r}")):
        initialize_(layer, init, density)
    assert torch.equal(layer.values, before)
