"""What SparseLinear and SparseConv2d share: a weight whose nonzeros ``values`` are the trainable
Parameter and whose pattern is one ``SparsePattern`` (``self.pattern``: CSR, cached transpose, BSR view)."""
from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..block_sparse import BlockSparseMatrix, block_mask_of, expand_block_mask
from ..sparse_matrix import SparseMatrix, scatter_dense
from .pattern import SparsePattern, check_block_aligned, check_positions, positions_mask, remap_entries
from .weight_view import SparseWeightView

FORMATS = ("csr", "bsr")
# What a checkpoint holds besides the bias; older checkpoints also hold the transpose, which is
# derived, so it is rebuilt and those keys are ignored.
_SAVED = ("values", "row_ptr", "col_idx")
_LEGACY_DERIVED = ("t_row_ptr", "t_col_idx", "t_perm")


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


def check_module_density(owner: str, density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 <= density <= 1.0:
        raise ValueError(f"{owner}: density must be a number in [0, 1], got {density!r}")
    return float(density)


class SparseWeightMixin:
    """Holds the weight of dense shape ``weight_shape`` as ``values`` (the nonzeros, in CSR order: the
    trainable Parameter) on ``self.pattern`` (a ``SparsePattern``). With ``format="bsr"`` the pattern
    is made of whole b x b blocks and also keeps their block view, which the GPU kernels run as BSR;
    ``values`` stay in CSR order, so DST, optimizer state and checkpoints treat both formats alike.

    The subclass is an ``nn.Module`` that sets ``self.weight_shape`` and calls
    ``self._init_sparse_weight(dense, mask, format, block)``.

    The pattern changes through one entry point, ``replace_pattern(positions, source)`` (what DST
    calls); ``set_pattern(mask, dense)`` and ``update_pattern_(mask, values, positions)`` are the same
    change given a mask or new values. A checkpoint holds ``values``, ``row_ptr`` (int32 where it fits)
    and ``col_idx`` (int32) and the bias; loading validates all of it before anything changes.
    """

    format: str = "csr"
    block: int = 1
    # State version 2: the checkpoint's metadata records the weight shape (see _save_to_state_dict).
    _version = 2

    weight_shape: torch.Size
    DENSE_TYPE: type  # the dense module this one mirrors (nn.Linear, nn.Conv2d)

    def _copy_geometry(self, module: nn.Module) -> None:
        """Take the dense module's arguments (features, kernel size, ...) and its weight shape."""
        raise NotImplementedError

    def _empty_dense(self) -> nn.Module:
        """A dense module with this module's arguments."""
        raise NotImplementedError

    def weight_grad(self, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
        """The dense gradient of the loss in the weight (dense shape) from the layer's input and the
        gradient at its product (``pre_activation_grad`` of its output's gradient)."""
        raise NotImplementedError

    def activate(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's fused activation (SparseLinear's ``activation``) on the product ``y``: none here."""
        return y

    def pre_activation_grad(self, grad: torch.Tensor, y: Optional[torch.Tensor], x: Optional[torch.Tensor] = None
                            ) -> torch.Tensor:
        """The gradient at the product from ``grad``, the gradient at the layer's output ``y`` (None: the layer
        has no activation) of input ``x``."""
        return grad

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
        if mask is None:
            mask = weight != 0
        elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != weight.shape:
            got = (f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            raise ValueError(f"{cls.__name__}.from_dense: mask must be a bool tensor of the weight's shape "
                             f"{tuple(weight.shape)}, got {got}")
        _check_format(cls.__name__, out.weight_shape, format, block)
        if format == "bsr":
            m, k = out.weight_shape[0], math.prod(out.weight_shape[1:])
            mask = expand_block_mask(block_mask_of(mask.reshape(m, k), block), block).reshape(out.weight_shape)
        out._init_sparse_weight(weight, mask, format, block)
        out.bias = None if module.bias is None else nn.Parameter(module.bias.detach().clone())
        return out

    def kernel_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the layer's kernels run on for its input ``x`` (SparseConv2d pads for its padding_mode first)."""
        return x

    def to_dense(self) -> nn.Module:
        """The equivalent dense module (the weight is exactly 0 outside the pattern)."""
        dense = self._empty_dense()
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        dense.weight.requires_grad_(self.values.requires_grad)
        if self.bias is not None:
            dense.bias.requires_grad_(self.bias.requires_grad)
        return dense.train(self.training)

    def _init_sparse_weight(self, dense: torch.Tensor, mask: torch.Tensor, format: str = "csr",
                            block: int = 32) -> None:
        _check_format(type(self).__name__, self.weight_shape, format, block)
        self.format, self.block = format, (block if format == "bsr" else 1)
        m, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        mask2 = mask.reshape(m, k).to(dense.device)
        check_block_aligned(type(self).__name__, mask2, self._pattern_block())
        self.pattern = SparsePattern.from_mask(self.weight_shape, mask2, self._pattern_block())
        self.values = nn.Parameter(dense.reshape(m, k)[mask2].clone())

    def _pattern_block(self) -> Optional[int]:
        return self.block if self.format == "bsr" else None

    def _initial_mask(self, density: float, generator, device) -> torch.Tensor:
        owner = type(self).__name__
        density = check_module_density(owner, density)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"{owner}: generator must be a torch.Generator or None, got {type(generator).__name__}")
        _check_format(owner, self.weight_shape, self.format, self.block)
        if self.format == "bsr":
            return random_block_mask(self.weight_shape, density, self.block, generator, device)
        return random_mask(self.weight_shape, density, generator, device=device)

    # -- the pattern's tensors, as the ops take them -------------------------------------------
    row_ptr = property(lambda self: self.pattern.row_ptr, doc="CSR row pointers (m+1, int64).")
    col_idx = property(lambda self: self.pattern.col_idx, doc="CSR column indices (nnz, int32).")
    t_row_ptr = property(lambda self: self.pattern.t_row_ptr, doc="Row pointers of W^T (derived).")
    t_col_idx = property(lambda self: self.pattern.t_col_idx, doc="Column indices of W^T (derived).")
    t_perm = property(lambda self: self.pattern.t_perm, doc="values[t_perm] are W^T's values (derived).")

    def block_weight(self) -> BlockSparseMatrix:
        """The weight as BSR (format="bsr"): blocks gathered from ``values``, differentiable."""
        if self.format != "bsr":
            raise RuntimeError(f"{type(self).__name__}.block_weight: the module's format is {self.format!r}, not 'bsr'")
        return self.pattern.bsr(self.values)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        numel = math.prod(self.weight_shape)
        return self.nnz / numel if numel else 0.0  # a layer with no weights (0 features), as SparseMatrix.density

    # -- changing the pattern: validated first, then applied whole --------------------------
    def replace_pattern(self, positions: torch.Tensor, source: torch.Tensor) -> None:
        """Make the pattern the entries at ``positions`` (flat row * k + col, strictly ascending); the
        i-th new value is the old ``values[source[i]]``, or 0 where ``source[i]`` is -1 (a grown
        entry). What DST calls; the optimizer's state follows with
        ``sparsekern.dst.remap_optimizer_state(optimizer, old_values, source, new_param=module.values)``."""
        where = f"{type(self).__name__}.replace_pattern"
        if not isinstance(source, torch.Tensor) or source.dim() != 1 or source.dtype.is_floating_point \
                or source.dtype == torch.bool:
            raise ValueError(f"{where}: source must be a 1-D integer tensor, got "
                             + (f"{source.dtype} of shape {tuple(source.shape)}" if isinstance(source, torch.Tensor)
                                else type(source).__name__))
        if isinstance(positions, torch.Tensor) and source.shape != positions.shape:
            raise ValueError(f"{where}: source must have one entry per position ({tuple(positions.shape)}), "
                             f"got shape {tuple(source.shape)}")
        if source.numel() and (int(source.min()) < -1 or int(source.max()) >= self.nnz):
            raise ValueError(f"{where}: source must lie in [-1, {self.nnz}) (an old index or -1), got values in "
                             f"[{int(source.min())}, {int(source.max())}]")
        self._replace(where, positions, lambda: remap_entries(self.values.detach(), source.to(self.values.device)))

    def set_pattern(self, mask: torch.Tensor, dense: Optional[torch.Tensor] = None) -> None:
        """Replace the pattern by ``mask``; values come from ``dense`` (default: the current weight, zero
        where newly active)."""
        where = f"{type(self).__name__}.set_pattern"
        positions = self._mask_positions(where, mask)
        if dense is not None and (not isinstance(dense, torch.Tensor) or dense.shape != self.weight_shape):
            raise ValueError(f"{where}: dense must be a tensor of shape {tuple(self.weight_shape)}, got "
                             + (f"shape {tuple(dense.shape)}" if isinstance(dense, torch.Tensor)
                                else type(dense).__name__))

        def values():
            source = self.dense_weight().detach() if dense is None else dense.detach()
            return source.reshape(-1).to(self.values.device, self.values.dtype)[positions]
        self._replace(where, positions, values)

    def update_pattern_(self, mask: Optional[torch.Tensor], values: torch.Tensor,
                        positions: Optional[torch.Tensor] = None) -> None:
        """Replace the pattern by ``mask`` (or by the flat ``positions`` of the new nonzeros, ascending)
        with the new nonzeros ``values`` in CSR order.

        At an unchanged nnz ``values`` are written into the existing Parameter (an optimizer or DDP
        holding it stays valid); if nnz changed, ``values`` becomes a new Parameter and whoever holds
        the old one must be re-pointed (``sparsekern.dst.remap_optimizer_state``). The gradient of the
        old pattern means nothing in the new one: it is dropped."""
        where = f"{type(self).__name__}.update_pattern_"
        if positions is not None and mask is not None:
            raise ValueError(f"{where}: give mask or positions, not both")
        if positions is None:
            positions = self._mask_positions(where, mask)
        check_positions(where, positions, math.prod(self.weight_shape), self.weight_shape)
        if not isinstance(values, torch.Tensor) or values.shape != positions.shape:
            raise ValueError(f"{where}: values must have shape ({positions.numel()},) (the new pattern's nnz), got "
                             + (f"{tuple(values.shape)}" if isinstance(values, torch.Tensor)
                                else type(values).__name__))
        self._replace(where, positions, lambda: values.detach())

    def _mask_positions(self, where: str, mask) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.shape != self.weight_shape or mask.dtype != torch.bool:
            raise ValueError(f"{where}: mask must be a bool tensor of shape {tuple(self.weight_shape)}, got "
                             + (f"{mask.dtype} of shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                                else type(mask).__name__))
        return mask.to(self.values.device).reshape(-1).nonzero().squeeze(1)

    def _replace(self, where: str, positions: torch.Tensor, new_values) -> None:
        """The one place a pattern changes: check ``positions`` (and block alignment), compute the new
        values, then write pattern and values."""
        m, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        check_positions(where, positions, m * k, self.weight_shape)
        positions = positions.to(self.values.device)
        if self.format == "bsr":
            check_block_aligned(where, positions_mask(positions, m, k), self.block)
        values = new_values()
        if values.shape != positions.shape or not values.is_floating_point():
            raise ValueError(f"{where}: the new values must be floating point of shape {tuple(positions.shape)}, "
                             f"got {values.dtype} of shape {tuple(values.shape)}")
        values = values.to(self.values.device, self.values.dtype)
        same_nnz = self.values.shape == values.shape
        self.pattern.replace(positions)  # first: a new values Parameter is checked against the pattern's nnz
        with torch.no_grad():
            if same_nnz:
                self.values.copy_(values)
                self.values.grad = None
            else:  # a new Parameter: resizing a leaf in place breaks autograd graphs still alive
                with torch.inference_mode(False):  # never an inference tensor: it outlives an inference_mode block
                    self.values = nn.Parameter(values.clone(), requires_grad=self.values.requires_grad)

    # -- views of the weight ------------------------------------------------------------------
    def sparse_weight(self) -> SparseMatrix:
        """The weight as a SparseMatrix sharing this module's values and cached transpose."""
        return self.pattern.csr(self.values)

    def dense_weight(self) -> torch.Tensor:
        """Dense weight (zeros outside the pattern), differentiable in ``values``; a full pattern (CSR
        order is then row-major order) is a view of ``values``."""
        numel = math.prod(self.weight_shape)
        if self.nnz == numel:
            return self.values.reshape(self.weight_shape)
        return scatter_dense(self.values, self.pattern.positions(), numel).reshape(self.weight_shape)

    def mask(self) -> torch.Tensor:
        return self.pattern.mask()

    def _write_dense(self, dense: torch.Tensor, where: str) -> None:
        """Store a dense weight into ``values``: it must be zero outside the pattern (else ValueError,
        nothing written)."""
        owner = f"{type(self).__name__}.{where}"
        if not isinstance(dense, torch.Tensor) or dense.shape != self.weight_shape:
            raise ValueError(f"{owner}: expected a tensor of shape {tuple(self.weight_shape)}, got "
                             + (f"shape {tuple(dense.shape)}" if isinstance(dense, torch.Tensor)
                                else type(dense).__name__))
        flat = dense.detach().reshape(-1).to(self.values.device, self.values.dtype)
        kept = flat[self.pattern.positions()]
        outside = int(torch.count_nonzero(flat)) - int(torch.count_nonzero(kept))
        if outside:
            raise ValueError(f"{owner}: {outside} entries outside the sparse pattern (nnz {self.nnz} of "
                             f"{flat.numel()}) would be nonzero; a sparse layer stores only its pattern. Change "
                             "the pattern with set_pattern(mask, dense), or sparsekern.densify(model) first")
        with torch.no_grad():
            self.values.copy_(kept)

    # -- drop-in for code written against nn.Linear / nn.Conv2d, which reads ``.weight`` -----
    @property
    def weight(self) -> torch.Tensor:
        """The dense weight as code written for nn.Linear / nn.Conv2d expects it: its shape, dtype,
        device and requires_grad are read without building it; using its data builds it
        (differentiable in ``values``); in-place writes (``copy_``, ``mul_``, ``w[:] = t``, also through
        ``.data``) store into ``values`` and raise if they would leave a nonzero outside the pattern.
        Under torch.compile it is the dense weight itself (traceable; the graph builds it if used)."""
        if torch.compiler.is_compiling():
            return self.dense_weight()
        return SparseWeightView(self)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":  # nn.Module would store it beside the pattern, where the forward never looks
            if not isinstance(value, torch.Tensor):
                raise AttributeError(f"{type(self).__name__}.weight can only be assigned a tensor of shape "
                                     f"{tuple(self.weight_shape)} (written into the sparse values), got "
                                     f"{type(value).__name__}")
            dense = value.materialize() if isinstance(value, SparseWeightView) else value
            self._write_dense(dense, "weight")
            if isinstance(value, nn.Parameter):
                self.values.requires_grad_(value.requires_grad)
            return
        if name == "values" and "pattern" in self._modules:
            self._check_values(value)
        super().__setattr__(name, value)

    def _check_values(self, values) -> None:
        """``values`` are the pattern's nonzeros in CSR order: any other size or layout computes a wrong
        weight (a (nnz, 2) tensor can even pass for a full pattern's nnz on the dense path)."""
        nnz, device = self.pattern.nnz, self.pattern.col_idx.device
        if not isinstance(values, nn.Parameter) or values.shape != (nnz,) or not values.is_floating_point() \
                or values.device != device:
            got = (f"{type(values).__name__} of {values.dtype}, shape {tuple(values.shape)} on {values.device}"
                   if isinstance(values, torch.Tensor) else type(values).__name__)
            raise ValueError(f"{type(self).__name__}.values must be a floating-point nn.Parameter of shape ({nnz},) "
                             f"(the pattern's nnz) on {device}, got {got}; change the pattern with set_pattern or "
                             "update_pattern_")

    # -- state_dict: values, row_ptr, col_idx (and bias); derived data is rebuilt ------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The weight shape goes into the layer's metadata (kept by torch.save with the state dict): a
        # 12-column pattern is also a valid 16-column one, so only the shape tells them apart.
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]]["weight_shape"] = tuple(self.weight_shape)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "row_ptr"] = self.pattern.compact_row_ptr()
        destination[prefix + "col_idx"] = self.pattern.col_idx if keep_vars else self.pattern.col_idx.detach()

    def check_state(self, state_dict, prefix: str = "", local_metadata: Optional[dict] = None) -> List[str]:
        """The errors loading this layer's entries of ``state_dict`` (under ``prefix``) would raise, without
        loading anything: what ``load_state_dict`` of a whole model checks for every sparse layer before
        it loads any (see ``check_model_state``)."""
        return self._plan_load(state_dict, prefix, local_metadata or {})[0]

    def _plan_load(self, state_dict, prefix, local_metadata):
        """(errors, entries found, new pattern or None, whether it changes the pattern)."""
        owner = f"{type(self).__name__} ({prefix[:-1] or 'root'})"
        errors = []
        got = {name: state_dict[prefix + name] for name in _SAVED + ("bias",) if prefix + name in state_dict}
        for name, t in got.items():
            if not isinstance(t, torch.Tensor):
                errors.append(f'While copying the parameter named "{prefix}{name}", expected torch.Tensor from '
                              f"checkpoint but received {type(t)}")
        new_pattern = None
        saved_shape = local_metadata.get("weight_shape")
        if saved_shape is not None and tuple(saved_shape) != tuple(self.weight_shape):
            errors.append(f"size mismatch for {prefix}row_ptr/col_idx/values: the checkpoint holds a weight of shape "
                          f"{tuple(saved_shape)}, the shape in current model is {tuple(self.weight_shape)}")
        if not errors and ("row_ptr" in got) != ("col_idx" in got):
            have, lack = ("row_ptr", "col_idx") if "row_ptr" in got else ("col_idx", "row_ptr")
            errors.append(f"{owner}: the checkpoint has {prefix}{have} but not {prefix}{lack}; the pattern loads "
                          "whole")
        elif not errors and "row_ptr" in got:
            try:
                new_pattern = SparsePattern.from_csr(f"{owner}: checkpoint pattern", self.weight_shape,
                                                     got["row_ptr"], got["col_idx"], self._pattern_block(),
                                                     self.values.device)
            except ValueError as exc:
                errors.append(str(exc))
        changes_pattern = new_pattern is not None and not self.pattern.same_as(new_pattern)
        nnz = new_pattern.nnz if new_pattern is not None else self.nnz
        if not errors:
            values = got.get("values")
            if values is not None:
                if values.shape != (nnz,):
                    what = "the checkpoint's pattern" if new_pattern is not None else "the layer's pattern (kept)"
                    errors.append(f"size mismatch for {prefix}values: copying a param with shape "
                                  f"{tuple(values.shape)} from checkpoint, the shape in current model is ({nnz},) "
                                  f"(nnz of {what})")
                elif not values.is_floating_point():
                    errors.append(f"{owner}: {prefix}values must be floating point, got {values.dtype}")
            elif changes_pattern:
                errors.append(f"{owner}: the checkpoint changes the pattern but has no {prefix}values; the "
                              "pattern and its values load together")
        bias = got.get("bias")
        if bias is not None and self.bias is not None and not errors and bias.shape != self.bias.shape:
            errors.append(f"size mismatch for {prefix}bias: copying a param with shape {tuple(bias.shape)} from "
                          f"checkpoint, the shape in current model is {tuple(self.bias.shape)}")
        return errors, got, new_pattern, changes_pattern

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """All or nothing: every entry of this layer is checked (pattern valid for this weight shape,
        values and bias sizes) before any is applied; a rejected state leaves the layer as it was."""
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        errors, got, new_pattern, changes_pattern = self._plan_load(state_dict, prefix, local_metadata)
        bias = got.get("bias")
        for name in _SAVED + (("bias",) if self.bias is not None else ()):
            if name not in got:
                missing_keys.append(prefix + name)
        known = set(_SAVED) | set(_LEGACY_DERIVED) | ({"bias"} if self.bias is not None else set())
        for key in state_dict:
            if key.startswith(prefix):
                rest = key[len(prefix):]
                if rest not in known and rest.split(".", 1)[0] not in self._modules:
                    unexpected_keys.append(key)
        if errors:
            error_msgs.extend(errors)
            # Only a hook on the model being loaded sees the whole state dict before any module loads (torch
            # loads module by module and reports at the end), and only models from sparsify carry one.
            if _PARTIAL_LOAD_HINT not in error_msgs:
                error_msgs.append(_PARTIAL_LOAD_HINT)
            return
        with torch.no_grad():
            if "values" in got:
                values = got["values"].to(self.values.device, self.values.dtype)
                if values.shape == self.values.shape:
                    self.values.copy_(values)
                else:  # keep the Parameter object: an optimizer built before loading holds it
                    self.values.data = values.clone()
                    self.values.grad = None
            if bias is not None and self.bias is not None:
                self.bias.copy_(bias)
        if changes_pattern:
            self.pattern.load_(new_pattern)

    def extra_repr_density(self) -> str:
        fmt = f", format='bsr', block={self.block}" if self.format == "bsr" else ""
        return f"density={self.density:.4f}, nnz={self.nnz}{fmt}"


