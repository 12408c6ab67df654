"""A DST step that cannot complete raises before any layer, optimizer state or the step count changes."""
import re

import pytest
import torch
from dst_helpers import tiny_data, tiny_mlp, train_step
from torch import nn

import sparsekern


def _state(model, optimizer, algo):
    layers = {name: (m.mask().clone(), m.values.detach().clone()) for name, m in algo.layers.items()}
    momentum = {id(p): s["momentum_buffer"].clone() for p, s in optimizer.state.items()}
    extra = {n: t.clone() for n, t in getattr(algo, "grad_momentum", {}).items()}
    return algo.step_count, len(algo.history), layers, momentum, extra


def _assert_same(before, after):
    assert before[:2] == after[:2]
    for name, (mask, values) in before[2].items():
        assert torch.equal(after[2][name][0], mask), name
        torch.testing.assert_close(after[2][name][1], values, rtol=0, atol=0, equal_nan=True)  # NaN: injected
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


def _bsr_mlp():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    return sparsekern.sparsify(model, 0.5, format="bsr", block=4, generator=torch.Generator().manual_seed(0))


def _with(call):
    """call(model, optimizer) on a fresh sparse MLP and an SGD over its parameters."""
    def run():
        model = tiny_mlp()
        return call(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    return run


# (id, call, error type, substring naming the argument), in the style of OpInfo error inputs.
CONSTRUCTOR_CASES = [
    ("total_steps-zero", _with(lambda m, o: sparsekern.dst.RigL(m, o, total_steps=0)), ValueError,
     "RigL: total_steps must be an int >= 1, got 0"),
    ("total_steps-float", _with(lambda m, o: sparsekern.dst.SET(m, o, total_steps=10.0)), ValueError,
     "SET: total_steps must be an int >= 1, got 10.0"),
    ("delta_t-zero", _with(lambda m, o: sparsekern.dst.SET(m, o, 10, delta_t=0)), ValueError,
     "SET: delta_t must be an int >= 1, got 0"),
    ("drop_fraction", _with(lambda m, o: sparsekern.dst.RigL(m, o, 10, drop_fraction=1.5)), ValueError,
     "RigL: drop_fraction must lie in [0, 1], got 1.5"),
    ("drop_fraction-nan", _with(lambda m, o: sparsekern.dst.RigL(m, o, 10, drop_fraction=float("nan"))), ValueError,
     "drop_fraction must lie in [0, 1], got nan"),
    ("end_fraction", _with(lambda m, o: sparsekern.dst.RigL(m, o, 10, end_fraction=0.0)), ValueError,
     "RigL: end_fraction must lie in (0, 1], got 0.0"),
    ("schedule", _with(lambda m, o: sparsekern.dst.SET(m, o, 10, schedule="step")), ValueError,
     "SET: schedule must be one of ('cosine', 'linear', 'constant'), got 'step'"),
    ("grow_init", _with(lambda m, o: sparsekern.dst.SET(m, o, 10, grow_init="random")), ValueError,
     "SET: grow_init must be one of ('zero',), got 'random'"),
    ("optimizer-type", _with(lambda m, o: sparsekern.dst.RigL(m, [o], 10)), TypeError,
     "RigL: optimizer must be a torch.optim.Optimizer, got list"),
    ("optimizer-without-values", _with(lambda m, o: sparsekern.dst.RigL(m, torch.optim.SGD([m[0].bias], lr=0.1), 10)),
     ValueError, "RigL: the optimizer does not hold the values of sparse layer '0'"),
    ("no-sparse-layers",
     lambda: sparsekern.dst.SET(nn.Linear(2, 2), torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1), 10),
     ValueError, "SET: the model has no sparse layers"),
    ("snfs-momentum", _with(lambda m, o: sparsekern.dst.SNFS(m, o, 10, momentum=1.0)), ValueError,
     "SNFS: momentum must lie in [0, 1), got 1.0"),
    ("snfs-momentum-string", _with(lambda m, o: sparsekern.dst.SNFS(m, o, 10, momentum="0.5")), ValueError,
     "SNFS: momentum must lie in [0, 1), got '0.5'"),
    ("generator", _with(lambda m, o: sparsekern.dst.SET(m, o, 10, generator=5)), TypeError,
     "SET: generator must be a torch.Generator or None, got int"),
    ("optimizer-of-another-model",
     lambda: sparsekern.dst.SNFS(_bsr_mlp(), torch.optim.SGD(_bsr_mlp().parameters(), lr=1), 10), ValueError,
     "SNFS: the optimizer does not hold"),
    ("create-name", _with(lambda m, o: sparsekern.dst.create("gmp", m, o, 10)), ValueError,
     "sparsekern.dst: algorithm must be one of ('static', 'set', 'snfs', 'rigl'), got 'gmp'"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CONSTRUCTOR_CASES],
                         ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_constructor_errors(call, error, match):
    with pytest.raises(error, match=re.escape(match)):
        call()


def test_snfs_redistribution_with_block_layers_is_rejected():
    model = _bsr_mlp()
    with pytest.raises(ValueError, match=re.escape("SNFS: redistribute=True cannot keep the total nnz with "
                                                   "block-sparse (format='bsr') layers ['0', '2']")):
        sparsekern.dst.SNFS(model, torch.optim.SGD(model.parameters(), lr=0.1), 10)


def _backward(model, batch, optimizer=None):
    """A forward and backward pass (and an optimizer step if given) without the DST step."""
    if optimizer is not None:
        optimizer.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    if optimizer is not None:
        optimizer.step()


@pytest.mark.parametrize("algorithm", ["SET", "RigL", "SNFS", "SNFS-no-redistribute"])
def test_a_non_finite_value_fails_the_update_before_any_layer_or_the_step_count_changes(algorithm):
    model = tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    cls, kwargs = (sparsekern.dst.SNFS, {"redistribute": False}) if algorithm == "SNFS-no-redistribute" \
        else (getattr(sparsekern.dst, algorithm), {})
    algo = cls(model, optimizer, 100, delta_t=2, drop_fraction=0.5, **kwargs)
    batches = tiny_data(3)
    train_step(model, optimizer, algo, batches[0])  # step 1: fills the optimizer state
    _backward(model, batches[1], optimizer)  # step 2, an update step
    with torch.no_grad():
        model[4].values[0] = float("nan")  # the last layer: the first ones would change first
    before = _state(model, optimizer, algo)
    with pytest.raises(ValueError, match=re.escape(f"{cls.__name__}.step: the values of sparse layer(s) ['4'] hold "
                                                   "NaN or inf; nothing was changed (step_count stays 1)")):
        algo.step()
    _assert_same(before, _state(model, optimizer, algo))
    # Fixed, the update is taken at step 2 (not lost to a step count advanced by the failed try).
    with torch.no_grad():
        model[4].values[0] = 0.0
    _backward(model, batches[1])
    assert algo.step()
    assert algo.step_count == 2 and [r["step"] for r in algo.history] == [2]


@pytest.mark.parametrize("algorithm, what", [("RigL", "grow scores"), ("SNFS", "dense gradients")])
def test_a_non_finite_gradient_fails_the_step_before_any_change(algorithm, what):
    model = tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    algo = getattr(sparsekern.dst, algorithm)(model, optimizer, 100, delta_t=2, drop_fraction=0.5)
    batches = tiny_data(3)
    train_step(model, optimizer, algo, batches[0])
    x, y = batches[1]
    x = x.clone()
    x[0, 0] = float("inf")  # NaN gradients; the optimizer does not step, so the values stay finite
    nn.functional.cross_entropy(model(x), y).backward()
    before = _state(model, optimizer, algo)
    with pytest.raises(ValueError, match=re.escape(f"{algorithm}.step: the {what} of sparse layer(s) ['0'") +
                       r".*hold NaN or inf; nothing was changed \(step_count stays 1\)"):
        algo.step()
    _assert_same(before, _state(model, optimizer, algo))
