"""Time sparsekern's ops against dense PyTorch, torch.sparse and SparseProp, in one process.

Run as ``sparsekern bench [--quick] [--cases linear conv topk] [--threads N] [--output FILE]``
or ``python -m sparsekern.bench.ops`` with the same options. Each implementation is first
run once and checked against dense PyTorch (output and gradients), then timed with the others side by side by
``bench.timing.measure_interleaved``.
"""
from __future__ import annotations

import datetime
import gc
import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import sparsekern
from sparsekern import allocator
from sparsekern.nn import kernel_choice, random_mask

from . import peers
from .peers import DENSE, SPARSEKERN, SPARSEPROP, TORCH_SPARSE, Impl
from .report import (
    FAILED,
    NO_BACKWARD,
    NOT_APPLICABLE,
    UNAVAILABLE,
    WRONG,
    Row,
    command_line,
    host,
    markdown,
    print_table,
)
from .timing import Budget, Timing, forward_fn, measure_interleaved, train_step_fn

GROUPS = ("linear", "conv", "topk")


@dataclass(frozen=True)
class Sizes:
    linear: Tuple[int, int, int]  # in_features, out_features, batch
    conv: Tuple[Tuple[int, int, int], ...]  # (channels, height = width, batch), 3x3 kernel, padding 1
    topk_n: int


SIZES = {
    "full": Sizes(linear=(4096, 4096, 256), conv=((64, 32, 64), (256, 8, 64)), topk_n=10 ** 7),
    # Smoke tests. SparseProp's conv (vectorizing_over_on=False) is wrong for batches not a multiple of 8.
    "tiny": Sizes(linear=(64, 48, 16), conv=((8, 8, 8), (16, 4, 8)), topk_n=10_000),
}
LINEAR_DENSITIES = {"full": (0.5, 0.35, 0.2, 0.1, 0.05, 0.01), "quick": (0.1, 0.01)}
CONV_DENSITIES = (0.1, 0.01)
TOPK_FRACTIONS = (0.01, 0.1)
BUDGETS = {"full": Budget(min_run_time=0.5, max_run_time=3.0), "quick": Budget(min_run_time=0.1, max_run_time=0.5),
           "tiny": Budget(min_run_time=0.002, max_run_time=0.02)}
TOLERANCE = 2e-3  # max |a - b| / max |dense|, over the output and every gradient


@dataclass
class Case:
    name: str
    inputs: Tuple[torch.Tensor, ...]
    impls: List[Impl]  # the first is the dense baseline every other is checked against
    grad_out: Optional[torch.Tensor]  # None: no backward (topk)
    missing: Dict[str, str] = field(default_factory=dict)  # column -> marker for columns no impl fills
    # What is compared between implementations: by default (output, *gradients).
    outcome: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    @property
    def passes(self) -> Tuple[str, ...]:
        return ("fwd",) if self.grad_out is None else ("fwd", "fwd+bwd")


# -- cases ----------------------------------------------------------------------------------
def _masked(module: nn.Module, density: float) -> torch.Tensor:
    """Zero ``module``'s weight outside a random mask of ``density``; return the mask."""
    mask = random_mask(module.weight.shape, density, torch.Generator().manual_seed(0))
    with torch.no_grad():
        module.weight.mul_(mask)
    return mask


def _sparseprop_missing(impls: List[Impl]) -> Dict[str, str]:
    return {} if any(i.column == SPARSEPROP for i in impls) else {SPARSEPROP: UNAVAILABLE}


def linear_case(in_features: int, out_features: int, batch: int, density: float) -> Case:
    torch.manual_seed(0)
    module = nn.Linear(in_features, out_features)
    mask = _masked(module, density)
    impls = [peers.dense(module, mask), peers.sparsekern_module(module, mask), *peers.torch_sparse_linear(module, mask),
             *peers.sparseprop_linear(module, mask)]
    x = torch.randn(batch, in_features, requires_grad=True)
    return Case(f"SparseLinear {out_features}x{in_features} b{batch} d={density}", (x,), impls,
                torch.randn(batch, out_features), _sparseprop_missing(impls))


def conv_case(channels: int, hw: int, batch: int, density: float) -> Case:
    torch.manual_seed(0)
    module = nn.Conv2d(channels, channels, 3, padding=1)
    mask = _masked(module, density)
    impls = [peers.dense(module, mask), peers.sparsekern_module(module, mask), *peers.sparseprop_conv2d(module, mask)]
    x = torch.randn(batch, channels, hw, hw, requires_grad=True)
    return Case(f"SparseConv2d C={channels} {hw}x{hw} b{batch} 3x3 d={density}", (x,), impls,
                torch.randn(batch, channels, hw, hw), {TORCH_SPARSE: NOT_APPLICABLE, **_sparseprop_missing(impls)})


