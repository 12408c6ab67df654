"""torch.compile over the sparse modules equals eager; torch.library.opcheck on every registered op."""
import pytest
import torch
import torch._dynamo

from sparsekern.nn import SparseConv2d, SparseLinear

from sk_testing import assert_close, gen, has_cpu_kernel, make_input, random_mask, random_sparse

LINEAR_KERNELS = ("sparse_linear", "sddmm", "gather")
CONV_KERNELS = ("sparse_conv2d", "sparse_conv2d_backward_input", "sparse_conv2d_backward_weight")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _linear(dtype=torch.float32):
    torch.manual_seed(0)
    lin = SparseLinear(24, 10, density=0.4, dtype=dtype, generator=gen(1))
    lin.set_pattern(random_mask((10, 24), 0.4, gen(2), empty_rows=True))
    return lin


def _linear_step(lin, compile_backend, x):
    def step(x_):
        y = lin(x_)
        return (y * y).sum(), y

    fn = torch.compile(step, fullgraph=True, backend=compile_backend) if compile_backend else step
    loss, y = fn(x)
    grads = torch.autograd.grad(loss, [x, lin.values, lin.bias])
    return y.detach(), grads


def _check_linear(compile_backend, x_shape=(5, 24), dtype=torch.float32):
    lin = _linear(dtype)
    x = make_input(x_shape, dtype, gen(3), requires_grad=True)
    y_e, g_e = _linear_step(lin, None, x)
    y_c, g_c = _linear_step(lin, compile_backend, x)
    assert_close(y_c, y_e, scale=24)
    for c, e in zip(g_c, g_e):
        assert_close(c, e, scale=24)


@pytest.mark.kernels(*LINEAR_KERNELS)
def test_sparse_linear_compiled_aot_eager(backend):
    _check_linear("aot_eager")


@pytest.mark.kernels(*LINEAR_KERNELS)
def test_sparse_linear_compiled_batch_dims(backend):
    _check_linear("aot_eager", (2, 3, 24), torch.float64)


@pytest.mark.slow
@pytest.mark.kernels(*LINEAR_KERNELS)
def test_sparse_linear_compiled_inductor(backend):
    """Inductor compiles C++ (~40 s on the shared 2-core machine): marked slow, still run in CI."""
    _check_linear("inductor")


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["batched", "direct"])
def test_sparse_conv2d_channels_last_compiled_inductor(kernel, monkeypatch):
    """Inductor checks each op's result against its fake kernel's strides: a channels_last conv's output and input
    gradient lie channels_last whichever CPU kernel runs (the direct one writes NCHW)."""
    monkeypatch.setenv("SPARSEKERN_CONV_KERNEL", kernel)
    torch.manual_seed(7)
    conv = SparseConv2d(8, 16, 3, padding=1, density=0.3, generator=gen(7))
    x = torch.randn(4, 8, 6, 6, generator=gen(8)).contiguous(memory_format=torch.channels_last).requires_grad_(True)

    def step(x_):
        return (conv(x_).relu() ** 2).sum()

    want = torch.autograd.grad(step(x), (x, conv.values))
    got = torch.autograd.grad(torch.compile(step, backend="inductor")(x), (x, conv.values))
    for a, b in zip(got, want):
        assert_close(a, b, scale=72)


