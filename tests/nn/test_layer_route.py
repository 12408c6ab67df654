"""The sparse layers' C++ route (sparsekern._C.LayerRoute, kept by kernel_choice._keep_fast): it gives exactly what
Python's route gives, and it refuses (returns None, so that Python's route decides) every call where anything that
route's key holds, or what its kept arguments depend on, has changed."""
import copy
import pickle
import weakref

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import sparsekern
from sparsekern.nn import SparseConv2d, SparseLinear, kernel_choice as kc

pytestmark = pytest.mark.skipif(kc._LayerRoute is None or not kc._dispatch.extension_loaded,
                                reason="no compiled extension")


def gen(seed):
    return torch.Generator().manual_seed(seed)


LAYERS = ["linear", "linear-3d", "linear-relu", "linear-gelu", "linear-full-gelu", "conv", "conv-channels-last",
          "conv-full"]


def _layer(kind: str, kernel: str, bias: bool = True):
    """A layer pinned to ``kernel`` and its input; "-full": every weight stored (the dense kernel is then the dense
    op on a view of the values)."""
    density = 1.0 if "-full" in kind else 0.4
    if kind.startswith("linear"):
        activation = kind.split("-")[-1] if kind.split("-")[-1] in ("relu", "gelu") else None
        layer = SparseLinear(24, 12, bias=bias, density=density, generator=gen(1), activation=activation)
        x = torch.randn((2, 3, 24) if kind == "linear-3d" else (6, 24), generator=gen(2))
    else:
        layer = SparseConv2d(6, 8, 3, stride=2, padding=1, bias=bias, density=density, generator=gen(3))
        x = torch.randn(2, 6, 9, 9, generator=gen(4))
        if kind == "conv-channels-last":
            x = x.contiguous(memory_format=torch.channels_last)
    layer.kernel = kernel
    return layer, x.requires_grad_()


def _kept(layer, x):
    """The layer's C++ route after its first calls on x."""
    for _ in range(3):
        layer(x)
    fast = layer.__dict__.get(kc.FAST)
    assert fast is not None and fast.usable
    return fast


def _grads(layer, x, g):
    layer.zero_grad(set_to_none=True)
    x.grad = None
    y = layer(x)
    y.backward(g)
    return [y.detach(), x.grad, layer.values.grad] + ([layer.bias.grad] if layer.bias is not None else [])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kernel", ["csr", "dense"])
@pytest.mark.parametrize("kind", LAYERS)
def test_the_cpp_route_gives_what_pythons_route_gives(kind, kernel, bias, monkeypatch):
    """Output, input gradient and parameter gradients bit for bit, through the same C++ autograd node; the output
    keeps the input's memory format."""
    layer, x = _layer(kind, kernel, bias)
    fast = _kept(layer, x)
    g = torch.randn(layer(x).shape, generator=gen(5))
    direct = fast(layer, x)
    assert direct is not None and type(direct.grad_fn).__name__ == type(layer(x).grad_fn).__name__
    through_cpp = _grads(layer, x, g)
    assert layer.__dict__[kc.FAST] is fast  # (still the same route: it ran)
    monkeypatch.setattr(kc, "_LayerRoute", None)
    layer.__dict__.pop(kc.FAST)
    through_python = _grads(layer, x, g)
    assert kc.FAST not in layer.__dict__
    for a, b in zip(through_cpp, through_python):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if kind == "conv-channels-last":
        assert through_cpp[0].is_contiguous(memory_format=torch.channels_last)