def topk_case(n: int, fraction: float) -> Case:
    torch.manual_seed(0)
    scores = torch.randn(n)
    k = int(n * fraction)
    impls = [Impl(DENSE, lambda s: torch.topk(s, k, sorted=False).indices),
             Impl(SPARSEKERN, lambda s: sparsekern.ops.topk_select(s, k))]
    # Indices may differ among tied scores; the selected scores may not.
    return Case(f"topk_select n={n:.0e} k={fraction:.0%}".replace("e+0", "e"), (scores,), impls, None,
                outcome=lambda idx: torch.sort(scores[idx]).values)


def case_builders(sizes: str, quick: bool, groups: Sequence[str]) -> List[Callable[[], Case]]:
    """One builder per case, so that only one case's tensors are alive at a time."""
    s = SIZES[sizes]
    builders = []
    if "linear" in groups:
        builders += [lambda d=d: linear_case(*s.linear, d) for d in LINEAR_DENSITIES["quick" if quick else "full"]]
    if "conv" in groups:
        builders += [lambda c=c, d=d: conv_case(*c, d) for c in s.conv for d in CONV_DENSITIES]
    if "topk" in groups:
        builders += [lambda f=f: topk_case(s.topk_n, f) for f in TOPK_FRACTIONS]
    return builders


# -- checking and timing --------------------------------------------------------------------
def _outcome(case: Case, impl: Impl) -> Tuple[List[torch.Tensor], Optional[str]]:
    """Output and gradients of one forward + backward of ``impl``, and why backward did not run
    (None if it did). A peer's unsupported backward is reported, sparsekern's is an error."""
    leaves = [t for t in (*case.inputs, *impl.params) if t.requires_grad]
    for t in leaves:
        t.grad = None
    out = impl.forward(*case.inputs)
    result = [case.outcome(out) if case.outcome else out.detach().clone()]
    if case.grad_out is None:
        return result, "no backward pass"
    try:
        torch.autograd.backward(out, case.grad_out)
    except (RuntimeError, NotImplementedError) as exc:
        if impl.column == SPARSEKERN:
            raise
        return result, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    grads = [t.grad for t in case.inputs if t.requires_grad] + [impl.weight_grad()]
    if impl.bias is not None:
        grads.append(impl.bias.grad)
    return result + [g.detach().clone() for g in grads], None


def _relative_error(got: List[torch.Tensor], want: List[torch.Tensor]) -> float:
    """max |a - b| / max |b| over the output and the gradients."""
    err = 0.0
    for a, b in zip(got, want):
        if a.shape != b.shape:
            return math.inf
        if b.numel():
            err = max(err, float((a.to(b.dtype) - b).abs().max()) / max(float(b.abs().max()), 1e-12))
    return err


