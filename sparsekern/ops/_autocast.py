"""Autocast rules of the ops.

Under ``torch.autocast`` the matmul-like ops (every op a module's forward reaches) run in the
autocast dtype, as ``F.linear`` and ``F.conv2d`` do: their floating inputs on the autocast's device
are cast to it (float64 is left alone, as autocast does), the kernels accumulate in float32, and
the output has the autocast dtype. The cast is an autograd op, so a float32 ``values`` Parameter
stays the master copy and gets a float32 gradient.

One rule for every backend: a kernel at the Autocast dispatch keys of the C++ schemas and of the
Triton ops (it reads the autocast dtype at call time; ``torch.library.register_autocast`` takes a
fixed one), and the same cast around the reference functions (``dispatch.implementation``).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch

DEVICE_TYPES = ("cpu", "cuda")
_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_libraries = []  # a registration lives as long as its Library


def dtype_for(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype of ``device_type`` now, or None outside autocast."""
    if device_type in DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _eligible(t, device_type: str) -> bool:
    return (isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type
            and t.dtype != torch.float64)


def effective_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``t`` enters the kernels with: its autocast dtype if autocast casts it."""
    dtype = dtype_for(t.device.type)
    return dtype if dtype is not None and _eligible(t, t.device.type) else t.dtype


def cast(args, device_type: str, dtype: torch.dtype) -> tuple:
    return tuple(a.to(dtype) if _eligible(a, device_type) else a for a in args)


def _kernel(op, device_type: str) -> Callable:
    keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _KEYS[device_type]))

    def kernel(_keyset, *args):
        with torch._C._ExcludeDispatchKeyGuard(keys):
            return op(*cast(args, device_type, torch.get_autocast_dtype(device_type)))
    return kernel


def register(lib: str, names: Sequence[str]) -> None:
    """Autocast kernels (CPU and CUDA) for the ops ``names`` of namespace ``lib`` (the ops declared
    with ``autocast=True``, see ``dispatch.Op``)."""
    library = torch.library.Library(lib, "IMPL")
    for name in names:
        op = getattr(getattr(torch.ops, lib), name).default
        for device_type in DEVICE_TYPES:
            library.impl(name, _kernel(op, device_type), _KEYS[device_type], with_keyset=True)
    _libraries.append(library)


def reference(fn: Callable, device_type: str) -> Callable:
    """``fn`` (a reference function) under the same rule: inputs cast, run with autocast off."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        dtype = dtype_for(device_type)
        if dtype is None:
            return fn(*args, **kwargs)
        with torch.autocast(device_type, enabled=False):
            return fn(*cast(args, device_type, dtype), **kwargs)
    return run
