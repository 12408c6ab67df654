"""Sparse modules: the trainable tensor is ``values`` (size nnz); the pattern is a ``SparsePattern``."""
from . import kernel_choice
from .base import FORMATS, SparseWeightMixin, random_block_mask, random_mask
from .batch_norm import FastBatchNorm2d, fast_batch_norm, plain_batch_norm
from .conv import SparseConv2d
from .fuse import FusedActivation, fuse_activations, fused_activations, unfuse_activations
from .linear import SparseLinear
from .pattern import SparsePattern
from .weight_view import SparseWeightView

__all__ = ["SparseLinear", "SparseConv2d", "SparseWeightMixin", "SparsePattern", "SparseWeightView", "random_mask",
           "random_block_mask", "FORMATS", "kernel_choice", "FusedActivation", "fuse_activations",
           "fused_activations", "unfuse_activations", "FastBatchNorm2d", "fast_batch_norm", "plain_batch_norm"]
