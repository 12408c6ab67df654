"""The op registry and the backend choice (sparsekern.ops.dispatch): the derived lists agree with the
op declarations and with what is registered in torch, and ``sparsekern.backend`` / ``set_backend``
follow their precedence, validate their arguments and restore their state."""
import os
import pkgutil
import subprocess
import sys

import pytest
import torch

import sparsekern
from sparsekern import SparseMatrix, ops, reference
from sparsekern.ops import dispatch

CPU = torch.device("cpu")
DECLARED = list(dispatch.REGISTRY.values())
DISPATCHED = [op for op in DECLARED if op.dispatched]
needs_extension = pytest.mark.skipif(not ops.HAS_EXTENSION, reason="sparsekern._C is not built")


def _has(qualname: str, key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key))


def _state():
    return dispatch._global, dict(dispatch._per_op)


# ----------------------------------------------------------------------------------------
# The registry
# ----------------------------------------------------------------------------------------


def test_every_op_file_declares_its_ops():
    files = {m.name for m in pkgutil.iter_modules(ops.__path__) if not m.name.startswith("_") and m.name != "dispatch"}
    declaring = {op.function.__module__.rsplit(".", 1)[1] for op in DECLARED}
    assert declaring == files


def test_derived_lists_agree_with_the_declarations():
    assert dispatch.OPS == tuple(op.name for op in DISPATCHED)
    assert dispatch.CUDA_ORDER == {op.name: op.cuda_order for op in DISPATCHED}
    assert dispatch.PARTS == {part: op.name for op in DISPATCHED for part in op.parts}
    assert set(ops.__all__) >= set(dispatch.REGISTRY)


@pytest.mark.parametrize("op", DECLARED, ids=lambda op: op.name)
def test_declared_op_is_exported(op):
    assert getattr(ops, op.name) is op.function
    assert op.name in ops.__all__


@pytest.mark.parametrize("op", DISPATCHED, ids=lambda op: op.name)
def test_declared_op_has_a_reference(op):
    # (its parts run only inside the backward of its own kernels: the reference's autograd needs none)
    assert callable(getattr(reference, op.name, None)), f"sparsekern.reference.{op.name} is missing"


@pytest.mark.parametrize("op", DISPATCHED, ids=lambda op: op.name)
def test_declared_op_has_an_autograd_formula(op):
    assert op.differentiable == (op.backward is not None)
    if op.differentiable:
        assert op.setup_context is not None
    if op.schema and ops.HAS_EXTENSION:
        assert _has(f"sparsekern::{op.name}", "Autograd") == op.differentiable


@needs_extension
@pytest.mark.parametrize("op", DISPATCHED, ids=lambda op: op.name)
def test_declared_schema_has_kernels_and_a_fake_kernel(op):
    if not op.schema:
        assert not hasattr(torch.ops.sparsekern, op.name)
        assert "cuda" not in op.cuda_order
        return
    for name in (op.name, *op.parts):
        assert _has(f"sparsekern::{name}", "CPU"), f"sparsekern::{name} has no CPU kernel"
        assert _has(f"sparsekern::{name}", "Meta"), f"sparsekern::{name} has no fake kernel"
    assert _has(f"sparsekern::{op.name}", "AutocastCPU") == op.autocast


@needs_extension
def test_every_cpp_schema_is_declared():
    schemas = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("sparsekern::")}
    schemas = {n for n in schemas if not n.startswith("_")}  # private helpers (e.g. ISA queries) are not ops
    assert schemas == {op.name for op in DISPATCHED if op.schema} | set(dispatch.PARTS)


