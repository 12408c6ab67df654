"""The op registry and the one place that decides which implementation of an op runs.

Registry: each op file of ``sparsekern/ops`` declares its ops once, at its end, with
``declare(Op(...))``: the public function, whether a C++ schema exists (with its fake kernel), the
autograd formula, the autocast rule, the ``triton_kernels`` module that defines its Triton kernel and
its default order on CUDA tensors. ``sparsekern.ops`` imports every op file it finds; everything else
is derived from these declarations: ``OPS`` (the dispatch table), ``PARTS``, ``CUDA_ORDER``, the
exports of ``sparsekern.ops``, the fake, autograd and autocast registrations of both namespaces
(``sparsekern`` and ``sparsekern_triton``) and the Triton modules to load. The reference of an op is
``sparsekern.reference.<name>``.

Backend choice, in order of precedence: ``backend(name, op=...)`` / ``set_backend(name, op=...)`` for
one op, ``backend(name)`` / ``set_backend(name)`` for all ops, the ``SPARSEKERN_BACKEND`` environment
variable, then the default of the tensor's device (per op on CUDA). ``backend`` is a context manager
that restores every override on exit; ``set_backend`` changes them until changed again.

Backends: ``cpp`` (csrc/cpu, CPU tensors), ``cuda`` (csrc/cuda, CUDA tensors, when the CUDA
extension was built), ``triton`` (triton_kernels/: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``, which is how the kernels are tested without a GPU), ``reference`` (pure
PyTorch, everywhere).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

from .. import reference
from . import _autocast

BACKENDS = ("cpp", "cuda", "triton", "reference")


@dataclasses.dataclass(frozen=True)
class Op:
    """The declaration of one op, written once in its op file."""
    name: str  # sparsekern::<name>, sparsekern_triton::<name>, reference.<name>, sparsekern.ops.<name>
    function: Callable  # the public entry point (argument checks, then ``call`` or ``implementation``)
    schema: bool = True  # a C++ schema in csrc/ops.cpp with CPU (and CUDA) kernels
    fake: Optional[Callable] = None  # the fake kernel of the C++ schema (a triton_op traces its own)
    backward: Optional[Callable] = None  # autograd formula over other ops, required unless not differentiable
    setup_context: Optional[Callable] = None
    differentiable: bool = True  # False: no autograd formula on its kernels (indices, or itself a backward)
    # Kernels that exist only as a part of this op (its backward), with their fake kernels: they follow
    # this op's backend.
    parts: Mapping[str, Callable] = dataclasses.field(default_factory=dict)
    # The parts that are differentiable again (so that the op has second derivatives): part -> (backward,
    # setup_context), registered wherever the part has a kernel (C++ schema, Triton op).
    part_autograd: Mapping[str, Tuple[Callable, Callable]] = dataclasses.field(default_factory=dict)
    autocast: bool = False  # runs in the autocast dtype under torch.autocast (see _autocast)
    triton: Optional[str] = None  # the triton_kernels module that defines sparsekern_triton::<name>
    # Default order on CUDA tensors, best first, among the backends present. To be set from
    # `sparsekern bench --gpu`; no GPU has measured it yet, so Triton comes first: its kernels' logic
    # runs in CI (interpreter), the CUDA C++ kernels' only compiles. The Sputnik-style CUDA kernels are
    # expected to win unstructured SpMM/SDDMM/top-k (Gale et al., SC'20): swap once a GPU confirms it.
    cuda_order: Tuple[str, ...] = ("triton", "cuda")
    dispatched: bool = True  # False: a composition of other ops, exported but without kernels of its own

    def __post_init__(self):
        if not self.schema:  # no C++ schema, so no CUDA C++ kernel either
            object.__setattr__(self, "cuda_order", tuple(b for b in self.cuda_order if b != "cuda"))


REGISTRY: Dict[str, Op] = {}  # name -> declaration, in the order the op files declared them
OPS: Tuple[str, ...] = ()  # the ops with kernels, i.e. what set_backend(op=...) accepts
PARTS: Dict[str, str] = {}  # sub-kernel -> the op whose backend it follows
CUDA_ORDER: Dict[str, Tuple[str, ...]] = {}


def declare(op: Op) -> Op:
    """Add ``op`` to the registry (called once per op, at the end of its op file)."""
    global OPS
    if op.name in REGISTRY or op.name in PARTS:
        raise ValueError(f"declare: op {op.name!r} is declared twice")
    if op.function.__name__ != op.name:
        raise ValueError(f"declare: the function of op {op.name!r} is named {op.function.__name__!r}")
    if op.dispatched and op.differentiable and (op.backward is None or op.setup_context is None):
        raise ValueError(f"declare: op {op.name!r} needs backward and setup_context, or differentiable=False")
    if op.dispatched and op.schema and (op.fake is None or None in op.parts.values()):
        raise ValueError(f"declare: op {op.name!r} has a C++ schema, so it needs a fake kernel for it and its parts")
    REGISTRY[op.name] = op
    if op.dispatched:
        OPS = OPS + (op.name,)
        CUDA_ORDER[op.name] = op.cuda_order
        PARTS.update({part: op.name for part in op.parts})
    return op


def register(lib: str) -> None:
    """Fake kernels, autograd formulas and autocast rules of the declared ops that namespace ``lib``
    defines: ``sparsekern`` (the C++ schemas) or ``sparsekern_triton`` (the Triton ops)."""
    defined = [op for op in REGISTRY.values()
               if op.dispatched and (op.schema if lib == "sparsekern" else op.triton is not None)]
    for op in defined:
        if lib == "sparsekern":
            for name, fake in {op.name: op.fake, **op.parts}.items():
                torch.library.register_fake(f"sparsekern::{name}")(fake)
        if op.backward is not None:
            torch.library.register_autograd(f"{lib}::{op.name}", op.backward, setup_context=op.setup_context)
        for part, (backward, setup_context) in op.part_autograd.items():
            torch.library.register_autograd(f"{lib}::{part}", backward, setup_context=setup_context)
    _autocast.register(lib, [op.name for op in defined if op.autocast])


# The env var is read once, as the process default (reading os.environ inside a traced op would put
# it in torch.compile's guards); backend() and set_backend() override it at run time.
_env: Optional[str] = os.environ.get("SPARSEKERN_BACKEND") or None
_global: Optional[str] = None
_per_op: Dict[str, str] = {}
generation = 0  # bumped by every change of the overrides (a cache key of what get_backend returns)
extension_loaded = False  # set by sparsekern.ops once sparsekern._C has registered the kernels
_triton_state: Optional[bool] = None  # None: not tried yet
_triton_error = ""


def _check_name(caller: str, argument: str, name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{caller}: {argument} must be one of {BACKENDS}, got {name!r}")


def _override(caller: str, name: Optional[str], op: Optional[str]) -> None:
    global _global, generation
    if op is not None and op not in OPS:
        raise ValueError(f"{caller}: op must be one of {OPS}, got {op!r}")
    if name is not None:
        _check_name(caller, "name", name)
    if op is None:
        _global = name
        if name is None:
            _per_op.clear()
    elif name is None:
        _per_op.pop(op, None)
    else:
        _per_op[op] = name
    generation += 1


def set_backend(name: Optional[str], op: Optional[str] = None) -> None:
    """Force backend ``name`` for ``op`` (or for every op) until changed again; ``None`` removes the
    override of ``op`` (or every override), back to ``SPARSEKERN_BACKEND`` or the device default."""
    _override("set_backend", name, op)


@contextlib.contextmanager
def backend(name: Optional[str], op: Optional[str] = None) -> Iterator[None]:
    """``with sparsekern.backend("reference"): ...`` runs the block on backend ``name`` (for ``op``
    only if given; ``None``: without overrides); on exit, even by an exception, every override is what
    it was on entry. Nests."""
    saved = (_global, dict(_per_op))
    _override("backend", name, op)
    try:
        yield
    finally:
        _restore(saved)


def _restore(saved) -> None:
    global _global, generation
    _global = saved[0]
    _per_op.clear()
    _per_op.update(saved[1])
    generation += 1


def _chosen(op: str) -> Optional[str]:
    """The backend forced for ``op`` (override or env var), None for the device default."""
    return _per_op.get(op) or _global or _env


def triton_loaded() -> bool:
    """Import the Triton kernels once (lazily: importing triton is slow and needs TRITON_INTERPRET
    decided beforehand) and register their autograd formulas."""
    global _triton_state, _triton_error
    if _triton_state is None:
        try:
            from .. import triton_kernels
            triton_kernels.load(sorted({op.triton for op in REGISTRY.values() if op.triton}))
        except ImportError as exc:
            _triton_state, _triton_error = False, str(exc)
        else:
            register("sparsekern_triton")
            _triton_state = True
    return _triton_state


def cuda_kernels_built() -> bool:
    return extension_loaded and torch._C._dispatch_has_kernel_for_dispatch_key("sparsekern::spmm", "CUDA")


def available(op: str, device_type: str) -> Tuple[str, ...]:
    """The backends that can run ``op`` on ``device_type`` tensors, the default first."""
    op = PARTS.get(op, op)
    if device_type == "cuda":
        present = {"cuda": cuda_kernels_built() and REGISTRY[op].schema, "triton": triton_loaded()}
        return tuple(b for b in CUDA_ORDER[op] if present[b]) + ("reference",)
    if device_type == "cpu":
        interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
        extra = ("triton",) if _chosen(op) == "triton" and interp and triton_loaded() else ()
        return ("cpp",) + extra + ("reference",)
    return ("reference",)


def get_backend(op: str, device: torch.device) -> str:
    op = PARTS.get(op, op)
    name = _chosen(op)
    if name in (None, "cpp") and extension_loaded and device.type == "cpu":
        return "cpp"  # what the general path below gives, without reading the environment on every call
    if name is not None:
        _check_name(f"sparsekern.{op}", "the backend (SPARSEKERN_BACKEND)", name)
    if name == "cpp" and not extension_loaded:
        raise RuntimeError(f"sparsekern.{op}: the cpp backend needs the compiled extension sparsekern._C, which "
                           "is not built; run `pip install --no-build-isolation -e .` or use the reference backend")
    avail = available(op, device.type)
    if name is None:
        name = avail[0]
    if name not in avail:
        why = ""
        if name == "triton":
            why = (f" (triton failed to import: {_triton_error})" if _triton_state is False else
                   " (on CPU tensors the Triton kernels run only under TRITON_INTERPRET=1, set before import)")
        elif name == "cuda":
            why = " (the CUDA kernels of sparsekern._C were not built: needs a CUDA torch and nvcc at install time)"
        elif name == "cpp":
            why = " (the cpp backend runs CPU tensors only)"
        raise RuntimeError(f"sparsekern.{op}: backend {name!r} is not available for {device.type} tensors"
                           f"{why}; available: {', '.join(avail)}")
    return name


def autocasts(op: str) -> bool:
    """Whether ``op`` runs in the autocast dtype (declared ``autocast=True``; its backward parts do not)."""
    return op in REGISTRY and REGISTRY[op].autocast


_references: Dict[Tuple[str, str], Callable] = {}


def reference_kernel(op: str, device_type: str) -> Callable:
    """The reference function of ``op``, under the autocast rule of the ops (``_autocast``)."""
    if not autocasts(op):
        return getattr(reference, op)
    key = (op, device_type)
    if key not in _references:
        _references[key] = _autocast.reference(getattr(reference, op), device_type)
    return _references[key]


def implementation(op: str, device: torch.device) -> Callable:
    """The callable that runs ``op`` for tensors on ``device``, with the op schema's signature."""
    name = get_backend(op, device)
    if name == "reference":
        return reference_kernel(op, device.type)
    if name == "triton":
        return getattr(torch.ops.sparsekern_triton, op)
    return getattr(torch.ops.sparsekern, op)  # cpp and cuda: the dispatcher picks the device's kernel


