"""What SparseLinear and SparseConv2d share: a CSR weight whose values are the
trainable Parameter and whose pattern (and cached transpose) lives in buffers."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..block_sparse import BlockSparseMatrix, block_mask_of, bsr_element_order, expand_block_mask
from ..sparse_matrix import SparseMatrix, csr_from_mask, csr_from_positions, rows_of, transpose_pattern

_PATTERN_BUFFERS = ("row_ptr", "col_idx", "t_row_ptr", "t_col_idx", "t_perm")
# format="bsr": the block pattern and where each block entry sits in ``values`` (derived from the
# element pattern after every change, so not saved in the state_dict).
_BLOCK_BUFFERS = ("b_row_ptr", "b_col_idx", "b_order", "b_t_row_ptr", "b_t_col_idx", "b_t_perm")
FORMATS = ("csr", "bsr")


def random_mask(shape: Sequence[int], density: float, generator: Optional[torch.Generator] = None,
                device=None) -> torch.Tensor:
    """A bool mask with exactly round(density * numel) True entries, drawn uniformly at random."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"random_mask: density must lie in [0, 1], got {density}")
    numel = math.prod(shape)
    n_keep = int(round(density * numel))
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:n_keep]] = True
    return mask.reshape(tuple(shape)).to(device)


def random_block_mask(shape: Sequence[int], density: float, block: int,
                      generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """A block-aligned mask of ``shape`` (2-D view: dim 0 x the rest) with round(density * blocks)
    whole b x b blocks, drawn uniformly at random."""
    m, k = shape[0], math.prod(shape[1:])
    blocks = random_mask((m // block, k // block), density, generator, device)
    return expand_block_mask(blocks, block).reshape(tuple(shape))


class SparseWeightMixin:
    """Holds the weight of dense shape ``weight_shape`` as CSR, or (``format="bsr"``) as a
    block-aligned CSR whose b x b blocks the GPU kernels run as BSR.

    The subclass is an ``nn.Module`` that sets ``self.weight_shape`` and calls
    ``self._init_sparse_weight(dense, mask, format, block)``.

    With ``format="bsr"`` the trainable ``values`` stay in CSR (row-major) order, so DST, optimizer
    state remapping and checkpoints treat both formats alike; ``block_weight()`` gathers them into
    (nnzb, b, b) blocks for the BSR kernels. Patterns must then be block-aligned (DST drops and
    grows whole blocks).
    """

    format: str = "csr"
    block: int = 1

    weight_shape: torch.Size
    DENSE_TYPE: type  # the dense module this one mirrors (nn.Linear, nn.Conv2d)

    def _copy_geometry(self, module: nn.Module) -> None:
        """Take the dense module's arguments (features, kernel size, ...) and its weight shape."""
        raise NotImplementedError

    def _empty_dense(self) -> nn.Module:
        """A dense module with this module's arguments."""
        raise NotImplementedError

    @classmethod
    def from_dense(cls, module: nn.Module, mask: Optional[torch.Tensor] = None, format: str = "csr",
                   block: int = 32):
        """The sparse equivalent of ``module`` at ``mask`` (None = the weight's nonzeros). With
        ``format="bsr"`` every block of ``block`` x ``block`` weights that holds any of ``mask`` is kept whole."""
        if not isinstance(module, cls.DENSE_TYPE):
            raise TypeError(f"{cls.__name__}.from_dense: module must be nn.{cls.DENSE_TYPE.__name__}, "
                            f"got {type(module).__name__}")
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out._copy_geometry(module)
        weight = module.weight.detach()
        mask = weight != 0 if mask is None else mask
        if format == "bsr":
            _check_format(cls.__name__, out.weight_shape, format, block)
            m, k = out.weight_shape[0], math.prod(out.weight_shape[1:])
            mask = expand_block_mask(block_mask_of(mask.reshape(m, k), block), block).reshape(out.weight_shape)
        out._init_sparse_weight(weight, mask, format, block)
        out.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())
        return out

    def to_dense(self) -> nn.Module:
        """The equivalent dense module (the weight is exactly 0 outside the pattern)."""
        dense = self._empty_dense()
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def _init_sparse_weight(self, dense: torch.Tensor, mask: torch.Tensor, format: str = "csr",
                            block: int = 32) -> None:
        _check_format(type(self).__name__, self.weight_shape, format, block)
        self.format, self.block = format, (block if format == "bsr" else 1)
        self.values = nn.Parameter(torch.empty(0, dtype=dense.dtype, device=dense.device))
        for name in _PATTERN_BUFFERS:
            self.register_buffer(name, torch.empty(0, dtype=torch.int64, device=dense.device))
        if self.format == "bsr":
            for name in _BLOCK_BUFFERS:
                self.register_buffer(name, torch.empty(0, dtype=torch.int64, device=dense.device), persistent=False)
        self.set_pattern(mask, dense)

    def _initial_mask(self, density: float, generator, device) -> torch.Tensor:
        _check_format(type(self).__name__, self.weight_shape, self.format, self.block)
        if self.format == "bsr":
            return random_block_mask(self.weight_shape, density, self.block, generator, device)
        return random_mask(self.weight_shape, density, generator, device=device)

    # -- format="bsr": the block layout of the element pattern -------------------------------
    def _check_block_aligned(self, where: str, mask2d: torch.Tensor) -> None:
        if self.format == "bsr" and not torch.equal(
                expand_block_mask(block_mask_of(mask2d, self.block), self.block), mask2d):
            raise ValueError(f"{type(self).__name__}.{where}: format='bsr' needs a mask made of whole "
                             f"{self.block}x{self.block} blocks (see sparsekern.block_sparse.expand_block_mask)")

    def _refresh_blocks(self) -> None:
        if self.format != "bsr":
            return
        m, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        mask2d = self.mask().reshape(m, k)
        bmask = block_mask_of(mask2d, self.block)
        self.b_row_ptr, self.b_col_idx = csr_from_mask(bmask)
        self.b_order = bsr_element_order(mask2d, self.block).reshape(-1)
        self.b_t_row_ptr, self.b_t_col_idx, self.b_t_perm = transpose_pattern(self.b_row_ptr, self.b_col_idx,
                                                                              k // self.block)

    def block_weight(self) -> BlockSparseMatrix:
        """The weight as BSR (format="bsr"): blocks gathered from ``values``, differentiable."""
        if self.format != "bsr":
            raise RuntimeError(f"{type(self).__name__}.block_weight: the module's format is {self.format!r}, not 'bsr'")
        b = self.block
        blocks = self.values.index_select(0, self.b_order).reshape(-1, b, b)
        return BlockSparseMatrix(self.b_row_ptr, self.b_col_idx, blocks, self.weight_shape, validate=False,
                                 transpose=(self.b_t_row_ptr, self.b_t_col_idx, self.b_t_perm),
                                 csr=self.sparse_weight())

    # -- the pattern --------------------------------------------------------------------
    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        return self.nnz / math.prod(self.weight_shape)

    def set_pattern(self, mask: torch.Tensor, dense: Optional[torch.Tensor] = None) -> None:
        """Replace the pattern by ``mask``; values come from ``dense`` (default: the current
        weight, zero where newly active). Rebuilds the cached transpose."""
        if mask.shape != self.weight_shape:
            raise ValueError(f"{type(self).__name__}.set_pattern: mask must have shape {tuple(self.weight_shape)}, "
                             f"got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"{type(self).__name__}.set_pattern: mask must be bool, got {mask.dtype}")
        if dense is None:
            dense = self.dense_weight().detach()
        m, k = self.weight_shape[0], math.prod(self.weight_shape[1:])  # not -1: ambiguous when m == 0
        mask2 = mask.reshape(m, k).to(self.values.device)
        self._check_block_aligned("set_pattern", mask2)
        row_ptr, col_idx = csr_from_mask(mask2)
        t_row_ptr, t_col_idx, t_perm = transpose_pattern(row_ptr, col_idx, mask2.shape[1])
        with torch.no_grad():
            values = dense.reshape(m, k).to(self.values.device, self.values.dtype)[mask2].clone()
        self.values = nn.Parameter(values, requires_grad=self.values.requires_grad)
        self.row_ptr, self.col_idx = row_ptr, col_idx
        self.t_row_ptr, self.t_col_idx, self.t_perm = t_row_ptr, t_col_idx, t_perm
        self._refresh_blocks()

    def update_pattern_(self, mask: Optional[torch.Tensor], values: torch.Tensor,
                        positions: Optional[torch.Tensor] = None) -> None:
        """Replace the pattern by ``mask`` in place (dynamic sparse training).

        Instead of a mask, ``positions`` may give the new nonzeros' flat indices (row * k + col) in
        ascending order, which skips a scan of the dense mask (DST knows them).

        ``values`` are the new nonzeros in row-major order. At an unchanged nnz they are written into
        the existing ``values`` Parameter and the pattern buffers are overwritten in place, so an
        optimizer or DDP holding these tensors stays valid. If nnz changed, ``values`` becomes a new
        Parameter (resizing a leaf in place breaks autograd graphs still alive) and whoever holds the
        old one must be re-pointed (``sparsekern.dst.remap_optimizer_state``). The gradient of the old
        pattern means nothing in the new one: it is dropped.
        """
        m, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        if positions is not None:
            if mask is not None:
                raise ValueError(f"{type(self).__name__}.update_pattern_: give mask or positions, not both")
            self._check_positions(positions, m * k)
            if self.format == "bsr":  # checked before any buffer is written, so a bad call changes nothing
                mask_flat = torch.zeros(m * k, dtype=torch.bool, device=positions.device)
                mask_flat[positions.long()] = True
                self._check_block_aligned("update_pattern_", mask_flat.reshape(m, k))
            row_ptr, col_idx = csr_from_positions(positions.to(self.values.device), m, k)
        else:
            if mask is None or mask.shape != self.weight_shape or mask.dtype != torch.bool:
                raise ValueError(f"{type(self).__name__}.update_pattern_: mask must be bool of shape "
                                 f"{tuple(self.weight_shape)}, got "
                                 + ("None" if mask is None else f"{mask.dtype} of shape {tuple(mask.shape)}"))
            self._check_block_aligned("update_pattern_", mask.reshape(m, k))
            row_ptr, col_idx = csr_from_mask(mask.reshape(m, k).to(self.values.device))
        if values.shape != col_idx.shape:
            raise ValueError(f"{type(self).__name__}.update_pattern_: values must have shape ({col_idx.numel()},) "
                             f"(the mask's nnz), got {tuple(values.shape)}")
        pattern = (row_ptr, col_idx) + transpose_pattern(row_ptr, col_idx, k)
        with torch.no_grad():
            for name, new in zip(_PATTERN_BUFFERS, pattern):
                old = getattr(self, name)
                if old.shape == new.shape and old.dtype == new.dtype:
                    old.copy_(new)
                else:
                    setattr(self, name, new)
            values = values.to(self.values.device, self.values.dtype)
            if self.values.shape == values.shape:
                self.values.copy_(values)
                self.values.grad = None
            else:
                self.values = nn.Parameter(values.clone(), requires_grad=self.values.requires_grad)
        self._refresh_blocks()

    def _check_positions(self, positions: torch.Tensor, numel: int) -> None:
        where = f"{type(self).__name__}.update_pattern_"
        if positions.dim() != 1 or positions.dtype.is_floating_point or positions.dtype.is_complex \
                or positions.dtype == torch.bool:
            raise ValueError(f"{where}: positions must be a 1-D integer tensor, got {positions.dtype} "
                             f"of shape {tuple(positions.shape)}")
        if positions.numel() == 0:
            return
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= numel:
            raise ValueError(f"{where}: positions must lie in [0, {numel}) (row * k + col of a "
                             f"{tuple(self.weight_shape)} weight), got values in [{lo}, {hi}]")
        steps = positions[1:] - positions[:-1]
        if steps.numel() and int(steps.min()) <= 0:
            first = int(torch.nonzero(steps <= 0)[0])
            raise ValueError(f"{where}: positions must be strictly ascending, got positions[{first}] = "
                             f"{int(positions[first])} followed by {int(positions[first + 1])}")

    def sparse_weight(self) -> SparseMatrix:
        """The weight as a SparseMatrix sharing this module's values and cached transpose."""
        return SparseMatrix(self.row_ptr, self.col_idx, self.values, self.weight_shape, validate=False,
                            transpose=(self.t_row_ptr, self.t_col_idx, self.t_perm))

    def dense_weight(self) -> torch.Tensor:
        """Dense weight (zeros outside the pattern), differentiable in ``values``. It is the operand of
        the ``dense`` kernel every step, so the scatter index is cached per pattern version, and a full
        pattern (CSR order is then row-major order) is a view of ``values``."""
        numel = math.prod(self.weight_shape)
        if self.nnz == numel:
            return self.values.reshape(self.weight_shape)
        flat = torch.zeros(numel, dtype=self.values.dtype, device=self.values.device)
        return flat.index_put((self._flat_index(),), self.values).reshape(self.weight_shape)

    def _flat_index(self) -> torch.Tensor:
        """row * k + col of every nonzero, rebuilt when a pattern buffer is replaced or written."""
        k = math.prod(self.weight_shape[1:])
        if torch.compiler.is_compiling():  # fake tensors have no data_ptr; the graph is built once anyway
            return rows_of(self.row_ptr, self.col_idx.numel()) * k + self.col_idx.long()
        version = tuple((t.data_ptr(), t._version, t.numel()) for t in (self.row_ptr, self.col_idx))
        cached = self.__dict__.get("_flat_index_cache")
        if cached is None or cached[0] != version:
            index = rows_of(self.row_ptr, self.col_idx.numel()) * k + self.col_idx.long()
            self.__dict__["_flat_index_cache"] = cached = (version, index)
        return cached[1]

    def mask(self) -> torch.Tensor:
        return self.sparse_weight().mask()

    # -- drop-in for code written against nn.Linear / nn.Conv2d, which reads ``.weight`` -----
    @property
    def weight(self) -> torch.Tensor:
        """The dense weight materialized from the CSR (zeros outside the pattern), differentiable in
        ``values``: a read-only view for code that reads ``.weight`` (its dtype, device, shape).

        Each read builds a new tensor, so writing into it changes nothing: the trainable tensor is
        ``values`` and the pattern changes through ``set_pattern``."""
        return self.dense_weight()

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":  # nn.Module would store it beside the CSR, which the forward ignores
            raise AttributeError(f"{type(self).__name__}.weight is read-only (a dense view built from the CSR): "
                                 "write the trainable `values` (the nonzeros, in CSR order) or change the "
                                 "pattern with set_pattern(mask, dense)")
        super().__setattr__(name, value)

    # -- state_dict: nnz may differ from the module's current size ---------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "row_ptr" in state_dict and prefix + "col_idx" in state_dict:
            # Validate the incoming pattern before anything is copied: a rejected state dict must leave
            # the module as it was, and a corrupt pattern must not reach the kernels.
            row_ptr, col_idx = state_dict[prefix + "row_ptr"], state_dict[prefix + "col_idx"]
            values = state_dict.get(prefix + "values", torch.zeros(col_idx.shape, dtype=self.values.dtype))
            incoming = SparseMatrix(row_ptr.to(self.values.device), col_idx.to(self.values.device),
                                    values.to(self.values.device), self.weight_shape)
            self._check_block_aligned("load_state_dict", incoming.mask().reshape(self.weight_shape[0], -1))
        for name in ("values",) + _PATTERN_BUFFERS:
            key = prefix + name
            if key in state_dict:
                current = getattr(self, name)
                incoming = state_dict[key]
                if current.shape != incoming.shape:
                    resized = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
                    if name == "values":
                        # Keep the Parameter object: an optimizer built before loading holds it.
                        self.values.data = resized
                        self.values.grad = None
                    else:
                        setattr(self, name, resized)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + "row_ptr" in state_dict:
            self._refresh_blocks()

    def extra_repr_density(self) -> str:
        fmt = f", format='bsr', block={self.block}" if self.format == "bsr" else ""
        return f"density={self.density:.4f}, nnz={self.nnz}{fmt}"


def _check_format(owner: str, weight_shape, format: str, block: int) -> None:
    if format not in FORMATS:
        raise ValueError(f"{owner}: format must be one of {FORMATS}, got {format!r}")
    if format == "bsr":
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"{owner}: block must be a positive int, got {block!r}")
        m, k = weight_shape[0], math.prod(weight_shape[1:])
        if m % block or k % block:
            raise ValueError(f"{owner}: format='bsr' with block={block} needs both weight dims (rows {m}, "
                             f"columns {k}) to be multiples of {block}")