@pytest.mark.kernels(*CONV_KERNELS)
def test_sparse_conv2d_compiled_forward(backend):
    torch.manual_seed(4)
    conv = SparseConv2d(3, 5, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), density=0.5, generator=gen(4))
    x = make_input((2, 3, 9, 8), torch.float32, gen(5), "transposed")
    expected = conv(x).detach()
    fn = torch.compile(conv, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = fn(x)
    assert_close(got, expected, scale=45)


# -- opcheck -----------------------------------------------------------------------------

def _opcheck_samples(op):
    """Sample arguments for torch.library.opcheck, with the differentiable inputs requiring grad."""
    g = gen(6)
    dt = torch.float64
    W = random_sparse((5, 7), 0.5, dt, g, empty_rows=True)
    t_row_ptr, t_col_idx, t_perm = W.transpose_pattern()
    v = W.values.detach().clone().requires_grad_(True)
    if op == "spmm":
        return [(v, W.row_ptr, W.col_idx, make_input((7, 3), dt, g, requires_grad=True), t_row_ptr, t_col_idx, t_perm),
                (v, W.row_ptr, W.col_idx, make_input((7, 3), dt, g, requires_grad=True))]
    if op == "sddmm":
        return [(W.row_ptr, W.col_idx, make_input((5, 4), dt, g, requires_grad=True),
                 make_input((7, 4), dt, g, requires_grad=True))]
    if op == "sparse_linear":
        x = make_input((4, 7), dt, g, requires_grad=True)
        return [(x, v, W.row_ptr, W.col_idx, make_input((5,), dt, g, requires_grad=True), t_row_ptr, t_col_idx, t_perm),
                (x.detach(), v, W.row_ptr, W.col_idx)]
    if op == "masked_matmul":
        return [(make_input((4, 7), dt, g, requires_grad=True), make_input((5, 7), dt, g, requires_grad=True),
                 random_mask((5, 7), 0.5, g))]
    if op == "masked_sddmm":
        return [(make_input((5, 3), dt, g, requires_grad=True), make_input((7, 3), dt, g, requires_grad=True),
                 random_mask((5, 7), 0.5, g))]
    Wc = random_sparse((4, 3, 3, 3), 0.5, dt, g, empty_rows=True)
    geometry = ([3, 3], [2, 1], [1, 1], [1, 2])
    x = make_input((2, 3, 7, 8), dt, g, requires_grad=True)
    # channels_last operands too: the ops' results lie as their inputs do, whichever kernel ran (the fakes say so)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    if op == "sparse_conv2d":
        vc = Wc.values.detach().clone().requires_grad_(True)
        return [(x, vc, Wc.row_ptr, Wc.col_idx, geometry[0], make_input((4,), dt, g, requires_grad=True),
                 *geometry[1:]),
                (x, vc, Wc.row_ptr, Wc.col_idx, geometry[0], None, *geometry[1:]),
                (x_cl, vc, Wc.row_ptr, Wc.col_idx, geometry[0], None, *geometry[1:])]
    grad_out = make_input((2, 4, 4, 6), dt, g)  # Ho = (7+2-2-1)//2+1, Wo = (8+2-4-1)+1
    grad_cl = grad_out.contiguous(memory_format=torch.channels_last)
    if op == "sparse_conv2d_backward_input":
        return [(grad_out, Wc.values, Wc.row_ptr, Wc.col_idx, [2, 3, 7, 8], *geometry),
                (grad_cl, Wc.values, Wc.row_ptr, Wc.col_idx, [2, 3, 7, 8], *geometry)]
    if op == "sparse_conv2d_backward_weight":
        return [(grad_out, x.detach(), Wc.row_ptr, Wc.col_idx, *geometry)]
    if op == "topk_select":
        scores = torch.randn(50, dtype=dt, generator=g)
        return [(scores, 10, True, None), (scores, 5, False, torch.rand(50, generator=g) < 0.5)]
    if op == "gather":
        src = torch.randn(30, dtype=dt, generator=g, requires_grad=True)
        return [(src, torch.randperm(30, generator=g)), (src, torch.tensor([2, 2, 29, 0]))]
    raise AssertionError(op)


ALL_OPS = ("spmm", "sddmm", "sparse_linear", "masked_matmul", "masked_sddmm", "sparse_conv2d",
           "sparse_conv2d_backward_input", "sparse_conv2d_backward_weight", "topk_select", "gather")


@pytest.mark.parametrize("op", ALL_OPS)
def test_opcheck(op):
    """Schema, fake kernel, autograd registration and AOT dispatch of each op with its cpp kernel."""
    import sparsekern
    if not sparsekern.ops.HAS_EXTENSION:
        pytest.skip("opcheck needs the registered ops: sparsekern._C is not built")
    if not has_cpu_kernel(op):
        pytest.skip(f"cpp backend: no CPU kernel registered yet for sparsekern::{op}")
    overload = getattr(torch.ops.sparsekern, op).default
    for args in _opcheck_samples(op):
        result = torch.library.opcheck(overload, args)
        assert all(v == "SUCCESS" for v in result.values()), result
