"""Magnitude pruning and lottery tickets (open_lth's semantics), and their controls.

Pruning works on dense models with boolean masks ({layer name: mask}); training runs on compressed
weights: ``apply_masks`` swaps each masked layer for ``SparseLinear`` / ``SparseConv2d.from_dense``.

Iterative magnitude pruning (IMP), as ``open_lth/lottery/runner.py`` does it: round 0 trains the
dense network from its init and keeps its weights at step ``rewind_step`` (k); each round then prunes
``prune_fraction`` of the weights still remaining in the prunable layers (by magnitude, globally or
per layer; the mask is carried from round to round, so a pruned weight never returns), rewinds the
surviving weights to their step-k values and trains from step k to the end. k = 0 is the original
lottery ticket. ``lottery_ticket`` returns the final mask, the rewound weights, and the pruned
solution the mask came from: the last trained network with the final mask applied.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .analysis.layers import layer_weights, masks_of, prunable_layers
from .init import sparse_init_
from .nn import SparseConv2d, SparseLinear, SparseWeightMixin, unfuse_activations
from .nn.conv1d import dense_weight_of

__all__ = ["SCOPES", "Masks", "prunable_layers", "layer_weights", "masks_of", "mask_density",
           "magnitude_prune", "one_shot_prune", "prune_schedule", "apply_masks", "to_dense_model", "random_masks",
           "reinitialize", "rewind", "LotteryTicket", "lottery_ticket"]

SCOPES = ("global", "layerwise")
Masks = Dict[str, torch.Tensor]


# -- layers and masks --------------------------------------------------------------------------
def mask_density(masks: Masks) -> float:
    """Kept weights over all weights of the masked layers."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def _check_fraction(where: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{where}: {name} must lie in [0, 1), got {value!r}")
    return float(value)


def _check_mask(where: str, name: str, mask, shape: Optional[torch.Size] = None) -> None:
    """A mask is a bool tensor of its layer's weight shape: a float mask or one of another shape with the same
    numel would be read silently wrong."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or (shape is not None and mask.shape != shape):
        got = f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        want = "" if shape is None else f" of shape {tuple(shape)}"
        raise ValueError(f"{where}: mask of {name!r} must be a bool tensor{want}, got {got}")


def _check_scope(where: str, scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"{where}: scope must be one of {SCOPES}, got {scope!r}")


def _smallest_kept(scores: torch.Tensor, kept: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Flat indices of the ``n_prune`` kept entries of smallest score; ties go to the lower index."""
    idx = kept.nonzero().squeeze(1)
    order = torch.sort(scores[idx], stable=True).indices[:n_prune]
    return idx[order]


@torch.no_grad()
def magnitude_prune(model: nn.Module, prune_fraction: float, masks: Optional[Masks] = None, scope: str = "global",
                    ignore: Iterable[str] = ()) -> Masks:
    """New masks that remove ``ceil(prune_fraction * remaining)`` of the weights still kept by ``masks``
    (default: ``masks_of(model)``), those of smallest |w| (open_lth's ``sparse_global``).

    ``scope``: ``global`` ranks all prunable layers together; ``layerwise`` removes the fraction from
    each layer. A weight outside ``masks`` stays pruned whatever its value.
    """
    prune_fraction = _check_fraction("magnitude_prune", "prune_fraction", prune_fraction)
    _check_scope("magnitude_prune", scope)
    weights = layer_weights(model, ignore)
    masks = masks_of(model, ignore) if masks is None else masks
    if set(masks) != set(weights):
        raise ValueError(f"magnitude_prune: masks must name the prunable layers {sorted(weights)}, got {sorted(masks)}")
    for name, w in weights.items():
        _check_mask("magnitude_prune", name, masks[name], w.shape)
        if not torch.isfinite(w[masks[name].to(w.device)]).all():  # a NaN sorts last: it would never be pruned
            raise ValueError(f"magnitude_prune: layer {name!r} has non-finite kept weights (NaN or inf), which "
                             "cannot be ranked by magnitude")
    new = {}
    if scope == "layerwise":
        for name, w in weights.items():
            kept = masks[name].to(w.device).reshape(-1)
            n_prune = math.ceil(prune_fraction * int(kept.sum()))
            flat = kept.clone()
            flat[_smallest_kept(w.abs().reshape(-1), kept, n_prune)] = False
            new[name] = flat.reshape(w.shape)
        return new
    names = list(weights)
    scores = torch.cat([weights[n].abs().reshape(-1).float().cpu() for n in names])
    kept = torch.cat([masks[n].reshape(-1).cpu() for n in names])
    n_prune = math.ceil(prune_fraction * int(kept.sum()))
    kept = kept.clone()
    kept[_smallest_kept(scores, kept, n_prune)] = False
    offset = 0
    for n in names:
        numel = weights[n].numel()
        new[n] = kept[offset:offset + numel].reshape(weights[n].shape).to(masks[n].device)
        offset += numel
    return new


