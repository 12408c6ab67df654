"""Keep freed memory in the process, so that a training loop's buffers are reused, not page-faulted in afresh.

glibc's malloc (what torch's CPU allocator calls) takes a request from new ``mmap`` pages when it exceeds a
threshold that adapts at run time (128 KB, raised up to 32 MB as such blocks are freed; always above 32 MB),
and hands the top of its heap back to the system once more than twice that is free. A training step frees and
allocates the same buffers every step, and which of them come back as resident memory depends on the order of
the process's earlier allocations: two runs of one ConvNeXt-T step (64x64, batch 8, 2 threads) differed by
28,000 page faults per step (oneDNN's depthwise-conv weight gradient takes 38.5 MB three times a step, each
time from new pages in one process and from the heap in another): 60-90 ms of system time in a 110-250 ms step.
That decided a dense-vs-sparse ratio more than the kernels did, and it slows real training the same way.

``keep_freed_memory()`` fixes both thresholds (``mallopt``: blocks up to 1 GiB come from the heap, and the heap
is never trimmed), so a step's buffers stay resident from the second step on, as jemalloc or tcmalloc keep
them. The price: the process keeps the memory of its largest step until it exits (its resident size stays at
the peak instead of falling between steps). The same without code: ``MALLOC_MMAP_THRESHOLD_=1073741824
MALLOC_TRIM_THRESHOLD_=4294967295`` in the environment, or ``LD_PRELOAD`` of jemalloc/tcmalloc.
It changes the whole process, so the library never calls it by itself: ``sparsekern train`` and ``sparsekern
bench`` do (``--default-malloc`` leaves glibc's behaviour), and a training script may.
"""
from __future__ import annotations

import ctypes
import platform
import sys

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # bytes: requests below come from the heap
TRIM_THRESHOLD = 2 ** 31 - 1  # bytes of free heap top kept before any is returned (an int: the most mallopt takes)

_kept = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module's docstring). Returns True where it
    applied (Linux with glibc; calling again changes nothing), False elsewhere (other C libraries, macOS,
    Windows), where nothing is changed."""
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Both: setting either one stops the adaptive threshold, and the mmap one left at its 128 KB start faults more.
    _kept = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _kept


def kept() -> bool:
    """Whether ``keep_freed_memory`` applied in this process."""
    return _kept


def describe() -> str:
    """One line for a benchmark's header: how the process allocates CPU memory."""
    if _kept:
        return (f"glibc malloc keeps freed memory (keep_freed_memory: mmap above {MMAP_THRESHOLD >> 20} MiB, "
                "no trimming)")
    return "the C library's default malloc settings"
