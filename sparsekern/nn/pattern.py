"""The pattern of a sparse module: its CSR, the cached transpose and (BSR) the block view, in one object.

Only ``row_ptr`` and ``col_idx`` are the pattern; everything else here is derived from them and
rebuilt whenever they change (``replace``) or are loaded: nothing derived is saved or trusted from a
checkpoint. All buffers are non-persistent (the owning module writes the checkpoint form: values,
row_ptr, col_idx) and move with the module (``.to``, ``.cuda``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..block_sparse import BlockSparseMatrix, block_mask_of, bsr_element_order, expand_block_mask
from ..sparse_matrix import (
    SparseMatrix,
    check_csr_pattern,
    csr_from_mask,
    csr_from_positions,
    rows_of,
    transpose_pattern,
)

__all__ = ["SparsePattern", "remap_entries"]

_CSR = ("row_ptr", "col_idx")
_TRANSPOSE = ("t_row_ptr", "t_col_idx", "t_perm")
_BLOCKS = ("b_row_ptr", "b_col_idx", "b_order", "b_t_row_ptr", "b_t_col_idx", "b_t_perm")
_INDEX_DTYPES = (torch.int32, torch.int64)


def remap_entries(old: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``old[source]`` with zeros where ``source`` is -1 (a grown entry)."""
    gathered = old[source.clamp(min=0)]
    return torch.where(source >= 0, gathered, torch.zeros((), dtype=old.dtype, device=old.device))


