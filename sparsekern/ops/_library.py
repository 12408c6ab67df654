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
    (0 runs every product dense, above 1 none; default 0.3). A bad value warns and keeps the default."""
    try:
        torch.ops.sparsekern._set_dense_above(float(env))
    except (ValueError, RuntimeError) as exc:
        warnings.warn(f"SPARSEKERN_DENSE_ABOVE={env!r} ignored ({exc}); the dense fallback runs from density "
                      f"{torch.ops.sparsekern._dense_above()}", stacklevel=2)


if os.environ.get("SPARSEKERN_DENSE_ABOVE"):
    _apply_dense_above(os.environ["SPARSEKERN_DENSE_ABOVE"])
