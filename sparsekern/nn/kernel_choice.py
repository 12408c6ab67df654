"""Per-layer kernel choice: every sparse layer runs the fastest of its candidate kernels.

A sparse layer can compute the same result several ways (``csr``: its sparse op; ``gemm``: a conv as a
CSR GEMM over channels x positions; ``dense``: the dense op on the scattered weight). Which is fastest
depends on shape, density, batch geometry, dtype, thread count and the CPU's vector width, so it is
measured, not modelled: on the first call of a geometry each candidate runs forward (+ backward when
training) on the layer's real input, in interleaved rounds with the caches evicted between calls (the
minimum per candidate counts; a layer below ``RULE_DENSE_FROM`` whose dense kernel won gets a second set of
rounds), the fastest wins, and the choice is cached under a key of all those things. The key holds nnz, not
the pattern: DST keeps nnz fixed, so a choice stays valid through training; pruning changes nnz and so
measures anew.

Where nothing is measured the density rule decides: ``dense`` from a density of ``RULE_DENSE_FROM`` on, else
``csr``. That holds for layers too small to be worth measuring and for every layer under
``torch.use_deterministic_algorithms(True)`` (a measured choice can differ between processes, and the
kernels' sums differ in the last bits; the C++ conv op likewise keeps its geometry rule there). Within the
``dense`` kernel of a linear, the CPU extension likewise times the two orientations of its MKL products (the
forward of a layer under 64 outputs, every weight gradient) once per shape, and keeps nn.Linear's under
deterministic algorithms.

``SPARSEKERN_KERNEL_CACHE=path.json`` keeps the measured choices across processes (loaded at import,
written after each new measurement), tagged with the sparsekern and torch versions and the CPU model:
a file from another of these is ignored, never trusted. Overrides: ``layer.kernel = "dense"`` (or
``"csr"``, ``"gemm"``) pins one layer; ``SPARSEKERN_KERNEL`` pins every layer left at ``"auto"``;
``set_autotune(False)`` (or ``SPARSEKERN_AUTOTUNE=0``) makes ``"auto"`` mean ``"csr"``.
``explain(model, x)`` prints the choices.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import isa
from ..ops import dispatch as _dispatch
from ..ops.dispatch import tracing as _tracing
from ..sparse_matrix import scatter_dense

try:
    import resource  # POSIX only
except ImportError:  # pragma: no cover - Windows
    resource = None

KERNELS = ("csr", "gemm", "dense")
CHOICES = ("auto",) + KERNELS
DEFAULT = "csr"
# Below this many dense multiply-adds (forward) a layer takes microseconds: measuring would cost
# more than any choice saves (the density rule decides).
MIN_TUNE_MACS = 1 << 16
WARMUP, REPEATS = 1, 3
# Candidates within CLOSE_RATIO of the fastest get more rounds, up to MAX_REPEATS in all: on a shared VM one
# round can run 1.7x slower than the next, and three rounds then mis-rank two kernels a few % apart.
CLOSE_RATIO, MAX_REPEATS = 1.25, 8
# A sparse kernel must beat the dense one by more than this fraction to be chosen; by NEAR_DENSE_MARGIN from a
# density of NEAR_DENSE on. There the sparse kernels do nine tenths of the dense work or more, at about half
# oneDNN's rate, and a win measured in the first step is the step's noise: ResNet-50's six layer1 1x1 convs at
# ERK density 0.959 (112x112, batch 16, AMD Zen 5) had the pointwise csr kernel measured over 5 % faster in one
# process of three, yet in the step the model ran 1.0-1.5 % slower with them on csr than on the dense kernel
# (interleaved steps, two processes), and the per-layer table read 0.88x their twins against 0.97x.
DENSE_MARGIN = 0.05
NEAR_DENSE, NEAR_DENSE_MARGIN = 0.9, 0.2
# Bytes written between timed calls on the CPU, more than the L2 caches of two cores hold: in a training step
# the other layers run between two calls of a layer, so its weight and input come from L3 or memory. Timed hot,
# the dense kernel's GEMM on the freshly scattered weight looked as fast as the CSR loops at a 128 -> 512 1x1
# conv at 8x8, batch 8, density 0.48 (1.56 ms each); with the caches evicted it takes 2.4 ms to their 1.46.
EVICT_BYTES = 8 << 20
# A candidate this much slower than the best after one round is not timed further.
GIVE_UP_RATIO = 3.0
# A timed call that took more minor page faults than this paid for fresh memory, not for its kernel: it counts only
# for a candidate without a clean call. In ResNet-50's first step (112x112, batch 16, ERK; AMD Zen 5) a third of the
# layers had timed calls with 1,100-9,400 faults (4-37 MB of fresh pages, milliseconds each), some a candidate's
# only call after the warm-up, which the give-up rule above then dropped. (csrc/cpu/sparse_conv2d.cpp's
# run_chosen filters its timed runs likewise.)
FAULT_PAGES = 16
# Where nothing is measured (small layers, below MIN_TUNE_MACS): the density from which a layer runs its dense
# kernel, a little below where the CSR engine's own products turn dense (csr_engine.h, dense_above, 0.6): a small
# full layer (a 512 -> 2 classifier at 16 rows) runs 2x faster on it than on csr, whose fixed cost per call is
# about 0.2 ms.
RULE_DENSE_FROM = 0.5

_autotune: bool = os.environ.get("SPARSEKERN_AUTOTUNE", "1") != "0"
_forced: Optional[str] = os.environ.get("SPARSEKERN_KERNEL") or None
if _forced is not None and _forced not in CHOICES:
    raise ValueError(f"SPARSEKERN_KERNEL must be one of {CHOICES}, got {_forced!r}")


@dataclass
class Choice:
    """The kernel chosen for one key, and why: candidate -> fastest of the timed calls that took no fresh pages
    (FAULT_PAGES), ms (empty when not measured)."""
    kernel: str
    times_ms: Dict[str, float] = field(default_factory=dict)
    reason: str = "measured"


_choices: Dict[tuple, Choice] = {}
# Bumped by clear_cache: a layer's remembered route (run) must not outlive the choice it came from.
_generation = 0
_clock = time.perf_counter


def _minor_faults() -> int:
    """The process's minor page faults so far (0 where the platform does not count them)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0
