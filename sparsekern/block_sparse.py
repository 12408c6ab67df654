"""Block-sparse (BSR) storage of a weight: square b x b blocks, for GPU tensor cores.

The block pattern is a CSR over blocks: ``row_ptr`` (m/b + 1, int64), ``col_idx`` (nnzb, int32,
sorted within a block row), ``values`` (nnzb, b, b). Every result through BSR equals the masked dense
computation at the expanded (block-aligned) element mask, which is also how the CPU runs it: the
same nonzeros as a CSR of elements (``to_csr``), through the CSR engine.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .sparse_matrix import SparseMatrix, check_csr_pattern, csr_from_mask, rows_of, transpose_pattern

__all__ = ["BlockSparseMatrix", "block_mask_of", "expand_block_mask", "bsr_element_order", "BLOCK_SIZES"]

BLOCK_SIZES = (16, 32, 64)  # what the Triton kernels are tuned for; any b >= 1 works on the CPU


def _check_block(owner: str, shape2d: Tuple[int, int], block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{owner}: block must be a positive int, got {block!r}")
    m, k = shape2d
    if m % block or k % block:
        raise ValueError(f"{owner}: the 2-D shape ({m}, {k}) must be a multiple of block={block} in both dims")


def block_mask_of(mask2d: torch.Tensor, block: int) -> torch.Tensor:
    """(m/b, k/b) bool: which blocks of the (m, k) mask hold any nonzero."""
    m, k = mask2d.shape
    return mask2d.reshape(m // block, block, k // block, block).any(dim=3).any(dim=1)


def expand_block_mask(block_mask: torch.Tensor, block: int) -> torch.Tensor:
    """The (m, k) element mask of a block mask."""
    return block_mask.repeat_interleave(block, 0).repeat_interleave(block, 1)


def bsr_element_order(mask2d: torch.Tensor, block: int) -> torch.Tensor:
    """For a block-aligned (m, k) mask: (nnzb, b, b) int64 positions of each block entry in the CSR
    (row-major) order of the mask's nonzeros, i.e. ``values_bsr = values_csr[order]``."""
    m, k = mask2d.shape
    pos = torch.full((m, k), -1, dtype=torch.int64, device=mask2d.device)
    pos[mask2d] = torch.arange(int(mask2d.sum()), device=mask2d.device)
    bmask = block_mask_of(mask2d, block)
    return pos.reshape(m // block, block, k // block, block).permute(0, 2, 1, 3)[bmask]


class BlockSparseMatrix:
    """BSR of a logical (m, k) matrix (``shape`` keeps a conv weight's 4-D shape, as SparseMatrix).

    ``csr`` optionally carries the same nonzeros as an element CSR (a sparse module passes its own),
    which the CPU backend runs; ``to_csr`` builds it otherwise.
    """

    def __init__(self, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor, shape: Sequence[int],
                 *, validate: bool = True, transpose: Optional[Tuple[torch.Tensor, ...]] = None,
                 csr: Optional[SparseMatrix] = None):
        self.row_ptr, self.col_idx, self.values = row_ptr, col_idx, values
        self.shape = torch.Size(shape)
        if validate:
            self._validate()
        self._transpose = transpose
        self._csr = csr

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_dense(cls, dense: torch.Tensor, block: int, mask: Optional[torch.Tensor] = None) -> BlockSparseMatrix:
        """Blocks of ``dense`` where ``mask`` (default: ``dense != 0``) has any nonzero; a kept block
        holds all of its b*b entries of ``dense`` (values outside ``mask`` in a kept block included)."""
        if not isinstance(dense, torch.Tensor) or dense.dim() < 2:
            raise ValueError("BlockSparseMatrix.from_dense: dense must be a tensor with >= 2 dims")
        if mask is None:
            mask = dense != 0
        elif mask.shape != dense.shape or mask.dtype != torch.bool:
            raise ValueError(f"BlockSparseMatrix.from_dense: mask must be bool of shape {tuple(dense.shape)}, "
                             f"got {mask.dtype} of shape {tuple(mask.shape)}")
        m, k = dense.shape[0], math.prod(dense.shape[1:])
        _check_block("BlockSparseMatrix.from_dense", (m, k), block)
        bmask = block_mask_of(mask.reshape(m, k), block)
        row_ptr, col_idx = csr_from_mask(bmask)
        values = dense.detach().reshape(m // block, block, k // block, block).permute(0, 2, 1, 3)[bmask].clone()
        return cls(row_ptr, col_idx, values, dense.shape, validate=False)

    @classmethod
    def from_mask(cls, mask: torch.Tensor, block: int, dtype=torch.float32) -> BlockSparseMatrix:
        """Zero-valued blocks wherever ``mask`` has any nonzero."""
        return cls.from_dense(torch.zeros(mask.shape, dtype=dtype, device=mask.device), block, mask)

    @classmethod
    def from_csr(cls, A: SparseMatrix, block: int) -> BlockSparseMatrix:
        """The blocks that hold any of ``A``'s nonzeros (zeros fill the rest of a kept block)."""
        return cls.from_dense(A.to_dense().detach(), block, A.mask())

    # -- properties ---------------------------------------------------------------------
    @property
    def block(self) -> int:
        return self.values.shape[-1]

    @property
    def nnzb(self) -> int:
        return self.col_idx.numel()

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def m(self) -> int:
        return self.shape[0]

    @property
    def k(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def density(self) -> float:
        return self.nnz / (self.m * self.k) if self.m * self.k else 0.0

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def __repr__(self) -> str:
        return (f"BlockSparseMatrix(shape={tuple(self.shape)}, block={self.block}, nnzb={self.nnzb}, "
                f"density={self.density:.4f}, dtype={self.dtype}, device={self.device})")

    # -- conversions --------------------------------------------------------------------
    def block_mask(self) -> torch.Tensor:
        b = self.block
        out = torch.zeros(self.m // b, self.k // b, dtype=torch.bool, device=self.device)
        out[rows_of(self.row_ptr, self.nnzb), self.col_idx.long()] = True
        return out

    def mask(self) -> torch.Tensor:
        return expand_block_mask(self.block_mask(), self.block).reshape(self.shape)

    def to_dense(self) -> torch.Tensor:
        """Dense tensor of ``shape``, differentiable in ``values``."""
        from . import reference
        return reference.bsr_to_dense(self.values, self.row_ptr, self.col_idx, self.k).reshape(self.shape)

    def to_csr(self) -> SparseMatrix:
        """The same nonzeros (every entry of every kept block) as a CSR of elements; its values are a
        differentiable gather of ``values``. Cached."""
        if self._csr is None:
            mask2d = self.mask().reshape(self.m, self.k)
            row_ptr, col_idx = csr_from_mask(mask2d)
            order = bsr_element_order(mask2d, self.block).reshape(-1)
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=order.device)
            self._csr = SparseMatrix(row_ptr, col_idx, self.values.reshape(-1)[inverse], self.shape, validate=False)
        return self._csr

    def transpose_pattern(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block pattern of W^T: (t_row_ptr, t_col_idx, t_perm); W^T's blocks are
        ``values[t_perm].transpose(1, 2)``. Built once and cached."""
        if self._transpose is None:
            self._transpose = transpose_pattern(self.row_ptr, self.col_idx, self.k // self.block)
        return self._transpose

    def to(self, *args, **kwargs) -> BlockSparseMatrix:
        values = self.values.to(*args, **kwargs)
        dev = values.device
        tr = None if self._transpose is None else tuple(t.to(dev) for t in self._transpose)
        return BlockSparseMatrix(self.row_ptr.to(dev), self.col_idx.to(dev), values, self.shape, validate=False,
                                 transpose=tr)

    # -- validation ---------------------------------------------------------------------
    def _validate(self) -> None:
        v = self.values
        if not isinstance(v, torch.Tensor) or v.dim() != 3 or v.shape[1] != v.shape[2]:
            raise ValueError("BlockSparseMatrix: values must be (nnzb, b, b), got "
                             + (f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else type(v).__name__))
        if len(self.shape) < 2:
            raise ValueError(f"BlockSparseMatrix: shape must have >= 2 dims, got {tuple(self.shape)}")
        b = v.shape[-1]
        _check_block("BlockSparseMatrix", (self.m, self.k), b)
        if v.shape[0] != self.col_idx.numel():
            raise ValueError(f"BlockSparseMatrix: values has {v.shape[0]} blocks but col_idx has "
                             f"{self.col_idx.numel()} entries")
        if not v.is_floating_point():
            raise ValueError(f"BlockSparseMatrix: values must be floating point, got {v.dtype}")
        # The block pattern is a CSR of the (m/b, k/b) block grid.
        check_csr_pattern("BlockSparseMatrix", self.row_ptr, self.col_idx, self.m // b, self.k // b,
                          f" for the {self.m // b} block rows of shape {tuple(self.shape)} at block={b}")
        if v.device != self.row_ptr.device:
            raise ValueError(f"BlockSparseMatrix: row_ptr ({self.row_ptr.device}) and values ({v.device}) must be "
                             "on one device")
