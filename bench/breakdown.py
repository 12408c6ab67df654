"""Where a training step's time goes, by kind of op: the step run under ``torch.profiler`` and every op's self
time (its own, not its children's, so nothing counts twice) summed per category.

The layers' kernels are one category among normalization, activations, the loss, attention, pooling, the
optimizer and the rest (adds, copies, autograd's own bookkeeping); ``outside ops`` is the step's time in no op at
all (Python, the autograd engine between nodes). Dense and sparse side by side show costs outside the kernels that
the kernels cause or move: ResNet-50's batch norms, for instance, took 62 ms of the dense step and 77 ms of the
sparse one on an Intel host (BENCHMARKS.md). Profiled times run a little longer than the bench's plain ones; the
table is for comparing categories and models, the step table for speedups.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Iterable, List, Tuple

import torch

# (category, substrings of an op's name, lowercase), in the table's order. The optimizer's ops are recognised by the
# optimizer's record_function range around them (``Optimizer.``).
CATEGORIES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("conv and linear layers", ("sparsekern", "convolution", "addmm", "aten::mm", "aten::linear", "aten::matmul",
                                "aten::conv", "conv2d", "mkldnn", "aten::im2col", "aten::col2im")),
    ("normalization", ("batch_norm", "batchnorm", "layer_norm", "layernorm", "group_norm", "groupnorm")),
    ("activations", ("relu", "threshold", "clamp", "gelu", "silu", "sigmoid", "tanh", "hardswish")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("attention", ("scaled_dot_product", "softmax", "bmm", "attention")),
    ("pooling", ("pool",)),
)
# The first category with a match takes the op, tried in this order: normalization and pooling before the layers,
# whose "sparsekern" takes our other ops (our batch norm and max pooling, sparsekern::_batch_norm_train and
# _max_pool2d_3x3s2 with their autograd nodes BatchNormTrain and MaxPool, are sparsekern ops too); the layers before
# the activations, as a sparse linear with its ReLU or GELU fused in (_sparse_linear_gelu_node, LinearGeluNode) is
# one kernel, mostly the layer's.
_MATCH_ORDER = sorted(CATEGORIES, key=lambda c: c[0] not in ("normalization", "pooling"))
OPTIMIZER = "optimizer"
OTHER = "other ops"
OUTSIDE = "outside ops"
ORDER = tuple(c for c, _ in CATEGORIES) + (OPTIMIZER, OTHER, OUTSIDE)


def category(name: str, ancestors: Iterable[str]) -> str:
    """The category of an op called ``name`` whose enclosing ranges are ``ancestors``."""
    if any(a.startswith("Optimizer.") for a in (name, *ancestors)):
        return OPTIMIZER
    low = name.lower()
    for cat, keys in _MATCH_ORDER:
        if any(k in low for k in keys):
            return cat
    return OTHER


def _ancestors(event) -> Iterable[str]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


def _profiled(step: Callable[[], None]) -> Dict[str, float]:
    """Seconds by category (ORDER) in one profiled call of ``step``."""
    totals = dict.fromkeys(ORDER, 0.0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    if events:
        # The thread that ran the step (its first op): ops an op starts on other threads overlap their parent's time.
        main = min(events, key=lambda e: e.time_range.start).thread
        for event in events:
            if event.thread == main:
                totals[category(event.name, _ancestors(event))] += event.self_cpu_time_total * 1e-6
    totals[OUTSIDE] = max(wall - sum(totals.values()), 0.0)
    return totals


def step_breakdowns(steps: Dict[str, Callable[[], None]], rounds: int = 3) -> Dict[str, Dict[str, float]]:
    """Seconds per step by category (ORDER) for each of ``steps``: the median over ``rounds`` profiled calls, each
    category on its own, after one profiled call each that is not counted. The steps take turns, one profiled call
    each per round in a rotated order, as ``bench.timing.measure_interleaved`` times them, so that a host that slows
    down for a while slows them alike (profiling each model's calls back to back, one ResNet-50 at 224x224 read
    245 ms of batch norm and 237 ms of activations, twice what its calls showed alone). The first profiled calls
    move the heap (the profiler's own memory): the steps after them take fresh pages, 15-50 thousand page faults a
    ResNet-50 224x224 step, counted in whichever ops allocate (its batch norms read 290-470 ms); they settle
    within a call or two. Every op's self time on the thread that ran the step counts once; ``outside ops`` is the
    step's wall time less those."""
    keys = list(steps)
    for key in keys:
        _profiled(steps[key])
    runs: Dict[str, List[Dict[str, float]]] = {key: [] for key in keys}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            runs[key].append(_profiled(steps[key]))
    return {key: {k: statistics.median(run[k] for run in runs[key]) for k in ORDER} for key in keys}