_cache_file: Optional[str] = os.environ.get("SPARSEKERN_KERNEL_CACHE") or None
_stored: Dict[str, dict] = {}  # the cache file's entries, by repr(key)


def file_tag() -> Dict[str, str]:
    """What a cache file's measurements are valid for: the kernels (sparsekern's version and the digest of
    its compiled extension, so that a rebuild from changed sources at the same version measures anew, and
    torch's, whose dense kernels are the competition) and the CPU (``isa.cpu_model``: its name with vendor, family,
    model and stepping, as a hypervisor may give Zen 3, 4 and 5 one name; two AVX-512 CPUs can differ 2x
    in a ratio). A file written under another tag is not used, and is replaced on the next measurement."""
    from .. import __version__
    from ..isa import cpu_model
    return {"sparsekern": __version__, "extension": _extension_digest(), "torch": torch.__version__,
            "cpu": cpu_model()}


@functools.cache
def _extension_digest() -> str:
    """SHA-256 (first 16 hex digits) of the compiled extension's file; "none" without one."""
    try:
        from .. import _C
    except ImportError:
        return "none"
    with open(_C.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _load_cache_file() -> None:
    if _cache_file and os.path.exists(_cache_file):
        try:
            with open(_cache_file) as f:
                data = json.load(f)
        except (OSError, ValueError) as exc:  # a broken cache only costs a new measurement
            print(f"sparsekern: ignoring the kernel cache {_cache_file}: {exc}")
            return
        if not isinstance(data, dict) or data.get("tag") != file_tag() or not isinstance(data.get("choices"), dict):
            print(f"sparsekern: ignoring the kernel cache {_cache_file}: written by another version or CPU "
                  f"(this is {file_tag()})")
            return
        _stored.update(data["choices"])


def _store(key: tuple, choice: Choice) -> None:
    if not _cache_file or not choice.times_ms:
        return
    _stored[repr(key)] = dict(kernel=choice.kernel, times_ms=choice.times_ms, reason=choice.reason)
    tmp = f"{_cache_file}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"tag": file_tag(), "choices": _stored}, f, indent=0, sort_keys=True)
    os.replace(tmp, _cache_file)  # atomic: a concurrent reader sees the old or the new file


_load_cache_file()


def set_autotune(enabled: bool) -> None:
    """Turn measuring on or off for layers whose ``kernel`` is ``"auto"`` (off: they run ``csr``)."""
    global _autotune
    _autotune = bool(enabled)


def set_kernel(name: Optional[str]) -> None:
    """Pin every ``"auto"`` layer to kernel ``name`` (None: measure again); per layer: ``layer.kernel``."""
    global _forced
    if name is not None and name not in CHOICES:
        raise ValueError(f"set_kernel: name must be one of {CHOICES} or None, got {name!r}")
    _forced = None if name == "auto" else name


def clear_cache() -> None:
    """Forget every measured choice (they are measured again on the next call)."""
    global _generation
    _choices.clear()
    _generation += 1


def cached_choices() -> Dict[tuple, Choice]:
    """A copy of the measured choices, by key."""
    return dict(_choices)


def check_kernel_name(owner: str, name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"{owner}: kernel must be one of {CHOICES}, got {name!r}")
    return name


def _needs_backward(module: nn.Module, x: torch.Tensor) -> bool:
    # The layer's own parameters (values, bias): module.parameters() would walk its submodules too.
    return torch.is_grad_enabled() and (x.requires_grad or any(
        p is not None and p.requires_grad for p in module._parameters.values()))


def choice_key(module: nn.Module, x: torch.Tensor) -> tuple:
    """Everything the speed of a layer's kernels depends on."""
    device = x.device.type
    autocast = (torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)) \
        if device in ("cpu", "cuda") else None
    contiguous = x.is_contiguous()
    layout = "contiguous" if contiguous else "channels_last" if (
        x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) else "strided"
    values = module.values
    return (type(module).__name__, tuple(module.weight_shape), values.numel(), module.geometry_key(),
            module.bias is not None, values.dtype, tuple(x.shape), x.dtype, layout, device,
            _needs_backward(module, x), autocast, torch.get_num_threads(), _machine(x.device))


