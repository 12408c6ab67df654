"""Dynamic sparse training on compressed weights: ``Static``, ``SET``, ``SNFS``, ``RigL``.

    algo = sparsekern.dst.RigL(model, optimizer, total_steps)
    ...; loss.backward(); optimizer.step(); algo.step()
"""
from .algorithms import SET, SNFS, RigL, Static
from .base import DynamicSparseTraining
from .optim_state import check_optimizer_state, remap_entries, remap_optimizer_state

ALGORITHMS = {"static": Static, "set": SET, "snfs": SNFS, "rigl": RigL}


def create(name: str, model, optimizer, total_steps: int, **kwargs) -> DynamicSparseTraining:
    """The algorithm called ``name`` (one of ``ALGORITHMS``, case-insensitive)."""
    cls = ALGORITHMS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"sparsekern.dst: algorithm must be one of {tuple(ALGORITHMS)}, got {name!r}")
    return cls(model, optimizer, total_steps, **kwargs)


__all__ = ["Static", "SET", "SNFS", "RigL", "DynamicSparseTraining", "ALGORITHMS", "create", "remap_entries",
           "remap_optimizer_state", "check_optimizer_state"]
