"""``.weight`` of a sparse module: a tensor that stands for the dense weight without holding it.

Its metadata (shape, dtype, device, requires_grad) is answered without building anything. Any
operation that reads its data gets the dense weight (zeros outside the pattern), built then and
differentiable in the module's ``values``. In-place operations (``mul_``, ``copy_``, ``zero_``,
``w[:] = t``, ``nn.init.*``, ``out=w``), also through ``.data`` or ``.detach()``, write through to
``values``; a write that leaves a nonzero outside the pattern raises and changes nothing.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

__all__ = ["SparseWeightView"]

_Tensor = torch.Tensor
# Answered from the view's own metadata: nothing is materialized.
_METADATA = {
    _Tensor.shape.__get__, _Tensor.dtype.__get__, _Tensor.device.__get__, _Tensor.ndim.__get__,
    _Tensor.layout.__get__, _Tensor.is_cuda.__get__, _Tensor.is_sparse.__get__, _Tensor.is_quantized.__get__,
    _Tensor.is_meta.__get__, _Tensor.is_leaf.__get__, _Tensor.requires_grad.__get__,
    _Tensor.size, _Tensor.dim, _Tensor.ndimension, _Tensor.numel, _Tensor.nelement, _Tensor.element_size,
    _Tensor.is_floating_point, _Tensor.is_complex, _Tensor.get_device, _Tensor.__len__,
}
_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                     "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}


def _name(func) -> str:
    return getattr(func, "__name__", "")


def _writes_in_place(func, kwargs) -> bool:
    name = _name(func)
    if name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("__")):
        return True
    out = (kwargs or {}).get("out")
    return isinstance(out, SparseWeightView) or (isinstance(out, (tuple, list))
                                                 and any(isinstance(o, SparseWeightView) for o in out))


class SparseWeightView(torch.Tensor):
    """The dense weight of ``module`` (a SparseLinear or SparseConv2d), built only when its data is
    used. ``detached``: ``.data`` / ``.detach()`` of it (no autograd link to ``values``)."""

    @staticmethod
    def __new__(cls, module, detached: bool = False):
        values = module.values
        view = torch.Tensor._make_wrapper_subclass(
            cls, tuple(module.weight_shape), dtype=values.dtype, device=values.device,
            requires_grad=values.requires_grad and not detached)
        view._module, view._detached = module, detached
        return view

    def materialize(self) -> torch.Tensor:
        """The dense weight as a plain tensor (differentiable in ``values`` unless detached)."""
        dense = self._module.dense_weight()
        return dense.detach() if self._detached else dense

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        view = args[0] if args and isinstance(args[0], SparseWeightView) else None
        if view is not None:
            if func in _METADATA:
                with torch._C.DisableTorchFunctionSubclass():
                    return func(*args, **kwargs)
            name = _name(func)
            if func == _Tensor.data.__get__ or name == "detach":
                return SparseWeightView(view._module, detached=True)
            if func == _Tensor.grad.__get__:
                grad = view._module.values.grad
                return None if grad is None else view._module.pattern.csr(grad).to_dense()
            if name == "requires_grad_" or func == _Tensor.requires_grad.__set__:
                flag = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
                view._module.values.requires_grad_(flag)
                return view if name == "requires_grad_" else None
            if func == _Tensor.data.__set__ or name in ("set_", "resize_", "resize_as_", "as_strided_"):
                raise RuntimeError(f"{type(view._module).__name__}.weight: {name or 'data ='} cannot change the "
                                   "storage of a sparse weight; write its entries (copy_, w[:] = t) or change the "
                                   "pattern with set_pattern(mask, dense)")
        if _writes_in_place(func, kwargs):
            return cls._write_through(func, args, kwargs)
        return func(*tree_map(_materialize, args), **tree_map(_materialize, kwargs))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Only what __torch_function__ did not intercept gets here (internal calls): it reads the data.
        def dense(a):
            return a._module.dense_weight().detach() if isinstance(a, SparseWeightView) else a
        return func(*tree_map(dense, args), **tree_map(dense, kwargs or {}))

    @classmethod
    def _write_through(cls, func, args, kwargs):
        """Run the in-place ``func`` on a dense copy, then store the result in ``values`` (checked to stay
        within the pattern)."""
        out = kwargs.get("out")  # else the written tensor comes first (self, or nn.init's tensor=)
        candidates = list(out) if isinstance(out, (tuple, list)) else [out] if out is not None else \
            list(args) + list(kwargs.values())
        target = next(a for a in candidates if isinstance(a, SparseWeightView))
        with torch.no_grad():
            dense = target._module.dense_weight().detach().clone()

            def swap(a):
                return dense if a is target else _materialize(a)
            func(*tree_map(swap, args), **tree_map(swap, kwargs))
            target._module._write_dense(dense, "weight")
        return target

    def __repr__(self, *, tensor_contents=None):
        return f"SparseWeightView({self.materialize()!r})"


def _materialize(a):
    return a.materialize() if isinstance(a, SparseWeightView) else a