def _machine(device: torch.device) -> str:
    """What the kernels' speed depends on beyond the call: the vector ISA of torch's kernels and of
    sparsekern's loops (``sparsekern.isa``, which can change at run time), or the GPU model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_torch_cpu_capability()}/{isa.current()}"


@functools.cache
def _torch_cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()  # fixed when torch loads (ATEN_CPU_CAPABILITY)


def _rule(module: nn.Module) -> str:
    """The kernel where nothing is measured: dense from RULE_DENSE_FROM on, else csr."""
    return "dense" if module.density >= RULE_DENSE_FROM and "dense" in module.candidates() else DEFAULT


def resolve(module: nn.Module, x: torch.Tensor) -> str:
    """The kernel ``module`` runs for input ``x`` (measuring it first if needed)."""
    name = check_kernel_name(type(module).__name__, module.kernel)
    if name != "auto":
        if name not in module.candidates():
            raise ValueError(f"{type(module).__name__}: kernel {name!r} is not one of this layer's kernels "
                             f"{module.candidates()}")
        return name
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return DEFAULT  # the op reports the bad argument
    if _forced is not None:
        return _forced if _forced in module.candidates() else DEFAULT
    if not _autotune or _tracing():
        return DEFAULT
    if torch.are_deterministic_algorithms_enabled():
        return _rule(module)
    key = choice_key(module, x)
    choice = _choices.get(key)
    if choice is None:
        stored = _stored.get(repr(key))
        if stored is not None and stored.get("kernel") in module.candidates():
            choice = Choice(stored["kernel"], dict(stored.get("times_ms", {})), "cached on disk")
        else:
            with _no_saved_tensor_hooks():
                choice = _measure(module, x)
            _store(key, choice)
        _choices[key] = choice
    return choice.kernel


def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module``'s forward on ``x`` through the kernel ``resolve`` picks. The dense kernel multiplies
    every input entry by the scattered weight, zeros included, so a NaN/Inf where the weight stores
    nothing would spread (0 * inf = NaN) where the sparse kernels never read it: a call with a non-finite
    input runs the sparse kernel instead, and so does its input gradient when the output's gradient is
    non-finite. Results thus never depend on the kernel chosen.

    The checks read one feature of the dense kernel's results, not the tensors it read: each output
    feature of the dense kernel multiplies every input feature over its receptive field (a zero weight
    too: 0 * NaN = NaN), so output channel 0 is non-finite whenever any input entry it reads is, and
    input-gradient channel 0 whenever any output-gradient entry is (a finite input that overflows only
    costs a sparse call). A full pattern stores every weight: both kernels read the same entries.

    Under a torch.func transform (vmap, grad, jacrev, ...: per-sample gradients) the layer runs its composite of
    torch ops, the dense op on the scattered weight, which every transform takes (the kernels have no vmap
    rule); a NaN/Inf in x then spreads as in the dense twin."""
    if torch._C._are_functorch_transforms_active():
        return module.activate(module.dense_forward(x, module.dense_weight(), module.bias))
    tracing = _tracing()
    key = None if tracing else _route_key(module, x)
    route = module.__dict__.get(_ROUTE)
    if key is not None and route is not None and route[0] == key:
        _, kernel, node, full = route
        if kernel == "dense" and node and not full:
            y = _dense_fast(module, x)
            if y is not None:
                _keep_fast(module, x, kernel)
                return y
        elif kernel == "csr" and node or kernel == "dense" and full:
            _keep_fast(module, x, "full" if kernel == "dense" else kernel)
    else:
        if _unexpected_input(module, x):
            return module.run_kernel(DEFAULT, x)  # whatever is pinned: the sparse op's checks name the argument
        kernel = resolve(module, x)
        node = _node(module, kernel, x)
        full = module.nnz == module.weight_shape.numel()  # (the key holds values.numel())
        if key is not None:
            module.__dict__[_ROUTE] = (key, kernel, node, full)
            module.__dict__.pop(FAST, None)  # a C++ route stands only for the kept route (last_kernel stays true)
    if kernel == "csr" and node:
        return module.csr_node(x)  # with the layer's activation
    if kernel != "dense" or tracing or full:  # a full pattern's dense kernel: the dense op on a view of values
        return module.activate(module.run_kernel(kernel, x, node=node))
    y, finite = _dense(module, x, route=True, node=node)
    return module.activate(y if finite else module.run_kernel(DEFAULT, x))


def _keep_fast(module: nn.Module, x: torch.Tensor, kernel: str) -> None:
    """Keep, for the layer's next calls, its route in C++ (``sparsekern._C.LayerRoute``, csrc/cpu/layer_route.cpp):
    a call whose Python route was kept and that ran ``kernel`` (csr's node, the dense kernel's op with the
    arguments ``_dense_fast`` used, or ``full``: a full pattern's dense op on a view of the values). The layer's
    forward calls it first; it runs the same op when everything this route's key holds (and what its kept arguments
    depend on) is as now, else returns None and this module decides."""
    if _LayerRoute is None or not _plain(module):
        return
    conv = module.feature_dim == -3
    geometry = (list(module.stride), list(module.padding), list(module.dilation)) if conv else ([], [], [])
    if kernel == "csr":
        kind, weight, geometry = ("conv" if conv else "linear"), None, (list(module.kernel_size) if conv else [],
                                                                         *geometry)
    elif kernel == "full":
        kind, weight, geometry = ("full_conv" if conv else "full_linear"), None, (list(module.weight_shape), *geometry)
    else:
        args = _dense_buffers[module][3]  # (row_ptr, col_idx, *transpose, weight, stride, padding, dilation, check)
        kind, weight, geometry = ("dense" if conv else "dense_linear"), args[5], ([], *args[6:9])
    fast = _LayerRoute(module, x, kind, weight, *geometry, _WATCHED)
    module.__dict__[FAST] = fast if fast.usable else None


