"""The one helper that moves per-weight tensors (values, optimizer state) through a pattern change.

A pattern change is described by ``source``: for each nonzero of the new pattern (row-major order),
the index of the same weight in the old values, or -1 for a grown weight. Surviving entries follow
their weight; grown entries start at zero.

At a fixed nnz per layer (Static, SET, RigL) the optimizer keeps holding the same ``values`` Parameter
(``replace_pattern`` writes into it in place), so only its per-parameter state is rewritten here. Where
nnz changed (SNFS's redistribution), ``replace_pattern`` makes a new Parameter and this helper also
re-points the optimizer's param_groups and state to it. Every per-element state tensor (SGD ``momentum_buffer``, with or
without nesterov; Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``; any optimizer with
element-wise state) is remapped; scalar state (``step``) is kept. Weight decay acts on the values
themselves and needs nothing: a grown weight is 0, so it decays nothing.
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch

from ..nn.pattern import remap_entries

__all__ = ["remap_entries", "remap_optimizer_state", "optimizer_holds", "check_optimizer_state"]


def check_optimizer_state(optimizer: torch.optim.Optimizer, layers: Mapping[str, torch.nn.Module]) -> None:
    """RuntimeError if the optimizer's per-weight state of a sparse layer's ``values`` no longer has the
    layer's nnz: the layer was loaded from a checkpoint of another nnz (``load_state_dict`` resizes
    ``values`` in place) after the optimizer took steps. Checked before every optimizer step of a DST
    run, where otherwise the optimizer would fail with a bare size mismatch."""
    for name, module in layers.items():
        state = optimizer.state.get(module.values)
        if not state:
            continue
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != module.values.shape:
                raise RuntimeError(
                    f"sparse layer {name!r}: the optimizer's {key!r} has {value.numel()} entries but the layer "
                    f"has nnz {module.nnz} (it was loaded from a checkpoint of another pattern after the optimizer "
                    "took steps); load the optimizer's state from the same checkpoint, or rebuild the optimizer "
                    "(or remap its state with sparsekern.dst.remap_optimizer_state)")


def optimizer_holds(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    return any(p is param for group in optimizer.param_groups for p in group["params"])


@torch.no_grad()
def remap_optimizer_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, source: torch.Tensor,
                          new_param: Optional[torch.Tensor] = None) -> None:
    """Rewrite ``optimizer``'s state of ``param`` (still of its old size) for the new pattern ``source``.

    ``new_param``: the Parameter that replaces ``param`` where nnz changed (see
    ``SparseWeightMixin.replace_pattern``); the optimizer's param_groups and state are re-pointed to it.
    """
    old_shape = param.shape
    if new_param is not None and new_param is not param:
        for group in optimizer.param_groups:
            group["params"] = [new_param if p is param else p for p in group["params"]]
        if param in optimizer.state:
            optimizer.state[new_param] = optimizer.state.pop(param)
        param = new_param
    state = optimizer.state.get(param)
    if not state:
        return  # no step taken yet (or a stateless optimizer): nothing to move
    for key, value in list(state.items()):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue  # scalar state: step counts and the like
        if value.shape != old_shape:
            raise ValueError(f"remap_optimizer_state: state {key!r} of {type(optimizer).__name__} has shape "
                             f"{tuple(value.shape)}, neither scalar nor the parameter's {tuple(old_shape)}; "
                             "cannot follow a pattern change")
        remapped = remap_entries(value, source)
        if remapped.shape == value.shape:
            value.copy_(remapped)  # in place: keeps any reference to the state tensor valid
        else:
            state[key] = remapped