_PARTIAL_LOAD_HINT = ("the other modules loaded their entries (torch loads module by module); to load all or nothing, "
                      "check first with sparsekern.nn.base.check_model_state(model, state_dict), or register "
                      "sparsekern.nn.base.load_all_or_nothing as the model's load_state_dict pre-hook (models "
                      "returned by sparsify have it)")


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


def check_model_state(model: nn.Module, state_dict, prefix: str = "") -> List[str]:
    """Every error ``model.load_state_dict(state_dict)`` would report for its sparse layers (invalid or
    mismatched pattern, values or bias) and for the shapes of its other parameters and buffers, found
    without loading anything. ``prefix``: where the model's entries start in ``state_dict``."""
    metadata = getattr(state_dict, "_metadata", None) or {}
    errors: List[str] = []
    for name, module in model.named_modules(prefix=prefix[:-1]):
        at = f"{name}." if name else ""
        if isinstance(module, SparseWeightMixin):
            errors += module.check_state(state_dict, at, metadata.get(name, {}))
            continue
        for key, t in list(module._parameters.items()) + [
                (k, b) for k, b in module._buffers.items() if k not in module._non_persistent_buffers_set]:
            got = state_dict.get(at + key)
            if t is None or not isinstance(got, torch.Tensor) or torch.nn.parameter.is_lazy(t):
                continue
            if got.shape != t.shape:
                errors.append(f"size mismatch for {at}{key}: copying a param with shape {tuple(got.shape)} "
                              f"from checkpoint, the shape in current model is {tuple(t.shape)}")
    return errors


def load_all_or_nothing(module: nn.Module, state_dict, prefix, local_metadata, strict, missing_keys,
                        unexpected_keys, error_msgs) -> None:
    """A load_state_dict pre-hook (``sparsify`` puts it on the model it returns): checks the whole state
    dict before any module loads, so a bad entry anywhere leaves every layer as it was (torch alone
    loads module by module and reports the errors at the end)."""
    errors = check_model_state(module, state_dict, prefix)
    if errors:
        raise RuntimeError(f"Error(s) in loading state_dict for {type(module).__name__} (nothing was loaded):\n\t"
                           + "\n\t".join(errors))