# The methods of a layer that Python's route calls (and the C++ route stands for): a subclass or an instance that
# overrides one keeps Python's route alone, so that its own method runs.
_ROUTED_METHODS = ("csr_node", "activate", "run_kernel", "dense_forward", "dense_backward", "dense_geometry")


def _plain(module: nn.Module) -> bool:
    """Whether ``module`` runs its class's own ``_ROUTED_METHODS`` (``ROUTE_BASE``: SparseLinear or SparseConv2d)."""
    cls = type(module)
    base = getattr(cls, "ROUTE_BASE", None)
    return base is not None and not any(name in module.__dict__ or getattr(cls, name) is not getattr(base, name)
                                        for name in _ROUTED_METHODS)


try:
    from .._C import LayerRoute as _LayerRoute
except ImportError:  # an extension without it (or none): Python's route only
    _LayerRoute = None
# Where a layer keeps its C++ route (``_keep_fast``; read by the layers' forward), and what module-level settings
# the C++ route compares with what it saw: kernel_choice's overrides and generation, the backends' generation.
FAST = "_sparsekern_fast"
_WATCHED = [(globals(), ["_forced", "_autotune", "_generation"]), (vars(_dispatch), ["generation"])]


# Where a layer keeps the route of its last call: (the call's _route_key, the kernel, whether the C++ node runs
# it, whether the pattern is full). In a training step resolve() and the node's checks took 60-80 us a layer with
# the caches cold from the layers between (about 4 ms of a 210 ms ViT-S/16 step, Intel SPR-class, 2 threads);
# comparing the key takes a few.
_ROUTE = "_sparsekern_route"


def last_kernel(module: nn.Module) -> Optional[str]:
    """The kernel ``module``'s last call ran (``run``'s kept route), or None before any call (or where no route is
    kept: tracing, other devices)."""
    route = module.__dict__.get(_ROUTE)
    return None if route is None else route[1]


def _route_key(module: nn.Module, x: torch.Tensor) -> Optional[tuple]:
    """Everything the route of a call of ``module`` depends on: ``choice_key``'s fields (bar the layer's fixed
    geometry), the overrides (``layer.kernel``, set_kernel, set_autotune, the op's backend), the modes that
    keep the C++ node out (autocast, torch.func) and deterministic algorithms; None where it is not kept."""
    x_device = x.device
    device = x_device.type
    if device not in ("cpu", "cuda"):
        return None
    # The parameters from the module's dict, not through nn.Module.__getattr__ (0.4 us each, a route costs ~3).
    params = module._parameters
    values = params["values"] if "values" in params else module.values
    bias = params["bias"] if "bias" in params else module.bias
    autocast = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device)
    return (x.shape, x.stride(), x.dtype, x_device, x.requires_grad, values.dtype, values.device, values.numel(),
            values.requires_grad, None if bias is None else bias.requires_grad, module.kernel,
            torch.is_grad_enabled(), autocast, torch._C._are_functorch_transforms_active(),
            torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(), isa.current(), _forced,
            _autotune, _generation, _dispatch.generation)


def _node(module: nn.Module, kernel: str, x: torch.Tensor) -> bool:
    """Whether one of the extension's C++ nodes runs ``kernel`` on ``x``: csr's, the dense kernel's (_fused), or
    gemm's products (``module.gemm_op(x)``: the op whose node conv2d_gemm calls)."""
    if kernel == "csr":
        return _dispatch.cpu_node(x, module.values, module.csr_op)
    if kernel == "dense":
        return _fused(x, module.values)
    return kernel == "gemm" and _dispatch.cpu_node(x, module.values, module.gemm_op(x))


def call_kernel(module: nn.Module, kernel: str, x: torch.Tensor) -> torch.Tensor:
    """``module``'s forward on ``x`` through ``kernel`` as ``run`` calls it (no NaN/Inf routing): what
    the choice times."""
    return module.activate(_dense(module, x, route=False)[0]) if kernel == "dense" else _run_kernel(module, kernel, x)


def _run_kernel(module: nn.Module, kernel: str, x: torch.Tensor) -> torch.Tensor:
    """``module.run_kernel(kernel, x)`` and the layer's activation, for an input the layer has checked; ``csr``
    on the CPU as one C++ autograd node (csrc/cpu/csr_nodes.cpp) where the op's cpp kernels would run anyway."""
    if kernel == "csr" and _dispatch.cpu_node(x, module.values, module.csr_op):
        return module.csr_node(x)
    return module.activate(module.run_kernel(kernel, x))


