"""Magnitude pruning, IMP with rewinding (open_lth's semantics) and the lottery-ticket controls."""
import math
import re

import pytest
import torch
from torch import nn

from sparsekern.data import make_synthetic
from sparsekern.lottery import (
    apply_masks,
    layer_weights,
    lottery_ticket,
    magnitude_prune,
    mask_density,
    masks_of,
    one_shot_prune,
    prune_schedule,
    random_masks,
    to_dense_model,
)
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.train import Trainer, TrainResult

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def _noop_trainer(model, start_step=0, snapshot_step=None, desc=""):
    """Changes every weight a little (so pruning sees new magnitudes) and snapshots at once."""
    snapshot = {k: v.clone() for k, v in to_dense_model(model).state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1 + 0.1 * torch.randn_like(p))
    return TrainResult([], None, None, 0.0, snapshot if snapshot_step == start_step else None)


def test_global_prune_removes_the_smallest_of_the_remaining():
    model = _net()
    weights = layer_weights(model)
    masks = magnitude_prune(model, 0.2)
    total = sum(w.numel() for w in weights.values())
    assert sum(int(m.sum()) for m in masks.values()) == total - math.ceil(0.2 * total)
    kept = torch.cat([weights[n][masks[n]].abs() for n in weights])
    pruned = torch.cat([weights[n][~masks[n]].abs() for n in weights])
    assert pruned.max() <= kept.min()
    # a second round only prunes among what the first kept, and prunes 20 % of what remains
    again = magnitude_prune(model, 0.2, masks)
    remaining = sum(int(m.sum()) for m in masks.values())
    assert sum(int(m.sum()) for m in again.values()) == remaining - math.ceil(0.2 * remaining)
    assert all(not (again[n] & ~masks[n]).any() for n in masks)


def test_layerwise_prune_takes_the_fraction_from_every_layer():
    model = _net()
    masks = magnitude_prune(model, 0.5, scope="layerwise")
    for name, w in layer_weights(model).items():
        assert int(masks[name].sum()) == w.numel() - math.ceil(0.5 * w.numel())
        assert w[~masks[name]].abs().max() <= w[masks[name]].abs().min()
    with pytest.raises(ValueError, match="scope"):
        magnitude_prune(model, 0.5, scope="per-layer")
    with pytest.raises(ValueError, match="prune_fraction"):
        magnitude_prune(model, 1.0)


def test_one_shot_prune_reaches_the_density():
    masks = one_shot_prune(_net(), 0.1)
    assert mask_density(masks) == pytest.approx(0.1, abs=1e-3)


def test_imp_sparsity_per_round_follows_the_schedule():
    model = _net()
    found = lottery_ticket(model, _noop_trainer, rounds=4, prune_fraction=0.2)
    total = sum(w.numel() for w in layer_weights(model).values())
    expected, remaining = [1.0], total
    for _ in range(4):
        remaining -= math.ceil(0.2 * remaining)
        expected.append(remaining / total)
    assert [r["density"] for r in found.rounds] == pytest.approx(expected[:4])  # rounds 0..3 trained
    assert found.density == pytest.approx(expected[4])
    assert expected[1:] == pytest.approx(prune_schedule(0.2, 4), abs=1e-3)
    # density= sets the per-round fraction; rounds=1 is one-shot
    assert lottery_ticket(model, _noop_trainer, rounds=2, density=0.25).density == pytest.approx(0.25, abs=1e-3)


def test_rewinding_restores_the_step_k_weights_exactly():
    data = make_synthetic(num_classes=4, image_size=8, n_train=256, seed=0)
    held_out = data.val[list(range(64))]
    trainer = Trainer(data.train, steps=12, batch_size=32, lr=0.05, seed=3, held_out=held_out, grad_flow_every=4,
                         progress=False)
    model = _net()
    found = lottery_ticket(model, trainer, rounds=2, prune_fraction=0.3, rewind_step=5)
    # the step-5 state is that of an independent run of the same trainer
    check = trainer(_net(), snapshot_step=5).snapshot
    for key, value in check.items():
        assert torch.equal(found.rewind_state[key], value), key
    ticket = found.ticket()
    modules = dict(ticket.named_modules())
    for name, mask in found.masks.items():
        layer = modules[name]
        assert isinstance(layer, (SparseLinear, SparseConv2d))
        assert torch.equal(layer.mask(), mask)
        assert torch.equal(layer.values.detach(), found.rewind_state[name + ".weight"][mask])  # exactly, kept only
        assert torch.equal(layer.bias.detach(), found.rewind_state[name + ".bias"])
    # the pruned solution is the last trained network at the ticket's mask (a sparse model)
    assert all(torch.equal(m.mask(), found.masks[n]) for n, m in found.pruned.named_modules()
               if isinstance(m, (SparseLinear, SparseConv2d)))
    assert [g["step"] for g in found.rounds[1]["grad_flow"]] == [8, 12]  # resumed at step 5, measured from 8
    assert len(found.rounds) == 2 and found.rounds[1]["density"] == pytest.approx(0.7, abs=1e-2)


