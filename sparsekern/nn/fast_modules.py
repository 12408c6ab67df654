"""Faster CPU versions of the dense modules around a network's sparse layers: ``fast_modules(model)`` makes each
``nn.BatchNorm2d`` of ``model`` a ``FastBatchNorm2d``, each ``nn.MaxPool2d`` a ``FastMaxPool2d``, each depthwise
``nn.Conv2d`` (groups = in = out channels, zero padding) a ``FastDepthwiseConv2d`` and each ``nn.Linear`` of at most 16
outputs a ``FastNarrowLinear``, in place (the same objects,
parameters, buffers and hooks: only their class changes); ``plain_modules`` changes them back.

Why: once the convolutions are sparse, what is left of a ResNet's CPU training step is largely these modules, and
ATen's CPU kernels for two of them are far from what the memory allows (ResNet-50 112x112 batch 16 at 90 %
sparsity, 187 ms a step: batch norm's forward 34 ms, most of it its batch statistics; the stem's 3x3 max pooling 9.5
ms, one output at a time, for 12.8 MB of input a copy of which takes 0.33 ms). A ConvNeXt's depthwise 7x7 convs stay
dense and ATen's CPU backward of them runs at a few GFLOP/s: 34 ms of a 126 ms step of ConvNeXt-T at 64x64 and 90 %
sparsity. A classifier head of a few outputs runs MKL's GEMMs at a fraction of their speed (the MLP's 1024 -> 10 head
at batch 256: 27 GFLOP/s, 11 % of the 90 %-sparse MLP's training step).

- ``FastBatchNorm2d``: the training forward on NCHW-contiguous float32/float64 CPU inputs computes the batch
  statistics in one read of the input and updates the running statistics (``_batch_norm_train``,
  csrc/cpu/batch_norm.cpp); its backward is ATen's.
- ``FastMaxPool2d``: 3x3 windows, stride 2, padding 1 (the stem of torchvision's, timm's and transformers'
  ResNets), on NCHW-contiguous float32/float64 CPU inputs, vectorized over output columns, the same values and
  indices as ATen's (``_max_pool2d_3x3s2``, csrc/cpu/max_pool.cpp); its backward is ATen's.
- ``FastDepthwiseConv2d``: depthwise convs at stride 1 and dilation 1 with zero padding of at most the kernel size
  minus 1, of 5x5 taps or more (ConvNeXt's 7x7, EfficientNet's stride-1 5x5) on NCHW-contiguous or channels_last
  float32/float64 CPU inputs, and 3x3 (MobileNets' stride-1 layers) on NCHW planes of 12x12 or more, forward and
  backward on sparsekern's kernels (``_depthwise_conv2d``, csrc/cpu/depthwise_conv.cpp); a backward that builds a
  graph (``create_graph=True``) runs ATen's, whose own derivatives give the second order.
- ``FastNarrowLinear``: linear layers of 1 to 16 outputs over float32/float64 CPU inputs (any leading dims), forward
  and backward on sparsekern's kernels (``_narrow_linear``, csrc/cpu/narrow_linear.cpp: per row the outputs' dot
  products sharing each loaded vector of x, per row dx, per column block dw; fwd+bwd 1.3-2.2x ``F.linear`` at 2 to 16
  outputs, 16 to 2048 rows, Zen 4, 2 threads). Its forward and its backward each run those loops or MKL's GEMMs,
  whichever measured faster once per shape (the loops lose at some: 4096 rows x 256 -> 16 on an Intel Xeon, where
  the module ran 0.64-0.92x ``nn.Linear`` when it always took them); under deterministic algorithms the loops. A
  backward that builds a graph runs ATen's products. A sparse linear layer with a full pattern runs the same op
  (``narrow_linear``) on its dense route, and one with a partial pattern its kernels on the scattered weight.

Everything else (eval-mode batch norm, other pooling geometries, channels_last batch norm and pooling, bfloat16,
autocast, CUDA, torch.compile, torch.func transforms, strided or dilated depthwise convs, smaller ones elsewhere,
linears of more outputs) runs the ``nn`` module's own forward. Each computes what its ``nn`` module computes, to float
rounding for batch norm, the depthwise conv and the narrow linear, and exactly for max pooling.
``sparsify(..., fast_modules=True)`` applies them with the sparse layers; they apply as well to a dense model, and
the model bench reports the speedup against a dense model with them too."""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..ops import dispatch

