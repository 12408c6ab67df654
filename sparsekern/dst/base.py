"""The update skeleton every dynamic-sparse-training algorithm shares: score, drop, grow, reset state.

Algorithms differ only in the grow score (``grow_scores``), in when they need the dense gradient
(``dense_grad``), and, for SNFS, in how the grown weights are shared among layers (``grow_counts``).
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..block_sparse import expand_block_mask
from ..distributed import all_reduce_mean, broadcast
from ..nn import SparseWeightMixin
from ..ops import topk_select
from .optim_state import check_optimizer_state, optimizer_holds, remap_optimizer_state

__all__ = ["DynamicSparseTraining", "SCHEDULES", "GROW_INITS"]

SCHEDULES = ("cosine", "linear", "constant")
GROW_INITS = ("zero",)


def weight_grad(module: SparseWeightMixin, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """The dense gradient of the loss in the layer's weight, from its input and its output's gradient,
    in the dtype of the master values (under autocast x and grad_out may differ: fp32 and bf16)."""
    return module.weight_grad(x.to(module.values.dtype), grad_out.to(module.values.dtype))


def _check_int(where: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_fraction(where: str, name: str, value, low_open: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{where}: {name} must lie in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")
    return float(value)


class _GradTap(torch.autograd.Function):
    """Identity that hands the gradient of its output to ``sink``. It returns a copy: a hook on the
    layer's own output would be lost to an in-place op after it (ReLU(inplace=True))."""

    @staticmethod
    def forward(ctx, output, sink):
        ctx.sink = sink
        return output.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.sink(grad)
        return grad, None


def _capture_hook(algorithm_ref, name: str):
    def hook(module, inputs, output):
        algorithm = algorithm_ref()
        return None if algorithm is None else algorithm._capture(name, module, inputs, output)
    return hook


def _check_state_hook(algorithm_ref):
    def hook(optimizer, args, kwargs):
        algorithm = algorithm_ref()
        if algorithm is not None:
            check_optimizer_state(optimizer, algorithm.layers)
    return hook


def _non_finite(tensors: Dict[str, torch.Tensor]) -> List[str]:
    """The names of the tensors holding a NaN or inf, with one host sync per device (not one per layer)."""
    flags = {name: torch.isfinite(t).all() for name, t in tensors.items()}
    names_on: Dict[torch.device, List[str]] = {}
    for name, flag in flags.items():
        names_on.setdefault(flag.device, []).append(name)
    finite = {}
    for names in names_on.values():
        finite.update(zip(names, torch.stack([flags[n] for n in names]).tolist()))
    return [name for name in tensors if not finite[name]]


def _remove_all(handles) -> None:
    for handle in handles:
        handle.remove()


