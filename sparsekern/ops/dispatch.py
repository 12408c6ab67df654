"""The one place that decides which implementation of an op runs.

Order of precedence: ``set_backend(name, op=...)`` for one op, ``set_backend(name)``
for all ops, the ``SPARSEKERN_BACKEND`` environment variable, then the default of
the tensor's device (per op on CUDA). ``reference`` (pure PyTorch) is available everywhere.

Backends: ``cpp`` (csrc/cpu, CPU tensors), ``cuda`` (csrc/cuda, CUDA tensors, when the CUDA
extension was built), ``triton`` (triton_kernels/: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``, which is how the kernels are tested without a GPU), ``reference``.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import reference
from . import _autocast

OPS = ("spmm", "sddmm", "sparse_linear", "masked_matmul", "masked_sddmm", "sparse_conv2d", "topk_select", "gather",
       "bsr_linear", "bsr_sddmm")
# Kernels that exist only as a part of another op (its backward) follow that op's backend.
_PARENT = {"sparse_conv2d_backward_input": "sparse_conv2d", "sparse_conv2d_backward_weight": "sparse_conv2d"}
_ALL = ("cpp", "cuda", "triton", "reference")

# Default order on CUDA tensors, best first, among the backends present. To be set from
# `sparsekern bench --gpu` on a lent GPU; no GPU has measured it yet, so Triton comes first
# everywhere: its kernels' logic runs in CI (interpreter), the CUDA C++ kernels' only compiles.
# The Sputnik-style CUDA kernels are expected to win unstructured SpMM/SDDMM/top-k (Gale et al.,
# SC'20): swap those entries once a GPU confirms it.
_CUDA_ORDER: Dict[str, Tuple[str, ...]] = {op: ("triton", "cuda") for op in OPS}
_CUDA_ORDER.update({"bsr_linear": ("triton",), "bsr_sddmm": ("triton",)})
# Ops without a kernel of the C++ extension: `cpp` on the CPU means their CSR-engine composition.
_NO_CUDA_KERNEL = ("bsr_linear", "bsr_sddmm")

# Read once: the env var is the process default, set_backend() changes it at run time
# (reading os.environ inside a traced op would put it in torch.compile's guards).
_global: Optional[str] = os.environ.get("SPARSEKERN_BACKEND") or None
_per_op: Dict[str, str] = {}
extension_loaded = False  # set by sparsekern.ops once sparsekern._C has registered the kernels
_triton_state: Optional[bool] = None  # None: not tried yet
_triton_error = ""


def _check_name(name: str) -> None:
    if name not in _ALL:
        raise ValueError(f"sparsekern backend must be one of {_ALL}, got {name!r}")


def set_backend(name: Optional[str], op: Optional[str] = None) -> None:
    """Force backend ``name`` for ``op`` (or for every op); ``None`` restores the default."""
    global _global
    if op is not None and op not in OPS:
        raise ValueError(f"set_backend: op must be one of {OPS}, got {op!r}")
    if name is not None:
        _check_name(name)
    if op is None:
        _global = name
        if name is None:
            _per_op.clear()
    elif name is None:
        _per_op.pop(op, None)
    else:
        _per_op[op] = name


def triton_loaded() -> bool:
    """Import the Triton kernels once (lazily: importing triton is slow and needs TRITON_INTERPRET
    decided beforehand) and register their autograd formulas."""
    global _triton_state, _triton_error
    if _triton_state is None:
        try:
            from .. import triton_kernels
            triton_kernels.load()
        except ImportError as exc:
            _triton_state, _triton_error = False, str(exc)
        else:
            from . import _register_triton
            _register_triton()
            _triton_state = True
    return _triton_state


def cuda_kernels_built() -> bool:
    return extension_loaded and torch._C._dispatch_has_kernel_for_dispatch_key("sparsekern::spmm", "CUDA")


def available(op: str, device_type: str) -> Tuple[str, ...]:
    """The backends that can run ``op`` on ``device_type`` tensors, the default first."""
    op = _PARENT.get(op, op)
    if device_type == "cuda":
        present = {"cuda": cuda_kernels_built() and op not in _NO_CUDA_KERNEL,
                   "triton": triton_loaded()}
        return tuple(b for b in _CUDA_ORDER[op] if present[b]) + ("reference",)
    if device_type == "cpu":
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        extra = ("triton",) if (_per_op.get(op) == "triton" or _global == "triton") and interp and triton_loaded() \
            else ()
        return ("cpp",) + extra + ("reference",)
    return ("reference",)


def get_backend(op: str, device: torch.device) -> str:
    op = _PARENT.get(op, op)
    name = _per_op.get(op) or _global
    if name is not None:
        _check_name(name)
    if name == "cpp" and not extension_loaded:
        raise RuntimeError(f"sparsekern.{op}: the cpp backend needs the compiled extension sparsekern._C, which "
                           "is not built; run `pip install --no-build-isolation -e .` or use the reference backend")
    avail = available(op, device.type)
    if name is None:
        name = avail[0]
    if name not in avail:
        why = ""
        if name == "triton":
            why = (f" (triton failed to import: {_triton_error})" if _triton_state is False else
                   " (on CPU tensors the Triton kernels run only under TRITON_INTERPRET=1, set before import)")
        elif name == "cuda":
            why = " (the CUDA kernels of sparsekern._C were not built: needs a CUDA torch and nvcc at install time)"
        raise RuntimeError(f"sparsekern.{op}: backend {name!r} is not available for {device.type} tensors"
                           f"{why}; available: {', '.join(avail)}")
    if name == "cpp" and device.type != "cpu":
        raise RuntimeError(f"sparsekern.{op}: the cpp backend runs CPU tensors only, got {device.type}")
    return name


_references: Dict[Tuple[str, str], Callable] = {}


def reference_kernel(op: str, device_type: str) -> Callable:
    """The reference function of ``op``, under the autocast rule of the ops (``_autocast``)."""
    if op not in _autocast.OPS:
        return getattr(reference, op)
    key = (op, device_type)
    if key not in _references:
        _references[key] = _autocast.reference(getattr(reference, op), device_type)
    return _references[key]


def implementation(op: str, device: torch.device) -> Callable:
    """The callable that runs ``op`` for tensors on ``device``, with the op schema's signature."""
    name = get_backend(op, device)
    if name == "reference":
        return reference_kernel(op, device.type)
    if name == "triton":
        return getattr(torch.ops.sparsekern_triton, op)
    return getattr(torch.ops.sparsekern, op)  # cpp and cuda: the dispatcher picks the device's kernel



def kernel_for(op: str, like: torch.Tensor) -> Callable:
    """``implementation`` for tensors like ``like``: how backward formulas call other ops."""
    return implementation(op, like.device)