def test_triton_registration_follows_the_declarations():
    if not dispatch.triton_loaded():
        pytest.skip(f"triton is not importable: {dispatch._triton_error}")
    from sparsekern import triton_kernels
    files = {m.name for m in pkgutil.iter_modules(triton_kernels.__path__) if not m.name.startswith("_")}
    assert {op.triton for op in DECLARED if op.triton} == files  # no kernel file left unloaded
    for op in DISPATCHED:
        if op.triton:
            assert hasattr(torch.ops.sparsekern_triton, op.name), f"{op.triton}.py does not define {op.name}"
            assert _has(f"sparsekern_triton::{op.name}", "AutocastCPU") == op.autocast
            for part in op.parts:
                assert hasattr(torch.ops.sparsekern_triton, part)


def test_declare_rejects_incomplete_declarations():
    def new_op(x):
        return x
    with pytest.raises(ValueError, match="declared twice"):
        dispatch.declare(dispatch.Op("spmm", ops.spmm, fake=lambda *a: None, differentiable=False))
    with pytest.raises(ValueError, match="needs backward and setup_context"):
        dispatch.declare(dispatch.Op("new_op", new_op, fake=lambda x: x))
    with pytest.raises(ValueError, match="needs a fake kernel"):
        dispatch.declare(dispatch.Op("new_op", new_op, differentiable=False))
    assert "new_op" not in dispatch.REGISTRY


# ----------------------------------------------------------------------------------------
# Backend choice
# ----------------------------------------------------------------------------------------


@needs_extension
def test_precedence_per_op_over_global_over_device_default():
    assert dispatch.get_backend("spmm", CPU) == "cpp"  # the CPU default
    assert dispatch.get_backend("spmm", torch.device("meta")) == "reference"
    with sparsekern.backend("reference"):
        assert dispatch.get_backend("spmm", CPU) == "reference"
        with sparsekern.backend("cpp", op="spmm"):
            assert dispatch.get_backend("spmm", CPU) == "cpp"
            assert dispatch.get_backend("sddmm", CPU) == "reference"
    with sparsekern.backend("reference", op="spmm"), sparsekern.backend("cpp"):  # the order of entry is no matter
        assert dispatch.get_backend("spmm", CPU) == "reference"
        assert dispatch.get_backend("sddmm", CPU) == "cpp"
    # Sub-kernels follow their op.
    with sparsekern.backend("reference", op="sparse_conv2d"):
        assert dispatch.get_backend("sparse_conv2d_backward_weight", CPU) == "reference"
    assert dispatch.get_backend("spmm", CPU) == "cpp"


def test_default_on_cuda_tensors_follows_the_declared_order():
    for op in DISPATCHED:
        avail = dispatch.available(op.name, "cuda")
        assert avail[-1] == "reference"
        assert list(avail[:-1]) == [b for b in op.cuda_order if b in avail]


