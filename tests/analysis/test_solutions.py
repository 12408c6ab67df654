"""Comparisons of solutions: interpolation barrier, disagreement, JS divergence, ensembles, distance."""
import math
import re

import pytest
import torch
from torch import nn

from sparsekern.analysis import (
    compare_predictions,
    disagreement,
    ensemble_accuracy,
    evaluate,
    interpolate,
    interpolation_curve,
    js_divergence,
    weight_distance,
)
from sparsekern.data import make_synthetic
from sparsekern.nn import SparseConv2d, SparseLinear


@pytest.fixture(scope="module")
def data():
    splits = make_synthetic(num_classes=4, image_size=6, n_train=64, n_val=32, n_test=48)
    return splits.loaders(batch_size=16, seed=0)


def sparse_mlp(seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return nn.Sequential(nn.Flatten(), SparseLinear(36, 12, density=0.4, generator=g), nn.ReLU(),
                         SparseLinear(12, 4, density=0.5, generator=g))


def conv_bn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(SparseConv2d(1, 3, 3, padding=1, density=0.5), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 36, 4))


class Rolled(nn.Module):
    """The model's logits cyclically shifted: its argmax always differs from the model's."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).roll(1, dims=1)


@pytest.mark.parametrize("make", [sparse_mlp, conv_bn])
def test_barrier_zero_between_model_and_itself(make, data):
    train, _, test = data
    model = make(0)
    curve = interpolation_curve(model, model, test, alphas=[0.25, 0.5, 0.75], bn_loader=train)
    assert curve.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.barrier == 0.0 and len(set(curve.losses)) == 1


def test_interpolation_endpoints_and_sparse_patterns(data):
    _, _, test = data
    a, b = sparse_mlp(0), sparse_mlp(1)  # different patterns
    x, _ = next(iter(test))
    # The union pattern adds explicit zeros, which may change the kernel's summation order: allclose, not equal.
    assert torch.allclose(interpolate(a, b, 0.0)(x), a(x), atol=1e-6)
    assert torch.allclose(interpolate(a, b, 1.0)(x), b(x), atol=1e-6)
    mid = interpolate(a, b, 0.5)
    assert torch.equal(mid[1].mask(), a[1].mask() | b[1].mask())  # union of the two patterns
    expected = 0.5 * (a[1].dense_weight() + b[1].dense_weight())
    assert torch.allclose(mid[1].dense_weight(), expected)
    same_pattern = sparse_mlp(0)
    with torch.no_grad():
        same_pattern[1].values.mul_(2)
    mid = interpolate(a, same_pattern, 0.5)
    assert mid[1].nnz == a[1].nnz and torch.allclose(mid[1].values, 1.5 * a[1].values)
    # a sparse layer facing a dense one: dense weights are interpolated
    dense_b = nn.Sequential(nn.Flatten(), b[1].to_dense(), nn.ReLU(), b[3].to_dense())
    assert torch.allclose(interpolate(a, dense_b, 0.3)(x), interpolate(a, b, 0.3)(x), atol=1e-5)
    assert torch.allclose(interpolate(dense_b, a, 0.7)(x), interpolate(a, b, 0.3)(x), atol=1e-5)
    curve = interpolation_curve(a, b, test)
    assert len(curve.losses) == 11 and curve.barrier >= 0.0


def test_disagreement_js_and_ensemble(data):
    _, _, test = data
    model = sparse_mlp(0)
    same = compare_predictions(model, model, test)
    assert same.disagreement == 0.0 and same.js_divergence == pytest.approx(0.0, abs=1e-12)
    _, accuracy = evaluate(model, test)
    assert same.ensemble_accuracy == same.accuracy_a == pytest.approx(accuracy)
    assert ensemble_accuracy([model, model], test) == pytest.approx(accuracy)

    rolled = compare_predictions(model, Rolled(model), test)
    assert rolled.disagreement == 1.0
    assert 0.0 < rolled.js_divergence <= math.log(2)
    other = compare_predictions(model, sparse_mlp(1), test)
    assert 0.0 < other.js_divergence <= math.log(2)


def test_js_divergence_bounds():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    # disjoint supports reach ln 2; identical distributions give 0
    assert js_divergence(p.log(), q.log()) == pytest.approx(0.5 * math.log(2))


@torch.no_grad()
def test_weight_distance_on_common_mask():
    a, b = sparse_mlp(0), sparse_mlp(1)
    assert weight_distance(a, a).common == 0.0 and weight_distance(a, a).overall == 0.0
    d = weight_distance(a, b)
    common_sq = overall_sq = 0.0
    for i in (1, 3):
        diff = a[i].dense_weight() - b[i].dense_weight()
        common_sq += float(diff[a[i].mask() & b[i].mask()].pow(2).sum())
        overall_sq += float(diff.pow(2).sum())
    assert d.common == pytest.approx(math.sqrt(common_sq)) and d.overall == pytest.approx(math.sqrt(overall_sq))
    assert 0.0 < d.common_fraction < 1.0


_LP = torch.log_softmax(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), 1)


@pytest.mark.parametrize("fn", [disagreement, js_divergence], ids=["disagreement", "js_divergence"])
@pytest.mark.parametrize("a, b, match", [
    (_LP, _LP[:4], "log_probs_a and log_probs_b must have the same shape, got (5, 3) and (4, 3)"),
    (_LP, _LP[:, :2], "log_probs_a and log_probs_b must have the same shape, got (5, 3) and (5, 2)"),
    (_LP[:0], _LP[:0], "log_probs_a must be a 2-D (N, classes) tensor with N > 0, got shape (0, 3)"),
    (_LP, _LP[0], "log_probs_b must be a 2-D (N, classes) tensor with N > 0, got shape (3,)"),
    ([[0.0]], _LP, "log_probs_a must be a 2-D (N, classes) tensor with N > 0, got list"),
], ids=["rows", "classes", "empty", "1-d", "list"])
def test_prediction_comparisons_check_their_inputs(fn, a, b, match):
    with pytest.raises(ValueError, match=re.escape(f"{fn.__name__}: {match}")):
        fn(a, b)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "0.5", None, True])
def test_interpolate_rejects_an_alpha_that_is_not_a_finite_number(alpha):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=re.escape(f"interpolate: alpha must be a finite number, got {alpha!r}")):
        interpolate(model, model, alpha)