def _unexpected_input(module: nn.Module, x) -> bool:
    """An input no kernel accepts (not a floating tensor on the layer's device in its dtype, autocast
    aside); the layer checks its own geometry before calling ``run``."""
    values = module.values
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.device != values.device:
        return True
    return x.dtype != values.dtype and not (x.device.type in ("cpu", "cuda")
                                            and torch.is_autocast_enabled(x.device.type))


def _all_finite(t: torch.Tensor) -> bool:
    """False if ``t`` holds a NaN or Inf (they make the sum non-finite). One read of ``t`` and no
    allocation, unlike isfinite(t).all(); a finite sum that overflows only costs a sparse-kernel call."""
    return math.isfinite(t.sum().item())


def _feature_finite(t: torch.Tensor, dim: int) -> bool:
    """No NaN or Inf in feature 0 of ``t`` along ``dim`` (``t`` has no features: nothing to check)."""
    return t.size(dim) == 0 or _all_finite(t.narrow(dim, 0, 1))


def _dense(module: nn.Module, x: torch.Tensor, route: bool, node: Optional[bool] = None) -> Tuple[torch.Tensor, bool]:
    """The dense kernel's output, and False when ``route`` and its feature 0 holds a NaN/Inf (the sparse
    kernel must run instead): one autograd node (``_DenseKernel``) when a gradient is wanted, else the dense
    op on the scattered weight. Under autocast the layer's own composite runs: its casts are autograd's. A full
    pattern's weight is a view of ``values``: the dense op runs on it with torch's own autograd, as the dense
    twin does (the Python node would cost 0.06-0.1 ms per fwd+bwd, 10-20 % of a 1024 -> 10 layer at batch 256),
    and reads every entry the sparse kernel does: nothing to check. ``node``: ``_fused(x, values)`` when the
    caller knows it (run's route)."""
    values, bias = module.values, module.bias
    if values.numel() == module.weight_shape.numel():
        return module.run_kernel("dense", x), True
    if node if node is not None else _fused(x, values):  # one C++ autograd node (none without a gradient)
        return _dense_forward(module, x, values, bias, route, fused=True)[:2]
    device = x.device.type  # (the C++ node never runs under autocast)
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        y = module.run_kernel("dense", x)
        return y, not route or _feature_finite(y, module.feature_dim)
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or values.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if not wants_grad:  # no graph: the weight from the layer's buffer, as the node's forward takes it
        with torch.no_grad():
            return _dense_forward(module, x, values, bias, route, fused=False)[:2]
    finite: List[bool] = []
    y = _DenseKernel.apply(x, values, bias, module, route, finite)
    return y, finite[0]


def _dense_fast(module: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
    """``run``'s dense kernel on a kept route: the extension's op called straight with the arguments the last
    call built (``_dense_buffers``), or None where they no longer hold (the pattern or the values tensor changed,
    none were kept). The chain run -> _dense -> _dense_forward rebuilt them on every call: a 64 -> 256 1x1 conv
    at 16x16, batch 8, density 0.96 (ResNet-50's layer1 at 64x64, ERK) ran fwd+bwd at 0.93x its dense twin
    against 0.97-0.98x for the op alone, with the caches cold between layers (Zen 5, 2 threads)."""
    cached = _dense_buffers.get(module)
    if cached is None or cached[3] is None:
        return None
    positions, values_ref, _, args = cached
    values = module._parameters["values"]
    if module._modules["pattern"].__dict__.get("_positions") is not positions or values_ref() is not values:
        return None
    params = module._parameters
    y, finite = _dense_op()(x, values, params["bias"] if "bias" in params else module.bias, *args)
    return module.activate(y if finite else module.run_kernel(DEFAULT, x))


@functools.cache
def _dense_op():
    """The extension's dense-kernel op at its one overload (resolved once: the lookup costs a few us a call)."""
    return torch.ops.sparsekern._dense_kernel.default


def _fused(x: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether the extension's dense kernel (csrc/cpu/dense_kernel.cpp: the scatter, the dense op, the NaN/Inf
    checks and the gather in C++, one C++ autograd node) can run this layer; else ``_DenseKernel`` does."""
    return _dispatch.cpu_node(x, values)


def _dense_forward(module: nn.Module, x: torch.Tensor, values: torch.Tensor, bias: Optional[torch.Tensor],
                   route: bool, fused: bool) -> Tuple[torch.Tensor, bool, torch.Tensor]:
    """(y, feature 0 of y finite or not ``route``, the scattered weight) with ``values`` scattered into the
    layer's dense buffer; a gradient recorded only by the extension's kernel (``_fused``)."""
    pattern = module.pattern
    positions = pattern.positions()
    weight, fresh = _dense_buffer(module, values, positions)
    if fused:
        transpose = pattern.transpose() if module.feature_dim == -1 else (None, None, None)  # a linear's sparse op
        args = (pattern.row_ptr, pattern.col_idx, *transpose, weight, *module.dense_geometry())
        y, finite = _dense_op()(x, values, bias, *args, route)
        if route and not weight.is_inference():  # kept for _dense_fast (an inference tensor is not written outside)
            _dense_buffers[module] = (*_dense_buffers[module][:3], args + (True,))
        return y, finite, weight
    if not fresh:
        weight.view(-1).scatter_(0, positions, values)
    y = module.dense_forward(x, weight, bias)
    return y, not route or _feature_finite(y, module.feature_dim), weight


def _scattered(module: nn.Module, values: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
    """The dense weight from ``values`` at ``positions`` (None: a full pattern, a view of ``values``), as
    ``dense_weight`` builds it but at the positions the forward saw; differentiable in ``values``."""
    shape = module.weight_shape
    if positions is None:
        return values.reshape(shape)
    return scatter_dense(values, positions, shape.numel()).reshape(shape)


# Per layer: (positions, a weak reference to values, the dense weight its dense kernel last scattered them into, the
# extension op's arguments after x, values and bias for run's kept route (_dense_fast), or None).
# Weakly keyed: the buffer is never pickled or deep-copied, nor does it keep its layer or a values graph alive.
_dense_buffers: weakref.WeakKeyDictionary[nn.Module, tuple] = weakref.WeakKeyDictionary()


def _dense_buffer(module: nn.Module, values: torch.Tensor, positions: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """The dense weight that ``values`` at ``positions`` are scattered into, and whether it is fresh (built
    here with them in place) rather than the layer's buffer from the last call (zeros outside ``positions``
    still, the values to be written by the caller): the same buffer call after call while the pattern, the
    values tensor, its dtype and device stay. A fresh weight is zeroed whole and, past glibc's mmap threshold
    (32 MB at most), page-faulted in on every call: 4096 x 4096 at density 0.5, batch 256, inference forward
    109 -> 75 ms (the twin: 66-70), training forward 94 -> 81 ms (68-72).
    Rewriting a buffer that an earlier graph saved is safe: the values changed in place in between, so
    backward through that graph fails autograd's version check on the saved values, as for nn.Linear."""
    cached = _dense_buffers.get(module)
    if cached is not None and cached[0] is positions and cached[1]() is values:
        weight = cached[2]
        # (An inference tensor, made under inference_mode, cannot be written outside it.)
        if weight.dtype == values.dtype and weight.device == values.device and not (
                weight.is_inference() and not torch.is_inference_mode_enabled()):
            return weight, False
    with torch.no_grad():  # a buffer, never part of a graph (the kernels record what the weight's gradient needs)
        weight = values.new_zeros(module.weight_shape.numel()).scatter_(0, positions, values).reshape(
            module.weight_shape)
    _dense_buffers[module] = (positions, weakref.ref(values), weight, None)
    return weight, True


