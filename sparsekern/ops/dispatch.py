"""The one place that decides which implementation of an op runs.

Order of precedence: ``set_backend(name, op=...)`` for one op, ``set_backend(name)``
for all ops, the ``SPARSEKERN_BACKEND`` environment variable, then the default of
the tensor's device. ``reference`` (pure PyTorch) is available everywhere.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

import torch

from .. import reference

OPS = ("spmm", "sddmm", "sparse_linear", "masked_matmul", "masked_sddmm", "sparse_conv2d", "topk_select", "gather")

# Backends per device type, default first. Later backends (triton, cuda) add themselves here.
_AVAILABLE: Dict[str, tuple] = {"cpu": ("cpp", "reference"), "cuda": ("reference",)}
# Read once: the env var is the process default, set_backend() changes it at run time
# (reading os.environ inside a traced op would put it in torch.compile's guards).
_global: Optional[str] = os.environ.get("SPARSEKERN_BACKEND") or None
_per_op: Dict[str, str] = {}
extension_loaded = False  # set by sparsekern.ops once sparsekern._C has registered the kernels
_ALL = ("cpp", "cuda", "triton", "reference")


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


def get_backend(op: str, device: torch.device) -> str:
    available = _AVAILABLE.get(device.type, ("reference",))
    name = _per_op.get(op) or _global or available[0]
    _check_name(name)
    if name == "cpp" and not extension_loaded:
        raise RuntimeError(f"sparsekern.{op}: the cpp backend needs the compiled extension sparsekern._C, which "
                           "is not built; run `pip install --no-build-isolation -e .` or use the reference backend")
    if name not in available:
        raise RuntimeError(f"sparsekern.{op}: backend {name!r} is not available for {device.type} tensors "
                           f"(available: {', '.join(available)})")
    return name


def implementation(op: str, device: torch.device) -> Callable:
    """The callable that runs ``op`` for tensors on ``device``, with the op schema's signature."""
    name = get_backend(op, device)
    if name == "reference":
        return getattr(reference, op)
    return getattr(torch.ops.sparsekern, op)
