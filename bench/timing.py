"""The one place that times anything: ``measure_interleaved`` over closures that are compared.

Every implementation of every case is timed side by side with the others it is compared against, with the
closures built by ``forward_fn`` (forward alone) and ``train_step_fn`` (forward + backward as a training step runs
them).
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Sequence

import torch


@dataclass(frozen=True)
class Budget:
    """How long ``measure_interleaved`` may time its closures (seconds)."""
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


def measure_interleaved(fns: Mapping[str, Callable[[], object]], budget: Budget,
                        min_rounds: int = 5, lead: int = 0) -> Dict[str, Timing]:
    """Median (and IQR) of each closure, timed in rounds that call every closure once, in an order
    rotated each round: what a ratio of two of them compares was measured side by side, so a machine
    that speeds up or slows down over the run (frequency, other tenants) moves both alike. Rounds go on
    until every closure has ``min_run_time`` of samples and IQR / median below the threshold, or any has
    ``max_run_time``. Single calls are timed (meant for closures of a millisecond or more); garbage
    collection is off while timing, as in ``timeit``.

    ``lead``: untimed calls of the same closure just before each timed one, so that a timed call finds the caches
    as its own previous call left them, as a training loop's step does, not as another closure left them. A
    sparse MLP step (784-1024-1024-10, batch 256, Intel, 2 threads) took 3.97 ms right after a dense step and 3.56
    ms right after its own (the dense step 10.20 and 10.07 ms); a ViT-S/16 step 195.7 and 195.1 ms."""
    keys = list(fns)
    samples: Dict[str, list] = {k: [] for k in keys}

    def settled() -> bool:
        if len(samples[keys[0]]) < min_rounds:
            return False
        if any(sum(v) >= budget.max_run_time for v in samples.values()):
            return True
        for v in samples.values():
            q = statistics.quantiles(v, n=4)
            if sum(v) < budget.min_run_time or (q[2] - q[0]) > budget.threshold * statistics.median(v):
                return False
        return True

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        r = 0
        while not settled():
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                for _ in range(lead):
                    fns[k]()
                t0 = time.perf_counter()
                fns[k]()
                samples[k].append(time.perf_counter() - t0)
            r += 1
    finally:
        if was_enabled:
            gc.enable()
    out = {}
    for k, v in samples.items():
        q = statistics.quantiles(v, n=4)
        out[k] = Timing(statistics.median(v), q[2] - q[0], len(v))
    return out


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
