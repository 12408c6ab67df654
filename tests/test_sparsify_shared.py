"""sparsify keeps a layer used in several places (tied) one layer: one sparse module wherever it appears."""
import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import SparseConv2d, SparseLinear


class TiedMLP(nn.Module):
    """The same Linear registered as ``first`` and ``again`` and applied twice."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.again = self.first
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.again(torch.relu(self.first(x)))))


def test_a_shared_linear_becomes_one_sparse_linear():
    model = sparsekern.sparsify(TiedMLP(), 0.5, generator=torch.Generator().manual_seed(0))
    assert isinstance(model.first, SparseLinear)
    assert model.again is model.first
    assert sum(isinstance(m, SparseLinear) for m in model.modules()) == 2  # first and head


def test_a_shared_linear_in_a_copy_stays_shared():
    dense = TiedMLP()
    model = sparsekern.sparsify(dense, 0.5, inplace=False, generator=torch.Generator().manual_seed(0))
    assert model.again is model.first and isinstance(model.first, SparseLinear)
    assert dense.again is dense.first and isinstance(dense.first, nn.Linear)


def test_a_shared_conv_in_two_containers_becomes_one_sparse_conv():
    conv = nn.Conv2d(2, 2, 3, padding=1)
    model = nn.ModuleDict({"a": nn.Sequential(conv, nn.ReLU()), "b": nn.Sequential(nn.ReLU(), conv)})
    sparsekern.sparsify(model, 0.5, generator=torch.Generator().manual_seed(0))
    assert isinstance(model["a"][0], SparseConv2d)
    assert model["b"][1] is model["a"][0]


def test_a_training_step_updates_the_shared_layer_once():
    model = sparsekern.sparsify(TiedMLP(), 0.5, init="dense", generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())
    assert sum(p is model.first.values for p in params) == 1
    # Reference: the same tied network with dense masked weights; its gradient sums both uses.
    reference = TiedMLP()
    with torch.no_grad():
        for dense, sparse in ((reference.first, model.first), (reference.head, model.head)):
            dense.weight.copy_(sparse.dense_weight())
            dense.bias.copy_(sparse.bias)
    x, y = torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    nn.functional.cross_entropy(reference(x), y).backward()
    mask = model.first.mask()
    expected = (reference.first.weight - 0.1 * reference.first.weight.grad).detach()[mask]
    optimizer = torch.optim.SGD(params, lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    torch.testing.assert_close(model.first.values.detach(), expected)


def test_dense_layers_must_name_every_name_of_a_shared_layer():
    model = TiedMLP()
    with pytest.raises(ValueError, match=r"dense_layers must name all or none.*\['first', 'again'\]"):
        sparsekern.sparsify(model, 0.5, dense_layers=["again"])
    assert isinstance(model.first, nn.Linear) and isinstance(model.head, nn.Linear)  # nothing replaced
    sparsekern.sparsify(model, 0.5, dense_layers=["first", "again"])
    assert model.again is model.first and isinstance(model.first, nn.Linear)
    assert isinstance(model.head, SparseLinear)


def test_densify_turns_the_model_back_into_plain_modules_tied_stays_tied():
    model = sparsekern.sparsify(TiedMLP(), 0.5, generator=torch.Generator().manual_seed(1))
    model.head.values.requires_grad_(False)
    model.eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    want = model(x)
    masks = {"first": model.first.mask(), "head": model.head.mask()}
    assert sparsekern.densify(model) is model
    assert type(model.first) is nn.Linear and type(model.head) is nn.Linear and model.again is model.first
    assert not any(isinstance(m, sparsekern.nn.SparseWeightMixin) for m in model.modules())
    torch.testing.assert_close(model(x), want)
    assert not model.first.weight[~masks["first"]].any() and not model.head.weight[~masks["head"]].any()
    assert not model.head.weight.requires_grad and model.first.weight.requires_grad and not model.first.training


def test_densify_a_copy_or_a_lone_layer():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1, bias=False)
    model = sparsekern.sparsify(nn.Sequential(conv, nn.ReLU()), 0.5, generator=torch.Generator().manual_seed(3))
    dense = sparsekern.densify(model, inplace=False)
    assert isinstance(model[0], SparseConv2d) and type(dense[0]) is nn.Conv2d and dense[0].bias is None
    assert (dense[0].stride, dense[0].padding) == ((2, 2), (1, 1))
    img = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(dense(img), model(img))
    lone = sparsekern.densify(model[0])
    assert type(lone) is nn.Conv2d and torch.equal(lone.weight, model[0].dense_weight())
    with pytest.raises(TypeError, match="densify: model must be an nn.Module, got dict"):
        sparsekern.densify({})



class TiedWeights(nn.Module):
    """Two different Linear modules holding one weight (or bias) Parameter, and a head."""

    def __init__(self, shared="weight"):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        setattr(self.b, shared, getattr(self.a, shared))


class TiedEmbedding(nn.Module):
    """A language-model head tied to its embedding."""

    def __init__(self):
        super().__init__()
        self.emb, self.body, self.head = nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize("make, shared, match, keep_dense", [
    (TiedWeights, ("a", "b", "weight"),
     r"a\.weight is the same parameter as \['b\.weight'\].*dense_layers=\['a', 'b'\]", ["a", "b"]),
    (lambda: TiedWeights("bias"), ("a", "b", "bias"), r"a\.bias is the same parameter as \['b\.bias'\]", ["a", "b"]),
    (TiedEmbedding, ("head", "emb", "weight"),
     r"head\.weight is the same parameter as \['emb\.weight'\].*dense_layers=\['head', 'emb'\]", ["head"]),
], ids=["two-linears", "shared-bias", "embedding-head"])
def test_a_parameter_shared_with_another_module_is_not_untied(make, shared, match, keep_dense):
    model = make()
    with pytest.raises(ValueError, match=match):
        sparsekern.sparsify(model, 0.5)
    assert not any(isinstance(m, sparsekern.nn.SparseWeightMixin) for m in model.modules())  # nothing replaced
    sparsekern.sparsify(model, 0.5, dense_layers=keep_dense)  # kept dense, they stay tied
    first, second, key = shared
    assert getattr(getattr(model, first), key) is getattr(getattr(model, second), key)
    assert isinstance(model.get_submodule("body" if hasattr(model, "body") else "head"), SparseLinear)
