"""Time training steps of real networks dense against sparse, with the bound their FLOPs allow and
every sparse layer timed alone on its real input.

A step is forward, cross-entropy, backward and an SGD step (momentum 0.9, weight decay), as in
``bench.train``. Each model is built once, copied and ``sparsify``-ed at density 0.1 with ERK and with
uniform per-layer densities (``init="dense"``: the dense model's weights, masked); dense and sparse run
in one process, each after warm-up steps (first-call caches and tuning are not timed), timed side by
side by ``bench.timing.measure_interleaved`` (rounds of one timed call each, order rotated; medians), so a
machine whose speed drifts during the run moves dense and sparse alike; each timed step follows an untimed step of
the same model, as in a training loop (a step right after another model's finds that model's data in the caches:
the sparse MLP's ran 3.97 ms there against 3.56 after its own). Each model runs in a process of its own
(spawned; ``--sizes tiny`` runs them in this one), as a training run would: run after the others in one process,
the MLP's sparse step measured 4.3-4.9 ms against 3.8-4.0 alone (Intel, 2 threads), its ratio 2.32-2.55x against
2.66-2.70x, as the heap that earlier, larger models left behind (``keep_freed_memory`` keeps it) served its
allocations. Per model and distribution the report gives:

- the step time dense and sparse, the speedup, and the peak tensor memory of a step. The sparse models run
  ``sparsify(..., fuse_activations=True, fast_modules=True)``; where the model has batch norms, max pooling,
  depthwise convs or narrow heads, a third copy, dense with ``sparsekern.fast_modules`` (what the sparse models run
  there), is timed beside them, and the speedup against it shows what the sparse layers give apart from those
  faster modules (the targets judge against the faster dense step, ``ModelResult.baseline``);
- the bound: ``share`` is the dense step's time spent in the layers that become sparse (each such layer's
  fwd+bwd timed alone on its input, captured by a forward hook, summed, over the step), ``flop fraction``
  the sparse layers' MACs over the dense layers' MACs; the bound is the dense step with each sparse layer's time
  scaled by its own density (``ModelResult.bound``), and "of bound" is the part of the bound's time saving achieved;
- per layer: weight shape, input shape, density, and its fwd+bwd dense and sparse on its captured input; a
  sparse layer that fuses the activation after it (``fuse_activations``: a ReLU or GELU) is compared with the
  dense layer followed by that activation (the share counts the layer alone);
- where a step's time goes by kind of op (layers, normalization, activations, ..., outside any op), dense and
  sparse side by side, from profiled steps (``bench.breakdown``): costs outside the kernels that sparse layers
  change show there.

``sparsekern bench --models [resnet50 resnet18 bert vit convnext mlp] [--quick] [--threads N] [--output FILE]``,
or ``python -m sparsekern.bench.models`` with the same options; ``--sizes tiny`` is for the smoke test.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import math
import multiprocessing
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

import sparsekern
from sparsekern import allocator, isa as sk_isa
from sparsekern.models import BertEncoder, ConvNeXt, ImageNetResNet, VisionTransformer, get_model
from sparsekern.models.resnet_imagenet import BasicBlock, Bottleneck
from sparsekern.nn import SparseWeightMixin, fast_modules, fused_activations, kernel_choice
from sparsekern.sparsity import sparsifiable_layers

from .breakdown import ORDER as BREAKDOWN_ORDER, step_breakdowns
from .ops import _backends
from .report import command_line, host
from .timing import Budget, Timing, measure_interleaved, train_step_fn
from .train import _optimizer, _step_fn

MODELS = ("resnet50", "resnet18", "bert", "vit", "convnext", "mlp")
FAST = "dense, fast modules"  # the step timing of the dense model with sparsekern.fast_modules
DENSITY = 0.1
DISTRIBUTIONS = ("erk", "uniform")


@dataclass(frozen=True)
class Settings:
    step: Budget
    layer: Budget
    warmup: int  # steps per model before timing; a layer, already run by those steps, gets one call
    # Rounds of steps at least, whatever the budget: a ResNet-50 224x224 round takes 3 s, so the step budget alone
    # stopped at 5 samples a model, whose median moved a ratio by 10 % on this project's shared VMs.
    step_rounds: int = 5
    breakdown_rounds: int = 4  # profiled steps per model for the breakdown by kind of op (medians)
    # Untimed steps of the same model before each timed one (measure_interleaved's lead): a training loop runs one
    # model step after step, and a small model's step right after another model's ran 11 % slower (the MLP's).
    step_lead: int = 1
    # A layer that reads below RECHECK_BELOW x its twin is timed again, with fresh samples and this budget, and judged
    # on those: the slowest of 54 layers is the lowest of 54 noisy ratios, biased low by picking it (a sparse layer
    # at density 1.0 runs the very ATen calls its twin runs and read 0.96x, with rounds of 0.81-1.12x; Zen 4).
    # Not only the ones below 1.0: a second chance for low readings alone would let a slow layer pass on one high
    # reading while another fails on one low one.
    recheck: Budget = Budget(1.0, 3.0)


SETTINGS = {"full": Settings(Budget(2.0, 8.0), Budget(0.2, 1.0), 3, step_rounds=9),
            "quick": Settings(Budget(0.3, 1.5), Budget(0.02, 0.1), 2, recheck=Budget(0.1, 0.5)),
            "tiny": Settings(Budget(0.002, 0.02), Budget(0.001, 0.005), 1, step_rounds=2, breakdown_rounds=1,
                             recheck=Budget(0.002, 0.01))}


@dataclass(frozen=True)
class Case:
    model: str  # one of MODELS
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], torch.Tensor]
    num_classes: int
    quick: bool = True  # also run with --quick


def _images(batch: int, size: int, channels: int = 3):
    return lambda g: torch.randn(batch, channels, size, size, generator=g)


def _tokens(batch: int, seq: int, vocab: int):
    return lambda g: torch.randint(0, vocab, (batch, seq), generator=g)


def cases(sizes: str) -> List[Case]:
    if sizes == "tiny":  # smoke tests: the same code paths, small widths
        return [Case("resnet50", "resnet50-style [1,1,1,1] 32x32 batch 2",
                     lambda: ImageNetResNet(Bottleneck, [1, 1, 1, 1], 10), _images(2, 32), 10),
                Case("resnet18", "resnet18-style [1,1,1,1] 32x32 batch 2",
                     lambda: ImageNetResNet(BasicBlock, [1, 1, 1, 1], 10), _images(2, 32), 10),
                Case("bert", "bert 1x32 seq 8 batch 2",
                     lambda: BertEncoder(2, vocab_size=50, hidden=32, layers=1, heads=2, ffn=64, max_len=8),
                     _tokens(2, 8, 50), 2),
                Case("vit", "vit 1x32 32x32 batch 2",
                     lambda: VisionTransformer(10, 3, 32, hidden=32, layers=1, heads=2, mlp=64), _images(2, 32), 10),
                Case("convnext", "convnext 1-1 8-16 32x32 batch 2", lambda: ConvNeXt(10, depths=(1, 1), dims=(8, 16)),
                     _images(2, 32), 10),
                Case("mlp", "mlp 49-32-10 batch 4", lambda: get_model("mlp", image_size=7, hidden=(32,)),
                     _images(4, 7, 1), 10)]
    return [Case("resnet50", "ResNet-50 112x112 batch 16", lambda: get_model("resnet50", 1000), _images(16, 112), 1000),
            Case("resnet50", "ResNet-50 224x224 batch 8", lambda: get_model("resnet50", 1000), _images(8, 224), 1000,
                 quick=False),
            Case("resnet50", "ResNet-50 64x64 batch 8", lambda: get_model("resnet50", 1000), _images(8, 64), 1000,
                 quick=False),
            Case("resnet18", "ResNet-18 224x224 batch 16", lambda: get_model("resnet18", 1000), _images(16, 224), 1000),
            Case("bert", "BERT-Small (4 layers, 512, FFN 2048, 8 heads) seq 128 batch 16",
                 lambda: get_model("bert-small", 2), _tokens(16, 128, 30522), 2),
            Case("vit", "ViT-S/16 112x112 batch 16", lambda: get_model("vit-s16", 1000, image_size=112),
                 _images(16, 112), 1000),
            Case("convnext", "ConvNeXt-T 64x64 batch 8", lambda: get_model("convnext-tiny", 1000), _images(8, 64),
                 1000),
            Case("mlp", "MLP 784-1024-1024-10 batch 256", lambda: get_model("mlp", hidden=(1024, 1024)),
                 _images(256, 28, 1), 10)]


# -- one layer alone on its real input -------------------------------------------------------------

@dataclass
class Capture:
    x: torch.Tensor  # the layer's input in the dense step, detached
    requires_grad: bool  # whether the step computes its gradient (not for the first layer)
    out_shape: Tuple[int, ...]


def capture_inputs(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> Dict[str, Capture]:
    """Each named layer's input and output shape in one training-mode forward of ``model`` (first call)."""
    captured: Dict[str, Capture] = {}

    def hook(name):
        def record(module, args, out):
            if name not in captured:
                captured[name] = Capture(args[0].detach().clone(), args[0].requires_grad, tuple(out.shape))
        return record
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in captured]
    if missing:
        raise RuntimeError(f"bench.models: the forward did not call these layers: {missing}")
    return captured