def test_environment_variable_is_below_the_overrides():
    code = """
import torch, sparsekern
from sparsekern.ops import dispatch
cpu = torch.device("cpu")
assert dispatch.get_backend("spmm", cpu) == "reference"
with sparsekern.backend("cpp"):
    assert dispatch.get_backend("spmm", cpu) == "cpp"
with sparsekern.backend("cpp", op="sddmm"):
    assert dispatch.get_backend("sddmm", cpu) == "cpp"
    assert dispatch.get_backend("spmm", cpu) == "reference"
sparsekern.set_backend("cpp")
sparsekern.set_backend(None)
assert dispatch.get_backend("spmm", cpu) == "reference"  # None removes the overrides, not the env var
print("ok")
"""
    if not ops.HAS_EXTENSION:
        pytest.skip("sparsekern._C is not built")
    env = {**os.environ, "SPARSEKERN_BACKEND": "reference", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_unknown_environment_value_is_named_on_use(monkeypatch):
    monkeypatch.setattr(dispatch, "_env", "fast")
    with pytest.raises(ValueError, match=r"SPARSEKERN_BACKEND\) must be one of .* got 'fast'"):
        dispatch.get_backend("spmm", CPU)


@pytest.mark.parametrize("call", [sparsekern.set_backend, lambda *a, **k: sparsekern.backend(*a, **k).__enter__()],
                         ids=["set_backend", "backend"])
def test_unknown_names_raise_value_error_naming_the_argument(call):
    before = _state()
    with pytest.raises(ValueError, match=r"name must be one of \('cpp', 'cuda', 'triton', 'reference'\), got 'fast'"):
        call("fast")
    with pytest.raises(ValueError, match=r"op must be one of .*'spmm'.*, got 'nope'"):
        call("reference", op="nope")
    with pytest.raises(ValueError, match="op must be one of"):  # a sub-kernel follows its op: not chosen alone
        call("reference", op="sparse_conv2d_backward_input")
    assert _state() == before


def test_cpp_on_cuda_tensors_raises():
    with sparsekern.backend("cpp"):
        if not ops.HAS_EXTENSION:
            with pytest.raises(RuntimeError, match="needs the compiled extension"):
                dispatch.get_backend("spmm", torch.device("cuda"))
            return
        with pytest.raises(RuntimeError, match="backend 'cpp' is not available for cuda tensors .*CPU tensors only"):
            dispatch.get_backend("spmm", torch.device("cuda"))


def test_triton_on_cpu_without_the_interpreter_raises_with_the_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    A = SparseMatrix.from_dense(torch.eye(4), torch.eye(4, dtype=torch.bool))
    with sparsekern.backend("triton", op="spmm"):
        with pytest.raises(RuntimeError, match="backend 'triton' is not available for cpu tensors "
                                               r"\((on CPU tensors the Triton kernels run only under "
                                               r"TRITON_INTERPRET=1|triton failed to import)"):
            ops.spmm(A, torch.ones(4, 2))


def test_context_restores_on_exception():
    before = _state()
    with pytest.raises(KeyError):
        with sparsekern.backend("reference"):
            with sparsekern.backend("cpp", op="spmm"):
                sparsekern.set_backend("reference", op="sddmm")  # undone too: the block's changes end with it
                raise KeyError("inside")
    assert _state() == before


def test_contexts_nest():
    with sparsekern.backend("reference"):
        with sparsekern.backend("cpp", op="spmm"):
            with sparsekern.backend("triton", op="spmm"):
                assert dispatch._per_op == {"spmm": "triton"}
            assert dispatch._per_op == {"spmm": "cpp"}
            with sparsekern.backend(None):  # no overrides inside
                assert _state() == (None, {})
            assert _state() == ("reference", {"spmm": "cpp"})
        assert _state() == ("reference", {})
    assert _state() == (None, {})


def test_backend_is_a_decorator_too():
    @sparsekern.backend("reference", op="gather")
    def chosen():
        return dispatch.get_backend("gather", CPU)
    assert chosen() == "reference"
    assert "gather" not in dispatch._per_op


def test_set_backend_keeps_its_meaning():
    sparsekern.set_backend("reference", op="spmm")
    sparsekern.set_backend("reference")
    assert _state() == ("reference", {"spmm": "reference"})
    sparsekern.set_backend(None, op="spmm")
    assert _state() == ("reference", {})
    sparsekern.set_backend("cpp", op="spmm")
    sparsekern.set_backend(None)  # clears every override
    assert _state() == (None, {})


def test_the_chosen_backend_runs():
    def implementation(op):
        impl = dispatch.implementation(op, CPU)
        return getattr(impl, "__wrapped__", impl)  # the reference under the autocast rule
    with sparsekern.backend("reference"):
        assert implementation("spmm") is reference.spmm
    if ops.HAS_EXTENSION:
        with sparsekern.backend("cpp"):
            assert implementation("spmm") is torch.ops.sparsekern.spmm


# ----------------------------------------------------------------------------------------
# The layers' ops in eager mode: one autograd.Function from the declaration
# ----------------------------------------------------------------------------------------


def _linear_case(g):
    W = SparseMatrix.from_dense(torch.randn(5, 7, dtype=torch.float64, generator=g)
                                * (torch.rand(5, 7, generator=g) < 0.5))
    x = torch.randn(3, 7, dtype=torch.float64, generator=g)
    bias = torch.randn(5, dtype=torch.float64, generator=g)
    t = W.transpose_pattern()
    return (ops.sparse_linear, (x, W, bias), torch.ops.sparsekern.sparse_linear,
            lambda x, v, b: (x, v, W.row_ptr, W.col_idx, b, *t))


def _conv_case(g):
    W = SparseMatrix.from_dense(torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g)
                                * (torch.rand(4, 3, 3, 3, generator=g) < 0.5))
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=g)
    bias = torch.randn(4, dtype=torch.float64, generator=g)
    return (lambda x, W, b: ops.sparse_conv2d(x, W, b, 2, 1), (x, W, bias), torch.ops.sparsekern.sparse_conv2d,
            lambda x, v, b: (x, v, W.row_ptr, W.col_idx, [3, 3], b, [2, 2], [1, 1], [1, 1]))


