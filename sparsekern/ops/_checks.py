"""Argument checks at the op boundary: every message names the op, the argument,
what was expected and what was received."""
from __future__ import annotations

import torch

from ..sparse_matrix import SparseMatrix
from . import _autocast, dispatch

FLOAT_DTYPES = (torch.float32, torch.float64)
# fp16/bf16 accumulate in fp32; the CPU kernels run bf16 (not fp16).
_BACKEND_DTYPES = {"cpp": FLOAT_DTYPES + (torch.bfloat16,), "triton": (torch.float32, torch.float16, torch.bfloat16),
                   "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}
_OP_BACKEND_DTYPES = {("topk_select", "cpp"): FLOAT_DTYPES}  # exact selection: no bf16 kernel


def _run_dtype(op: str, t: torch.Tensor) -> torch.dtype:
    """The dtype t enters op's kernels with (the autocast dtype where autocast casts it)."""
    return _autocast.effective_dtype(t) if dispatch.autocasts(op) else t.dtype


def _dtype_of(op: str, t: torch.Tensor) -> str:
    dtype = _run_dtype(op, t)
    return str(t.dtype) if dtype == t.dtype else f"{t.dtype} ({dtype} under autocast)"


def tensor(op: str, name: str, t, dim=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() not in ((dim,) if isinstance(dim, int) else dim):
        raise ValueError(f"{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")
    return t


def floating(op: str, name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")


def sparse(op: str, name: str, W) -> SparseMatrix:
    if not isinstance(W, SparseMatrix):
        raise TypeError(f"{op}: {name} must be a sparsekern.SparseMatrix, got {type(W).__name__}")
    return W


def same(op: str, tensors: dict) -> None:
    """All named tensors share one device and one dtype (the dtype they run in: under autocast,
    float32 and the autocast dtype mix, as in F.linear)."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{op}: {n} is on {t.device} but {n0} is on {t0.device}")
        if _run_dtype(op, t) != _run_dtype(op, t0):
            raise TypeError(f"{op}: {n} has dtype {_dtype_of(op, t)} but {n0} has {_dtype_of(op, t0)}")


def backend_dtype(op: str, backend: str, name: str, t: torch.Tensor) -> None:
    allowed = _OP_BACKEND_DTYPES.get((op, backend), _BACKEND_DTYPES.get(backend))
    if allowed is not None and _run_dtype(op, t) not in allowed:
        raise TypeError(f"{op}: {name} has dtype {_dtype_of(op, t)}, which the {backend} backend does not support "
                        f"(supported: {', '.join(str(d) for d in allowed)}; SPARSEKERN_BACKEND=reference "
                        "runs any floating dtype)")


def linear_operands(op: str, x: torch.Tensor, W, bias) -> None:
    """x (..., k) floating, bias (m,) or None, for a weight W of m rows and k columns (CSR or BSR)."""
    tensor(op, "x", x)
    floating(op, "x", x)
    if x.dim() < 1 or x.shape[-1] != W.k:
        raise ValueError(f"{op}: x must have last dim {W.k} (W has {W.k} columns), got shape {tuple(x.shape)}")
    if bias is not None:
        tensor(op, "bias", bias, dim=1)
        if bias.shape[0] != W.m:
            raise ValueError(f"{op}: bias must have {W.m} entries (W has {W.m} rows), got {bias.shape[0]}")
    same(op, {"x": x, "W.values": W.values, "bias": bias})
