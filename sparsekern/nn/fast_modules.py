"""Faster CPU versions of the dense modules around a ResNet's sparse layers: ``fast_modules(model)`` makes each
``nn.BatchNorm2d`` of ``model`` a ``FastBatchNorm2d`` and each ``nn.MaxPool2d`` a ``FastMaxPool2d``, in place (the
same objects, parameters, buffers and hooks: only their class changes); ``plain_modules`` changes them back.

Why: once the convolutions are sparse, what is left of a ResNet's CPU training step is largely these modules, and
ATen's CPU kernels for two of them are far from what the memory allows (ResNet-50 112x112 batch 16 at 90 %
sparsity, 187 ms a step: batch norm's forward 34 ms, most of it its batch statistics; the stem's 3x3 max pooling 9.5
ms, one output at a time, for 12.8 MB of input a copy of which takes 0.33 ms).

- ``FastBatchNorm2d``: the training forward on NCHW-contiguous float32/float64 CPU inputs computes the batch
  statistics in one read of the input and updates the running statistics (``_batch_norm_train``,
  csrc/cpu/batch_norm.cpp); its backward is ATen's.
- ``FastMaxPool2d``: 3x3 windows, stride 2, padding 1 (the stem of torchvision's, timm's and transformers'
  ResNets), on NCHW-contiguous float32/float64 CPU inputs, vectorized over output columns, the same values and
  indices as ATen's (``_max_pool2d_3x3s2``, csrc/cpu/max_pool.cpp); its backward is ATen's.

Everything else (eval-mode batch norm, other pooling geometries, channels_last, bfloat16, CUDA, torch.compile,
torch.func transforms) runs the ``nn`` module's own forward. Each computes what its ``nn`` module computes, to float
rounding for batch norm and exactly for max pooling. ``sparsify(..., fast_modules=True)`` applies them with the
sparse layers; they apply as well to a dense model, and the model bench reports the speedup against a dense model
with them too."""
from __future__ import annotations

from typing import List

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..ops import dispatch

FAST_DTYPES = (torch.float32, torch.float64)


def _eager_cpu(x: torch.Tensor) -> bool:
    """Whether x is a tensor the kernels take (NCHW-contiguous, float32/64, CPU) outside tracing and transforms."""
    return (x.dtype in FAST_DTYPES and x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous()
            and dispatch.extension_loaded and not torch.is_autocast_enabled("cpu") and not dispatch.tracing()
            and not torch._C._are_functorch_transforms_active())


class FastBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with sparsekern's CPU training forward (see the module's doc); no state of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tracked = self.running_mean
        if not (self.training and _eager_cpu(x) and (self.weight is None or self.weight.dtype == x.dtype)
                and (self.bias is None or self.bias.dtype == x.dtype)
                and (tracked is None or not self.track_running_stats or tracked.dtype == x.dtype)
                and x.shape[0] * x.shape[2] * x.shape[3] > 1):  # one value per channel: nn.BatchNorm2d's error
            return super().forward(x)
        track = self.track_running_stats and tracked is not None
        return torch.ops.sparsekern._batch_norm_train(
            x, self.weight, self.bias, tracked if track else None, self.running_var if track else None,
            self.num_batches_tracked if track else None, self.momentum, self.eps)[0]


class FastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` with sparsekern's CPU kernel for 3x3 windows at stride 2, padding 1 (see the module's doc);
    no state of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.return_indices or self.ceil_mode or _pair(self.kernel_size) != (3, 3) or _pair(self.stride) != (2, 2)
                or _pair(self.padding) != (1, 1) or _pair(self.dilation) != (1, 1) or not _eager_cpu(x)
                or x.shape[2] == 0 or x.shape[3] == 0):
            return super().forward(x)
        return torch.ops.sparsekern._max_pool2d_3x3s2(x)[0]


# The modules made fast, by exact class (subclasses, SyncBatchNorm and the like are left alone).
FAST = {nn.BatchNorm2d: FastBatchNorm2d, nn.MaxPool2d: FastMaxPool2d}


def _check_model(where: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")


def _swap(model: nn.Module, classes) -> List[str]:
    changed = []
    for name, module in model.named_modules():
        new = classes.get(type(module))
        if new is not None:
            module.__class__ = new
            changed.append(name)
    return changed


def fast_modules(model: nn.Module) -> List[str]:
    """Make every ``nn.BatchNorm2d`` of ``model`` a ``FastBatchNorm2d`` and every ``nn.MaxPool2d`` a ``FastMaxPool2d``
    (those exact classes only), in place; returns their names. Optimizers, hooks and state dicts that refer to them
    stay valid: the modules are the same objects."""
    _check_model("fast_modules", model)
    return _swap(model, FAST)


def plain_modules(model: nn.Module) -> List[str]:
    """Undo ``fast_modules`` in place: every ``FastBatchNorm2d`` and ``FastMaxPool2d`` is its ``nn`` module again;
    returns their names."""
    _check_model("plain_modules", model)
    return _swap(model, {fast: plain for plain, fast in FAST.items()})
