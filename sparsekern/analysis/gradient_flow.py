"""Gradient flow as the paper measures it: the L2 norm of the loss gradient on one fixed batch, without
regularization terms, in training mode, over the active weights and over all weights (the dense gradient). The
paper's code takes 1000 training examples for the batch; the studies here take 1000 validation examples by
default, so that the norm late in training is not that of examples trained on, and the paper's batch with
``grad_flow_data="train"`` (``studies.common.grad_flow_batch``; ``sparsekern study --grad-flow-data train``)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import SparseConv2d, SparseLinear, SparseWeightMixin

__all__ = ["GradNorm", "grad_norm"]


@dataclass
class GradNorm:
    """Gradient norms of one batch. Keys of the per-parameter dicts are parameter names; a sparse
    module's ``values`` is reported as ``<module>.weight``.

    ``active``: norm over the trainable entries (a sparse weight's nnz, every entry of any other
    parameter: biases, BatchNorm, dense layers), as in the paper's released code.
    ``dense``: the same with a sparse weight contributing the gradient w.r.t. its whole dense
    weight (what RigL's grow criterion sees).
    """
    loss: float
    active: float
    dense: float
    active_per_param: Dict[str, float]
    dense_per_param: Dict[str, float]

    def to_dict(self) -> dict:
        return asdict(self)


def _dense_forward(module: SparseWeightMixin, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's forward computed with the dense tensor ``weight`` (zeros outside the pattern), its fused
    activation (``sparsify(..., fuse_activations=True)``) included."""
    if isinstance(module, SparseLinear):
        return lambda x: module.activate(F.linear(x, weight, module.bias))
    if isinstance(module, SparseConv2d):
        return lambda x: module.activate(F.conv2d(module.kernel_input(x), weight, module.bias, module.stride,
                                                  module.padding, module.dilation))
    raise TypeError(f"grad_norm: no dense forward for sparse module {type(module).__name__}")


@contextlib.contextmanager
def _dense_weights(model: nn.Module) -> Iterator[Dict[str, Tuple[torch.Tensor, torch.Tensor]]]:
    """Within the block every sparse module runs a dense forward with a leaf dense weight;
    yields {module name: (dense weight, mask)}."""
    patched: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseWeightMixin)]
    try:
        for name, m in modules:
            weight = m.dense_weight().detach().requires_grad_(True)
            m.forward = _dense_forward(m, weight)  # instance attribute shadows the class forward
            patched[name] = (weight, m.mask())
        yield patched
    finally:
        for _, m in modules:
            m.__dict__.pop("forward", None)


def _norm(sq: float) -> float:
    return math.sqrt(sq)


def grad_norm(model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor],
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
              train_mode: bool = True) -> GradNorm:
    """Gradient norms of ``loss_fn(model(x), y)`` on ``batch = (x, y)``.

    Uses ``torch.autograd.grad``, so no ``.grad`` is touched; ``train_mode`` (default, as in the
    paper's code) uses BatchNorm batch statistics, and the running statistics and the model's
    training flag are restored afterwards. No weight decay or other regularization is added.
    """
    device = next(model.parameters()).device
    x, y = batch[0].to(device), batch[1].to(device)
    was_training = model.training
    saved_buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with _dense_weights(model) as dense_weights:
            model.train(train_mode)
            names, tensors, masks = [], [], []
            for pname, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                module_name, _, leaf = pname.rpartition(".")
                if leaf == "values" and module_name in dense_weights:
                    weight, mask = dense_weights[module_name]
                    names.append(f"{module_name}.weight" if module_name else "weight")
                    tensors.append(weight)
                    masks.append(mask)
                else:
                    names.append(pname)
                    tensors.append(p)
                    masks.append(None)
            loss = loss_fn(model(x), y)
            grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved_buffers[name])
    active, dense = {}, {}
    for name, tensor, mask, g in zip(names, tensors, masks, grads):
        g = torch.zeros_like(tensor) if g is None else g.detach()  # unused parameter: zero gradient
        dense[name] = float(g.double().pow(2).sum())
        active[name] = dense[name] if mask is None else float(g[mask].double().pow(2).sum())
    return GradNorm(loss=float(loss.detach()), active=_norm(sum(active.values())), dense=_norm(sum(dense.values())),
                    active_per_param={k: _norm(v) for k, v in active.items()},
                    dense_per_param={k: _norm(v) for k, v in dense.items()})