def _own(y: torch.Tensor) -> torch.Tensor:
    """``y`` as a tensor of its own: the dense op's result can be a view of a buffer it made (F.linear over 3-D x),
    and autograd forbids in-place ops on a custom Function's output that is a view (as the C++ node's ``own``)."""
    if not y._is_view():
        return y
    return y.new_empty(0).set_(y.untyped_storage(), y.storage_offset(), y.size(), y.stride())


class _DenseKernel(torch.autograd.Function):
    """The dense op on the scattered weight as one autograd node: the weight is scattered once in the
    forward and its dense gradient gathered once in the backward, with no autograd node or hook for
    either (on small layers those cost as much as the multiply: ~0.4 ms of a 0.7 ms fwd+bwd of a
    1024->10 layer at batch 256). Where the extension can (``_fused``), its C++ node runs instead. ``finite``
    (a list) receives whether feature 0 of the output is finite (always, without ``route``). With ``route``,
    an input gradient whose feature 0 is non-finite (a NaN/Inf in the output's gradient, spread by the
    weight's zeros) is recomputed by the sparse kernel, which never reads the entries the weight does not
    store. Differentiable twice: under create_graph the backward runs the layer's composite (scatter,
    dense op) through autograd instead."""

    @staticmethod
    def forward(ctx, x, values, bias, module, route, finite):
        y, ok, weight = _dense_forward(module, x, values, bias, route, fused=False)
        finite.append(ok)
        ctx.module, ctx.route, ctx.weight = module, route, weight
        ctx.positions = module.pattern.positions()
        ctx.save_for_backward(x, values, bias)
        return _own(y)

    @staticmethod
    def backward(ctx, grad):
        x, values, bias = ctx.saved_tensors
        module, positions = ctx.module, ctx.positions
        needs = ctx.needs_input_grad[:3]
        check = ctx.route and needs[0]
        if torch.is_grad_enabled():  # create_graph: gradients that are differentiable again
            with torch.enable_grad():
                y = module.dense_forward(x, _scattered(module, values, positions), bias)
                wanted = [t for t, n in zip((x, values, bias), needs) if n]
                got = iter(torch.autograd.grad(y, wanted, grad, create_graph=True))
            grad_x, grad_values, grad_bias = (next(got) if n else None for n in needs)
            finite = not check or _feature_finite(grad_x, module.feature_dim)
        else:
            grad_x, grad_weight, grad_bias = module.dense_backward(x, ctx.weight, grad, needs)
            grad_values = None if grad_weight is None else grad_weight.reshape(-1).index_select(0, positions)
            finite = not check or _feature_finite(grad_x, module.feature_dim)
        if not finite:
            create = torch.is_grad_enabled()
            with torch.enable_grad():
                xs = x if create else x.detach().requires_grad_(True)
                (grad_x,) = torch.autograd.grad(module.run_kernel(DEFAULT, xs), xs, grad, create_graph=create)
        return grad_x, grad_values, grad_bias, None, None, None