@needs_extension
@pytest.mark.parametrize("make", [_linear_case, _conv_case], ids=["sparse_linear", "sparse_conv2d"])
def test_eager_function_matches_the_registered_autograd(make):
    """In eager mode the public op runs through dispatch.call's autograd.Function (kernels below
    autograd); its forward and derivatives (second ones for sparse_linear) equal those of the op called
    through torch.library's registered autograd (what torch.compile and autocast use), bit for bit."""
    fn, (x, W, bias), raw, raw_args = make(torch.Generator().manual_seed(3))
    leaves = [t.clone().requires_grad_() for t in (x, W.values, bias)]
    y = fn(leaves[0], W.with_values(leaves[1]), leaves[2])
    assert type(y.grad_fn).__name__.startswith("_Eager_")
    ref_leaves = [t.clone().requires_grad_() for t in (x, W.values, bias)]
    y_ref = raw(*raw_args(*ref_leaves))
    assert not type(y_ref.grad_fn).__name__.startswith("_Eager_")
    assert torch.equal(y, y_ref)
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(4))
    first = torch.autograd.grad(y, leaves, g, create_graph=True)
    first_ref = torch.autograd.grad(y_ref, ref_leaves, g, create_graph=True)
    for a, b in zip(first, first_ref):
        assert torch.equal(a, b)
    if raw is torch.ops.sparsekern.sparse_linear:  # the conv's backward kernels have no derivatives of their own
        second = torch.autograd.grad(sum(t.sum() for t in first), leaves, allow_unused=True)
        second_ref = torch.autograd.grad(sum(t.sum() for t in first_ref), ref_leaves, allow_unused=True)
        for a, b in zip(second, second_ref):
            assert (a is None and b is None) or torch.equal(a, b)
    torch.autograd.gradcheck(lambda *t: fn(t[0], W.with_values(t[1]), t[2]), leaves)


@needs_extension
@pytest.mark.parametrize("make", [_linear_case, _conv_case], ids=["sparse_linear", "sparse_conv2d"])
def test_eager_function_under_torch_func(make):
    """Under a torch.func transform dispatch.call goes through Function.apply (functorch's own path),
    outside one it skips apply's argument binding: torch.func.grad and plain autograd agree. (The backward's
    ops run without a graph there: torch.library's generated autograd.Function, which they have, lacks the
    setup_context torch.func requires.)"""
    fn, (x, W, bias), _, _ = make(torch.Generator().manual_seed(5))

    def loss(x, values, bias):
        return (fn(x, W.with_values(values), bias) ** 2).sum()

    got = torch.func.grad(loss, argnums=(0, 1, 2))(x, W.values, bias)
    leaves = [t.clone().requires_grad_() for t in (x, W.values, bias)]
    y = fn(leaves[0], W.with_values(leaves[1]), leaves[2])
    assert type(y.grad_fn).__name__.startswith("_Eager_")
    expected = torch.autograd.grad((y ** 2).sum(), leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