def call(op: str, device: torch.device, *args):
    """``implementation(op, device)(*args)``, the entry of the differentiable ops. On the cpp backend in eager
    mode without autocast the op runs as one torch.autograd.Function built from its declaration (its
    setup_context and backward: the same formula) that calls the kernels below autograd: torch.library's
    Python autograd wrapper costs about 0.1 ms per call (fill_defaults, redispatch), forward and again for
    every op of the backward, more than a small layer's kernels (a 16x16 SparseLinear's fwd+bwd: 220 us this
    way, 400 us through the wrapper; MLP step 3.4 %, ViT-S step 1.2 % faster). Under torch.compile, autocast
    or another backend: the op itself."""
    name = get_backend(op, device)
    if name != "cpp" or torch.is_autocast_enabled(device.type) or tracing():
        return implementation(op, device)(*args)
    fn = _eager_function(op)
    if _unwrap_dead_wrappers is None or torch._C._are_functorch_transforms_active():
        return fn.apply(*args)
    # Function.apply binds the arguments to forward's signature (inspect.signature, ~15 us a call) because
    # setup_context is defined; forward takes *args without defaults, so the binding changes nothing. The
    # rest of what apply does outside torch.func transforms is this unwrap and the C++ apply.
    return super(torch.autograd.Function, fn).apply(*_unwrap_dead_wrappers(args))


