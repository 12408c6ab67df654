"""Invariants of RigL on compressed weights over 2,000 steps, with SGD (momentum, weight decay) and AdamW."""
import pytest
import torch
from dst_helpers import tiny_data, tiny_mlp, train_step

import sparsekern

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
}


def _snapshot(algo):
    """Per layer: flat mask, flat dense weight, and each per-element optimizer state as a flat dense tensor."""
    out = {}
    for name, layer in algo.layers.items():
        mask = layer.mask().reshape(-1)
        states = {}
        for key, value in algo.optimizer.state[layer.values].items():
            if isinstance(value, torch.Tensor) and value.dim() == 1:
                dense = torch.zeros(mask.numel(), dtype=value.dtype)
                dense[mask] = value
                states[key] = dense
        out[name] = (mask, layer.dense_weight().detach().reshape(-1).clone(), states)
    return out


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_rigl_2000_steps_keeps_nnz_zeros_and_grows_at_zero(optimizer_name):
    model = tiny_mlp(seed=1, density=0.25)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    algo = sparsekern.dst.RigL(model, optimizer, total_steps=2000, delta_t=100, drop_fraction=0.3)
    batches = tiny_data()
    nnz0 = {name: layer.nnz for name, layer in algo.layers.items()}
    values0 = {name: layer.values for name, layer in algo.layers.items()}
    changes = 0
    for step in range(2000):
        due = algo.is_update_step(algo.step_count + 1)
        train_step(model, optimizer, None, batches[step % len(batches)])
        before = _snapshot(algo) if due else None  # after optimizer.step(), before the pattern update
        changed = algo.step()
        if not due:
            assert not changed
            continue
        assert changed == any(r["mask_distance"] for r in algo.stats["layers"].values())
        changes += changed
        after = _snapshot(algo)
        for name, layer in algo.layers.items():
            old_mask, _, _ = before[name]
            new_mask, weight, states = after[name]
            grown = new_mask & ~old_mask
            assert layer.nnz == nnz0[name] == int(new_mask.sum())
            assert layer.values is values0[name]  # the optimizer's Parameter, updated in place
            assert bool((weight[~new_mask] == 0).all())
            assert bool((weight[grown] == 0).all()), "grown weights must start at 0"
            for key, state in states.items():
                assert bool((state[grown] == 0).all()), f"optimizer state {key} of grown weights must start at 0"
            # Every weight active before and after keeps its value and optimizer state, a survivor or one
            # dropped and grown back in the same update (reinit_when_same=False, the paper's code).
            survived = new_mask & old_mask
            _, weight_before, states_before = before[name]
            assert torch.equal(weight[survived], weight_before[survived])
            for key, state in states.items():
                assert torch.equal(state[survived], states_before[key][survived])
    assert len(algo.history) == 15  # updates at steps 100, 200, ..., 1500 (end_fraction 0.75)
    assert changes >= 5  # the late ones drop floor(nnz * f(t)) = 0
    for name, layer in algo.layers.items():
        assert layer.nnz == nnz0[name]
        layer.sparse_weight()._validate()
        dense = layer.dense_weight().detach()
        assert bool((dense[~layer.mask()] == 0).all())
        for value in optimizer.state[layer.values].values():
            assert value.dim() == 0 or value.shape == (nnz0[name],)
    # Training worked through the pattern changes.
    losses = [train_step(model, optimizer, None, b)[0] for b in batches]
    assert sum(losses) / len(losses) < 0.5


@pytest.mark.parametrize("optimizer_name", ["sgd_nesterov", "adamw"])
@pytest.mark.parametrize("algorithm", ["SET", "SNFS"])
def test_other_algorithms_keep_total_nnz_and_grow_at_zero(algorithm, optimizer_name):
    model = tiny_mlp(seed=2, density=0.3)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    algo = getattr(sparsekern.dst, algorithm)(model, optimizer, total_steps=200, delta_t=20,
                                             generator=torch.Generator().manual_seed(0))
    batches = tiny_data()
    total = sum(layer.nnz for layer in algo.layers.values())
    for step in range(200):
        due = algo.is_update_step(algo.step_count + 1)
        train_step(model, optimizer, None, batches[step % len(batches)])
        before = _snapshot(algo) if due else None
        algo.step()
        if due:
            after = _snapshot(algo)
            for name in algo.layers:
                grown = after[name][0] & ~before[name][0]
                assert bool((after[name][1][grown] == 0).all())
                for state in after[name][2].values():
                    assert bool((state[grown] == 0).all())
            assert sum(layer.nnz for layer in algo.layers.values()) == total
            for layer in algo.layers.values():  # the optimizer follows a replaced Parameter (SNFS)
                assert any(p is layer.values for g in optimizer.param_groups for p in g["params"])
                for value in optimizer.state[layer.values].values():
                    assert value.dim() == 0 or value.shape == (layer.nnz,)
    assert len(algo.history) == 7
    assert any(r["mask_distance"] for rec in algo.history for r in rec["layers"].values())


@pytest.mark.parametrize("reinit_when_same", [True, False])
@pytest.mark.parametrize("algorithm", ["SET", "RigL", "SNFS"])
def test_a_weight_dropped_and_grown_back_restarts_only_under_reinit_when_same(algorithm, reinit_when_same):
    """drop_fraction 1 drops every weight of a dense layer and grows every one back (the pattern is
    unchanged, all regrown). The paper's code (google-research/rigl, reinit_when_same=False for SET,
    SNFS and RigL) keeps such a weight's value and optimizer state; reinit_when_same=True zeroes both."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(sparsekern.nn.SparseLinear(6, 4, density=1.0, generator=torch.Generator()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw = {"redistribute": False} if algorithm == "SNFS" else {}
    algo = getattr(sparsekern.dst, algorithm)(model, optimizer, total_steps=4, delta_t=1, drop_fraction=1.0,
                                             schedule="constant", end_fraction=1.0,
                                             reinit_when_same=reinit_when_same, **kw)
    model(torch.randn(5, 6)).square().sum().backward()
    optimizer.step()
    values = model[0].values.detach().clone()
    momentum = optimizer.state[model[0].values]["momentum_buffer"].clone()
    assert bool((values != 0).all()) and bool((momentum != 0).all())
    algo.step()
    assert algo.stats["layers"]["0"] == {"nnz": 24, "dropped": 24, "grown": 24, "regrown": 24, "mask_distance": 0}
    kept_values, kept_momentum = model[0].values.detach(), optimizer.state[model[0].values]["momentum_buffer"]
    if reinit_when_same:
        assert bool((kept_values == 0).all()) and bool((kept_momentum == 0).all())
    else:
        assert torch.equal(kept_values, values) and torch.equal(kept_momentum, momentum)


def test_reinit_when_same_must_be_a_bool():
    model = tiny_mlp(seed=1, density=0.25)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="reinit_when_same must be a bool"):
        sparsekern.dst.RigL(model, optimizer, total_steps=10, reinit_when_same=1)
