"""A DST step that cannot complete raises before any layer, optimizer state or the step count changes."""
import pytest
import torch
from torch import nn

import sparsekern
from dst_helpers import tiny_data, tiny_mlp, train_step


def _state(model, optimizer, algo):
    layers = {name: (m.mask().clone(), m.values.detach().clone()) for name, m in algo.layers.items()}
    momentum = {id(p): s["momentum_buffer"].clone() for p, s in optimizer.state.items()}
    extra = {n: t.clone() for n, t in getattr(algo, "grad_momentum", {}).items()}
    return algo.step_count, len(algo.history), layers, momentum, extra


def _assert_same(before, after):
    assert before[:2] == after[:2]
    for name, (mask, values) in before[2].items():
        assert torch.equal(after[2][name][0], mask), name
        assert torch.equal(after[2][name][1], values), name
    assert before[3].keys() == after[3].keys()
    for key, t in before[3].items():
        assert torch.equal(after[3][key], t)
    for name, t in before[4].items():
        assert torch.equal(after[4][name], t), name


@pytest.mark.parametrize("algorithm", ["RigL", "SNFS"])
def test_a_layer_without_gradient_fails_the_step_before_any_change(algorithm):
    model = tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    algo = getattr(sparsekern.dst, algorithm)(model, optimizer, 100, delta_t=2, drop_fraction=0.5)
    batches = tiny_data(3)
    train_step(model, optimizer, algo, batches[0])  # step 1: fills the optimizer state
    # Step 2 (an update step) with a loss that does not reach the last layer ("4").
    x, _ = batches[1]
    optimizer.zero_grad()
    model[:3](x).square().mean().backward()
    optimizer.step()
    before = _state(model, optimizer, algo)
    with pytest.raises(RuntimeError, match=r"no gradient reached sparse layer\(s\) \['4'\].*nothing was changed"):
        algo.step()
    _assert_same(before, _state(model, optimizer, algo))
    # A backward through every layer, and the step goes through.
    nn.functional.cross_entropy(model(x), batches[1][1]).backward()
    assert algo.step()
    assert algo.step_count == 2 and len(algo.history) == 1


def test_rigl_off_update_steps_needs_no_gradient():
    model = tiny_mlp()
    algo = sparsekern.dst.RigL(model, torch.optim.SGD(model.parameters(), lr=0.05), 100, delta_t=2)
    assert algo.step() is False  # step 1 is no update step: no dense gradient needed
    assert algo.step_count == 1
    algo.remove_hooks()
