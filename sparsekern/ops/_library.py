"""Loads the compiled kernels (sparsekern._C) that register the op schemas."""
try:
    from .. import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "sparsekern: the compiled extension sparsekern._C is missing; install the package with "
        "`pip install --no-build-isolation -e .` (or set SPARSEKERN_BACKEND=reference)") from exc
