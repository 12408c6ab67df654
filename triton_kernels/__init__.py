"""Triton kernels (installed as ``sparsekern.triton_kernels``), one file per op.

Each file defines its ops with ``torch.library.triton_op`` in the ``sparsekern_triton`` namespace,
with the signatures of the ``sparsekern`` schemas (csrc/ops.cpp), so ``torch.compile`` traces into
them. ``sparsekern.ops.dispatch`` loads them lazily (``load``) and routes CUDA tensors (or CPU
tensors under ``TRITON_INTERPRET=1``) here when the triton backend is chosen.

Import this package as ``sparsekern.triton_kernels``, never as a top-level ``triton_kernels``:
two module names for one file would define each op twice.
"""
import importlib

MODULES = ("gather", "spmm", "sddmm", "masked_matmul", "bsr", "sparse_conv2d", "topk_select")


def load() -> None:
    """Define every Triton op; ImportError when triton is not installed."""
    import triton  # noqa: F401 - ImportError here means no triton on this machine
    for name in MODULES:
        importlib.import_module(f"{__name__}.{name}")