def _fused_activation(name: str, fused: Dict[str, Dict[str, nn.Module]]) -> Optional[nn.Module]:
    """The activation module the sparse twins of layer ``name`` fused (``fused``: per distribution, the model's
    ``fused_activations``), as the dense model runs it after the layer; None where they fused none."""
    acts = [f.get(name) for f in fused.values()]
    if len({type(a) for a in acts}) > 1:
        raise ValueError(f"bench.models: the sparse twins of {name} fuse different activations: {acts}")
    return acts[0] if acts else None


def _geometry(module: nn.Module) -> tuple:
    if hasattr(module, "kernel_size"):
        return (module.stride, module.padding, module.dilation)
    return ()


def _weight_params(module: nn.Module) -> List[torch.Tensor]:
    if isinstance(module, nn.Sequential):  # a dense layer and the activation after it
        return _weight_params(module[0])
    weight = module.values if isinstance(module, SparseWeightMixin) else module.weight
    return [weight] + ([module.bias] if module.bias is not None else [])


def _layer_key(module: nn.Module, cap: Capture) -> tuple:
    if isinstance(module, nn.Sequential):
        return ("then", type(module[1]).__name__, _layer_key(module[0], cap))
    shape = tuple(module.weight_shape if isinstance(module, SparseWeightMixin) else module.weight.shape)
    nnz = module.nnz if isinstance(module, SparseWeightMixin) else None
    return (type(module).__name__, shape, _geometry(module), tuple(cap.x.shape), cap.requires_grad,
            module.bias is None, nnz)


