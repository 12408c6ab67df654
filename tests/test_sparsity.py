"""Per-layer densities (uniform, ER, ERK as in google-research/rigl) and sparsify."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import sparsekern
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.sparsity import densities


def _net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=2),
                         nn.Conv2d(16, 32, 3, stride=2), nn.Flatten(), nn.Linear(32 * 3 * 3, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def test_erk_by_hand():
    # raw ERK scores: (10+20)/200 = 0.15, (30+10)/300 = 2/15; eps = 0.5 * 500 / (0.15*200 + 2/15*300) = 250/70
    eps = 250 / 70
    assert densities([(10, 20), (30, 10)], 0.5, "erk") == pytest.approx([0.15 * eps, 2 / 15 * eps])
    # ER ignores kernel dims: (Cin + Cout) / (Cin * Cout); ERK counts them.
    er = densities({"conv": (8, 4, 3, 3), "fc": (10, 72)}, 0.2, "er")
    raw = {"conv": 12 / 32, "fc": 82 / 720}
    eps = 0.2 * (288 + 720) / (raw["conv"] * 288 + raw["fc"] * 720)
    assert er == pytest.approx({k: v * eps for k, v in raw.items()})
    assert densities([(10, 20), (30, 10)], 0.5, "uniform") == [0.5, 0.5]


def test_erk_makes_small_layers_dense_and_solves_again():
    shapes = [(4, 3), (500, 400), (300, 500)]  # the tiny layer would need density > 1
    d = densities(shapes, 0.3, "erk")
    assert d[0] == 1.0 and all(0 < x < 1 for x in d[1:])
    numels = [math.prod(s) for s in shapes]
    assert sum(x * n for x, n in zip(d, numels)) == pytest.approx(0.3 * sum(numels))
    assert densities(shapes, 1.0, "erk") == [1.0, 1.0, 1.0]


@settings(max_examples=60, deadline=None)
@given(shapes=st.lists(st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([1, 3])), min_size=1,
                       max_size=6),
       density=st.floats(0.01, 1.0), distribution=st.sampled_from(["uniform", "er", "erk"]))
def test_achieved_density_is_the_request_within_one_weight_per_layer(shapes, density, distribution):
    shapes = [(o, i) if k == 1 else (o, i, k, k) for o, i, k in shapes]
    d = densities(shapes, density, distribution)
    numels = [math.prod(s) for s in shapes]
    assert all(0.0 < x <= 1.0 for x in d)
    kept = sum(round(x * n) for x, n in zip(d, numels))  # what random_mask keeps
    assert abs(kept - density * sum(numels)) <= len(shapes) * 0.5 + 1e-6


def test_sparsify_replaces_linear_and_conv_and_keeps_the_rest():
    torch.manual_seed(0)
    model = _net()
    x = torch.randn(2, 3, 8, 8)
    grouped = model[2]
    out = sparsekern.sparsify(model, 0.2, generator=torch.Generator().manual_seed(0))
    assert out is model
    assert isinstance(model[0], SparseConv2d) and isinstance(model[3], SparseConv2d)
    assert isinstance(model[5], SparseLinear) and isinstance(model[7], SparseLinear)
    assert model[2] is grouped  # groups=2: not supported, stays dense
    assert model(x).shape == (2, 10)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}
    total = sum(math.prod(m.weight_shape) for m in layers.values())
    kept = sum(m.nnz for m in layers.values())
    assert abs(kept - 0.2 * total) <= len(layers) * 0.5
    expected = densities({n: tuple(m.weight_shape) for n, m in layers.items()}, 0.2, "erk")
    for name, m in layers.items():
        assert m.nnz == round(expected[name] * math.prod(m.weight_shape))


def test_masks_are_seeded_and_uniform():
    def masks(seed):
        model = sparsekern.sparsify(nn.Sequential(nn.Linear(5, 4)), 0.25, distribution="uniform",
                                    generator=torch.Generator().manual_seed(seed))
        return model[0].mask()
    assert torch.equal(masks(1), masks(1))
    assert not torch.equal(masks(1), masks(2))
    frequency = torch.stack([masks(s) for s in range(300)]).float().mean(0)
    assert float((frequency - 0.25).abs().max()) < 0.1  # 4 sigma of a binomial(300, 0.25) frequency


def test_dense_layers_inplace_and_init_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5))
    kept = sparsekern.sparsify(model, 0.5, dense_layers=["0"], inplace=False)
    assert isinstance(kept[0], nn.Linear) and isinstance(kept[2], SparseLinear) and kept[2].density == 0.5
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)  # original untouched
    dense = model[0].weight.detach()
    for init, scale in [("dense", 1.0), ("layer", 1 / math.sqrt(0.5))]:
        sparse = sparsekern.sparsify(model, 0.5, distribution="uniform", init=init, inplace=False,
                                     generator=torch.Generator().manual_seed(0))[0]
        mask = sparse.mask()
        torch.testing.assert_close(sparse.dense_weight().detach()[mask], dense[mask] * scale)
        torch.testing.assert_close(sparse.bias.detach(), model[0].bias.detach())
    single = sparsekern.sparsify(nn.Linear(8, 8), 0.5)  # the model itself is the layer
    assert isinstance(single, SparseLinear)


def test_bad_input_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4))
    for density in (0, 0.0, -0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(ValueError, match="density must lie in \\(0, 1\\]"):
            sparsekern.sparsify(model, density, inplace=False)
        with pytest.raises(ValueError, match="density must lie in \\(0, 1\\]"):
            densities([(4, 4)], density)
    with pytest.raises(ValueError, match="distribution must be one of"):
        sparsekern.sparsify(model, 0.5, distribution="erdos", inplace=False)
    with pytest.raises(ValueError, match="distribution must be one of"):
        densities([(4, 4)], 0.5, "random")
    with pytest.raises(ValueError, match="init must be one of"):
        sparsekern.sparsify(model, 0.5, init="xavier", inplace=False)
    with pytest.raises(ValueError, match="nothing|no nn.Linear"):
        sparsekern.sparsify(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(ValueError, match="outside dense_layers"):
        sparsekern.sparsify(model, 0.5, dense_layers=["0"], inplace=False)
    with pytest.raises(ValueError, match="dense_layers names no module"):
        sparsekern.sparsify(model, 0.5, dense_layers=["fc9"], inplace=False)
    with pytest.raises(ValueError, match="no layers"):
        densities([], 0.5)
    with pytest.raises(ValueError, match="shape"):
        densities([(4,)], 0.5)
