"""Static, SET, SNFS and RigL: the skeleton of ``base.py`` with their grow scores."""
from __future__ import annotations

import math
from typing import Dict

import torch
from torch.nn.parallel import DistributedDataParallel

from .base import DynamicSparseTraining, broadcast

__all__ = ["Static", "SET", "SNFS", "RigL"]


class Static(DynamicSparseTraining):
    """The pattern never changes (the sparse baseline)."""

    name = "static"

    def is_update_step(self, t: int) -> bool:
        return False


class SET(DynamicSparseTraining):
    """Sparse Evolutionary Training (Mocanu et al. 2018): grow uniformly at random."""

    name = "set"

    def grow_scores(self, name, module):
        scores = torch.rand(math.prod(module.weight_shape), generator=self.generator)
        return broadcast(scores.to(module.values.device, module.values.dtype))


class RigL(DynamicSparseTraining):
    """Rigging the Lottery (Evci et al. 2020): grow where the dense gradient is largest in magnitude.

    The dense gradient is computed on update steps only: the layer's input and its output's gradient
    are kept for that step's backward pass, then multiplied once.
    """

    name = "rigl"
    dense_grad = "update"

    def grow_scores(self, name, module):
        return self.layer_dense_grad(name).abs_()


class SNFS(DynamicSparseTraining):
    """Sparse Networks From Scratch / sparse momentum (Dettmers & Zettlemoyer 2019).

    Keeps an exponential moving average of each layer's dense gradient (``momentum``), so it needs the
    dense gradient every step. Grows by |momentum| among the weights not kept; with ``redistribute``
    the total number of dropped weights is shared among layers in proportion to the mean |momentum|
    of their active weights (so nnz moves between layers; the total stays fixed).
    """

    name = "snfs"
    dense_grad = "every_step"

    def __init__(self, model, optimizer, total_steps, delta_t=100, drop_fraction=0.3, end_fraction=0.75,
                 schedule="cosine", grow_init="zero", generator=None, momentum: float = 0.9,
                 redistribute: bool = True, reinit_when_same: bool = False):
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum < 1.0:
            raise ValueError(f"SNFS: momentum must lie in [0, 1), got {momentum!r}")
        if redistribute and isinstance(model, DistributedDataParallel):
            raise ValueError("SNFS: layer redistribution changes each layer's nnz, which DDP's gradient buckets "
                             "cannot follow; pass redistribute=False under DistributedDataParallel")
        super().__init__(model, optimizer, total_steps, delta_t, drop_fraction, end_fraction, schedule, grow_init,
                         generator, reinit_when_same)
        blocky = [n for n, m in self.layers.items() if m.block > 1]
        if redistribute and blocky:
            # Redistribution moves single weights between layers; block layers change whole blocks only.
            raise ValueError(f"SNFS: redistribute=True cannot keep the total nnz with block-sparse (format='bsr') "
                             f"layers {blocky}; pass redistribute=False")
        self.momentum, self.redistribute = momentum, redistribute
        self.grad_momentum: Dict[str, torch.Tensor] = {
            name: torch.zeros(math.prod(m.weight_shape), dtype=m.values.dtype, device=m.values.device)
            for name, m in self.layers.items()}

    def _on_step(self) -> None:
        grads = {name: self.layer_dense_grad(name) for name in self.grad_momentum}
        self._check_finite("dense gradients", grads)  # before any buffer: a NaN would stay in the momentum
        for name, buffer in self.grad_momentum.items():
            buffer.mul_(self.momentum).add_(grads[name])

    def grow_scores(self, name, module):
        return self.grad_momentum[name].abs()

    def grow_counts(self, drop_counts):
        if not self.redistribute:
            return dict(drop_counts)
        names = list(self.layers)
        importance, capacity = {}, {}
        for name, module in self.layers.items():
            active = module.mask().reshape(-1)
            importance[name] = float(self.grad_momentum[name][active].abs().mean()) if module.nnz else 0.0
            capacity[name] = active.numel() - module.nnz + drop_counts[name]
        return _share(sum(drop_counts.values()), names, importance, capacity)

    def _extra_state(self):
        return {"grad_momentum": {n: t.clone() for n, t in self.grad_momentum.items()}}

    def _check_extra_state(self, state):
        saved = state.get("grad_momentum")
        if not isinstance(saved, dict) or set(saved) != set(self.grad_momentum):
            got = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"SNFS.load_state_dict: grad_momentum must name the sparse layers "
                             f"{sorted(self.grad_momentum)}, got {got}")
        for name, t in saved.items():
            if not isinstance(t, torch.Tensor) or t.shape != self.grad_momentum[name].shape:
                got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"SNFS.load_state_dict: grad_momentum of layer {name!r} must have shape "
                                 f"{tuple(self.grad_momentum[name].shape)}, got {got}")

    def _load_extra_state(self, state):
        for name, saved in state["grad_momentum"].items():
            self.grad_momentum[name].copy_(saved)


def _share(total: int, names, weight: Dict[str, float], capacity: Dict[str, int]) -> Dict[str, int]:
    """Split ``total`` among ``names`` in proportion to ``weight`` (rounding the running sum, so the parts
    add up exactly), never giving a layer more than its ``capacity``; what a full layer cannot take goes
    to the others. Proportional to the room left where every weight is 0."""
    counts = {n: 0 for n in names}
    remaining = total
    open_names = [n for n in names if capacity[n] > 0]
    while remaining > 0 and open_names:
        w = [weight[n] for n in open_names]
        if sum(w) <= 0:
            w = [float(capacity[n] - counts[n]) for n in open_names]
        running, given, scale = 0.0, 0, remaining / sum(w)
        gives = []
        for i, wi in enumerate(w):
            running += wi * scale
            upto = remaining if i == len(w) - 1 else min(remaining, math.floor(running + 1e-9))
            gives.append(upto - given)
            given = upto
        for n, give in zip(open_names, gives):
            take = min(give, capacity[n] - counts[n])
            counts[n] += take
            remaining -= take
        open_names = [n for n in open_names if counts[n] < capacity[n]]
    return counts