def _changes():
    """(name, what to do around a call of the kept route: a context manager factory taking (layer, x) and giving
    the input to call it on)."""
    from contextlib import contextmanager

    def around(setup=None, teardown=None, arg=None):
        @contextmanager
        def ctx(layer, x):
            state = setup(layer, x) if setup else None
            try:
                yield arg(layer, x) if arg else x
            finally:
                if teardown:
                    teardown(layer, x, state)
        return ctx

    def mode(factory):
        @contextmanager
        def ctx(layer, x):
            with factory():
                yield x
        return ctx

    def set_threads(layer, x):
        n = torch.get_num_threads()
        torch.set_num_threads(n + 1)
        return n

    def set_deterministic(layer, x):
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        return before

    def pin_auto(layer, x):
        before = layer.kernel
        layer.kernel = "auto"
        return before

    def other_isa(layer, x):
        now = sparsekern.isa.get()
        other = "avx2" if now == "avx512" else "avx512"
        if not sparsekern.isa.supported(other):
            pytest.skip(f"this CPU has no {other}")
        sparsekern.isa.set(other)
        return now

    def swap(attr, make):
        def setup(layer, x):
            old = getattr(layer, attr) if attr != "values" else layer._parameters["values"]
            new = make(layer, old)
            if attr == "pattern":
                layer._modules["pattern"] = new
            else:
                setattr(layer, attr, new)
            return old

        def teardown(layer, x, old):
            if attr == "pattern":
                layer._modules["pattern"] = old
            else:
                setattr(layer, attr, old)
        return setup, teardown

    def frozen(attr):
        def setup(layer, x):
            getattr(layer, attr).requires_grad_(False)

        def teardown(layer, x, _):
            getattr(layer, attr).requires_grad_(True)
        return setup, teardown

    def replace_dict(name):
        def setup(layer, x):
            old = layer.__dict__[name]
            layer.__dict__[name] = dict(old)  # the same entries in another dict
            return old
        return setup

    def restore_dict(name):
        def teardown(layer, x, old):
            layer.__dict__[name] = old
        return teardown

    def rewritten_pattern(layer, x):
        """The pattern rewritten in place (DST: the same nnz, the same buffers)."""
        pattern = layer.pattern
        old = pattern.positions().clone()
        new = torch.randperm(layer.weight_shape.numel(), generator=gen(9))[:old.numel()].sort().values
        pattern.replace(new)
        return old

    class Functions(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    class Dispatches(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    return [
        ("shape", around(arg=lambda layer, x: torch.cat([x, x]).detach().requires_grad_())),
        ("strides", around(arg=lambda layer, x: x.detach().transpose(0, 1).contiguous().transpose(0, 1)
                           .requires_grad_() if x.dim() > 1 else x)),
        ("dtype", around(arg=lambda layer, x: x.detach().double())),
        ("requires_grad", around(arg=lambda layer, x: x.detach())),
        ("subclass_input", around(arg=lambda layer, x: x.as_subclass(Sub))),
        ("no_grad", mode(torch.no_grad)),
        ("inference_mode", mode(torch.inference_mode)),
        ("autocast", mode(lambda: torch.autocast("cpu", dtype=torch.bfloat16))),
        ("threads", around(set_threads, lambda layer, x, n: torch.set_num_threads(n))),
        ("deterministic", around(set_deterministic, lambda layer, x, b: torch.use_deterministic_algorithms(b))),
        ("isa", around(other_isa, lambda layer, x, now: sparsekern.isa.set(now))),
        ("layer_kernel", around(pin_auto, lambda layer, x, before: setattr(layer, "kernel", before))),
        ("set_kernel", around(lambda layer, x: kc.set_kernel("dense"), lambda layer, x, _: kc.set_kernel(None))),
        ("set_autotune", around(lambda layer, x: kc.set_autotune(not kc._autotune) or not kc._autotune,
                                lambda layer, x, before: kc.set_autotune(before))),
        ("clear_cache", around(lambda layer, x: kc.clear_cache())),
        ("backend", mode(lambda: sparsekern.backend("reference"))),
        ("values_replaced", around(*swap("values", lambda layer, v: nn.Parameter(v.detach().clone())))),
        ("values_frozen", around(*frozen("values"))),
        ("bias_frozen", around(*frozen("bias"))),
        ("bias_removed", around(*swap("bias", lambda layer, b: None))),
        ("pattern_rewritten", around(rewritten_pattern, lambda layer, x, old: layer.pattern.replace(old))),
        ("pattern_replaced", around(*swap("pattern", lambda layer, p: copy.deepcopy(p)))),
        ("parameters_dict_replaced", around(replace_dict("_parameters"), restore_dict("_parameters"))),
        ("modules_dict_replaced", around(replace_dict("_modules"), restore_dict("_modules"))),
        ("torch_function_mode", mode(Functions)),
        ("torch_dispatch_mode", mode(Dispatches)),
    ]


class Sub(torch.Tensor):
    """A tensor subclass: torch functions on it go through its __torch_function__, which the route never calls."""


CHANGES = _changes()


@pytest.mark.parametrize("kernel", ["csr", "dense"])
@pytest.mark.parametrize("kind", ["linear-3d", "conv", "conv-full"])
@pytest.mark.parametrize("name,change", CHANGES, ids=[n for n, _ in CHANGES])
def test_the_cpp_route_refuses_a_call_where_anything_it_depends_on_changed(name, change, kind, kernel):
    """Each change gives None (Python's route decides); after it, the route runs again."""
    layer, x = _layer(kind, kernel)
    fast = _kept(layer, x)
    assert fast(layer, x) is not None
    with change(layer, x) as arg:
        assert fast(layer, arg) is None, name
    # (a generation bumped, or buffers written, for good: the next call keeps a new route)
    assert fast(layer, x) is not None or name in ("clear_cache", "backend", "pattern_rewritten"), name


def test_the_cpp_route_refuses_a_changed_activation():
    layer, x = _layer("linear-relu", "csr")
    fast = _kept(layer, x)
    layer.activation = "gelu"
    assert fast(layer, x) is None
    y = layer(x)  # Python's route, then a new C++ route
    torch.testing.assert_close(y, torch.nn.functional.gelu(SparseLinear.to_dense(layer)[0](x)))
    layer.activation = "relu"
    assert fast(layer, x) is not None


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_cpp_route_refuses_inside_torch_func_and_jit_tracing(kind):
    layer, x = _layer(kind, "csr")
    fast = _kept(layer, x)
    seen = []

    def f(v):
        seen.append(fast(layer, x))
        return v * 2
    torch.func.vmap(f)(torch.ones(3))
    torch.func.grad(lambda v: f(v).sum())(torch.ones(3))
    torch.jit.trace(f, torch.ones(3), check_trace=False)
    assert seen == [None, None, None]
    assert fast(layer, x) is not None


def test_a_non_finite_input_on_the_dense_kernel_takes_the_sparse_kernel():
    """The dense kernel's NaN/Inf check holds on the C++ route: it returns None and Python's route runs the sparse
    kernel, so a NaN where the weight stores nothing does not spread."""
    mask = torch.rand(12, 24, generator=gen(6)) < 0.5
    mask[:, 0] = False  # input feature 0 is read by no output
    layer = SparseLinear.from_dense(nn.Linear(24, 12), mask=mask)
    layer.kernel = "dense"
    x = torch.randn(6, 24, generator=gen(7), requires_grad=True)
    fast = _kept(layer, x)
    bad = x.detach().clone()
    bad[:, 0] = float("nan")
    bad.requires_grad_()
    assert fast(layer, bad) is None
    y = layer(bad)
    assert torch.isfinite(y).all()
    layer.kernel = "csr"
    torch.testing.assert_close(y, layer(bad), rtol=0, atol=0)


def test_a_copied_or_pickled_layer_keeps_no_route_and_the_route_keeps_no_layer_alive():
    layer, x = _layer("conv", "csr")
    _kept(layer, x)
    for other in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert other.__dict__.get(kc.FAST) is None
        torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
        assert other.__dict__.get(kc.FAST) is None or other.__dict__[kc.FAST] is not layer.__dict__[kc.FAST]
    ref = weakref.ref(layer)
    del layer
    assert ref() is None  # no reference cycle through the route: freed without the collector


def test_torch_compile_does_not_call_the_cpp_route():
    """Under torch.compile the forward skips the route (the registered ops are traced), with no graph break."""
    layer, x = _layer("linear", "csr")
    _kept(layer, x)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))



