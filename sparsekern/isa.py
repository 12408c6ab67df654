"""The vector width of the CPU CSR kernels (sparse_linear, spmm, sddmm, masked_matmul) and of the
tile loops of sparse_conv2d's pointwise and batch-innermost kernels.

``avx2`` runs the portable 32-byte loops (AVX2 on x86-64-v3, SSE on older x86, generic elsewhere);
``avx512`` runs the same loops on 64-byte vectors, on CPUs with AVX-512F/BW/DQ/VL only. The
environment variable ``SPARSEKERN_ISA=auto|avx2|avx512`` is read once, when the extension loads;
``auto`` (the default) picks the width measured faster on this CPU family. ``set``/``use`` change
it at run time, for tests and benchmarks: the choice is process-wide, not per thread.

Every other hot loop of the extension (and the 32-byte loops themselves) comes in three builds, x86-64-v4
(AVX-512), x86-64-v3 (AVX2+FMA) and baseline x86-64, picked per call: the best this CPU runs, held to the
x86-64-v3 build while the ISA is ``avx2``, so that an AVX-512 host under ``avx2`` runs (and tests) the code an
AVX2 host runs. ``build()`` says which.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

NAMES = ("auto", "avx2", "avx512")


def _op(name: str):
    # Registered by sparsekern._C (csrc/cpu/csr_isa.cpp), which `import sparsekern` loads.
    try:
        return getattr(torch.ops.sparsekern, name)
    except (AttributeError, RuntimeError):
        raise RuntimeError("sparsekern.isa: the compiled extension sparsekern._C is not built") from None


_CPUINFO = "/proc/cpuinfo"


def cpu_model() -> str:
    """The CPU's model name with its vendor, family, model and stepping (/proc/cpuinfo): what its speed ratios and
    measured kernel choices hold for. Under a hypervisor the name alone can be one string for several generations
    ("AMD EPYC" on Zen 3, Zen 4 and Zen 5 hosts alike, whose ratios against oneDNN differ up to 2x)."""
    fields = _cpuinfo(("model name", "vendor_id", "cpu family", "model", "stepping"))
    name = fields.get("model name")
    if name is None:
        import platform
        return platform.processor() or "unknown"
    ident = [fields[k] for k in ("vendor_id",) if k in fields]
    ident += [f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields]
    return f"{name} ({' '.join(ident)})" if ident else name


def _cpuinfo(keys) -> dict:
    """The first value of each of ``keys`` in /proc/cpuinfo (those it has; none where it cannot be read)."""
    found: dict = {}
    try:
        with open(_CPUINFO) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in keys and key not in found:
                    found[key] = value.strip()
                if len(found) == len(keys) or (not key and found):  # the first processor's block is enough
                    break
    except OSError:
        pass
    return found


_current: Optional[str] = None  # get()'s answer, kept by set(): the kernel choice reads it on every layer call


def get() -> str:
    """The ISA the CSR kernels run now: ``"avx2"`` or ``"avx512"``."""
    return _op("_isa")()


def current() -> str:
    """``get()`` without the call into the extension (as cheap as reading a variable); ``"none"`` without it."""
    global _current
    if _current is None:
        try:
            _current = get()
        except RuntimeError:
            return "none"
    return _current


BUILDS = ("baseline", "x86-64-v3", "x86-64-v4")


def build() -> str:
    """The build of the extension's cloned loops that runs now: ``"x86-64-v4"``, ``"x86-64-v3"`` or
    ``"baseline"``."""
    return BUILDS[_op("_clone_level")()]


def supported(name: str) -> bool:
    """Whether ``set(name)`` would succeed on this CPU and build."""
    return bool(_op("_isa_supported")(name))


def set(name: str) -> str:  # noqa: A001 (module-level function, used as sparsekern.isa.set)
    """Run the CSR kernels with ``name`` (``auto``, ``avx2`` or ``avx512``); returns the ISA now in effect."""
    global _current
    _current = _op("_set_isa")(name)
    return _current


@contextlib.contextmanager
def use(name: str) -> Iterator[str]:
    """``set(name)`` for the duration of a with-block, then the previous ISA again."""
    before = get()
    try:
        yield set(name)
    finally:
        set(before)
