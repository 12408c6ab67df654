"""The Triton backend behind the op contracts: each public op under ``sparsekern.backend("triton")``, forward
and backward (the autograd formulas registered on the sparsekern_triton ops), against the reference
backend on the same inputs; the modules on it; and the dispatch rules that choose it."""
import pytest
import torch
from triton_testing import DEVICE, assert_close, needs_gpu

import sparsekern
from sparsekern import BlockSparseMatrix, SparseMatrix, ops
from sparsekern.nn import SparseConv2d, SparseLinear, random_block_mask, random_mask
from sparsekern.ops import dispatch

DT = torch.float32


@pytest.fixture
def triton_backend():
    with sparsekern.backend("triton"):
        yield


def _run(fn, *inputs):
    """fn's output and the gradients of every input that requires grad, under the triton backend,
    then under the reference backend (fresh leaves each time)."""
    results = []
    for backend in ("triton", "reference"):
        with sparsekern.backend(backend):
            leaves = [t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                      for t in inputs]
            out = fn(*leaves)
            grads = torch.autograd.grad(out, [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad],
                                        torch.ones_like(out)) if out.requires_grad else ()
            results.append((out.detach(), grads))
    (out, grads), (ref, ref_grads) = results
    assert_close(out, ref, DT)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, DT)