def time_layers(modules: Dict[str, nn.Module], cap: Capture, budget: Budget, cache: dict) -> Dict[str, Timing]:
    """fwd+bwd of each module (a dense layer and its sparse twins) on the same captured input, timed
    side by side (``measure_interleaved``); layers alike in kind, shape, input and nnz are timed once."""
    fns = {}
    for name, module in modules.items():
        key = _layer_key(module, cap)
        if key not in cache and key not in {k for k, _ in fns.values()}:
            x = cap.x.clone().requires_grad_(cap.requires_grad)
            grad_out = torch.randn(cap.out_shape, generator=torch.Generator().manual_seed(1))
            run = train_step_fn(module, [x], _weight_params(module), grad_out)
            run()  # the kernel choice and first-call work, outside the timing
            fns[name] = (key, run)
    if fns:
        measured = measure_interleaved({name: run for name, (_, run) in fns.items()}, budget)
        for name, (key, _) in fns.items():
            cache[key] = measured[name]
    return {name: cache[_layer_key(module, cap)] for name, module in modules.items()}


# Layers whose first reading is below this (the layers' target is 0.95x) are timed again; spreads of 10-15 % between
# readings of one layer are common on these VMs.
RECHECK_BELOW = 1.15


def recheck_slower(rows: List[LayerRow], modules: Dict[str, Dict[str, nn.Module]], captured: Dict[str, Capture],
                   budget: Budget) -> None:
    """Each layer of ``rows`` that some distribution ran at less than RECHECK_BELOW x its twin, timed again (the twin
    and every sparse twin, side by side, fresh samples with ``budget``) and its timings replaced by those, the first
    speedups kept in ``LayerRow.first``. Selecting the slow readings and judging them on the same samples would
    report the noise that made them slow; fresh ones do not (layers alike are timed once, as in ``time_layers``)."""
    cache: dict = {}
    for row in rows:
        slower = [d for d in row.sparse if row.speedup(d) < RECHECK_BELOW]
        if not slower:
            continue
        first = {d: row.speedup(d) for d in row.sparse}
        times = time_layers(modules[row.name], captured[row.name], budget, cache)
        row.dense, row.activated = times["dense"], times.get("dense+act")
        for d in row.sparse:
            row.sparse[d] = times[d]
        row.first = first