def test_a_layer_whose_values_are_not_a_parameter_keeps_no_cpp_route():
    """The route reads the values from the layer's _parameters; values kept as a buffer (a frozen layer): Python's
    route alone, with the same results."""
    layer, x = _layer("linear", "csr")
    expected = layer(x).detach()
    values = layer._parameters.pop("values")
    layer.register_buffer("values", values.detach())
    for _ in range(3):
        y = layer(x)
    assert layer.__dict__.get(kc.FAST) is None
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["subclass", "instance"])
def test_a_layer_that_overrides_a_routed_method_keeps_no_cpp_route(where):
    """Python's route calls the layer's csr_node, activate, run_kernel, ...: where a subclass or the instance
    overrides one, that method runs on every call (no C++ route stands for it)."""
    calls = []

    class Counted(SparseLinear):
        def csr_node(self, x):
            calls.append(1)
            return super().csr_node(x)

    if where == "subclass":
        layer = Counted(24, 12, density=0.4, generator=gen(1))
    else:
        layer = SparseLinear(24, 12, density=0.4, generator=gen(1))
        real = layer.csr_node
        layer.csr_node = lambda x: calls.append(1) or real(x)
    layer.kernel = "csr"
    x = torch.randn(6, 24, generator=gen(2), requires_grad=True)
    for _ in range(4):
        layer(x)
    assert len(calls) == 4 and layer.__dict__.get(kc.FAST) is None


def test_the_cpp_route_stands_only_for_the_kept_python_route():
    """A call that keeps another Python route (here another input shape) drops the C++ route, so that last_kernel()
    names what the layer's last call ran; back on the first shape, both are kept again."""
    layer, x = _layer("linear", "auto")
    layer.kernel = "csr"
    _kept(layer, x)
    layer(torch.randn(3, 24))
    assert layer.__dict__.get(kc.FAST) is None
    _kept(layer, x)
    assert kc.last_kernel(layer) == "csr"
