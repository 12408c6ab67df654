"""DST on format="bsr" layers: RigL, SET and SNFS drop and grow whole b x b blocks.

The model mixes two block-sparse layers (block 4 and block 8) with a CSR layer. At every update step the
test checks, against a snapshot taken just before ``algo.step()``: block alignment, fixed nnz, the
recorded counts (whole blocks), survivors keeping value and optimizer state, grown blocks starting at
zero, which blocks were dropped (smallest L2 norm) and, for RigL/SNFS, which were grown (largest L2 norm
of the grow score).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern.block_sparse import block_mask_of, expand_block_mask
from sparsekern.nn import SparseLinear

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
}
ALGORITHMS = {
    "rigl": lambda model, opt, **kw: sparsekern.dst.RigL(model, opt, **kw),
    "set": lambda model, opt, **kw: sparsekern.dst.SET(model, opt, generator=torch.Generator().manual_seed(3), **kw),
    "snfs": lambda model, opt, **kw: sparsekern.dst.SNFS(model, opt, redistribute=False, **kw),
}
TOTAL_STEPS, DELTA_T, N_STEPS = 40, 4, 28  # updates at 4, 8, ..., 28 (end_step 30)


def block_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return nn.Sequential(
        SparseLinear(16, 32, density=0.5, format="bsr", block=4, generator=g, dtype=dtype), nn.ReLU(),
        SparseLinear(32, 32, density=0.5, format="bsr", block=8, generator=g, dtype=dtype), nn.ReLU(),
        SparseLinear(32, 4, density=0.5, generator=g, dtype=dtype))


def data(seed=1, n=48, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g, dtype=dtype)
    teacher = torch.randn(16, 4, generator=g, dtype=dtype)
    return x, (x @ teacher).argmax(1)


def _blocks(t2d, b):
    """(m/b, k/b, b*b) view of an (m, k) tensor by blocks."""
    m, k = t2d.shape
    return t2d.reshape(m // b, b, k // b, b).permute(0, 2, 1, 3).reshape(m // b, k // b, b * b)


def _snapshot(algo):
    """Per layer: (m, k) mask, dense weight and dense per-element optimizer states."""
    out = {}
    for name, layer in algo.layers.items():
        m, k = layer.weight_shape[0], math.prod(layer.weight_shape[1:])
        mask = layer.mask().reshape(m, k).clone()
        states = {}
        for key, value in algo.optimizer.state[layer.values].items():
            if isinstance(value, torch.Tensor) and value.dim() == 1:
                dense = torch.zeros(m, k, dtype=value.dtype)
                dense[mask] = value
                states[key] = dense
        out[name] = (mask, layer.dense_weight().detach().reshape(m, k).clone(), states)
    return out


def _dense_weight_grads(model, x, y):
    """Gradient of the loss in each sparse layer's dense weight (at the current weights), by dense math."""
    weights = {name: m.dense_weight().detach().clone().requires_grad_(True)
               for name, m in model.named_children() if isinstance(m, SparseLinear)}
    h = x
    for name, m in model.named_children():
        h = F.linear(h, weights[name], m.bias.detach()) if name in weights else m(h)
    loss = F.cross_entropy(h, y)
    return dict(zip(weights, torch.autograd.grad(loss, list(weights.values()))))