def lookup(module: nn.Module, x: torch.Tensor) -> Optional[Choice]:
    return _choices.get(choice_key(module, x))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(module: nn.Module, x: torch.Tensor, kernel: str) -> Callable[[], None]:
    """One call of ``kernel`` on ``x``: forward, and backward when the layer is training. The gradients
    are returned by autograd.grad, never accumulated into ``.grad``."""
    backward = _needs_backward(module, x)
    xs = x.detach().requires_grad_(x.requires_grad)
    params = [p for p in module.parameters() if p.requires_grad]
    inputs = params + ([xs] if xs.requires_grad else [])

    def run():
        with torch.enable_grad() if backward else torch.no_grad():
            y = call_kernel(module, kernel, xs)
            if backward:
                torch.autograd.grad(y, inputs, grad_outputs=torch.ones_like(y), allow_unused=True)
    return run


def dense_margin(module: nn.Module) -> float:
    """How much faster than the dense kernel a sparse one must measure to be chosen for ``module``."""
    return NEAR_DENSE_MARGIN if module.density >= NEAR_DENSE else DENSE_MARGIN


@contextlib.contextmanager
def _no_saved_tensor_hooks() -> Iterator[None]:
    """The saved-tensor hooks in effect (a non-reentrant activation checkpoint's, save_on_cpu's) set aside while the
    choice times its calls: those calls' graphs are not the model's, and a checkpoint that saw their saved tensors
    in the forward would find fewer when it recomputes (once the choice is made) and raise. torch keeps the hooks
    in a thread-local stack, reached through private functions: where they are missing, nothing is set aside."""
    ag = torch._C._autograd
    top, pop, push = (getattr(ag, f"_{op}_saved_tensors_default_hooks", None) for op in ("top", "pop", "push"))
    held = []
    if top is not None and pop is not None and push is not None:
        while (hooks := top(True)) is not None:
            held.append(hooks)
            pop()
    try:
        yield
    finally:
        for pack, unpack in reversed(held):
            push(pack, unpack)