# -- peak memory of a step ---------------------------------------------------------------------------

def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def step_peak_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, step: Callable[[], None]) -> Optional[int]:
    """Tensor memory at the step's peak: what the model and optimizer hold at its start (parameters, buffers,
    optimizer state) plus the most the step allocates on top (activations, gradients, workspaces), from the
    allocation events of torch's profiler (``profile_memory``); None where this torch does not expose them."""
    # The profiler does not see blocks freed that were allocated before it started: drop the old
    # gradients first, so the step frees none and its new gradients count once.
    optimizer.zero_grad(set_to_none=True)
    held = _tensor_bytes([*model.parameters(), *model.buffers(),
                          *(v for state in optimizer.state.values() for v in state.values())])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:
        return None
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return held + peak


# -- a model -----------------------------------------------------------------------------------------

@dataclass
class LayerRow:
    name: str
    weight: str
    input: str
    macs: int
    dense: Timing  # the dense layer alone: its share of the dense step
    density: Dict[str, float] = field(default_factory=dict)  # distribution ->
    sparse: Dict[str, Timing] = field(default_factory=dict)
    kernel: Dict[str, str] = field(default_factory=dict)  # the kernel the sparse layer ran in the timed steps
    # What the sparse layers are compared with: where they fuse an activation (SparseLinear's ReLU or GELU, which
    # the dense model runs as a module of its own), the dense layer followed by it; else None (the layer alone).
    activated: Optional[Timing] = None
    # Where a sparse layer read below RECHECK_BELOW x its twin and was timed again (Settings.recheck): the first
    # timing's speedup per distribution; the timings above are the second's.
    first: Dict[str, float] = field(default_factory=dict)

    @property
    def twin(self) -> Timing:
        return self.dense if self.activated is None else self.activated

    def speedup(self, dist: str) -> float:
        return self.twin.median / self.sparse[dist].median

    def speedup_text(self, dist: str) -> str:
        """The speedup, with the first timing's where the layer was timed again."""
        first = f" (first {self.first[dist]:.2f}x)" if dist in self.first else ""
        return f"{self.speedup(dist):.2f}x{first}"


def of_bound(ratio: float, bound: float) -> float:
    """(dense - sparse) / (dense - bound time) for a speedup ``ratio`` and a ``bound`` on it: 1 at the bound, 0 at
    dense speed, < 0 when slower."""
    saving = 1.0 - 1.0 / bound
    return (1.0 - 1.0 / ratio) / saving if saving > 0 else math.nan


@dataclass
class ModelResult:
    case: Optional[Case]  # None only on its way back from the process that ran it (a Case holds lambdas)
    dense: Timing
    dense_peak: Optional[int]
    sparse: Dict[str, Timing]
    sparse_peak: Dict[str, Optional[int]]
    layers: List[LayerRow]
    breakdown: Dict[str, Dict[str, float]] = field(default_factory=dict)  # "dense" or distribution -> category -> s
    isa: str = ""  # what the process that ran it used: torch's CPU capability and the sparsekern loops
    # The dense model with sparsekern.fast_modules, as the sparse models run (None: it has no such module).
    dense_fast: Optional[Timing] = None

    @property
    def share(self) -> float:
        return sum(r.dense.median for r in self.layers) / self.dense.median

    def flop_fraction(self, dist: str) -> float:
        return sum(r.density[dist] * r.macs for r in self.layers) / sum(r.macs for r in self.layers)

    def bound(self, dist: str, base: Optional[Timing] = None) -> float:
        """The step's speedup with each sparse layer's dense time scaled by its own density, all else as in the dense
        step ``base`` (default: the plain dense model). Per layer, not by the model's FLOP fraction: ERK's densities
        differ most between layers whose time per MAC differs too (1x1 convs, the stem, heads)."""
        step = (base or self.dense).median
        alone = sum(r.dense.median for r in self.layers)
        scale = min(1.0, step / alone) if alone > 0 else 0.0  # layers timed alone may add up to more than the step
        saved = scale * sum(r.dense.median * (1.0 - r.density[dist]) for r in self.layers)
        return step / (step - saved) if saved < step else math.inf

    def speedup(self, dist: str) -> float:
        return self.dense.median / self.sparse[dist].median

    @property
    def baseline(self) -> Timing:
        """The faster dense step: the plain model's or, where it has batch norms, max pooling, depthwise convs or
        narrow heads, the one with ``sparsekern.fast_modules`` (as the sparse models run): what the targets judge
        against, so that a speedup counts only what the sparse layers give."""
        if self.dense_fast is None or self.dense.median <= self.dense_fast.median:
            return self.dense
        return self.dense_fast

    def speedup_same_modules(self, dist: str) -> float:
        """The speedup against the dense model with the sparse models' fast modules (the plain one without any)."""
        base = self.dense if self.dense_fast is None else self.dense_fast
        return base.median / self.sparse[dist].median

    def speedup_vs_baseline(self, dist: str) -> float:
        return self.baseline.median / self.sparse[dist].median

    def of_bound(self, dist: str) -> float:
        return of_bound(self.speedup(dist), self.bound(dist))


