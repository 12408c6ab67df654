"""The ops of sparsekern: one contract each (schemas in csrc/ops.cpp), dispatched by
``sparsekern.ops.dispatch``.

Every op file here (a module whose name does not start with ``_``) declares its ops with
``dispatch.declare``; this package imports each of them, exports the declared functions and registers
their fake kernels, autograd formulas and autocast rules. A new op is its op file, its reference, its
kernels and its tests: no list here or elsewhere to extend.
"""
import importlib
import pkgutil

from . import dispatch
from .dispatch import backend, get_backend, set_backend

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "dispatch":
        importlib.import_module(f"{__name__}.{_module.name}")
del _module
# Set after the imports: importing op file `spmm` binds the package attribute `spmm` to the module.
globals().update({name: op.function for name, op in dispatch.REGISTRY.items()})


def _register_all() -> bool:
    try:
        from . import _library  # noqa: F401
    except ImportError:
        if dispatch._env == "reference":
            return False  # reference-only use without the compiled kernels
        raise
    dispatch.register("sparsekern")
    dispatch.extension_loaded = True
    return True


HAS_EXTENSION = _register_all()

__all__ = [*dispatch.REGISTRY, "backend", "set_backend", "get_backend", "HAS_EXTENSION"]
