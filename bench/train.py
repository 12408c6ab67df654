"""Time whole training steps of sparse models against the same models dense, in one process.

A step is forward, loss, backward and an SGD step (momentum 0.9, weight decay); the DST update
(RigL: dense gradient from the saved inputs, drop, grow, optimizer-state remap) is timed as the
extra cost of a step that updates, amortized over ``delta_t`` steps. Cases: an MLP 784-1024-1024-10
at batch 256 (densities 0.1 and 0.02) and a CIFAR ResNet-20 at batch 64 (density 0.1), every
Linear/Conv2d sparse at the same (uniform) density. Run as ``python -m sparsekern.bench.train
[--quick] [--threads N] [--output FILE]``; the three steps of a case are timed side by side by
``bench.timing.measure_interleaved``.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern import allocator
from sparsekern.models import get_model

from .report import command_line, host
from .timing import Budget, Timing, measure_interleaved

DELTA_T = 100
BUDGETS = {"full": Budget(min_run_time=1.0, max_run_time=5.0), "quick": Budget(min_run_time=0.2, max_run_time=1.0),
           "tiny": Budget(min_run_time=0.002, max_run_time=0.02)}


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    input_shape: Sequence[int]  # batch first
    density: float


def cases(sizes: str) -> List[Case]:
    if sizes == "tiny":  # smoke tests only
        return [Case("mlp 48-32-10 batch 16", lambda: get_model("mlp", image_size=7, hidden=(32,)), (16, 1, 7, 7), 0.1),
                Case("resnet20 8x8 batch 4", lambda: get_model("resnet20"), (4, 3, 8, 8), 0.1)]
    mlp = lambda: get_model("mlp", hidden=(1024, 1024))  # noqa: E731  784-1024-1024-10
    return [Case("mlp 784-1024-1024-10 batch 256", mlp, (256, 1, 28, 28), 0.1),
            Case("mlp 784-1024-1024-10 batch 256", mlp, (256, 1, 28, 28), 0.02),
            Case("resnet20 CIFAR batch 64", lambda: get_model("resnet20"), (64, 3, 32, 32), 0.1)]


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)


def _step_fn(model, optimizer, x, y, after: Callable[[], object] = lambda: None):
    def run():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        after()
    return run


@dataclass
class Result:
    case: str
    density: float
    dense: Timing
    sparse: Timing
    update: Timing  # a sparse step that also runs a RigL update

    def cells(self) -> List[str]:
        overhead = max(self.update.median - self.sparse.median, 0.0) / DELTA_T
        return [self.case, f"{1 - self.density:.0%}", f"{self.dense.median * 1e3:.2f}",
                f"{self.sparse.median * 1e3:.2f}", f"{self.dense.median / self.sparse.median:.2f}x",
                f"{self.update.median * 1e3:.2f}", f"{overhead / self.sparse.median:.1%}"]


HEADERS = ("case", "sparsity", "dense step ms", "sparse step ms", "speedup", "step + RigL update ms",
           f"DST overhead (amortized, delta_t={DELTA_T})")


def steps(case: Case) -> Tuple[Dict[str, Callable[[], None]], sparsekern.dst.RigL]:
    """The case's three step closures (dense, sparse, sparse with a RigL update) and the RigL that updates."""
    torch.manual_seed(0)
    dense = case.build()
    sparse = sparsekern.sparsify(copy.deepcopy(dense), case.density, distribution="uniform",
                                 generator=torch.Generator().manual_seed(0))
    x = torch.randn(*case.input_shape)
    y = torch.randint(0, 10, (case.input_shape[0],))
    dense_opt, sparse_opt = _optimizer(dense), _optimizer(sparse)
    algo = sparsekern.dst.RigL(sparse, sparse_opt, total_steps=10 ** 9, delta_t=DELTA_T)

    def next_is_update():
        algo.step_count = DELTA_T - 1  # so the next step() updates the patterns

    def update():
        algo.step()
        next_is_update()

    sparse_step = _step_fn(sparse, sparse_opt, x, y)

    def plain_sparse_step():
        # RigL sits just before an update, so unpaused it would tap every layer's output gradient and keep (x, grad)
        # for the dense gradient, which training does only in the step before an update: the update step pays that.
        with algo.paused():
            sparse_step()

    next_is_update()
    return {"dense": _step_fn(dense, dense_opt, x, y), "sparse": plain_sparse_step,
            "update": _step_fn(sparse, sparse_opt, x, y, after=update)}, algo


def run_case(case: Case, budget: Budget) -> Result:
    fns, algo = steps(case)
    # Side by side, each timed call after an untimed one of its own: a sparse step after an update step pays for the
    # new pattern in that untimed call, as the update step's own next call does in its timed one.
    times = measure_interleaved(fns, budget, lead=1)
    dense_time, sparse_time, update_time = times["dense"], times["sparse"], times["update"]
    if not algo.history or any(r["nnz"] != m.nnz for r, m in zip(algo.stats["layers"].values(),
                                                                   algo.layers.values())):
        raise RuntimeError(f"bench.train: {case.name}: the RigL update did not run as expected")
    return Result(case.name, case.density, dense_time, sparse_time, update_time)


def markdown(results: Sequence[Result], meta: dict) -> str:
    def line(cells):
        return "| " + " | ".join(cells) + " |"
    lines = ["# sparsekern training-step bench", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += [line(HEADERS), line(["---"] * len(HEADERS)), *(line(r.cells()) for r in results)]
    return "\n".join(lines + ["", "Median ms per step. Speedup: dense step / sparse step. DST overhead: (step with "
                              "update - step) / delta_t, as a fraction of a sparse step.", ""])


def main(quick: bool = False, output: Optional[str] = None, threads: Optional[int] = None,
         sizes: str = "full") -> int:
    if threads is not None:
        torch.set_num_threads(threads)
    budget = BUDGETS["tiny" if sizes == "tiny" else "quick" if quick else "full"]
    results = []
    for i, case in enumerate(cases(sizes), 1):
        print(f"[{i}] {case.name} at density {case.density}", file=sys.stderr, flush=True)
        results.append(run_case(case, budget))
    meta = {"command": f"`{command_line('sparsekern.bench.train')}`",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "CPU": host(), "threads": str(torch.get_num_threads()),
            "torch": torch.__version__,
            "sparsekern backend": sparsekern.ops.get_backend("sparse_linear", torch.device("cpu")),
            "allocator": allocator.describe()}
    text = markdown(results, meta)
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text)
    return 0


def _cli(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekern.bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    parser.add_argument("--output", default=None, help="also write the markdown table to this file")
    parser.add_argument("--sizes", choices=("full", "tiny"), default="full", help="tiny: smoke tests only")
    parser.add_argument("--default-malloc", action="store_true", help="leave the C library's malloc as it is")
    args = parser.parse_args(argv)
    if not args.default_malloc:
        allocator.keep_freed_memory()
    return main(quick=args.quick, output=args.output, threads=args.threads, sizes=args.sizes)


if __name__ == "__main__":
    sys.exit(_cli())
