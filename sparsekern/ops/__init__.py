"""The ops of sparsekern: one contract each (schemas in csrc/ops.cpp), dispatched by
``sparsekern.ops.dispatch``, with autograd formulas and fake kernels registered here."""
from .dispatch import get_backend, set_backend
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
        from . import dispatch
        if dispatch._global == "reference":
            return False  # reference-only use without the compiled kernels
        raise
    from . import masked_matmul as _mm, sddmm as _sd, sparse_conv2d as _sc, sparse_linear as _sl
    from . import spmm as _sp, topk_select as _tk
    for module in (_sp, _sd, _sl, _mm, _sc, _tk):
        module.register()
    return True


HAS_EXTENSION = _register_all()

__all__ = ["spmm", "sddmm", "sparse_linear", "masked_matmul", "masked_sddmm", "sparse_conv2d", "topk_select",
           "set_backend", "get_backend", "HAS_EXTENSION"]
