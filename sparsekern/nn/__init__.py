"""Sparse modules: the trainable tensor is ``values`` (size nnz); the pattern lives in buffers."""
from . import kernel_choice
from .base import FORMATS, SparseWeightMixin, random_block_mask, random_mask
from .conv import SparseConv2d
from .linear import SparseLinear

__all__ = ["SparseLinear", "SparseConv2d", "SparseWeightMixin", "random_mask", "random_block_mask", "FORMATS", "kernel_choice"]
