"""Loads the compiled kernels (sparsekern._C) that register the op schemas, and hands them their
process-wide settings from the environment (read here, once, never inside a kernel)."""
import os
import warnings

import torch

try:
    from .. import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "sparsekern: the compiled extension sparsekern._C is missing; install the package with "
        "`pip install --no-build-isolation -e .` (or set SPARSEKERN_BACKEND=reference)") from exc


def _apply_dense_above(env: str) -> None:
    """SPARSEKERN_DENSE_ABOVE: the density from which the CPU CSR products run as a dense GEMM
    (0 runs every product dense, above 1 none; default 0.6). A bad value warns and keeps the default."""
    try:
        torch.ops.sparsekern._set_dense_above(float(env))
    except (ValueError, RuntimeError) as exc:
        warnings.warn(f"SPARSEKERN_DENSE_ABOVE={env!r} ignored ({exc}); the dense fallback runs from density "
                      f"{torch.ops.sparsekern._dense_above()}", stacklevel=2)


if os.environ.get("SPARSEKERN_DENSE_ABOVE"):
    _apply_dense_above(os.environ["SPARSEKERN_DENSE_ABOVE"])


def _apply_check_patterns(env: str) -> None:
    """SPARSEKERN_CHECK_PATTERNS=1: the CPU CSR ops check every pattern on every call, including the
    patterns sparse modules validated once and registered (a debugging aid: writes that bypass the
    version counter, e.g. through ``.data``, are not seen otherwise). 0 or unset: trust registered ones."""
    if env not in ("0", "1"):
        warnings.warn(f"SPARSEKERN_CHECK_PATTERNS={env!r} ignored (use 0 or 1)", stacklevel=2)
        return
    torch.ops.sparsekern._set_check_patterns(env == "1")


if os.environ.get("SPARSEKERN_CHECK_PATTERNS"):
    _apply_check_patterns(os.environ["SPARSEKERN_CHECK_PATTERNS"])
