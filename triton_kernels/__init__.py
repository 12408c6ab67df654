"""Triton kernels (installed as ``sparsekern.triton_kernels``), one file per op.

Each file defines its ops with ``torch.library.triton_op`` in the ``sparsekern_triton`` namespace,
with the signatures of the ``sparsekern`` schemas (csrc/ops.cpp), so ``torch.compile`` traces into
them. ``sparsekern.ops.dispatch`` loads them lazily (``load``) and routes CUDA tensors (or CPU
tensors under ``TRITON_INTERPRET=1``) here when the triton backend is chosen.

Import this package as ``sparsekern.triton_kernels``, never as a top-level ``triton_kernels``:
two module names for one file would define each op twice.
"""
import importlib
from typing import Iterable


def load(modules: Iterable[str]) -> None:
    """Define the Triton ops of ``modules`` (the ``triton`` fields of the op declarations, so this
    package keeps no list of its own); ImportError when triton is not installed."""
    import triton  # noqa: F401 - ImportError here means no triton on this machine
    for name in modules:
        importlib.import_module(f"{__name__}.{name}")