NODE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def cpu_node(x: torch.Tensor, values: torch.Tensor, op: Optional[str] = None) -> bool:
    """Whether one of the extension's C++ autograd nodes (csrc/cpu/csr_nodes.cpp, dense_kernel.cpp) can run this
    call of a sparse layer in place of the op's Python formula: the extension loaded, CPU tensors of one dtype it
    runs, no autocast, no tracing, no torch.func transform (C++ nodes have no vmap rule), and ``op`` (when named)
    on the cpp backend. In a training step that Python costs 0.1-0.3 ms per layer: caches are cold between layers."""
    return (extension_loaded and x.device.type == "cpu" and values.dtype in NODE_DTYPES and x.dtype == values.dtype
            and not torch.is_autocast_enabled("cpu") and not tracing()
            and not torch._C._are_functorch_transforms_active()
            and (op is None or get_backend(op, x.device) == "cpp"))


def tracing() -> bool:
    """Under torch.compile or torch.jit tracing (where the registered ops, not eager shortcuts, must run)."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


_eager: Dict[str, type] = {}


# Private in torch (used by Function.apply since 2.1): where a release lacks it, call() takes Function.apply.
_unwrap_dead_wrappers = getattr(getattr(torch._functorch, "utils", None), "unwrap_dead_wrappers", None)


def _eager_function(op: str) -> type:
    if op not in _eager:
        decl, kernel = REGISTRY[op], getattr(torch.ops.sparsekern, op)

        def forward(*args):
            with torch._C._AutoDispatchBelowADInplaceOrView():
                return kernel(*args)

        def backward(ctx, *grads):
            if torch._C._are_functorch_transforms_active():
                # torch.library's generated autograd.Function (the backward's ops) has no setup_context, which
                # torch.func refuses: first derivatives only under a transform.
                with torch.no_grad():
                    return decl.backward(ctx, *grads)
            if torch.is_grad_enabled():  # create_graph: the backward's ops record their own autograd
                return decl.backward(ctx, *grads)
            with torch._C._AutoDispatchBelowADInplaceOrView():
                return decl.backward(ctx, *grads)

        _eager[op] = type(f"_Eager_{op}", (torch.autograd.Function,),
                          {"forward": staticmethod(forward), "setup_context": staticmethod(decl.setup_context),
                           "backward": staticmethod(backward)})
    return _eager[op]


def kernel_for(op: str, like: torch.Tensor) -> Callable:
    """``implementation`` for tensors like ``like``: how backward formulas call other ops."""
    return implementation(op, like.device)