def one_shot_prune(model: nn.Module, density: float, scope: str = "global", ignore: Iterable[str] = ()) -> Masks:
    """Masks keeping the ``density`` fraction of the prunable weights of largest magnitude, in one step."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"one_shot_prune: density must lie in (0, 1], got {density!r}")
    full = {n: torch.ones_like(w, dtype=torch.bool) for n, w in layer_weights(model, ignore).items()}
    return magnitude_prune(model, 1.0 - density, full, scope, ignore) if density < 1.0 else full


def prune_schedule(prune_fraction: float, rounds: int) -> List[float]:
    """Density after each round of pruning ``prune_fraction`` of the remaining weights (ceil ignored)."""
    prune_fraction = _check_fraction("prune_schedule", "prune_fraction", prune_fraction)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"prune_schedule: rounds must be an int >= 1, got {rounds!r}")
    return [(1.0 - prune_fraction) ** r for r in range(1, rounds + 1)]


# -- models from masks -------------------------------------------------------------------------
def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if name == "":
        return module
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)
    return model


@torch.no_grad()
def to_dense_model(model: nn.Module, inplace: bool = False) -> nn.Module:
    """The model with every sparse layer replaced by its dense equivalent (zeros outside the pattern)."""
    model = model if inplace else copy.deepcopy(model)
    unfuse_activations(model)  # fused ReLUs back in their places: each layer becomes its plain dense module
    for name, m in list(model.named_modules()):
        if isinstance(m, SparseWeightMixin):
            dense = m.to_dense().train(m.training)
            model = _replace(model, name, dense)
    return model


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks, inplace: bool = False) -> nn.Module:
    """The model with each layer named in ``masks`` made sparse (``from_dense``) at its mask; a sparse
    layer first becomes dense, so its weights outside its old pattern read as zero. Every mask is checked
    before any layer changes."""
    modules, layers = dict(model.named_modules()), prunable_layers(model)
    for name, mask in masks.items():
        if name not in modules:
            raise ValueError(f"apply_masks: masks name {name!r}, which is no module of the model")
        m = modules[name]
        if name not in layers:
            raise TypeError(f"apply_masks: {name!r} must be nn.Linear, nn.Conv2d (groups=1), transformers Conv1D "
                            f"or a sparse layer, got {type(m).__name__}")
        _check_mask("apply_masks", name, mask,
                    m.weight_shape if isinstance(m, SparseWeightMixin) else dense_weight_of(m).shape)
    model = to_dense_model(model, inplace)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        m = modules[name]
        cls = SparseConv2d if isinstance(m, nn.Conv2d) else SparseLinear
        sparse = cls.from_dense(m, mask.to(m.weight.device)).train(m.training)
        sparse.values.requires_grad_(m.weight.requires_grad)
        model = _replace(model, name, sparse)
    return model


def random_masks(masks: Masks, generator: Optional[torch.Generator] = None) -> Masks:
    """Masks with each layer's number of kept weights of ``masks``, at uniformly random positions."""
    out = {}
    for name, mask in masks.items():
        _check_mask("random_masks", name, mask)
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=generator)[:int(mask.sum())]] = True
        out[name] = flat.reshape(mask.shape).to(mask.device)
    return out