def run_case(case: Case, budget: Budget) -> Tuple[List[Row], bool]:
    """The case's rows, and whether sparsekern's results matched dense. Every implementation that ran and matched is
    timed with the others side by side, pass by pass (``measure_interleaved``: one timed call each per round, each
    after an untimed call of its own, as back-to-back calls find the caches), so that the ratios a row gives compare
    calls made over the same seconds of a host whose speed drifts."""
    rows = {p: Row(case.name, p, dict(case.missing)) for p in case.passes}
    first_notes = rows[case.passes[0]].notes
    sparsekern_ok = True
    reference = None
    timed: Dict[str, List[Tuple[Impl, Callable[[], object]]]] = {p: [] for p in case.passes}
    for impl in case.impls:
        try:
            result, no_backward = _outcome(case, impl)
        except Exception as exc:  # say so and time the others (a peer may not support this case)
            for row in rows.values():
                if not isinstance(row.times.get(impl.column), Timing):
                    row.times[impl.column] = FAILED
            first_notes.append(f"{impl.column}: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
            sparsekern_ok &= impl.column != SPARSEKERN
            continue
        reference = result if reference is None else reference
        err = _relative_error(result, reference)
        if err > TOLERANCE:  # a wrong result's time means nothing: not timed
            first_notes.append(f"{' '.join((impl.column, impl.variant)).strip()}: differs from dense "
                               f"(relative error {err:.1e}), not timed")
            sparsekern_ok &= impl.column != SPARSEKERN
            for row in rows.values():
                row.times.setdefault(impl.column, WRONG)
            continue
        for pass_name, row in rows.items():
            if pass_name == "fwd+bwd" and no_backward:
                row.times.setdefault(impl.column, NO_BACKWARD)
                row.notes.append(f"{impl.column} backward: {no_backward}")
                continue
            timed[pass_name].append((impl, forward_fn(impl.forward, case.inputs) if pass_name == "fwd" else
                                     train_step_fn(impl.forward, case.inputs, impl.params, case.grad_out)))
    for pass_name, impls in timed.items():
        if not impls:
            continue
        row = rows[pass_name]
        timings = measure_interleaved({str(i): fn for i, (_, fn) in enumerate(impls)}, budget, lead=1)
        best: Dict[str, Tuple[Timing, str]] = {}  # column -> (its fastest impl's timing, that impl's variant)
        for i, (impl, _) in enumerate(impls):
            if impl.column not in best or timings[str(i)].median < best[impl.column][0].median:
                best[impl.column] = (timings[str(i)], impl.variant)
        for column, (timing, variant) in best.items():
            row.times[column] = timing
            if variant:
                row.notes.append(f"{column}: fastest was {variant}")
        # The kernel our layer ran in those calls (kernel_choice may pick the dense one at a high density).
        for impl, _ in impls:
            if impl.column == SPARSEKERN and isinstance(impl.forward, nn.Module):
                row.notes.append(f"{SPARSEKERN} kernel: {kernel_choice.last_kernel(impl.forward) or '?'}")
    return list(rows.values()), sparsekern_ok


# -- entry point ----------------------------------------------------------------------------
def _backends() -> str:
    cpu = torch.device("cpu")
    names = {op: sparsekern.ops.get_backend(op, cpu) for op in ("sparse_linear", "sparse_conv2d", "topk_select")}
    if len(set(names.values())) == 1:
        return next(iter(names.values()))
    return ", ".join(f"{k}={v}" for k, v in names.items())


def main(quick: bool = False, cases: Optional[Sequence[str]] = None, output: Optional[str] = None,
         threads: Optional[int] = None, sizes: str = "full") -> int:
    groups = tuple(cases) if cases else GROUPS
    unknown = [g for g in groups if g not in GROUPS]
    if unknown or sizes not in SIZES:
        print(f"sparsekern bench: cases must be among {GROUPS} and sizes among {tuple(SIZES)}, "
              f"got cases={list(groups)} sizes={sizes!r}", file=sys.stderr)
        return 2
    if threads is not None:
        torch.set_num_threads(threads)  # SparseProp shares torch's OpenMP runtime, so this sets its threads too
    budget = BUDGETS["tiny" if sizes == "tiny" else "quick" if quick else "full"]
    if peers.sparseprop_status() and any(g in groups for g in ("linear", "conv")):
        print(f"SparseProp is not importable ({peers.sparseprop_status()}); its column shows {UNAVAILABLE}. "
              "To compare: pip install pybind11 scipy && pip install --no-build-isolation sparseprop", file=sys.stderr)

    rows: List[Row] = []
    all_ok = True
    builders = case_builders(sizes, quick, groups)
    for i, build in enumerate(builders, 1):
        case = build()
        print(f"[{i}/{len(builders)}] {case.name}", file=sys.stderr, flush=True)
        case_rows, ok = run_case(case, budget)
        rows += case_rows
        all_ok &= ok
        del case
        gc.collect()

    meta = {
        "command": f"`{command_line('sparsekern.bench.ops')}`",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "CPU": host(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "sparsekern backend": _backends(), "allocator": allocator.describe(),
        "SparseProp": peers.sparseprop_version() or f"not importable ({peers.sparseprop_status()})",
        "timing": ("bench.timing.measure_interleaved: a case's implementations side by side, one timed call each "
                   f"per round after an untimed one of its own (min_run_time={budget.min_run_time}, "
                   f"max_run_time={budget.max_run_time}, IQR/median < {budget.threshold}), median"),
    }
    print_table(rows, meta)
    if output:
        with open(output, "w") as f:
            f.write(markdown(rows, meta))
        print(f"wrote {output}", file=sys.stderr)
    if not all_ok:
        print("sparsekern bench: sparsekern's results did not match dense PyTorch (see notes)", file=sys.stderr)
    return 0 if all_ok else 1


def _cli(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sparsekern.bench.ops``: ``sparsekern bench`` without a mode flag (one parser, in sparsekern.cli)."""
    from sparsekern.cli import build_parser
    args = build_parser().parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    modes = [flag for flag, on in (("--targets", args.targets), ("--gpu", args.gpu),
                                   ("--models", args.models is not None), ("--train", args.train)) if on]
    if modes:
        args.parser.error(f"argument {modes[0]}: python -m sparsekern.bench.ops runs the op benchmarks only; "
                          f"run sparsekern bench {modes[0]}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(_cli())