def _csr(m, k, density, seed=0, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    mask = random_mask((m, k), density, g)
    mask[list(empty_rows)] = False
    return SparseMatrix.from_dense(torch.randn(m, k, generator=g), mask).to(DEVICE)


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_spmm(density):
    A = _csr(13, 19, density, empty_rows=(2,))
    B = torch.randn(19, 6, device=DEVICE, requires_grad=True)
    values = A.values.clone().requires_grad_()
    _run(lambda v, b: ops.spmm(A.with_values(v), b), values, B)


@pytest.mark.parametrize("bias", [False, True])
def test_sparse_linear(bias):
    W = _csr(17, 24, 0.25, empty_rows=(0, 5))
    x = torch.randn(2, 5, 24, device=DEVICE, requires_grad=True)
    b = torch.randn(17, device=DEVICE, requires_grad=True) if bias else None
    values = W.values.clone().requires_grad_()
    _run(lambda x_, v, *bb: ops.sparse_linear(x_, W.with_values(v), *bb), x, values, *([b] if bias else []))


def test_sddmm():
    W = _csr(11, 14, 0.4)
    X = torch.randn(11, 9, device=DEVICE, requires_grad=True)
    Y = torch.randn(14, 9, device=DEVICE, requires_grad=True)
    _run(lambda X_, Y_: ops.sddmm(W, X_, Y_), X, Y)


def test_masked_matmul_and_sddmm():
    g = torch.Generator().manual_seed(3)
    mask = random_mask((21, 30), 0.2, g).to(DEVICE)
    mask[:, :16] = False  # whole empty tiles on the skip path
    w = torch.randn(21, 30, device=DEVICE, requires_grad=True)
    x = torch.randn(9, 30, device=DEVICE, requires_grad=True)
    _run(lambda x_, w_: ops.masked_matmul(x_, w_, mask), x, w)
    X = torch.randn(21, 7, device=DEVICE, requires_grad=True)
    Y = torch.randn(30, 7, device=DEVICE, requires_grad=True)
    _run(lambda X_, Y_: ops.masked_sddmm(X_, Y_, mask), X, Y)


@pytest.mark.parametrize("channels_last", [False, True])
def test_sparse_conv2d(channels_last):
    g = torch.Generator().manual_seed(4)
    mask = random_mask((6, 4, 3, 3), 0.3, g)
    W = SparseMatrix.from_dense(torch.randn(6, 4, 3, 3, generator=g), mask).to(DEVICE)
    x = torch.randn(2, 4, 7, 9, device=DEVICE)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    bias = torch.randn(6, device=DEVICE, requires_grad=True)
    values = W.values.clone().requires_grad_()
    _run(lambda x_, v, b: ops.sparse_conv2d(x_, W.with_values(v), b, stride=2, padding=1), x, values, bias)


@pytest.mark.parametrize("block", [16, 32])
def test_bsr_linear(block):
    g = torch.Generator().manual_seed(5)
    mask = random_block_mask((64, 96), 0.4, block, g)
    W = BlockSparseMatrix.from_dense(torch.randn(64, 96, generator=g), block, mask).to(DEVICE)
    x = torch.randn(10, 96, device=DEVICE, requires_grad=True)
    bias = torch.randn(64, device=DEVICE, requires_grad=True)
    values = W.values.clone().requires_grad_()
    W2 = lambda v: BlockSparseMatrix(W.row_ptr, W.col_idx, v, W.shape, validate=False)  # noqa: E731
    _run(lambda x_, v, b: ops.bsr_linear(x_, W2(v), b), x, values, bias)


def test_topk_select_and_gather():
    scores = torch.randn(300, device=DEVICE)
    scores[::7] = 0.5  # ties
    candidates = torch.rand(300, device=DEVICE) < 0.6
    picks = {}
    for backend in ("triton", "reference"):
        with sparsekern.backend(backend):
            picks[backend] = ops.topk_select(scores, 40, largest=False, candidates=candidates)
    assert torch.equal(picks["triton"], picks["reference"])
    src = torch.randn(50, device=DEVICE, requires_grad=True)
    index = torch.randint(0, 50, (80,), device=DEVICE)
    _run(lambda s: ops.gather(s, index), src)


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_module_training_step_matches_cpu_kernels(fmt, triton_backend):
    """One SGD step of a sparse MLP + conv on the triton backend equals the same step on the reference."""
    torch.manual_seed(0)
    lin = SparseLinear(32, 48, density=0.3, format=fmt, block=16).to(DEVICE)
    conv = SparseConv2d(16, 32, 3, padding=1, density=0.3, format=fmt, block=16).to(DEVICE)
    x, img = torch.randn(6, 32, device=DEVICE), torch.randn(2, 16, 6, 6, device=DEVICE)
    grads = []
    for backend in ("triton", "reference"):
        with sparsekern.backend(backend):
            lin.zero_grad(), conv.zero_grad()
            (lin(x).square().mean() + conv(img).square().mean()).backward()
        grads.append([p.grad.clone() for p in (lin.values, lin.bias, conv.values, conv.bias)])
    for g, r in zip(*grads):
        assert_close(g, r, DT)


def test_dispatch_rules(monkeypatch):
    cpu = torch.device("cpu")
    # On CPU tensors the C++ kernels stay the default even where the interpreter could run Triton.
    assert dispatch.get_backend("spmm", cpu) == "cpp"
    with sparsekern.backend("triton", op="spmm"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # (on a GPU machine the kernels are compiled, not interpreted)
        assert dispatch.get_backend("spmm", cpu) == "triton"
        assert dispatch.get_backend("sddmm", cpu) == "cpp"  # per op
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            dispatch.get_backend("spmm", cpu)
    with sparsekern.backend("cuda", op="spmm"):
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available for cpu tensors"):
            dispatch.get_backend("spmm", cpu)
    # The backward kernels of conv follow the conv's choice.
    with sparsekern.backend("reference", op="sparse_conv2d"):
        assert dispatch.get_backend("sparse_conv2d_backward_input", cpu) == "reference"
    with pytest.raises(ValueError, match="op must be one of"):
        sparsekern.set_backend("triton", op="nope")


def test_triton_dtype_rejected_clearly(triton_backend):
    W = _csr(8, 8, 0.5)
    with pytest.raises(TypeError, match="triton backend does not support"):
        ops.sparse_linear(torch.randn(3, 8, dtype=torch.float64, device=DEVICE), W.to(torch.float64))


@needs_gpu
def test_cuda_default_and_compile():
    """On a GPU: CUDA tensors pick a GPU backend by default, and torch.compile traces the Triton ops."""
    dev = torch.device("cuda")
    assert dispatch.get_backend("bsr_linear", dev) == "triton"
    assert dispatch.get_backend("spmm", dev) in ("cuda", "triton")
    lin = SparseLinear(256, 512, density=0.1, format="bsr", block=32, device=dev)
    x = torch.randn(128, 256, device=dev)
    with sparsekern.backend("triton"):
        eager = lin(x)
        compiled = torch.compile(lin, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