class DynamicSparseTraining:
    """Base of ``Static``, ``SET``, ``SNFS`` and ``RigL``: call ``step()`` after ``optimizer.step()``.

    Every ``delta_t`` steps up to ``end_fraction * total_steps``, each sparse layer drops the
    floor(nnz * f(t)) active weights of smallest magnitude (f: ``schedule`` decay of
    ``drop_fraction``) and grows as many among the weights not kept, by the algorithm's score. nnz per
    layer stays fixed (SNFS alone moves nnz between layers). Grown weights and their optimizer state
    start at zero; survivors keep theirs (``optim_state.remap_optimizer_state``). A weight dropped and
    grown back in the same update keeps its value and state, as in the paper's code
    (``reinit_when_same=False``, google-research/rigl); ``reinit_when_same=True`` restarts it at zero. Under
    torch.distributed every rank draws the same pattern: dense gradients (RigL, SNFS) are averaged
    over ranks, drop magnitudes and SET's random scores are rank 0's.
    """

    name = "base"
    # When the grow score needs the layer's dense gradient: None, "update" (only on update steps), "every_step".
    dense_grad: Optional[str] = None

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int, delta_t: int = 100,
                 drop_fraction: float = 0.3, end_fraction: float = 0.75, schedule: str = "cosine",
                 grow_init: str = "zero", generator: Optional[torch.Generator] = None,
                 reinit_when_same: bool = False):
        where = type(self).__name__
        if not isinstance(reinit_when_same, bool):
            raise TypeError(f"{where}: reinit_when_same must be a bool, got {type(reinit_when_same).__name__}")
        self.total_steps = _check_int(where, "total_steps", total_steps, 1)
        self.delta_t = _check_int(where, "delta_t", delta_t, 1)
        self.drop_fraction = _check_fraction(where, "drop_fraction", drop_fraction, low_open=False)
        self.end_fraction = _check_fraction(where, "end_fraction", end_fraction, low_open=True)
        if schedule not in SCHEDULES:
            raise ValueError(f"{where}: schedule must be one of {SCHEDULES}, got {schedule!r}")
        if grow_init not in GROW_INITS:
            raise ValueError(f"{where}: grow_init must be one of {GROW_INITS}, got {grow_init!r}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{where}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{where}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.schedule, self.grow_init, self.reinit_when_same = schedule, grow_init, reinit_when_same
        self.model, self.optimizer = model, optimizer
        self.layers: Dict[str, SparseWeightMixin] = {
            name: m for name, m in model.named_modules() if isinstance(m, SparseWeightMixin)}
        if not self.layers:
            raise ValueError(f"{where}: the model has no sparse layers; call sparsekern.sparsify(model, density) "
                             "first")
        for name, module in self.layers.items():
            if not optimizer_holds(optimizer, module.values):
                raise ValueError(f"{where}: the optimizer does not hold the values of sparse layer {name!r}; "
                                 "build the optimizer from model.parameters() after sparsify")
        self.end_step = int(self.end_fraction * self.total_steps)
        if type(self).is_update_step is DynamicSparseTraining.is_update_step and self.delta_t > self.end_step:
            warnings.warn(f"{where}: no mask update falls within the run: updates come every delta_t={self.delta_t} "
                          f"steps up to step {self.end_step} (end_fraction x total_steps), so the pattern never "
                          "changes (static sparse training); lower delta_t", stacklevel=2)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(torch.initial_seed())
        self.step_count = 0
        self.history: List[dict] = []
        self._captured: Dict[str, List[Tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in self.layers}
        self._paused = False
        # Before every optimizer step: the optimizer's per-weight state must match each layer's nnz (a
        # checkpoint of another nnz loaded into the model after the optimizer was built fails here, clearly).
        self._hooks = [optimizer.register_step_pre_hook(_check_state_hook(weakref.ref(self)))]
        if self.dense_grad is not None:
            self._hooks += [m.register_forward_hook(_capture_hook(weakref.ref(self), n))
                            for n, m in self.layers.items()]
        # The hooks hold the algorithm weakly: a discarded algorithm stops capturing and its hooks go.
        weakref.finalize(self, _remove_all, list(self._hooks))

    # -- schedule -----------------------------------------------------------------------
    def drop_rate(self, t: int) -> float:
        """f(t): the fraction of each layer's active weights dropped at update step t."""
        if self.schedule == "constant":
            return self.drop_fraction
        progress = min(t / self.end_step, 1.0) if self.end_step else 1.0
        if self.schedule == "linear":
            return self.drop_fraction * (1.0 - progress)
        return self.drop_fraction / 2 * (1 + math.cos(math.pi * progress))

    def is_update_step(self, t: int) -> bool:
        return t % self.delta_t == 0 and 0 < t <= self.end_step

    # -- the dense gradient, from the layer's saved input and output gradient --------------
    def _wants_dense_grad(self) -> bool:
        return self.dense_grad == "every_step" or self.is_update_step(self.step_count + 1)

    @contextlib.contextmanager
    def paused(self):
        """Forward/backward passes within the block (e.g. measurements) do not count in the dense gradient."""
        was, self._paused = self._paused, True
        try:
            yield self
        finally:
            self._paused = was

    def _capture(self, name: str, module, inputs, output):
        if self._paused or not (torch.is_grad_enabled() and output.requires_grad and self._wants_dense_grad()):
            return None
        # With a fused activation the weight's gradient needs the gradient at the product, from the output's.
        y = output.detach() if getattr(module, "activation", None) else None
        x, store = module.kernel_input(inputs[0].detach()), self._captured[name]  # (a conv's padding_mode pads)
        return _GradTap.apply(output, lambda grad: store.append((x, module.pre_activation_grad(grad.detach(), y, x))))

    def layer_dense_grad(self, name: str) -> torch.Tensor:
        """The flat dense gradient of layer ``name`` over the backward passes since the last step (one
        dense product per pass), averaged over ranks."""
        pairs = self._captured[name]
        if not pairs:
            raise RuntimeError(f"{type(self).__name__}: no gradient reached sparse layer {name!r} since the last "
                               "step; call step() after loss.backward() and optimizer.step()")
        module = self.layers[name]
        grad = sum(weight_grad(module, x, g) for x, g in pairs)
        return all_reduce_mean(grad.reshape(-1).to(module.values.dtype).contiguous())

    def _check_finite(self, what: str, tensors: Dict[str, torch.Tensor]) -> None:
        """Raise naming the layers whose ``what`` hold a NaN or inf, before the step changes anything: ranking
        them would give a pattern at random, and a step that fails half-way leaves the layers out of step."""
        bad = _non_finite(tensors)
        if bad:
            raise ValueError(f"{type(self).__name__}.step: the {what} of sparse layer(s) {bad} hold NaN or inf; "
                             f"nothing was changed (step_count stays {self.step_count})")

    # -- what algorithms override ---------------------------------------------------------
    def grow_scores(self, name: str, module: SparseWeightMixin) -> torch.Tensor:
        """Flat scores over the layer's dense weight (the same on every rank); the largest grow."""
        raise NotImplementedError

    def grow_counts(self, drop_counts: Dict[str, int]) -> Dict[str, int]:
        """How many weights each layer grows; by default as many as it dropped."""
        return dict(drop_counts)

    def _on_step(self) -> None:
        """Work done every step (SNFS accumulates its gradient momentum)."""

    def _extra_state(self) -> dict:
        return {}

    def _check_extra_state(self, state: dict) -> None:
        """Raise if ``_load_extra_state`` could not load ``state`` whole (checked before anything loads)."""

    def _load_extra_state(self, state: dict) -> None:
        pass

    # -- the skeleton -----------------------------------------------------------------------
    def step(self) -> bool:
        """Advance one training step; on an update step change the patterns. True if a pattern changed."""
        t = self.step_count + 1
        self._check_gradients(t)
        check_optimizer_state(self.optimizer, self.layers)
        update = self.is_update_step(t)
        if update:
            self._check_finite("values", {name: m.values.detach() for name, m in self.layers.items()})
        try:
            self._on_step()
            changed = update and self._update(t)
            self.step_count = t  # only now: a step that raised can be taken again
            return changed
        finally:
            for pairs in self._captured.values():
                pairs.clear()

    def _check_gradients(self, t: int) -> None:
        """Every layer whose dense gradient step t needs must have one, checked before any layer (or
        the step count) changes: a step that fails half-way would leave the layers out of step."""
        if self.dense_grad is None or (self.dense_grad == "update" and not self.is_update_step(t)):
            return
        missing = [name for name, pairs in self._captured.items() if not pairs]
        if missing:
            raise RuntimeError(
                f"{type(self).__name__}.step: no gradient reached sparse layer(s) {missing} since the last step "
                f"(step {t} needs every sparse layer's dense gradient); nothing was changed. Call step() after "
                "loss.backward() through every sparse layer, or leave layers outside the loss dense "
                "(sparsify(..., dense_layers=[...]))")

    @torch.no_grad()
    def _update(self, t: int) -> bool:
        """Plan every layer's new pattern (scores checked), then apply them all: no layer changes unless all can."""
        fraction = self.drop_rate(t)
        drop_counts = {name: math.floor(m.nnz * fraction) for name, m in self.layers.items()}
        grow_counts = self.grow_counts(drop_counts)
        record = {"step": t, "drop_fraction": fraction, "layers": {}}
        plans = {}
        for name, module in self.layers.items():
            record["layers"][name], plans[name] = self._plan_layer(name, module, drop_counts[name], grow_counts[name])
        for name, (new_pos, source) in plans.items():
            if new_pos is not None:
                module = self.layers[name]
                old_param = module.values
                module.replace_pattern(new_pos, source)
                remap_optimizer_state(self.optimizer, old_param, source, new_param=module.values)
        self.history.append(record)
        return any(r["mask_distance"] > 0 for r in record["layers"].values())

    def _grow_scores_checked(self, name: str, module: SparseWeightMixin) -> torch.Tensor:
        scores = self.grow_scores(name, module)
        self._check_finite("grow scores", {name: scores})
        return scores

    def _plan_layer(self, name: str, module: SparseWeightMixin, n_drop: int, n_grow: int):
        """(the layer's record, (new positions, source) for ``replace_pattern`` or (None, None) if unchanged)."""
        nnz = module.nnz
        if module.block > 1:
            return self._plan_layer_blocks(name, module, n_drop, n_grow)
        if n_drop == 0 and n_grow == 0:
            return {"nnz": nnz, "dropped": 0, "grown": 0, "regrown": 0, "mask_distance": 0}, (None, None)
        m, k = module.weight_shape[0], math.prod(module.weight_shape[1:])
        old_pos = module.pattern.positions()  # ascending (CSR order): no dense mask to scan
        values = module.values.detach()
        # Drop: the n_drop active weights of smallest magnitude.
        dropped = topk_select(broadcast(values.abs()), n_drop, largest=False)
        keep = torch.ones(nnz, dtype=torch.bool, device=values.device)
        keep[dropped] = False
        kept_pos = old_pos[keep]
        new_mask = torch.zeros(m * k, dtype=torch.bool, device=values.device)
        new_mask[kept_pos] = True
        # Grow: the n_grow best scores among the weights not kept (a just-dropped one may come back).
        grown = topk_select(self._grow_scores_checked(name, module), n_grow, largest=True, candidates=~new_mask)
        new_mask[grown] = True
        # Regrown: grown at a position of the old pattern (necessarily a just-dropped one).
        at = torch.searchsorted(old_pos, grown).clamp_(max=max(nnz - 1, 0))
        is_regrown = (old_pos[at] == grown) if nnz else torch.zeros_like(grown, dtype=torch.bool)
        regrown = int(is_regrown.sum())
        # source[i]: the old index of the new pattern's i-th nonzero (ascending position), -1 where it
        # starts at zero (grown; regrown too under reinit_when_same).
        grown_source = torch.full((n_grow,), -1, dtype=torch.int64, device=values.device)
        if not self.reinit_when_same:
            grown_source = torch.where(is_regrown, at, grown_source)
        new_pos, order = torch.sort(torch.cat([kept_pos, grown]))
        source = torch.cat([keep.nonzero().squeeze(1), grown_source])[order]
        return {"nnz": new_pos.numel(), "dropped": n_drop, "grown": n_grow, "regrown": regrown,
                "mask_distance": n_drop + n_grow - 2 * regrown}, (new_pos, source)

    def _plan_layer_blocks(self, name: str, module: SparseWeightMixin, n_drop: int, n_grow: int):
        """Block-sparse layers (format="bsr") drop and grow whole b x b blocks: drop the blocks of
        smallest L2 norm, grow the blocks of largest L2 norm of the grow scores (counts rounded down
        to whole blocks)."""
        b = module.block
        per_block = b * b
        n_drop_b, n_grow_b = n_drop // per_block, n_grow // per_block
        nnz = module.nnz
        if n_drop_b == 0 and n_grow_b == 0:
            return {"nnz": nnz, "dropped": 0, "grown": 0, "regrown": 0, "mask_distance": 0}, (None, None)
        m, k = module.weight_shape[0], math.prod(module.weight_shape[1:])
        mb, kb = m // b, k // b
        values = module.values.detach()
        # Block norms in ascending block position.
        norms = module.pattern.blocks(values).reshape(-1, per_block).norm(dim=1)
        old_blocks = module.pattern.block_positions()
        dropped = topk_select(broadcast(norms), n_drop_b, largest=False)
        keep = torch.ones(old_blocks.numel(), dtype=torch.bool, device=values.device)
        keep[dropped] = False
        new_bmask = torch.zeros(mb * kb, dtype=torch.bool, device=values.device)
        new_bmask[old_blocks[keep]] = True
        scores = self._grow_scores_checked(name, module).reshape(mb, b, kb, b)
        block_scores = scores.square().sum(dim=(1, 3)).sqrt_().reshape(-1)
        grown = topk_select(block_scores, n_grow_b, largest=True, candidates=~new_bmask)
        kept_bmask = new_bmask.clone()
        new_bmask[grown] = True
        # Element positions of the new pattern; survivors keep their value (and optimizer state), grown
        # blocks start at zero; a just-dropped block grown back keeps its own unless reinit_when_same.
        new_mask = expand_block_mask(new_bmask.reshape(mb, kb), b).reshape(-1)
        new_pos = new_mask.nonzero().squeeze(1)
        old_pos = module.pattern.positions()
        from_old = kept_bmask.clone()
        is_regrown = torch.isin(grown, old_blocks[~keep])
        if not self.reinit_when_same:
            from_old[grown[is_regrown]] = True
        old_elem = expand_block_mask(from_old.reshape(mb, kb), b).reshape(-1)[new_pos]
        at = torch.searchsorted(old_pos, new_pos).clamp_(max=max(nnz - 1, 0))
        source = torch.where(old_elem, at, torch.full_like(at, -1))
        regrown = int(is_regrown.sum())
        return {"nnz": new_pos.numel(), "dropped": n_drop_b * per_block, "grown": n_grow_b * per_block,
                "regrown": regrown * per_block, "mask_distance": (n_drop_b + n_grow_b - 2 * regrown) * per_block
                }, (new_pos, source)

    # -- bookkeeping ---------------------------------------------------------------------
    @property
    def stats(self) -> Optional[dict]:
        """The last update's record: per layer nnz, dropped, grown, regrown, mask_distance."""
        return self.history[-1] if self.history else None

    def remove_hooks(self) -> None:
        _remove_all(self._hooks)
        self._hooks = []

    def state_dict(self) -> dict:
        return {"algorithm": self.name, "step_count": self.step_count, "generator": self.generator.get_state(),
                "history": [dict(r) for r in self.history], **self._extra_state()}

    def load_state_dict(self, state: dict) -> None:
        """Everything is checked before anything is set: a bad state leaves the algorithm as it was."""
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{where}: state must be a dict (from state_dict()), got {type(state).__name__}")
        if state.get("algorithm") != self.name:
            raise ValueError(f"{where}: state is of algorithm {state.get('algorithm')!r}, expected {self.name!r}")
        missing = [key for key in ("step_count", "generator", "history") if key not in state]
        if missing:
            raise ValueError(f"{where}: state lacks {missing}")
        step_count = state["step_count"]
        if isinstance(step_count, bool) or not isinstance(step_count, int) or step_count < 0:
            raise ValueError(f"{where}: step_count must be an int >= 0, got {step_count!r}")
        generator = torch.Generator(device=self.generator.device)
        try:  # on a scratch generator: the algorithm's own changes only once all is checked
            generator.set_state(state["generator"])
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"{where}: generator is not a state of a {self.generator.device} torch.Generator "
                             f"({exc})") from None
        history = state["history"]
        if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
            raise ValueError(f"{where}: history must be a list of dicts, got {type(history).__name__}")
        self._check_extra_state(state)
        self.step_count = step_count
        self.generator.set_state(state["generator"])
        self.history = [dict(r) for r in history]
        self._load_extra_state(state)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={len(self.layers)}, total_steps={self.total_steps}, "
                f"delta_t={self.delta_t}, drop_fraction={self.drop_fraction}, end_fraction={self.end_fraction}, "
                f"schedule={self.schedule!r}, reinit_when_same={self.reinit_when_same}, step={self.step_count})")
