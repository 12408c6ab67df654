"""Argument checks at the op boundary: every message names the op, the argument,
what was expected and what was received."""
from __future__ import annotations

import torch

from ..sparse_matrix import SparseMatrix

FLOAT_DTYPES = (torch.float32, torch.float64)
# fp16/bf16 accumulate in fp32 on the GPU backends; the CPU kernels run fp32/fp64.
_BACKEND_DTYPES = {"cpp": FLOAT_DTYPES, "triton": (torch.float32, torch.float16, torch.bfloat16),
                   "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16)}


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
    """All named tensors share one dtype and one device."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{op}: {n} is on {t.device} but {n0} is on {t0.device}")
        if t.dtype != t0.dtype:
            raise TypeError(f"{op}: {n} has dtype {t.dtype} but {n0} has {t0.dtype}")


def backend_dtype(op: str, backend: str, name: str, t: torch.Tensor) -> None:
    allowed = _BACKEND_DTYPES.get(backend)
    if allowed is not None and t.dtype not in allowed:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, which the {backend} backend does not support "
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
