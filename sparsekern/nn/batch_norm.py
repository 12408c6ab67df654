"""A faster batch norm for CPU training: ``fast_batch_norm(model)`` makes each ``nn.BatchNorm2d`` of ``model`` a
``FastBatchNorm2d`` (in place: the same object, parameters, buffers and hooks, only its class changes), whose
training forward on NCHW-contiguous float32/float64 CPU inputs runs sparsekern's kernel (``_batch_norm_train``,
csrc/cpu/batch_norm.cpp: the batch statistics in one read of the input instead of ATen's two, then the output;
its backward is ATen's). Everything else (eval mode, channels_last, bfloat16, CUDA, torch.compile, torch.func
transforms) takes ``nn.BatchNorm2d.forward`` unchanged. It computes what ``nn.BatchNorm2d`` computes, to float
rounding, running statistics and ``num_batches_tracked`` included; ``plain_batch_norm`` changes the class back.

Why: in a sparse ResNet's training step the convolutions shrink and batch norm grows into a large share of what is
left (ResNet-50 112x112 batch 16 at 90 % sparsity: ATen's batch norm forward took 34 ms of a 187 ms step, its
statistics 4-5x its normalization). ``sparsify(..., fast_batch_norm=True)`` applies it with the sparse layers; it
applies as well to a dense model, and the model bench reports the ratio against a dense model with it too."""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..ops import dispatch

FAST_DTYPES = (torch.float32, torch.float64)


class FastBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with sparsekern's CPU training forward (see the module's doc); no state of its own."""

    def _fast(self, x: torch.Tensor) -> bool:
        tracked = self.running_mean
        return (self.training and x.dtype in FAST_DTYPES and x.device.type == "cpu" and x.dim() == 4
                and x.is_contiguous() and dispatch.extension_loaded
                and (self.weight is None or self.weight.dtype == x.dtype)
                and (self.bias is None or self.bias.dtype == x.dtype)
                and (tracked is None or not self.track_running_stats or tracked.dtype == x.dtype)
                and not torch.is_autocast_enabled("cpu") and not dispatch.tracing()
                and not torch._C._are_functorch_transforms_active())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fast(x):
            return super().forward(x)
        if x.shape[0] * x.shape[2] * x.shape[3] <= 1:
            return super().forward(x)  # nn.BatchNorm2d's error
        track = self.track_running_stats and self.running_mean is not None
        return torch.ops.sparsekern._batch_norm_train(
            x, self.weight, self.bias, self.running_mean if track else None, self.running_var if track else None,
            self.num_batches_tracked if track else None, self.momentum, self.eps)[0]


def _check_model(where: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")


def fast_batch_norm(model: nn.Module) -> List[str]:
    """Make every ``nn.BatchNorm2d`` of ``model`` (of that exact class: subclasses and SyncBatchNorm are left
    alone) a ``FastBatchNorm2d``, in place; returns their names. Optimizers, hooks and state dicts that refer to
    them stay valid: the modules are the same objects."""
    _check_model("fast_batch_norm", model)
    changed = []
    for name, module in model.named_modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = FastBatchNorm2d
            changed.append(name)
    return changed


def plain_batch_norm(model: nn.Module) -> List[str]:
    """Undo ``fast_batch_norm`` in place: every ``FastBatchNorm2d`` is an ``nn.BatchNorm2d`` again; returns their
    names."""
    _check_model("plain_batch_norm", model)
    changed = []
    for name, module in model.named_modules():
        if type(module) is FastBatchNorm2d:
            module.__class__ = nn.BatchNorm2d
            changed.append(name)
    return changed