def test_controls_keep_the_mask_or_its_per_layer_density():
    found = lottery_ticket(_net(), _noop_trainer, rounds=1, density=0.2)
    ticket, scratch, rand = found.ticket(), found.scratch(seed=1), found.random_mask(seed=2)
    tm, sm, rm = masks_of(ticket), masks_of(scratch), masks_of(rand)
    for name in found.masks:
        assert torch.equal(sm[name], found.masks[name])
        assert int(rm[name].sum()) == int(found.masks[name].sum()) and not torch.equal(rm[name], tm[name])
    values = lambda m: torch.cat([p.detach().reshape(-1) for n, p in m.named_parameters() if n.endswith("values")])  # noqa
    assert not torch.allclose(values(ticket), values(scratch))
    counts = {n: int(m.sum()) for n, m in random_masks(found.masks, torch.Generator().manual_seed(0)).items()}
    assert counts == {n: int(m.sum()) for n, m in found.masks.items()}


def test_apply_masks_runs_the_masked_dense_network_on_compressed_weights():
    model = _net()
    masks = one_shot_prune(model, 0.3)
    sparse = apply_masks(model, masks)
    assert isinstance(sparse[0], SparseConv2d) and isinstance(sparse[3], SparseLinear)
    reference = to_dense_model(sparse)
    assert isinstance(reference[0], nn.Conv2d)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name in masks:
                m.weight.mul_(masks[name])
        torch.testing.assert_close(sparse(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(reference(x), model(x), rtol=1e-5, atol=1e-5)


def _bad_masks(kind):
    masks = masks_of(_net())
    masks["3"] = {"transposed": masks["3"].t().contiguous(),  # same numel, another shape
                  "float": masks["3"].float(), "list": masks["3"].tolist()}[kind]
    return masks


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("kind, got", [("transposed", "torch.bool of shape (256, 32)"),
                                       ("float", "torch.float32 of shape (32, 256)"), ("list", "list")])
def test_magnitude_prune_needs_a_bool_mask_of_each_layers_shape(kind, got, scope):
    with pytest.raises(ValueError, match=re.escape(f"magnitude_prune: mask of '3' must be a bool tensor of shape "
                                                   f"(32, 256), got {got}")):
        magnitude_prune(_net(), 0.5, _bad_masks(kind), scope)


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_magnitude_prune_rejects_non_finite_kept_weights(bad, scope):
    model = _net()
    with torch.no_grad():
        model[3].weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"magnitude_prune: layer '3' has non-finite kept weights"):
        magnitude_prune(model, 0.5, scope=scope)
    masks = masks_of(model)
    masks["3"][0, 0] = False  # pruned already: its value does not matter
    assert not magnitude_prune(model, 0.5, masks, scope)["3"][0, 0]


@pytest.mark.parametrize("args, match", [
    ((1.5, 2), "prune_schedule: prune_fraction must lie in [0, 1), got 1.5"),
    ((-0.5, 2), "prune_schedule: prune_fraction must lie in [0, 1), got -0.5"),
    ((float("nan"), 2), "prune_schedule: prune_fraction must lie in [0, 1), got nan"),
    ((0.2, 0), "prune_schedule: rounds must be an int >= 1, got 0"),
    ((0.2, -1), "prune_schedule: rounds must be an int >= 1, got -1"),
    ((0.2, 2.5), "prune_schedule: rounds must be an int >= 1, got 2.5"),
    ((0.2, True), "prune_schedule: rounds must be an int >= 1, got True"),
])
def test_prune_schedule_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        prune_schedule(*args)


@pytest.mark.parametrize("masks, error, match", [
    (lambda m: {**masks_of(m), "5": torch.ones(4, 33, dtype=torch.bool)}, ValueError,
     "apply_masks: mask of '5' must be a bool tensor of shape (4, 32), got torch.bool of shape (4, 33)"),
    (lambda m: {**masks_of(m), "5": [[True] * 32] * 4}, ValueError,
     "apply_masks: mask of '5' must be a bool tensor of shape (4, 32), got list"),
    (lambda m: {**masks_of(m), "nope": torch.ones(1, dtype=torch.bool)}, ValueError,
     "apply_masks: masks name 'nope', which is no module of the model"),
    (lambda m: {**masks_of(m), "1": torch.ones(1, dtype=torch.bool)}, TypeError,
     "apply_masks: '1' must be nn.Linear, nn.Conv2d (groups=1), transformers Conv1D or a sparse layer, got ReLU"),
], ids=["shape", "not-a-tensor", "unknown-layer", "not-a-layer"])
@pytest.mark.parametrize("start", ["dense", "sparse"])
def test_apply_masks_checks_every_mask_before_changing_any_layer(masks, error, match, start):
    model = _net() if start == "dense" else apply_masks(_net(), one_shot_prune(_net(), 0.5))
    types, state = [type(m) for m in model], {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=re.escape(match)):
        apply_masks(model, masks(model), inplace=True)
    assert [type(m) for m in model] == types
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_random_masks_needs_bool_masks():
    message = "random_masks: mask of 'a' must be a bool tensor, got torch.float32"
    with pytest.raises(ValueError, match=re.escape(message)):
        random_masks({"a": torch.tensor([1.5, 0.6, 0.0])})