FAST_DTYPES = (torch.float32, torch.float64)


def _eager(x: torch.Tensor) -> bool:
    """Whether x is a float32/64 CPU tensor outside autocast, tracing and transforms, with the extension loaded."""
    return (x.dtype in FAST_DTYPES and x.device.type == "cpu" and dispatch.extension_loaded
            and not torch.is_autocast_enabled("cpu") and not dispatch.tracing()
            and not torch._C._are_functorch_transforms_active())


def _eager_cpu(x: torch.Tensor, channels_last: bool = False) -> bool:
    """Whether x is a tensor the conv-shaped kernels take (NCHW-contiguous, or also channels_last where
    ``channels_last``, float32/64, CPU) outside tracing and transforms."""
    return (x.dim() == 4 and _eager(x)
            and (x.is_contiguous() or (channels_last and x.is_contiguous(memory_format=torch.channels_last))))


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


def depthwise(module: nn.Conv2d) -> bool:
    """Whether a conv is depthwise with a channel multiplier of 1 and zero padding (what FastDepthwiseConv2d can
    run, at stride 1 and dilation 1)."""
    return (module.groups == module.in_channels == module.out_channels and module.groups > 1
            and module.padding_mode == "zeros")


# Where FastDepthwiseConv2d runs its kernels (fwd+bwd against nn.Conv2d's, Zen 4, 2 threads): 7x7 and 5x5 kernels
# 2.3-7x at every plane size measured (2x2 to 112x112), NCHW and channels_last; 3x3 kernels on NCHW planes of 12x12
# 1.2x, 14x14 and up 1.4-1.8x (9x9 and 10x10 0.85-1.09x, 7x7 0.8-0.9x: a plane's copies and per-row work are not
# amortized over 9 taps), on
# channels_last planes 0.6-1.1x, left to ATen. Its forward alone on channels_last planes reads 1.1-1.3x ATen's up to
# 16x16 and 0.8-0.9x from 56x56 on.
MIN_TAPS = 25
MIN_TAPS_NCHW = 9
MIN_PLANE_NCHW_SMALL_KERNEL = 144  # H x W from which NCHW planes take kernels of MIN_TAPS_NCHW to MIN_TAPS taps
LARGE_PLANE = 32 * 32