def _dims(shape) -> str:
    return "x".join(str(d) for d in shape)


def _with_conv_kernels(kernel: str, module: nn.Module, x: torch.Tensor) -> str:
    """``csr`` on a conv as "csr b/d/b": the C++ kernel of its forward, input and weight gradient (batched, direct or
    pointwise; SparseConv2d.cpu_conv_kernels), which the process measured for each pass on its first call."""
    conv = getattr(module, "cpu_conv_kernels", None)
    passes = conv(x) if kernel == "csr" and conv is not None else None
    return f"{kernel} {'/'.join(p[0] for p in passes.split('/'))}" if passes else kernel


def in_channels_last(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model``'s 4-D parameters and buffers, in place, and an image batch ``x`` (returned) in channels_last; other
    inputs (token ids) as they are."""
    model.to(memory_format=torch.channels_last)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def run_case(case: Case, settings: Settings, distributions: Sequence[str] = DISTRIBUTIONS,
             channels_last: bool = False) -> ModelResult:
    """One model's steps and layers, dense and sparse; ``channels_last``: both models and the images in that layout
    (the sparse layers take it as it comes)."""
    torch.manual_seed(0)
    dense = case.build().train()
    names = list(sparsifiable_layers(dense))
    sparse = {d: sparsekern.sparsify(copy.deepcopy(dense), DENSITY, d, init="dense", fuse_activations=True,
                                     fast_modules=True, generator=torch.Generator().manual_seed(0))
              for d in distributions}
    dense_fast = copy.deepcopy(dense)
    if not fast_modules(dense_fast):
        dense_fast = None
    gen = torch.Generator().manual_seed(0)
    x = case.inputs(gen)
    y = torch.randint(0, case.num_classes, (x.shape[0],), generator=gen)
    extra = [] if dense_fast is None else [(FAST, dense_fast)]
    if channels_last:
        for model in (dense, *sparse.values(), *(m for _, m in extra)):
            x = in_channels_last(model, x)

    steps, optimizers = {}, {}
    for key, model in [("dense", dense), *sparse.items(), *extra]:
        optimizers[key] = _optimizer(model)
        steps[key] = _step_fn(model, optimizers[key], x, y)
        for _ in range(settings.warmup):
            steps[key]()
    timings = measure_interleaved(steps, settings.step, min_rounds=settings.step_rounds, lead=settings.step_lead)
    for key, _ in extra:
        del steps[key]  # the peaks and the breakdown: dense and sparse only
    # What each sparse layer ran in those steps (its route, kept from its last call): a kernel choice that a noisy
    # measurement got wrong shows in the per-layer table.
    step_kernels = {d: {name: kernel_choice.last_kernel(model.get_submodule(name)) or "?" for name in names}
                    for d, model in sparse.items()}
    peaks = {key: step_peak_bytes(model, optimizers[key], steps[key])
             for key, model in [("dense", dense), *sparse.items()]}
    breakdowns = step_breakdowns(steps, settings.breakdown_rounds)

    captured = capture_inputs(dense, names, x)
    fused = {d: fused_activations(model) for d, model in sparse.items()}
    cache: dict = {}
    rows, modules = [], {}
    for name in names:
        layer, cap = dense.get_submodule(name), captured[name]
        stride = getattr(layer, "stride", (1, 1))
        macs = math.prod(cap.out_shape) * math.prod(layer.weight.shape[1:])
        twins = {d: model.get_submodule(name) for d, model in sparse.items()}
        act = _fused_activation(name, fused)
        with_act = {} if act is None else {"dense+act": nn.Sequential(layer, act).train()}
        modules[name] = {"dense": layer, **with_act, **twins}
        times = time_layers(modules[name], cap, settings.layer, cache)
        row = LayerRow(name, _dims(layer.weight.shape),
                       _dims(cap.x.shape) + (f" /{stride[0]}" if stride != (1, 1) else ""), macs, times["dense"],
                       activated=times.get("dense+act"))
        for d, module in twins.items():
            row.density[d] = module.density
            row.sparse[d] = times[d]
            row.kernel[d] = _with_conv_kernels(step_kernels[d][name], module, cap.x)
        rows.append(row)
    recheck_slower(rows, modules, captured, settings.recheck)
    return ModelResult(case, timings["dense"], peaks["dense"], {d: timings[d] for d in sparse},
                       {d: peaks[d] for d in sparse}, rows, breakdowns, dense_fast=timings.get(FAST))


# -- the report --------------------------------------------------------------------------------------

def _line(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _table(headers, rows) -> List[str]:
    return [_line(headers), _line(["---"] * len(headers)), *(_line(r) for r in rows)]


def _mb(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2 ** 20:.3g}" if n < 100 * 2 ** 20 else f"{n / 2 ** 20:.0f}"


SUMMARY_HEADERS = ("model", "distribution", "sparse layers", "FLOP fraction", "share", "dense step ms",
                   "sparse step ms", "speedup", "vs dense with fast modules", "bound", "of bound", "dense peak MB",
                   "sparse peak MB", "layers slower than dense")


def summary_rows(results: Sequence[ModelResult]) -> List[list]:
    rows = []
    for r in results:
        for d in r.sparse:
            slower = sum(row.speedup(d) < 1.0 for row in r.layers)
            same = ("none" if r.dense_fast is None else
                    f"{r.speedup_same_modules(d):.2f}x ({r.dense_fast.median * 1e3:.1f})")
            rows.append([r.case.name, d, len(r.layers), f"{r.flop_fraction(d):.3f}", f"{r.share:.0%}",
                         f"{r.dense.median * 1e3:.1f}", f"{r.sparse[d].median * 1e3:.1f}", f"{r.speedup(d):.2f}x",
                         same, f"{r.bound(d):.2f}x", f"{r.of_bound(d):.0%}", _mb(r.dense_peak),
                         _mb(r.sparse_peak[d]), f"{slower} of {len(r.layers)}"])
    return rows


def layer_rows(result: ModelResult) -> Tuple[List[str], List[list]]:
    dists = list(result.sparse)
    headers = ["layer", "weight", "input", "dense ms"]
    for d in dists:
        headers += [f"{d} density", f"{d} kernel", f"{d} ms", f"{d} speedup"]
    rows = []
    for row in result.layers:
        cells = [row.name, row.weight, row.input, f"{row.twin.median * 1e3:.3f}"]
        for d in dists:
            cells += [f"{row.density[d]:.3f}", row.kernel.get(d, "?"), f"{row.sparse[d].median * 1e3:.3f}",
                      row.speedup_text(d)]
        rows.append(cells)
    return headers, rows


LEGEND = (f"Density {DENSITY} (90 % sparse) over the sparsified layers (every Linear and groups=1 Conv2d), per-layer "
          "densities by ERK or uniform; init='dense'; fuse_activations=True, fast_modules=True. Step: forward, cross-"
          "entropy, backward, SGD (momentum 0.9, weight decay); median ms. Vs dense with fast modules: the speedup "
          "against the dense model with sparsekern.fast_modules (its step ms in brackets), what the sparse layers "
          "give apart from the faster batch norm, max pooling, depthwise convs and narrow heads ('none': the model "
          "has none); the targets judge against the faster of the two dense steps. FLOP fraction: MACs of the sparse "
          "layers / MACs of the same layers dense. Share: the dense step's time in those layers (each timed alone, "
          "fwd+bwd, on its input captured by a forward hook) / the dense step. Bound: the dense step T with each "
          "sparse layer's dense time t_i scaled by its density d_i, T / (T - sum t_i (1 - d_i)). Of bound: (dense - "
          "sparse) / (dense - dense / bound), 100 % = at the bound, below 0 = slower than dense, above 100 % where the "
          "sparse step also saves outside the sparse layers' own time (the activations fused into them, the "
          "optimizer's update of fewer weights, the fast modules). Peak MB: "
          "tensor memory at a step's peak (the model's parameters, buffers and "
          "optimizer state, plus the most the step allocates on top: activations, gradients, workspaces; from the "
          "allocation events of torch.profiler with profile_memory; memory a kernel takes outside torch's allocator "
          "is not seen). Per-layer kernel: what the sparse layer ran in the timed steps (sparsekern.nn.kernel_choice:"
          " csr, gemm or dense; a conv's csr with the C++ kernel of its forward, input gradient and weight gradient, "
          "b batch-innermost, d direct, p pointwise: measured per pass, else the geometry rule). Per-layer speedup: "
          "dense fwd+bwd / sparse fwd+bwd on the same input; where the sparse layers fuse the activation after them "
          "(a ReLU or GELU: sparsify(..., fuse_activations=True)), the dense layer followed by that activation, which"
          " the 'dense ms' column then shows (the share counts the layer alone) (gradients into the weights and bias,"
          " and into the input where the step needs it); layers alike in kind, shape, input and nnz are timed once. A"
          f" layer that a distribution ran at less than {RECHECK_BELOW}x its twin is timed again, all of its twins "
          "side by side with fresh samples, and shown (and judged by the targets) on those, the first timing's "
          "speedup in brackets.")


def breakdown_rows(result: ModelResult) -> Tuple[List[str], List[list]]:
    keys = ["dense", *result.sparse]
    headers = ["kind of op", *(f"{k} ms" for k in keys), *(f"{d} - dense ms" for d in result.sparse)]
    rows = []
    for cat in BREAKDOWN_ORDER:
        ms = {k: result.breakdown[k][cat] * 1e3 for k in keys}
        rows.append([cat, *(f"{ms[k]:.2f}" for k in keys), *(f"{ms[d] - ms['dense']:+.2f}" for d in result.sparse)])
    return headers, rows


BREAKDOWN_LEGEND = ("Steps under torch.profiler (bench/breakdown.py), ms per step, the median of profiled steps "
                    "per kind of op: each op's self time on the step's thread, summed by kind (the layers' kernels, "
                    "dense or sparse, are `conv and linear layers`); `outside ops` is the step's time in no op "
                    "(Python, the autograd engine). Profiled steps run a little longer than the timed ones above.")


def markdown(results: Sequence[ModelResult], meta: Dict[str, str]) -> str:
    lines = ["# sparsekern model bench", ""] + [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += _table(SUMMARY_HEADERS, summary_rows(results)) + ["", LEGEND, ""]
    for r in results:
        headers, rows = layer_rows(r)
        lines += [f"## {r.case.name}: every sparse layer", ""] + _table(headers, rows) + [""]
        if r.breakdown:
            headers, rows = breakdown_rows(r)
            lines += [f"## {r.case.name}: where a step's time goes", ""] + _table(headers, rows)
            lines += ["", BREAKDOWN_LEGEND, ""]
    return "\n".join(lines)


# --isa avx2: every library of a model's process held to AVX2 (each reads its variable when it loads, so only a fresh
# process takes them): a proxy for an AVX2 host on an AVX-512 one, not one. Restricting our loops alone
# (SPARSEKERN_ISA) while torch's dense ops keep AVX-512 read 1.52x / 1.92x for ResNet-50 112x112 where the full proxy
# read 2.21x / 2.99x (AMD Zen 5).
ISA_PROXIES: Dict[str, Dict[str, str]] = {
    "avx2": {"SPARSEKERN_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def process_isa() -> str:
    """This process's vector ISA: torch's CPU capability (ATen's kernels), the width of the sparsekern loops and the
    build of them that runs (x86-64-v3 under the AVX2 proxy: an AVX2 host's code, not the v4 build's 32-byte loops)."""
    return f"torch {torch.backends.cpu.get_cpu_capability()}, sparsekern loops {sk_isa.get()} ({sk_isa.build()})"


@contextmanager
def _environment(variables: Dict[str, str]):
    """os.environ with ``variables`` set, for the processes spawned inside the with-block."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def isa_line(isa: str, ran: Iterable[str], processes: str = "every model's process") -> str:
    """A report's ISA line: the restriction asked for, and what the processes ran (``ran``: their process_isa())."""
    used = "; ".join(sorted(set(ran)))
    if isa == "native":
        return f"native: {used}"
    env = ", ".join(f"{k}={v}" for k, v in ISA_PROXIES[isa].items())
    return f"{processes} held to {isa.upper()} ({env}), a proxy for an {isa.upper()} host, not one: {used}"


def checked_process_isa(isa: str) -> str:
    """``process_isa()``, after checking that a spawned process took the ISA proxy ``isa`` asked of it."""
    used = process_isa()
    if isa != "native" and not (torch.backends.cpu.get_cpu_capability() == isa.upper() and sk_isa.get() == isa
                                and sk_isa.build() == "x86-64-v3"):
        raise RuntimeError(f"sparsekern bench --isa {isa}: this process runs {used}; the environment "
                           f"({ISA_PROXIES[isa]}) did not take (is {isa} supported here?)")
    return used


def _case_in_child(sizes: str, index: int, mode: str, threads: int, keep_freed: bool,
                   channels_last: bool = False, isa: str = "native") -> ModelResult:
    """``run_case`` of case ``index`` of ``cases(sizes)``, in a spawned process set up as its parent."""
    used = checked_process_isa(isa)
    if keep_freed:
        allocator.keep_freed_memory()
    torch.set_num_threads(threads)
    result = run_case(cases(sizes)[index], SETTINGS[mode], channels_last=channels_last)
    return dataclasses.replace(result, case=None, isa=used)


def run_isolated(sizes: str, index: int, mode: str, channels_last: bool = False, isa: str = "native") -> ModelResult:
    """``run_case`` of case ``index`` of ``cases(sizes)`` in a fresh process (spawned: no state of this one, but
    its environment, thread count and allocator setting; ``isa``: a key of ISA_PROXIES, or native)."""
    with _environment(ISA_PROXIES.get(isa, {})), multiprocessing.get_context("spawn").Pool(1) as pool:
        result = pool.apply(_case_in_child, (sizes, index, mode, torch.get_num_threads(), allocator.kept(),
                                             channels_last, isa))
    return dataclasses.replace(result, case=cases(sizes)[index])


def main(models: Optional[Sequence[str]] = None, quick: bool = False, output: Optional[str] = None,
         threads: Optional[int] = None, sizes: str = "full", channels_last: bool = False, isa: str = "native") -> int:
    models = tuple(models) if models else MODELS
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"sparsekern bench --models: names must be among {MODELS}, got {unknown}")
    if isa != "native" and isa not in ISA_PROXIES:
        raise SystemExit(f"sparsekern bench --models: isa must be native or one of {tuple(ISA_PROXIES)}, got {isa!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    mode = "tiny" if sizes == "tiny" else "quick" if quick else "full"
    settings = SETTINGS[mode]
    selected = [(i, c) for i, c in enumerate(cases(sizes)) if c.model in models and (c.quick or mode != "quick")]
    results = []
    for n, (index, case) in enumerate(selected, 1):
        print(f"[{n}/{len(selected)}] {case.name}", file=sys.stderr, flush=True)
        if mode == "tiny" and isa == "native":
            results.append(dataclasses.replace(run_case(case, settings, channels_last=channels_last),
                                               isa=process_isa()))
            gc.collect()
        else:
            results.append(run_isolated(sizes, index, mode, channels_last, isa))
    meta = {"command": f"`{command_line('sparsekern.bench.models')}`",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "CPU": host() if isa == "native" else host().split("; sparsekern loops")[0],
            "threads": str(torch.get_num_threads()), "torch": torch.__version__, "sparsekern backend": _backends(),
            "allocator": allocator.describe(),
            "ISA": isa_line(isa, (r.isa for r in results)),
            "memory format": ("channels_last (both models' 4-D weights and the images)" if channels_last
                              else "contiguous (NCHW images)"),
            "timing": (("each model in a process of its own; " if mode != "tiny" else "")
                       + f"{settings.warmup} warm-up steps per model (1 call per layer), then "
                       f"bench.timing.measure_interleaved: dense, ERK and uniform side by side, one timed call "
                       f"each per round, order rotated (steps: each after {settings.step_lead} untimed step(s) of "
                       f"the same model, at least {settings.step_rounds} rounds, "
                       f"min_run_time={settings.step.min_run_time}, max_run_time="
                       f"{settings.step.max_run_time}; layers: min_run_time={settings.layer.min_run_time}, "
                       f"max_run_time={settings.layer.max_run_time}; a layer slower than its twin again: min_run_time="
                       f"{settings.recheck.min_run_time}, max_run_time={settings.recheck.max_run_time}), median")}
    text = markdown(results, meta)
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text)
        print(f"wrote {output}", file=sys.stderr)
    return 0


def _cli(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m sparsekern.bench.models``: ``sparsekern bench --models``, its options checked alike."""
    from sparsekern.cli import build_parser
    args = build_parser().parse_args(["bench", "--models", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(_cli())