def _measure(module: nn.Module, x: torch.Tensor) -> Choice:
    candidates = module.candidates()
    if len(candidates) == 1:
        return Choice(candidates[0], reason="only candidate")
    if module.dense_macs(x) < MIN_TUNE_MACS:
        return Choice(_rule(module), reason=f"below {MIN_TUNE_MACS:.1e} MACs: density rule")
    runs = {kernel: _timer(module, x, kernel) for kernel in candidates}
    evict = torch.empty(EVICT_BYTES // 4, dtype=torch.float32) if x.device.type == "cpu" and EVICT_BYTES else None

    def timed(kernel: str) -> Tuple[float, bool]:
        """(ms, whether the call took no more than FAULT_PAGES page faults)."""
        if evict is not None:
            evict.fill_(1.0)
        _sync(x.device)
        faults = _minor_faults()
        t0 = _clock()
        runs[kernel]()
        _sync(x.device)
        t = (_clock() - t0) * 1e3
        return t, _minor_faults() - faults <= FAULT_PAGES

    for _ in range(WARMUP):
        for kernel in candidates:
            timed(kernel)
    # Rounds over the candidates, not one candidate after another: the machine's state drifts (fresh
    # pages, caches, other processes) and must not favour whichever ran last. The minimum per
    # candidate, not the median: interference only ever adds time.
    samples: Dict[str, List[Tuple[float, bool]]] = {kernel: [] for kernel in candidates}

    def best(kernel: str) -> float:
        """The candidate's fastest clean call (its fastest call where none was clean)."""
        clean = [t for t, ok in samples[kernel] if ok]
        return min(clean or [t for t, _ in samples[kernel]])

    def rounds() -> None:
        active = list(candidates)
        for r in range(MAX_REPEATS):
            for kernel in active:
                samples[kernel].append(timed(kernel))
            fastest = min(best(k) for k in candidates)
            if r == 0:  # clearly slower after one round: not worth timing further (unless that call faulted)
                active = [k for k in active if best(k) <= GIVE_UP_RATIO * fastest or not samples[k][-1][1]]
            elif r + 1 >= REPEATS:  # a close call: more rounds for the contenders
                active = [k for k in active if best(k) <= CLOSE_RATIO * fastest]
                if len(active) < 2:
                    break

    def pick() -> Choice:
        times = {kernel: best(kernel) for kernel in samples}
        fastest = min(times, key=times.get)
        if "dense" in times and times["dense"] <= (1 + dense_margin(module)) * times[fastest]:
            fastest = "dense"  # a near tie is within the noise: the dense kernel is never the wrong bet
        return Choice(fastest, times)

    rounds()
    if pick().kernel == "dense" and module.density < RULE_DENSE_FROM:
        # A sparse layer that lost to its dense kernel gets a second set of rounds (the minimum over both counts):
        # once chosen, a kernel runs for the whole training. In one model bench run (Intel, 2 threads) ResNet-50's
        # 128 -> 128 3x3 stride-2 layer at density 0.1 most likely ran its dense kernel, 12.6 ms against the csr
        # kernel's 5.1-6.1 in every other run.
        rounds()
    return pick()


# -- explain ---------------------------------------------------------------------------------------
def explain(model: nn.Module, *example_inputs, backward: bool = True, print_table: bool = True,
            forward: Optional[Callable] = None) -> List[dict]:
    """Run ``model`` once on ``example_inputs`` (forward, and backward of the summed outputs when
    ``backward``; no ``.grad`` is touched) and report, per sparse layer: name, shape, density, input shape, chosen
    kernel, the measured time of each candidate (ms; the ``dense`` column is the layer's dense twin) and, for a conv
    on the ``csr`` kernel on the CPU, the C++ kernel of each pass (``conv_kernels``: "forward/input gradient/weight
    gradient", each direct, batched or pointwise; SparseConv2d.cpu_conv_kernels).

    One mapping for ``example_inputs`` (a ``transformers`` batch: ``{"input_ids": ...}``) is passed as keyword
    arguments. Returns the rows as dicts; prints them as a table when ``print_table``. ``forward(model, *inputs)``
    (``forward(model, **inputs)`` for a mapping) replaces ``model(...)`` for models whose outputs are not tensors,
    or tuples or mappings of tensors."""
    from .base import SparseWeightMixin
    if not isinstance(model, nn.Module):
        raise TypeError(f"explain: model must be an nn.Module, got {type(model).__name__}")
    keywords: Dict[str, object] = {}
    if len(example_inputs) == 1 and isinstance(example_inputs[0], Mapping):
        keywords, example_inputs = dict(example_inputs[0]), ()
    if not example_inputs and not keywords and forward is None:
        raise TypeError("explain: example_inputs are missing: explain(model, x) runs the model once on x to "
                        "measure each sparse layer on its input")
    seen: List[Tuple[str, nn.Module, torch.Tensor]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.append((name, mod, args[0])))
             for name, m in model.named_modules() if isinstance(m, SparseWeightMixin)]
    try:
        with torch.enable_grad() if backward else torch.no_grad():
            run = forward if forward is not None else (lambda m, *args, **kwargs: m(*args, **kwargs))
            out = run(model, *example_inputs, **keywords)
            params = [p for p in model.parameters() if p.requires_grad]
            if backward and params:
                torch.autograd.grad(_sum_outputs(out), params, allow_unused=True)  # leaves .grad alone
    finally:
        for h in hooks:
            h.remove()
    rows, done = [], set()
    for name, mod, x in seen:
        if name in done:
            continue
        done.add(name)
        x = mod.kernel_input(x)  # what the kernels ran on (a conv's padding_mode pads first)
        tuned = mod.kernel == "auto" and mod.format == "csr"
        choice = lookup(mod, x) if tuned else None
        if choice is None and tuned and torch.are_deterministic_algorithms_enabled():
            choice = Choice(resolve(mod, x), reason="deterministic rule")  # nothing measured: the rule's kernel
        kernel = mod.kernel if mod.kernel != "auto" else (choice.kernel if choice else DEFAULT)
        reason = ("pinned" if mod.kernel != "auto" else
                  "format='bsr'" if mod.format != "csr" else (choice.reason if choice else "not measured"))
        conv = getattr(mod, "cpu_conv_kernels", None)
        rows.append(dict(name=name, type=type(mod).__name__, shape=tuple(mod.weight_shape), density=mod.density,
                         input=tuple(x.shape), kernel=kernel, reason=reason,
                         times_ms=dict(choice.times_ms) if choice else {},
                         conv_kernels=conv(x) if conv is not None and kernel == "csr" else None))
    if print_table:
        print_rows(rows)
    return rows


def _sum_outputs(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().sum()
    if isinstance(out, dict):
        out = list(out.values())
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (list, tuple)):
        parts = [_sum_outputs(o) for o in out if isinstance(o, (torch.Tensor, list, tuple, dict))]
        if parts:
            return sum(parts)
    raise TypeError(f"explain: cannot sum a model output of type {type(out).__name__}; pass forward=... that "
                    "returns a tensor")


def _kernel_cell(row: dict) -> str:
    """The chosen kernel, the C++ conv kernel of each pass where it is csr on a conv, and why where not measured."""
    cell = row["kernel"] + (f" [{row['conv_kernels']}]" if row.get("conv_kernels") else "")
    return cell if row["reason"] == "measured" else f"{cell} ({row['reason']})"


def print_rows(rows: Sequence[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title="sparsekern kernel choice per layer (ms: forward+backward on the example input)")
    for col in ("layer", "shape", "density", "input", "kernel", "csr", "gemm", "dense", "vs dense"):
        table.add_column(col, justify="left" if col in ("layer", "kernel") else "right")
    for r in rows:
        t = r["times_ms"]
        chosen, dense = t.get(r["kernel"]), t.get("dense")
        ratio = f"{dense / chosen:.2f}x" if chosen and dense else "-"
        cells = [f"{t[k]:.2f}" if k in t else "-" for k in KERNELS]
        table.add_row(r["name"], "x".join(map(str, r["shape"])), f"{r['density']:.3f}",
                      "x".join(map(str, r["input"])), _kernel_cell(r), *cells, ratio)
    console = Console()
    if not console.is_terminal:  # a log or a pipe: wide enough that no column wraps
        console = Console(width=180)
    console.print(table)
