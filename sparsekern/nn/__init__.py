"""Sparse modules: the trainable tensor is ``values`` (size nnz); the pattern is a ``SparsePattern``."""
from . import kernel_choice
from .base import FORMATS, SparseWeightMixin, random_block_mask, random_mask
from .conv import SparseConv2d
from .fast_modules import (
                           FastBatchNorm2d,
                           FastDepthwiseConv2d,
                           FastMaxPool2d,
                           FastNarrowLinear,
                           fast_modules,
                           plain_modules,
)
from .fuse import FusedActivation, fuse_activations, fused_activations, unfuse_activations
from .linear import SparseLinear
from .pattern import SparsePattern
from .weight_view import SparseWeightView

__all__ = ["SparseLinear", "SparseConv2d", "SparseWeightMixin", "SparsePattern", "SparseWeightView", "random_mask",
           "random_block_mask", "FORMATS", "kernel_choice", "FusedActivation", "fuse_activations",
           "fused_activations", "unfuse_activations", "FastBatchNorm2d", "FastMaxPool2d", "FastDepthwiseConv2d",
           "FastNarrowLinear", "fast_modules", "plain_modules"]
