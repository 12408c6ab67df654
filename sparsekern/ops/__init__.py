"""The ops of sparsekern: one contract each (schemas in csrc/ops.cpp), dispatched by
``sparsekern.ops.dispatch``, with autograd formulas, fake kernels and autocast rules registered here."""
from . import _autocast, dispatch
from .dispatch import get_backend, set_backend
from .bsr import bsr_conv2d, bsr_linear, bsr_sddmm
from .gather import gather
from .masked_matmul import masked_matmul, masked_sddmm
from .sddmm import sddmm
from .sparse_conv2d import sparse_conv2d
from .sparse_linear import sparse_linear
from .spmm import spmm
from .topk_select import topk_select


def _register_all() -> bool:
    try:
        from . import _library  # noqa: F401
    except ImportError:
        if dispatch._global == "reference":
            return False  # reference-only use without the compiled kernels
        raise
    # Not `from . import spmm`: that returns the package attribute, i.e. the function of the same name.
    import importlib
    for name in ("spmm", "sddmm", "sparse_linear", "masked_matmul", "sparse_conv2d", "topk_select", "gather"):
        importlib.import_module(f"{__name__}.{name}").register()
    _autocast.register("sparsekern")
    dispatch.extension_loaded = True
    return True


def _register_triton() -> None:
    """Autograd formulas for the Triton ops (called by dispatch once triton_kernels has loaded)."""
    import importlib
    for name in ("spmm", "sddmm", "sparse_linear", "masked_matmul", "sparse_conv2d", "gather", "bsr"):
        importlib.import_module(f"{__name__}.{name}").register("sparsekern_triton")
    _autocast.register("sparsekern_triton")


HAS_EXTENSION = _register_all()

__all__ = ["bsr_linear", "bsr_sddmm", "bsr_conv2d", "spmm", "sddmm", "sparse_linear", "masked_matmul", "masked_sddmm", "sparse_conv2d", "topk_select", "gather",
           "set_backend", "get_backend", "HAS_EXTENSION"]
