"""The one place that times anything: ``torch.utils.benchmark.Timer`` over a closure.

Every implementation of every case is timed through ``measure``, with the closures
built by ``forward_fn`` (forward alone) and ``train_step_fn`` (forward + backward as a
training step runs them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.benchmark import Timer


@dataclass(frozen=True)
class Budget:
    """How long ``adaptive_autorange`` may measure one closure (seconds)."""
    min_run_time: float
    max_run_time: float
    threshold: float = 0.05  # stop once IQR / median is below this (and min_run_time has passed)


@dataclass(frozen=True)
class Timing:
    median: float  # seconds per call
    iqr: float
    runs: int  # measured blocks

    @property
    def ok(self) -> bool:
        return math.isfinite(self.median) and self.median > 0


def measure(fn: Callable[[], object], budget: Budget, label: str = "") -> Timing:
    """Median (and IQR) of ``fn()``, on the thread count torch is set to.

    Timer defaults to num_threads=1, so the current count is passed explicitly.
    """
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), label=label)
    m = timer.adaptive_autorange(threshold=budget.threshold, min_run_time=budget.min_run_time,
                                 max_run_time=budget.max_run_time)
    return Timing(m.median, m.iqr, len(m.times))


def forward_fn(forward: Callable, inputs: Sequence[torch.Tensor]) -> Callable[[], object]:
    """Forward alone, as in training: grad mode on, inputs requiring grad, graph built and dropped."""
    def run():
        return forward(*inputs)
    return run


def train_step_fn(forward: Callable, inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                  grad_out: torch.Tensor) -> Callable[[], None]:
    """Forward + backward with a fixed upstream gradient; grads set to None first (as
    ``zero_grad(set_to_none=True)`` does), so nothing accumulates across calls."""
    leaves = [t for t in (*inputs, *params) if t.requires_grad]

    def run():
        for t in leaves:
            t.grad = None
        torch.autograd.backward(forward(*inputs), grad_out)
    return run