@torch.no_grad()
def reinitialize(model: nn.Module, seed: int, init: str = "dense",
                 init_fn: Optional[Callable[[nn.Module], object]] = None) -> nn.Module:
    """A copy of ``model`` (same masks) with fresh weights drawn with ``seed``.

    ``init="dense"``: the dense network's init, masked (the ticket's own distribution): ``init_fn``
    applied to the dense copy if given (e.g. the init the original network got), else every module's
    ``reset_parameters``. ``init="sparse"``: then ``sparsekern.init.sparse_init_`` on the sparse layers.
    """
    if init not in ("dense", "sparse"):
        raise ValueError(f"reinitialize: init must be 'dense' or 'sparse', got {init!r}")
    masks = {name: m.mask() for name, m in model.named_modules() if isinstance(m, SparseWeightMixin)}
    fresh = to_dense_model(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if init_fn is not None:
            init_fn(fresh)
        else:
            for m in fresh.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
    fresh = apply_masks(fresh, masks, inplace=True)
    if init == "sparse":
        g = torch.Generator().manual_seed(seed)
        for m in fresh.modules():
            if isinstance(m, SparseWeightMixin):
                sparse_init_(m, generator=g)
    return fresh


@torch.no_grad()
def rewind(dense_model: nn.Module, state: Dict[str, torch.Tensor], masks: Masks) -> nn.Module:
    """A sparse copy of ``dense_model`` holding the weights of ``state`` (a dense state_dict) at ``masks``."""
    model = copy.deepcopy(to_dense_model(dense_model))
    model.load_state_dict(state)
    return apply_masks(model, masks, inplace=True)


# -- lottery tickets ----------------------------------------------------------------------------
@dataclass
class LotteryTicket:
    """The result of ``lottery_ticket``.

    ``masks``: the ticket's mask; ``rewind_state``: the dense network's weights at ``rewind_step``
    (a dense state_dict; the ticket holds them at ``masks``); ``pruned``: the pruned solution the mask
    came from (the last trained network, masked; a sparse model); ``dense``: the trained dense network
    (round 0); ``init``: the dense network at step 0; ``rounds``: one record per training round
    (density it trained at, accuracy, gradient flow, and for the last one the pruned accuracy).
    """
    masks: Masks
    rewind_state: Dict[str, torch.Tensor]
    rewind_step: int
    pruned: nn.Module
    dense: nn.Module
    init: nn.Module
    rounds: List[dict]

    @property
    def density(self) -> float:
        return mask_density(self.masks)

    def ticket(self) -> nn.Module:
        """A fresh sparse copy of the ticket: the mask with the rewound weights."""
        return rewind(self.init, self.rewind_state, self.masks)

    def scratch(self, seed: int, init: str = "dense",
                init_fn: Optional[Callable[[nn.Module], object]] = None) -> nn.Module:
        """Control: the same mask with new random weights (see ``reinitialize``)."""
        return reinitialize(self.ticket(), seed, init, init_fn)

    def random_mask(self, seed: int) -> nn.Module:
        """Control: a random mask of the same per-layer density, with the rewound weights."""
        return rewind(self.init, self.rewind_state, random_masks(self.masks, torch.Generator().manual_seed(seed)))


def lottery_ticket(model: nn.Module, trainer: Callable, rounds: int = 1,
                   prune_fraction: Optional[float] = 0.2, density: Optional[float] = None, scope: str = "global",
                   rewind_step: int = 0, ignore: Sequence[str] = ()) -> LotteryTicket:
    """Find a lottery ticket of the dense ``model`` (left unchanged) by IMP.

    ``trainer(model, start_step=, snapshot_step=, desc=)`` trains in place and returns a
    ``sparsekern.train.TrainResult`` (``sparsekern.train.Trainer``). Round 0 trains the dense network and
    keeps its weights at ``rewind_step``; each of
    ``rounds`` rounds prunes ``prune_fraction`` of the remaining weights (``density`` instead sets it to
    1 - density ** (1 / rounds), so ``rounds=1`` is one-shot pruning to ``density``) of the network the
    round before trained. Rounds 1..rounds-1 retrain the rewound network; the last mask is the ticket's,
    and training the ticket is left to the caller (``LotteryTicket.ticket()``).
    """
    _check_scope("lottery_ticket", scope)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"lottery_ticket: rounds must be an int >= 1, got {rounds!r}")
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density < 1.0:
            raise ValueError(f"lottery_ticket: density must lie in (0, 1), got {density!r}")
        prune_fraction = 1.0 - density ** (1.0 / rounds)
    prune_fraction = _check_fraction("lottery_ticket", "prune_fraction", prune_fraction)
    if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
        raise ValueError(f"lottery_ticket: rewind_step must be an int >= 0, got {rewind_step!r}")
    init = copy.deepcopy(to_dense_model(model))
    dense = copy.deepcopy(init)
    result = trainer(dense, start_step=0, snapshot_step=rewind_step, desc="IMP round 0 (dense)")
    if result.snapshot is None:
        raise ValueError(f"lottery_ticket: rewind_step {rewind_step} lies beyond the trainer's steps")
    rewind_state = result.snapshot
    records = [{"round": 0, "density": 1.0, "accuracy": result.accuracy, "loss": result.loss,
                "grad_flow": result.grad_flow, "seconds_per_step": result.seconds_per_step}]
    trained, masks = dense, masks_of(dense, ignore)
    for r in range(1, rounds + 1):
        masks = magnitude_prune(trained, prune_fraction, masks, scope, ignore)
        if r == rounds:
            break
        trained = rewind(init, rewind_state, masks)
        result = trainer(trained, start_step=rewind_step, desc=f"IMP round {r} (density {mask_density(masks):.3f})")
        records.append({"round": r, "density": mask_density(masks), "accuracy": result.accuracy,
                        "loss": result.loss, "grad_flow": result.grad_flow,
                        "seconds_per_step": result.seconds_per_step})
    pruned = apply_masks(trained, masks)
    return LotteryTicket(masks, rewind_state, rewind_step, pruned, dense, init, records)