class FastDepthwiseConv2d(nn.Conv2d):
    """A depthwise ``nn.Conv2d`` with sparsekern's CPU kernels at stride 1 and dilation 1 (see the module's doc); no
    state of its own."""

    def _fast_padding(self, x: torch.Tensor) -> Optional[List[int]]:
        """The padding the kernel takes, or None where nn.Conv2d's forward must run."""
        kernel = _pair(self.kernel_size)
        if not (depthwise(self) and _pair(self.stride) == (1, 1) and _pair(self.dilation) == (1, 1)
                and _eager_cpu(x, channels_last=True)
                and x.shape[1] == self.in_channels and self.weight.dtype == x.dtype
                and self.weight.device.type == "cpu" and (self.bias is None or self.bias.dtype == x.dtype)):
            return None
        if self.padding == "valid":
            padding = (0, 0)
        elif self.padding == "same":
            if kernel[0] % 2 == 0 or kernel[1] % 2 == 0:
                return None  # uneven padding: nn.Conv2d pads one side more
            padding = (kernel[0] // 2, kernel[1] // 2)
        else:
            padding = _pair(self.padding)
        if not all(0 <= p < k and n + 2 * p - k + 1 > 0 for p, k, n in zip(padding, kernel, x.shape[2:])):
            return None  # padding beyond the kernel, or no output: nn.Conv2d (and its error)
        taps = kernel[0] * kernel[1]
        if taps < MIN_TAPS and not (taps >= MIN_TAPS_NCHW and x.is_contiguous()
                                    and x.shape[2] * x.shape[3] >= MIN_PLANE_NCHW_SMALL_KERNEL):
            return None
        if (x.shape[2] * x.shape[3] > LARGE_PLANE and not x.is_contiguous()
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return None  # a forward alone on large channels_last planes: ATen's is as fast or faster
        return list(padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self._fast_padding(x) if isinstance(x, torch.Tensor) else None
        if padding is None:
            return super().forward(x)
        return torch.ops.sparsekern._depthwise_conv2d(x, self.weight, self.bias, padding)


MAX_NARROW_OUT = 16  # out_features up to which a linear runs the narrow kernel


def narrow(module: nn.Linear) -> bool:
    """Whether a linear layer has few enough outputs for FastNarrowLinear (a classifier head)."""
    return 1 <= module.out_features <= MAX_NARROW_OUT


def narrow_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``F.linear(x, weight, bias)`` on the narrow kernel where it takes them (1 to MAX_NARROW_OUT outputs, float32/64
    CPU tensors of one dtype, outside autocast, tracing and transforms), else None."""
    if not (isinstance(x, torch.Tensor) and 1 <= weight.shape[0] <= MAX_NARROW_OUT and weight.dim() == 2
            and x.dim() >= 1 and x.shape[-1] == weight.shape[1] and weight.dtype == x.dtype
            and weight.device.type == "cpu" and (bias is None or (bias.dtype == x.dtype and bias.device.type == "cpu"))
            and _eager(x)):
        return None
    x2 = x if x.dim() == 2 else x.reshape(-1, weight.shape[1])
    y = torch.ops.sparsekern._narrow_linear(x2, weight, bias)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])


class FastNarrowLinear(nn.Linear):
    """An ``nn.Linear`` of at most MAX_NARROW_OUT outputs with sparsekern's CPU kernels (see the module's doc); no
    state of its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = narrow_linear(x, self.weight, self.bias) if narrow(self) else None
        return super().forward(x) if y is None else y


# The modules made fast, by exact class (subclasses, SyncBatchNorm and the like are left alone), and which of a class.
FAST = {nn.BatchNorm2d: FastBatchNorm2d, nn.MaxPool2d: FastMaxPool2d, nn.Conv2d: FastDepthwiseConv2d,
        nn.Linear: FastNarrowLinear}
ELIGIBLE = {nn.Conv2d: depthwise, nn.Linear: narrow}


def _check_model(where: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: model must be an nn.Module, got {type(model).__name__}")


def _swap(model: nn.Module, classes) -> List[str]:
    changed = []
    for name, module in model.named_modules():
        new = classes.get(type(module))
        if new is not None and ELIGIBLE.get(type(module), lambda m: True)(module):
            module.__class__ = new
            changed.append(name)
    return changed


def fast_modules(model: nn.Module) -> List[str]:
    """Make every ``nn.BatchNorm2d`` of ``model`` a ``FastBatchNorm2d``, every ``nn.MaxPool2d`` a ``FastMaxPool2d``,
    every depthwise ``nn.Conv2d`` a ``FastDepthwiseConv2d`` and every ``nn.Linear`` of at most MAX_NARROW_OUT outputs a
    ``FastNarrowLinear`` (those exact classes only), in place; returns their names. Optimizers, hooks and state dicts
    that refer to them stay valid: the modules are the same objects."""
    _check_model("fast_modules", model)
    return _swap(model, FAST)


def plain_modules(model: nn.Module) -> List[str]:
    """Undo ``fast_modules`` in place: every ``FastBatchNorm2d``, ``FastMaxPool2d``, ``FastDepthwiseConv2d`` and
    ``FastNarrowLinear`` is its ``nn`` module again; returns their names."""
    _check_model("plain_modules", model)
    return _swap(model, {fast: plain for plain, fast in FAST.items()})