def _check_update(algo, before, after, grow_scores):
    """The invariants of one update step on every layer; returns True if some pattern changed."""
    changed = False
    record = algo.stats["layers"]
    for name, layer in algo.layers.items():
        b = layer.block
        bb = b * b
        old_mask, old_w, old_states = before[name]
        new_mask, new_w, new_states = after[name]
        r = record[name]
        assert layer.nnz == int(new_mask.sum()) == int(old_mask.sum()) == r["nnz"]
        layer.sparse_weight()._validate()
        # mask_distance is the symmetric difference; grown weights start at zero with zero state.
        grown = new_mask & ~old_mask
        assert r["mask_distance"] == int((new_mask ^ old_mask).sum())
        assert r["dropped"] - r["regrown"] == int((old_mask & ~new_mask).sum())
        assert r["grown"] - r["regrown"] == int(grown.sum())
        changed |= r["mask_distance"] > 0
        assert bool((new_w[~new_mask] == 0).all())
        assert bool((new_w[grown] == 0).all()), f"{name}: grown weights must start at 0"
        for key, state in new_states.items():
            assert bool((state[grown] == 0).all()), f"{name}: optimizer state {key} of grown weights must be 0"
        # The drop count: floor(nnz * f(t)) weights, rounded down to whole blocks on a bsr layer.
        n_drop = math.floor(layer.nnz * algo.drop_rate(algo.step_count))
        assert r["dropped"] == r["grown"] == (n_drop // bb) * bb
        if layer.format != "bsr":
            continue
        assert b > 1
        for key in ("nnz", "dropped", "grown", "regrown", "mask_distance"):
            assert r[key] % bb == 0, f"{name}: {key} = {r[key]} is not a multiple of {bb}"
        # Block aligned, and the block layout (b_* buffers) follows the new pattern.
        assert torch.equal(expand_block_mask(block_mask_of(new_mask, b), b), new_mask)
        W = layer.block_weight()
        assert torch.equal(W.block_mask(), block_mask_of(new_mask, b))
        assert torch.equal(W.to_dense(), new_w)
        # Blocks active before and after: a survivor keeps its values and optimizer state exactly; a
        # block dropped and grown back (regrown) restarts at zero, state included, under
        # reinit_when_same and keeps both otherwise.
        old_b, new_b = block_mask_of(old_mask, b), block_mask_of(new_mask, b)
        both = old_b & new_b
        ow, nw = _blocks(old_w, b)[both], _blocks(new_w, b)[both]
        same = (ow == nw).all(1)
        restarted = ~same
        if not algo.reinit_when_same:
            assert not bool(restarted.any()), f"{name}: a block active before and after changed"
            for key, state in new_states.items():
                assert torch.equal(_blocks(state, b)[both], _blocks(old_states[key], b)[both])
            if r["regrown"]:
                continue  # a regrown block is told from a survivor by its scores only: checked below
        assert bool((nw[restarted] == 0).all())
        for key, state in new_states.items():
            os_, ns_ = _blocks(old_states[key], b)[both], _blocks(state, b)[both]
            assert torch.equal(ns_[same], os_[same]), f"{name}: survivors keep their {key}"
            assert bool((ns_[restarted] == 0).all())
        assert int(restarted.sum()) * bb <= r["regrown"]
        # Dropped blocks (no longer active, or restarted) have the smallest L2 norms.
        norms = _blocks(old_w, b).norm(dim=2)
        dropped_norms = torch.cat([norms[old_b & ~new_b], norms[both][restarted]])
        kept_norms = norms[both][same]
        assert dropped_norms.numel() * bb == r["dropped"]
        if dropped_norms.numel() and kept_norms.numel():
            assert float(dropped_norms.max()) <= float(kept_norms.min())
        # Grown blocks have the largest block L2 norm of the grow score among the blocks not kept.
        if grow_scores is not None and (new_b & ~old_b).any():
            m, k = new_mask.shape
            s = _blocks(grow_scores[name].reshape(m, k), b).norm(dim=2)
            if (~new_b).any():
                assert float(s[new_b & ~old_b].min()) >= float(s[~new_b].max()), f"{name}: grew the wrong blocks"
    return changed


@pytest.mark.parametrize("reinit_when_same", [True, False])
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
def test_block_dst_invariants(algorithm, optimizer_name, reinit_when_same):
    model = block_model(seed=2)
    optimizer = OPTIMIZERS[optimizer_name](model.parameters())
    algo = ALGORITHMS[algorithm](model, optimizer, total_steps=TOTAL_STEPS, delta_t=DELTA_T, drop_fraction=0.5,
                                 reinit_when_same=reinit_when_same)
    x, y = data()
    values0 = {name: layer.values for name, layer in algo.layers.items()}
    nnz0 = {name: layer.nnz for name, layer in algo.layers.items()}
    assert {name: layer.format for name, layer in algo.layers.items()} == {"0": "bsr", "2": "bsr", "4": "csr"}
    changes, block_changes = 0, 0
    for _ in range(N_STEPS):
        due = algo.is_update_step(algo.step_count + 1)
        # RigL's grow score: |dense gradient| of this step's loss at the weights before optimizer.step().
        dense_grads = _dense_weight_grads(model, x, y) if due and algorithm == "rigl" else None
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        before = _snapshot(algo) if due else None
        changed = algo.step()
        if not due:
            assert not changed
            continue
        if algorithm == "rigl":
            scores = {n: g.abs() for n, g in dense_grads.items()}
        elif algorithm == "snfs":
            scores = {n: t.abs() for n, t in algo.grad_momentum.items()}
        else:
            scores = None
        assert changed == _check_update(algo, before, _snapshot(algo), scores)
        changes += changed
        block_changes += sum(algo.stats["layers"][n]["mask_distance"] > 0 for n in ("0", "2"))
    assert len(algo.history) == 7
    assert changes >= 3 and block_changes >= 3  # the block layers' patterns do change
    for name, layer in algo.layers.items():
        assert layer.values is values0[name] and layer.nnz == nnz0[name]  # updated in place
        for value in optimizer.state[layer.values].values():
            assert value.dim() == 0 or value.shape == (nnz0[name],)
    # The model still computes what its dense equivalent computes (no stale block layout), and trains.
    with torch.no_grad():
        h = x
        for m in model:
            h = m.to_dense()(h) if isinstance(m, SparseLinear) else m(h)
        torch.testing.assert_close(model(x), h, rtol=1e-5, atol=1e-5)
    losses = []
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("reinit_when_same", [True, False])
def test_a_dropped_block_grown_back_restarts_only_under_reinit_when_same(reinit_when_same):
    """drop_fraction 1 on a dense block layer drops every block and grows every one back: the pattern
    is unchanged; each regrown block restarts at zero (value and optimizer state) under
    reinit_when_same, and keeps both otherwise (the paper's code)."""
    torch.manual_seed(4)
    model = nn.Sequential(SparseLinear(8, 8, density=1.0, format="bsr", block=4, generator=torch.Generator()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.dst.SET(model, optimizer, total_steps=4, delta_t=1, drop_fraction=1.0, schedule="constant",
                              end_fraction=1.0, reinit_when_same=reinit_when_same)
    x = torch.randn(5, 8)
    model(x).square().sum().backward()
    optimizer.step()
    assert bool((model[0].values != 0).all())
    values = model[0].values.detach().clone()
    momentum = optimizer.state[model[0].values]["momentum_buffer"].clone()
    algo.step()
    r = algo.stats["layers"]["0"]
    assert r == {"nnz": 64, "dropped": 64, "grown": 64, "regrown": 64, "mask_distance": 0}
    if reinit_when_same:
        assert bool((model[0].values == 0).all())
        assert bool((optimizer.state[model[0].values]["momentum_buffer"] == 0).all())
    else:
        assert torch.equal(model[0].values.detach(), values)
        assert torch.equal(optimizer.state[model[0].values]["momentum_buffer"], momentum)
    assert model[0].nnz == 64 and torch.equal(model[0].mask(), torch.ones(8, 8, dtype=torch.bool))


def test_static_keeps_the_block_pattern():
    model = block_model(seed=5)
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    algo = sparsekern.dst.Static(model, optimizer, total_steps=10, delta_t=2)
    masks = {n: m.mask().clone() for n, m in algo.layers.items()}
    x, y = data()
    for _ in range(6):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert not algo.step()
    assert all(torch.equal(m.mask(), masks[n]) for n, m in algo.layers.items())


def test_small_drop_counts_round_down_to_no_block():
    """A drop of fewer than b*b weights on a block layer changes nothing there (the csr layer still moves)."""
    model = block_model(seed=6)
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    # nnz 256 (b=4: 16 per block) and 512 (b=8: 64 per block); f = 0.05 drops 12 and 25 weights: 0 blocks.
    algo = sparsekern.dst.SET(model, optimizer, total_steps=10, delta_t=1, drop_fraction=0.05, schedule="constant",
                              end_fraction=1.0)
    masks = {n: m.mask().clone() for n, m in algo.layers.items()}
    x, y = data()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    assert algo.step()
    layers = algo.stats["layers"]
    for n in ("0", "2"):
        assert layers[n]["dropped"] == layers[n]["grown"] == layers[n]["mask_distance"] == 0
        assert torch.equal(algo.layers[n].mask(), masks[n])
    assert layers["4"]["dropped"] == math.floor(algo.layers["4"].nnz * 0.05) > 0


def test_snfs_redistribution_refuses_block_layers():
    """Redistribution moves single weights between layers, which whole-block layers cannot follow
    (the total nnz would drift): refused with a clear error instead."""
    model = block_model(seed=2)
    optimizer = OPTIMIZERS["sgd"](model.parameters())
    with pytest.raises(ValueError, match="redistribute=True cannot keep the total nnz"):
        sparsekern.dst.SNFS(model, optimizer, total_steps=TOTAL_STEPS, delta_t=DELTA_T, drop_fraction=0.5)
