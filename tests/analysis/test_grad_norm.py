"""grad_norm against a hand-written backward pass of a tiny sparse MLP."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern.analysis import grad_norm
from sparsekern.nn import SparseConv2d, SparseLinear


def tiny_sparse_mlp(seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    return nn.Sequential(SparseLinear(6, 5, density=0.5, generator=g), nn.ReLU(),
                         SparseLinear(5, 3, density=0.6, generator=g))


def test_grad_norm_equals_hand_computation():
    model = tiny_sparse_mlp()
    x, y = torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    l1, l2 = model[0], model[2]
    w1, w2 = l1.dense_weight().detach(), l2.dense_weight().detach()
    pre = x @ w1.T + l1.bias.detach()
    h = pre.clamp_min(0)
    z = h @ w2.T + l2.bias.detach()
    dz = (z.softmax(1) - F.one_hot(y, 3)) / x.shape[0]  # d mean cross-entropy / d logits
    dw2, db2 = dz.T @ h, dz.sum(0)
    dpre = (dz @ w2) * (pre > 0)
    dw1, db1 = dpre.T @ x, dpre.sum(0)

    result = grad_norm(model, (x, y))
    sq = lambda t: float(t.double().pow(2).sum())  # noqa: E731
    active = sq(dw1[l1.mask()]) + sq(dw2[l2.mask()]) + sq(db1) + sq(db2)
    dense = sq(dw1) + sq(dw2) + sq(db1) + sq(db2)
    assert math.isclose(result.active, math.sqrt(active), rel_tol=1e-5)
    assert math.isclose(result.dense, math.sqrt(dense), rel_tol=1e-5)
    assert result.dense > result.active
    assert math.isclose(result.dense_per_param["0.weight"], math.sqrt(sq(dw1)), rel_tol=1e-5)
    assert math.isclose(result.active_per_param["2.weight"], math.sqrt(sq(dw2[l2.mask()])), rel_tol=1e-5)
    assert math.isclose(result.active_per_param["2.bias"], math.sqrt(sq(db2)), rel_tol=1e-5)
    assert math.isclose(result.loss, float(F.cross_entropy(z, y)), rel_tol=1e-6)

    # The active norm is the norm of the gradient the sparse kernels give ``values``.
    F.cross_entropy(model(x), y).backward()
    backward_sq = sum(sq(p.grad) for p in model.parameters())
    assert math.isclose(result.active, math.sqrt(backward_sq), rel_tol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_grad_norm_keeps_the_fused_activations(activation):
    """A model whose activations sparsify fused into its layers has the gradients of the same model unfused."""
    plain = nn.Sequential(nn.Linear(6, 5), nn.ReLU() if activation == "relu" else nn.GELU(), nn.Linear(5, 3))
    args = dict(density=0.5, init="dense", inplace=False)
    unfused = sparsekern.sparsify(plain, generator=torch.Generator().manual_seed(0), **args)
    fused = sparsekern.sparsify(plain, fuse_activations=True, generator=torch.Generator().manual_seed(0), **args)
    assert getattr(fused[0], "activation", None) == activation  # fused: the model has no activation module left
    x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    want, got = grad_norm(unfused, (x, y)), grad_norm(fused, (x, y))
    assert math.isclose(got.loss, want.loss, rel_tol=1e-6)
    assert math.isclose(got.active, want.active, rel_tol=1e-5) and math.isclose(got.dense, want.dense, rel_tol=1e-5)


def test_grad_norm_restores_state():
    torch.manual_seed(0)
    model = nn.Sequential(SparseConv2d(1, 4, 3, padding=1, density=0.5), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    model.eval()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    result = grad_norm(model, (x, y))
    assert result.active > 0 and set(result.active_per_param) == {"0.weight", "0.bias", "1.weight", "1.bias",
                                                                    "4.weight", "4.bias"}
    # Dense layers are fully active: both norms agree on them.
    assert result.active_per_param["4.weight"] == result.dense_per_param["4.weight"]
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    assert "forward" not in model[0].__dict__  # the dense forward patch is gone


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate"])
def test_grad_norm_of_a_conv_is_its_dense_twins_for_every_padding_mode(padding_mode):
    """The dense gradient of a conv runs on the input its kernels see (padded by F.pad for reflect/replicate)."""
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode), nn.Flatten(), nn.Linear(64, 3))
    model = sparsekern.sparsify(plain, 0.5, "uniform", init="dense", inplace=False,
                                generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    twin = nn.Sequential(model[0].to_dense(), nn.Flatten(), model[2].to_dense())
    F.cross_entropy(twin(x), y).backward()
    sq = lambda t: float(t.double().pow(2).sum())  # noqa: E731
    dense = sum(sq(p.grad) for p in twin.parameters())
    active = sq(twin[0].weight.grad[model[0].mask()]) + sq(twin[2].weight.grad[model[2].mask()]) + \
        sq(twin[0].bias.grad) + sq(twin[2].bias.grad)
    result = grad_norm(model, (x, y))
    assert math.isclose(result.dense, math.sqrt(dense), rel_tol=1e-5)
    assert math.isclose(result.active, math.sqrt(active), rel_tol=1e-5)
