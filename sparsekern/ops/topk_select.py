"""topk_select: exact O(n) selection of the k best scores among candidates (DST's drop and grow)."""
from typing import Optional

import torch

from . import _checks as check
from .dispatch import Op, declare, get_backend, implementation

OP = "topk_select"


def topk_select(scores: torch.Tensor, k: int, largest: bool = True,
                candidates: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Indices (int64, ascending) of the ``k`` largest (or smallest) ``scores`` among ``candidates``.

    Exact, deterministic: among equal scores at the threshold the lower index wins.
    NaN scores among the candidates raise.
    """
    check.tensor(OP, "scores", scores, dim=1)
    check.floating(OP, "scores", scores)
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{OP}: k must be an int, got {type(k).__name__}")
    if not isinstance(largest, bool):
        raise TypeError(f"{OP}: largest must be a bool, got {type(largest).__name__}")
    n_candidates = scores.numel()
    if candidates is not None:
        check.tensor(OP, "candidates", candidates, dim=1)
        if candidates.dtype != torch.bool:
            raise TypeError(f"{OP}: candidates must be a bool tensor, got {candidates.dtype}")
        if candidates.shape != scores.shape:
            raise ValueError(f"{OP}: candidates must have {scores.numel()} entries like scores, "
                             f"got {candidates.numel()}")
        if candidates.device != scores.device:
            raise ValueError(f"{OP}: candidates is on {candidates.device} but scores is on {scores.device}")
        n_candidates = int(torch.count_nonzero(candidates))  # no int64 copy of the mask, unlike sum()
    if not 0 <= k <= n_candidates:
        raise ValueError(f"{OP}: k must lie in [0, {n_candidates}] (the number of candidates), got {k}")
    backend = get_backend(OP, scores.device)
    check.backend_dtype(OP, backend, "scores", scores)
    return implementation(OP, scores.device)(scores, k, largest, candidates)


def _fake(scores, k, largest=True, candidates=None):
    return scores.new_empty((k,), dtype=torch.int64)


declare(Op(OP, topk_select, fake=_fake, differentiable=False, triton="topk_select"))
