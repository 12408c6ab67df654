"""masked_matmul: y = x @ (weight * mask)^T for a dense weight and a bool mask."""
import math

import torch

from . import _checks as check
from .dispatch import Op, call, declare, get_backend, kernel_for

OP = "masked_matmul"


def masked_matmul(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * mask)^T`` for x (..., k); the weight gradient is exactly 0 outside the mask."""
    check.tensor(OP, "x", x)
    check.tensor(OP, "weight", weight, dim=2)
    check.tensor(OP, "mask", mask)
    check.floating(OP, "x", x)
    if mask.dtype != torch.bool:
        raise TypeError(f"{OP}: mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != weight.shape:
        raise ValueError(f"{OP}: mask shape {tuple(mask.shape)} must equal weight shape {tuple(weight.shape)}")
    if mask.device != weight.device:
        raise ValueError(f"{OP}: mask is on {mask.device} but weight is on {weight.device}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{OP}: x must have last dim {weight.shape[1]} (weight has {weight.shape[1]} columns), "
                         f"got shape {tuple(x.shape)}")
    check.same(OP, {"x": x, "weight": weight})
    backend = get_backend(OP, x.device)
    check.backend_dtype(OP, backend, "x", x)
    # not reshape(-1, k): ambiguous when k == 0
    y = call(OP, x.device, x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), weight, mask)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])  # no view: see sparse_linear


def masked_sddmm(X: torch.Tensor, Y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(X @ Y^T) * mask`` (dense (m, k)), computed only at the mask."""
    op = "masked_sddmm"
    check.tensor(op, "X", X, dim=2)
    check.tensor(op, "Y", Y, dim=2)
    check.tensor(op, "mask", mask, dim=2)
    check.floating(op, "X", X)
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor, got {mask.dtype}")
    if mask.shape != (X.shape[0], Y.shape[0]):
        raise ValueError(f"{op}: mask must have shape ({X.shape[0]}, {Y.shape[0]}), got {tuple(mask.shape)}")
    if mask.device != X.device:
        raise ValueError(f"{op}: mask is on {mask.device} but X is on {X.device}")
    if X.shape[1] != Y.shape[1]:
        raise ValueError(f"{op}: X and Y must have the same number of columns, got {X.shape[1]} and {Y.shape[1]}")
    check.same(op, {"X": X, "Y": Y})
    check.backend_dtype(op, get_backend(op, X.device), "X", X)
    return call(op, X.device, X, Y, mask)


def _fake(x, weight, mask):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _fake_sddmm(X, Y, mask):
    return X.new_empty((X.shape[0], Y.shape[0]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, weight, mask = ctx.saved_tensors
    d_x = d_weight = None
    if ctx.needs_input_grad[0]:
        d_x = kernel_for("masked_matmul", grad)(grad, weight.t(), mask.t())
    if ctx.needs_input_grad[1]:
        d_weight = kernel_for("masked_sddmm", grad)(grad.t(), x.t(), mask)
    return d_x, d_weight, None


def _setup_context_sddmm(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_sddmm(ctx, grad):
    X, Y, mask = ctx.saved_tensors
    d_X = d_Y = None
    # d_X = (grad * mask) @ Y and d_Y = (grad * mask)^T @ X, both masked products.
    if ctx.needs_input_grad[0]:
        d_X = kernel_for("masked_matmul", grad)(Y.t(), grad, mask).t()
    if ctx.needs_input_grad[1]:
        d_Y = kernel_for("masked_matmul", grad)(X.t(), grad.t(), mask.t()).t()
    return d_X, d_Y, None


declare(Op(OP, masked_matmul, fake=_fake, backward=_backward, setup_context=_setup_context, autocast=True,
           triton="masked_matmul"))
declare(Op("masked_sddmm", masked_sddmm, fake=_fake_sddmm, backward=_backward_sddmm,
           setup_context=_setup_context_sddmm, autocast=True, triton="masked_matmul"))