class SparsePattern(nn.Module):
    """CSR pattern of a weight of dense ``shape`` (rows: dim 0; columns: the other dims flattened):
    ``row_ptr`` (m+1, int64: the kernels index with it), ``col_idx`` (nnz, int32, sorted within rows),
    the transpose ``t_row_ptr``/``t_col_idx``/``t_perm`` (``values[t_perm]`` are W^T's values) and, for
    ``block`` given (format "bsr"), the block CSR ``b_row_ptr``/``b_col_idx`` with its transpose and ``b_order``
    (``values[b_order]`` are the (nnzb, b, b) blocks). Build it with ``from_csr`` (validated),
    ``from_mask`` or ``from_positions``; change it only through ``replace``."""

    def __init__(self, shape: Sequence[int], row_ptr: torch.Tensor, col_idx: torch.Tensor,
                 block: Optional[int] = None):
        super().__init__()
        self.shape = torch.Size(shape)
        self.block = block
        for name in _CSR + _TRANSPOSE + (_BLOCKS if block is not None else ()):
            self.register_buffer(name, torch.empty(0, dtype=torch.int64, device=row_ptr.device), persistent=False)
        self._install(row_ptr.to(torch.int64), col_idx.to(torch.int32))

    # -- construction -------------------------------------------------------------------
    @property
    def m(self) -> int:
        return self.shape[0]

    @property
    def k(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def nnz(self) -> int:
        return self.col_idx.numel()

    @classmethod
    def from_mask(cls, shape: Sequence[int], mask: torch.Tensor, block: Optional[int] = None) -> SparsePattern:
        shape = torch.Size(shape)
        return cls(shape, *csr_from_mask(mask.reshape(shape[0], math.prod(shape[1:]))), block)

    @classmethod
    def from_csr(cls, owner: str, shape: Sequence[int], row_ptr, col_idx, block: Optional[int] = None,
                 device=None) -> SparsePattern:
        """A pattern from (possibly untrusted) row_ptr and col_idx of any integer dtype, checked once:
        sizes, row_ptr from 0 non-decreasing to nnz, col_idx in range, sorted and unique within rows,
        made of whole blocks when ``block`` is given. ValueError naming the argument otherwise."""
        shape = torch.Size(shape)
        m, k = shape[0], math.prod(shape[1:])
        for name, t in (("row_ptr", row_ptr), ("col_idx", col_idx)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{owner}: {name} must be a tensor, got {type(t).__name__}")
            if t.dtype not in _INDEX_DTYPES:
                raise ValueError(f"{owner}: {name} must be int32 or int64, got {t.dtype}")
        if col_idx.dim() == 1 and col_idx.numel():  # before the int32 cast, which would wrap
            lo, hi = int(col_idx.min()), int(col_idx.max())
            if lo < 0 or hi >= k:
                raise ValueError(f"{owner}: col_idx must lie in [0, {k}), got values in [{lo}, {hi}]")
        device = row_ptr.device if device is None else device
        row_ptr, col_idx = row_ptr.to(device, torch.int64), col_idx.to(device, torch.int32)
        check_csr_pattern(owner, row_ptr, col_idx, m, k, f" for a weight of shape {tuple(shape)}")
        if block is not None:
            check_block_aligned(owner, SparseMatrix(row_ptr, col_idx, torch.zeros(col_idx.numel(), device=device),
                                                    (m, k), validate=False).mask(), block)
        return cls(shape, row_ptr, col_idx, block)

    # -- the only way the pattern changes ------------------------------------------------------
    def replace(self, positions: torch.Tensor) -> None:
        """Make the pattern the entries at ``positions`` (flat row * k + col, strictly ascending, checked
        by the caller) and rebuild everything derived. Buffers of unchanged size are overwritten in
        place, so whoever holds them (DDP, a compiled graph) stays valid."""
        self._install(*csr_from_positions(positions.to(self.row_ptr.device), self.m, self.k))

    def load_(self, other: SparsePattern) -> None:
        """Take ``other``'s pattern (already validated and built)."""
        self._install(other.row_ptr.to(self.row_ptr.device), other.col_idx.to(self.row_ptr.device))

    def _install(self, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> None:
        with torch.inference_mode(False):  # buffers outlive an inference_mode block (a change made under one)
            self._install_buffers(row_ptr.clone() if row_ptr.is_inference() else row_ptr,
                                  col_idx.clone() if col_idx.is_inference() else col_idx)
        self._positions = None
        self._trust()

    def _install_buffers(self, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> None:
        new = {"row_ptr": row_ptr, "col_idx": col_idx}
        new.update(zip(_TRANSPOSE, transpose_pattern(row_ptr, col_idx, self.k)))
        if self.block is not None:
            b, kb = self.block, self.k // self.block
            mask2d = self._mask2d(row_ptr, col_idx)
            b_row_ptr, b_col_idx = csr_from_mask(block_mask_of(mask2d, b))
            new.update(b_row_ptr=b_row_ptr, b_col_idx=b_col_idx, b_order=bsr_element_order(mask2d, b).reshape(-1))
            new.update(zip(("b_t_row_ptr", "b_t_col_idx", "b_t_perm"), transpose_pattern(b_row_ptr, b_col_idx, kb)))
        with torch.no_grad():
            for name, tensor in new.items():
                old = self._buffers[name]
                if old.shape == tensor.shape and old.dtype == tensor.dtype and old.device == tensor.device:
                    old.copy_(tensor)
                else:
                    self._buffers[name] = tensor

    def _trust(self) -> None:
        """Validate the CSR and its transpose once and register them: the CPU kernels then skip the
        per-call pattern check while these buffers are unchanged (an in-place write is seen and checked
        again; SPARSEKERN_CHECK_PATTERNS=1 checks every call)."""
        if self.row_ptr.device.type == "cpu" and not torch.compiler.is_compiling():
            torch.ops.sparsekern._trust_pattern(self.row_ptr, self.col_idx, self.k, *self.transpose())

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._trust()  # .to() / .cpu() may have made new buffers
        return out

    def __setstate__(self, state):
        # A copy (copy.deepcopy, pickle) has new buffers, which no op trusts: without this each call of a copied
        # layer checked its whole pattern again (90 us a call at 1024x1024, density 0.1).
        super().__setstate__(state)
        self._trust()

    # -- derived views -----------------------------------------------------------------------
    def positions(self) -> torch.Tensor:
        """Flat index (row * k + col) of every stored entry, ascending (the CSR order). Cached until the
        pattern changes."""
        if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
            # fake tensors, or torch.func's wrappers (not to outlive the transform): built in the graph, not kept
            return rows_of(self.row_ptr, self.nnz) * self.k + self.col_idx.long()
        cached = self.__dict__.get("_positions")
        if cached is None or cached.device != self.row_ptr.device:
            # Never an inference tensor (a first call under torch.inference_mode): the cache outlives the mode, and
            # the dense route's scatter saves it for backward.
            with torch.inference_mode(False):
                cached = rows_of(self.row_ptr, self.nnz) * self.k + self.col_idx.long()
            self.__dict__["_positions"] = cached
        return cached

    def transpose(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.t_row_ptr, self.t_col_idx, self.t_perm

    def _mask2d(self, row_ptr: torch.Tensor, col_idx: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.m, self.k, dtype=torch.bool, device=row_ptr.device)
        out[rows_of(row_ptr, col_idx.numel()), col_idx.long()] = True
        return out

    def mask(self) -> torch.Tensor:
        """Bool mask of the stored entries, in the dense shape."""
        return self._mask2d(self.row_ptr, self.col_idx).reshape(self.shape)

    def csr(self, values: torch.Tensor) -> SparseMatrix:
        """``values`` on this pattern, with the cached transpose."""
        return SparseMatrix(self.row_ptr, self.col_idx, values, self.shape, validate=False,
                            transpose=self.transpose())

    def block_positions(self) -> torch.Tensor:
        """Flat index (block row * k/b + block column) of every stored block, ascending."""
        self._need_blocks("block_positions")
        return rows_of(self.b_row_ptr, self.b_col_idx.numel()) * (self.k // self.block) + self.b_col_idx.long()

    def blocks(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (CSR order) gathered into (nnzb, b, b) blocks, differentiable."""
        self._need_blocks("blocks")
        return values.index_select(0, self.b_order).reshape(-1, self.block, self.block)

    def bsr(self, values: torch.Tensor) -> BlockSparseMatrix:
        """``values`` as BSR (with this pattern's element CSR for the CPU backend)."""
        return BlockSparseMatrix(self.b_row_ptr, self.b_col_idx, self.blocks(values), self.shape, validate=False,
                                 transpose=(self.b_t_row_ptr, self.b_t_col_idx, self.b_t_perm), csr=self.csr(values))

    def _need_blocks(self, where: str) -> None:
        if self.block is None:
            raise RuntimeError(f"SparsePattern.{where}: the pattern has no block view (format 'csr')")

    # -- checkpoint form -----------------------------------------------------------------------
    def compact_row_ptr(self) -> torch.Tensor:
        """row_ptr as saved: int32 where nnz fits (4 bytes per row instead of 8)."""
        return self.row_ptr.to(torch.int32) if self.nnz < 2 ** 31 else self.row_ptr

    def same_as(self, other: SparsePattern) -> bool:
        dev = self.row_ptr.device
        return (self.nnz == other.nnz and torch.equal(self.row_ptr, other.row_ptr.to(dev))
                and torch.equal(self.col_idx, other.col_idx.to(dev)))

    def extra_repr(self) -> str:
        block = f", block={self.block}" if self.block is not None else ""
        return f"shape={tuple(self.shape)}, nnz={self.nnz}{block}"


def check_block_aligned(owner: str, mask2d: torch.Tensor, block: Optional[int]) -> None:
    if block is not None and block > 1 and \
            not torch.equal(expand_block_mask(block_mask_of(mask2d, block), block), mask2d):
        raise ValueError(f"{owner}: format='bsr' needs a mask made of whole {block}x{block} blocks "
                         "(see sparsekern.block_sparse.expand_block_mask)")


def check_positions(owner: str, positions, numel: int, shape) -> None:
    """ValueError unless ``positions`` is a 1-D integer tensor of strictly ascending flat indices in [0, numel)."""
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.dtype.is_floating_point \
            or positions.dtype.is_complex or positions.dtype == torch.bool:
        got = (f"{positions.dtype} of shape {tuple(positions.shape)}" if isinstance(positions, torch.Tensor)
               else type(positions).__name__)
        raise ValueError(f"{owner}: positions must be a 1-D integer tensor, got {got}")
    if positions.numel() == 0:
        return
    lo, hi = int(positions.min()), int(positions.max())
    if lo < 0 or hi >= numel:
        raise ValueError(f"{owner}: positions must lie in [0, {numel}) (row * k + col of a {tuple(shape)} weight), "
                         f"got values in [{lo}, {hi}]")
    steps = positions[1:] - positions[:-1]
    if steps.numel() and int(steps.min()) <= 0:
        first = int(torch.nonzero(steps <= 0)[0])
        raise ValueError(f"{owner}: positions must be strictly ascending, got positions[{first}] = "
                         f"{int(positions[first])} followed by {int(positions[first + 1])}")


def positions_mask(positions: torch.Tensor, m: int, k: int) -> torch.Tensor:
    flat = torch.zeros(m * k, dtype=torch.bool, device=positions.device)
    flat[positions.long()] = True
    return flat.reshape(m, k)
