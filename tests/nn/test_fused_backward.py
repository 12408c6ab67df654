"""The layer nodes' backward with both gradients in one pass over the output gradient's batch tiles
(csrc/cpu/csr_backward.cpp), against float64 dense autograd: the linear node (without and with its fused ReLU or GELU)
and the spmm node (2-D and NCHW planes), over dtypes, densities (empty, with empty rows, up to the dense
fallback), batches of one tile to many with a ragged last one, gradient layouts (contiguous, transposed,
expanded) and both vector widths; and that the shapes meant to take the one-pass path do."""
import pytest
import torch

import sparsekern
from sparsekern import isa as sk_isa
from sparsekern.ops import dispatch

from sk_testing import gen, random_mask, seed_of, threads

pytestmark = pytest.mark.skipif(not dispatch.extension_loaded, reason="no compiled extension")

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}
ISAS = ("avx2", "avx512")


@pytest.fixture(params=ISAS)
def isa(request):
    if not sk_isa.supported(request.param):
        pytest.skip(f"isa {request.param}: this CPU lacks AVX-512F/BW/DQ/VL")
    with sk_isa.use(request.param):
        yield request.param


def _node(act):
    """The linear node with fused activation `act` (None: none)."""
    return getattr(torch.ops.sparsekern, f"_sparse_linear_{act}_node" if act else "_sparse_linear_node")


def _runs():
    return torch.ops.sparsekern._fused_backward_runs()


def _pattern(m, k, density, seed, empty_rows=False):
    mask = random_mask((m, k), density, gen(seed), empty_rows)
    row_ptr, col_idx = sparsekern.sparse_matrix.csr_from_mask(mask)
    t_row_ptr, t_col_idx, t_perm = sparsekern.sparse_matrix.transpose_pattern(row_ptr, col_idx, k)
    return mask, row_ptr, col_idx, (t_row_ptr, t_col_idx, t_perm)


def _dense(mask, values):
    W = torch.zeros(mask.shape, dtype=values.dtype)
    W[mask] = values
    return W


def _grad_layout(shape, dtype, g, layout):
    if layout == "contiguous":
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "transposed":
        return torch.randn(shape[::-1], generator=g, dtype=torch.float64).to(dtype).t()
    return torch.randn(shape[1:], generator=g, dtype=torch.float64).to(dtype).expand(shape)  # stride 0 rows


def _close(got, expected, dtype, scale):
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("density,empty_rows", [(0.0, False), (0.05, True), (0.3, False), (0.3, True), (0.9, False)])
@pytest.mark.parametrize("n", [1, 40, 200, 333])
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
@pytest.mark.parametrize("wants", ["all", "weight", "weight+bias", "no-bias"])
def test_linear_node_backward(isa, dtype, density, empty_rows, n, act, wants):
    """`wants`: which of x, values, bias need a gradient (no-bias: the layer has none)."""
    m, k = 70, 90
    seed = seed_of("fused-linear", isa, dtype, density, empty_rows, n, act, wants)
    g = gen(seed)
    mask, row_ptr, col_idx, tr = _pattern(m, k, density, seed, empty_rows)
    values = torch.randn(int(mask.sum()), generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    bias = torch.randn(m, generator=g, dtype=torch.float64).to(dtype).requires_grad_(wants != "weight")
    # x saved for the backward as the layer gets it: contiguous, or a transposed view (strides (1, n)).
    x = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype) if n % 2 else \
        torch.randn(k, n, generator=g, dtype=torch.float64).to(dtype).t()
    x.requires_grad_(wants in ("all", "no-bias"))
    if wants == "no-bias":
        bias = None
    inputs = [t for t in (x, values, bias) if t is not None and t.requires_grad]
    for layout in ("contiguous", "transposed", "expanded"):
        grad = _grad_layout((n, m), dtype, g, layout)
        y = _node(act)(x, values, bias, row_ptr, col_idx, *tr)
        got = torch.autograd.grad(y, inputs, grad)
        x64, v64 = x.detach().double().requires_grad_(), values.detach().double().requires_grad_()
        b64 = None if bias is None else bias.detach().double().requires_grad_()
        y64 = x64 @ _dense(mask, v64).t() + (0 if b64 is None else b64)
        if act:
            y64 = getattr(torch.nn.functional, act)(y64)
        ref = {id(x): x64, id(values): v64, id(bias): b64}
        expected = torch.autograd.grad(y64, [ref[id(t)] for t in inputs], grad.double())
        scales = {id(x): m, id(values): n, id(bias): n}
        for t, a, e in zip(inputs, got, expected):
            _close(a, e, dtype, scales[id(t)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_relu_mask_keeps_nan_and_drops_at_zero(dtype):
    """The fused ReLU's mask is nn.ReLU's backward: the gradient is dropped where the output is 0 (also where
    the product is exactly 0 or negative) and kept where it is NaN."""
    m, k, n = 64, 48, 256
    mask, row_ptr, col_idx, tr = _pattern(m, k, 0.3, 5)
    values = torch.randn(int(mask.sum()), dtype=torch.float64).to(dtype).requires_grad_()
    bias = torch.randn(m, dtype=torch.float64).to(dtype).requires_grad_()
    x = torch.randn(n, k, dtype=torch.float64).to(dtype)
    x[:, :] = torch.where(torch.rand(n, 1) < 0.1, 0.0, x)  # whole rows of 0: outputs equal to relu(bias)
    x[3, 5] = float("nan")  # one token's outputs NaN where its NaN reaches them
    x.requires_grad_()
    grad = torch.randn(n, m, dtype=torch.float64).to(dtype)
    before = _runs()
    y = torch.ops.sparsekern._sparse_linear_relu_node(x, values, bias, row_ptr, col_idx, *tr)
    got = torch.autograd.grad(y, [x, values, bias], grad)
    assert _runs() - before == 1
    pre = torch.ops.sparsekern._sparse_linear_node(x.detach(), values.detach(), bias.detach(), row_ptr, col_idx, *tr)
    y2 = pre.detach().requires_grad_()
    masked = torch.autograd.grad(torch.relu(y2), [y2], grad)[0]  # nn.ReLU's backward at the same product
    assert masked.isnan().sum() == 0 and y.isnan().any()
    expected_bias = masked.double().sum(0)
    tol = TOL[dtype]
    torch.testing.assert_close(got[2].double(), expected_bias, rtol=tol["rtol"], atol=tol["atol"] * n)
    finite = ~x.isnan().any(1)
    expected_x = masked.double() @ _dense(mask, values.detach().double())
    torch.testing.assert_close(got[0].double()[finite], expected_x[finite], rtol=tol["rtol"], atol=tol["atol"] * m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("density", [0.05, 0.3])
@pytest.mark.parametrize("planes", [None, (3, 25), (4, 64), (2, 1)], ids=["2d", "p25", "p64", "p1"])
def test_spmm_node_backward(isa, dtype, density, planes):
    m, k = 36, 50
    seed = seed_of("fused-spmm", isa, dtype, density, planes)
    g = gen(seed)
    mask, row_ptr, col_idx, tr = _pattern(m, k, density, seed, empty_rows=True)
    values = torch.randn(int(mask.sum()), generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    shape = (k, 150) if planes is None else (k,) + planes
    # A plane operand as conv2d_gemm passes it: an NCHW tensor viewed (C, N, H*W).
    B = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) if planes is None else
         torch.randn((planes[0], k, planes[1]), generator=g, dtype=torch.float64).to(dtype).transpose(0, 1))
    B.requires_grad_()
    out = torch.ops.sparsekern._spmm_node(values, row_ptr, col_idx, B, *tr)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    got = torch.autograd.grad(out, [values, B], grad)
    v64, B64 = values.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    out64 = torch.einsum("mk,k...->m...", _dense(mask, v64), B64)
    expected = torch.autograd.grad(out64, [v64, B64], grad.double())
    n = B[0].numel()
    _close(got[0], expected[0], dtype, n)
    _close(got[1], expected[1], dtype, m)
    assert got[1].shape == B.shape


@pytest.mark.parametrize("nthreads", [1, 2])
def test_shapes_meant_for_one_pass_take_it(nthreads):
    """Several whole batch tiles per thread: one pass; a single tile on two threads, the dense fallback, the
    gather path (far fewer nonzeros than columns) and create_graph: the products apart."""
    def backward_runs(n, density, m=64, k=96, create_graph=False):
        _, row_ptr, col_idx, tr = _pattern(m, k, density, 7)
        values = torch.randn(col_idx.numel(), requires_grad=True)
        x = torch.randn(n, k, requires_grad=True)
        y = torch.ops.sparsekern._sparse_linear_node(x, values, None, row_ptr, col_idx, *tr)
        before = _runs()
        torch.autograd.grad(y.square().sum(), [x, values], create_graph=create_graph)
        return _runs() - before

    with threads(nthreads):
        assert backward_runs(512, 0.2) == 1
        assert backward_runs(512, 0.2, create_graph=True) == 0
        assert backward_runs(512, 0.95) == 0  # the dense fallback
        assert backward_runs(512, 0.002, m=8, k=1000) == 0  # the gather path
        assert backward_runs(16, 0.2) == (1 if nthreads == 1 else 0)  # one tile: row parts on two threads


def test_layers_in_a_training_step_take_one_pass():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64))
    sparse = sparsekern.sparsify(model, 0.2, init="dense", fuse_activations=True)
    before = _runs()
    sparse(torch.randn(512, 96)).square().sum().backward()
    # Both layers, the first (its input needs no gradient) for the weight's, the bias's and its ReLU's.
    assert _runs() - before == 2
    assert all(p.grad is not None for p in sparse.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
# (kernel, stride, padding, size, one pass at 4 images): 2x2 planes put all 4 images in one group, one group for
# two threads, so the passes run apart, split by rows.
@pytest.mark.parametrize("geometry", [(1, 1, 0, 14, True), (1, 2, 0, 14, True), (1, 1, 0, 2, False),
                                      (3, 1, 1, 8, False)], ids=["1x1", "1x1-stride2", "1x1-2x2", "3x3"])
@pytest.mark.parametrize("n", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_node_backward(dtype, geometry, n, channels_last):
    """The conv node's backward with both gradients: a pointwise conv with at least one image group per thread
    runs the two in one pass (dy read once), the rest apart; both as F.conv2d's."""
    kernel, stride, padding, size, one_pass = geometry
    cin, cout = 24, 40
    seed = seed_of("fused-conv", dtype, geometry, n, channels_last)
    g = gen(seed)
    mask, row_ptr, col_idx, _ = _pattern(cout, cin * kernel * kernel, 0.3, seed, empty_rows=True)
    values = torch.randn(int(mask.sum()), generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    bias = torch.randn(cout, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    x = torch.randn(n, cin, size, size, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    with threads(2):
        before = _runs()
        y = torch.ops.sparsekern._sparse_conv2d_node(x, values, bias, row_ptr, col_idx, [kernel, kernel],
                                                     [stride, stride], [padding, padding], [1, 1])
        grad = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype)
        got = torch.autograd.grad(y, [x, values, bias], grad)
        fused = _runs() - before
    assert fused == (1 if one_pass and n >= 2 else 0)
    x64, v64, b64 = (t.detach().double().requires_grad_() for t in (x, values, bias))
    w64 = _dense(mask, v64).reshape(cout, cin, kernel, kernel)
    y64 = torch.nn.functional.conv2d(x64, w64, b64, stride, padding)
    expected = torch.autograd.grad(y64, [x64, v64, b64], grad.double())
    for a, e, scale in zip(got, expected, (cout, n * y.shape[2] * y.shape[3], n * y.shape[2] * y.shape[3])):
        _close(a, e, dtype, scale)
    assert got[0].is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_node_backward_in_runs_of_tiles(stride):
    """A plane whose dY, x and dx outgrow the one-pass backward's L2 run (1 MB: 682 columns at 256 + 2 x 64
    channels) runs in several runs of tiles; the result does not depend on it."""
    cin, cout, size, n = 64, 256, 28 * stride, 2
    seed = seed_of("fused-conv-runs", stride)
    g = gen(seed)
    mask, row_ptr, col_idx, _ = _pattern(cout, cin, 0.1, seed)
    values = torch.randn(int(mask.sum()), generator=g, dtype=torch.float64).float().requires_grad_()
    x = torch.randn(n, cin, size, size, generator=g, dtype=torch.float64).float().requires_grad_()
    with threads(2):
        before = _runs()
        y = torch.ops.sparsekern._sparse_conv2d_node(x, values, None, row_ptr, col_idx, [1, 1], [stride, stride],
                                                     [0, 0], [1, 1])
        grad = torch.randn(y.shape, generator=g, dtype=torch.float64).float()
        got = torch.autograd.grad(y, [x, values], grad)
        assert _runs() - before == 1
    x64, v64 = x.detach().double().requires_grad_(), values.detach().double().requires_grad_()
    y64 = torch.nn.functional.conv2d(x64, _dense(mask, v64).reshape(cout, cin, 1, 1), None, stride)
    expected = torch.autograd.grad(y64, [x64, v64], grad.double())
    _close(got[0], expected[0], torch.float32, cout)
    _close(got[1], expected[1], torch.float32, n * 28 * 28)


def test_gradcheck_through_the_one_pass_backward():
    """gradcheck (float64) of the linear node with its fused ReLU or GELU and of a pointwise conv node, at shapes whose
    backward runs in one pass (two batch tiles, resp. two image groups, on two threads)."""
    g = gen(seed_of("fused-gradcheck"))
    mask, row_ptr, col_idx, tr = _pattern(10, 12, 0.4, 11, empty_rows=True)
    values = torch.randn(int(mask.sum()), generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(64, 12, generator=g, dtype=torch.float64, requires_grad=True)
    cmask, crow_ptr, ccol_idx, _ = _pattern(5, 4, 0.5, 12)
    cvalues = torch.randn(int(cmask.sum()), generator=g, dtype=torch.float64, requires_grad=True)
    cx = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    with threads(2):
        before = _runs()
        for act in ("relu", "gelu"):
            node = _node(act)
            assert torch.autograd.gradcheck(lambda x, v, b, node=node: node(x, v, b, row_ptr, col_idx, *tr),
                                            (x, values, bias))
            assert _runs() > before
            before = _runs()
        before = _runs()
        assert torch.autograd.gradcheck(
            lambda x, v: torch.ops.sparsekern._sparse_conv2d_node(x, v, None, crow_ptr, ccol_idx, [1, 1], [1, 1],
                                                                   [0, 0], [1, 1]), (cx, cvalues))
        assert _runs() > before


def test_fused_gelu_second_gradients_and_non_finite_inputs():
    """The GELU node's gradient is itself differentiable (under create_graph it recomputes the product: gelu''
    reaches x, the values and the bias), and NaN / Inf pass as through F.gelu and its backward."""
    g = gen(seed_of("fused-gelu"))
    mask, row_ptr, col_idx, tr = _pattern(6, 8, 0.5, 13)
    values = torch.randn(int(mask.sum()), generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    node = _node("gelu")
    assert torch.autograd.gradgradcheck(lambda x, v, b: node(x, v, b, row_ptr, col_idx, *tr), (x, values, bias))
    assert torch.autograd.gradgradcheck(lambda x, v: node(x, v, None, row_ptr, col_idx, *tr), (x, values))
    for dtype in (torch.float32, torch.bfloat16):
        xs = torch.randn(300, 8, generator=g).to(dtype)
        xs[3, :], xs[7, :] = float("nan"), float("inf")
        v, b = values.detach().to(dtype).requires_grad_(), bias.detach().to(dtype).requires_grad_()
        xs.requires_grad_()
        y = node(xs, v, b, row_ptr, col_idx, *tr)
        grad = torch.randn(300, 6, generator=g).to(dtype)
        got = torch.autograd.grad(y, [xs, v, b], grad)
        # In float32 (the node rounds a bf16 output once, after the GELU).
        pre = torch.ops.sparsekern._sparse_linear_node(xs.detach().float(), v.detach().float(), b.detach().float(),
                                                       row_ptr, col_idx, *tr).requires_grad_()
        want_y = torch.nn.functional.gelu(pre)
        torch.testing.assert_close(y.float(), want_y, equal_nan=True, **TOL[dtype])
        dz = torch.autograd.grad(want_y, [pre], grad.float())[0]
        # NaN where a NaN reaches the bias's row
        torch.testing.assert_close(got[2].float(), dz.sum(0), equal_nan=True, rtol=TOL[dtype]["rtol"],
                                   atol=TOL[dtype]["atol"] * 300)
        finite = torch.isfinite(xs.detach()).all(1)
        want_x = dz.float() @ _dense(mask, v.detach().float())
        tol = TOL[dtype]
        torch.testing.assert_close(got[0].float()[finite], want_x[finite], rtol=tol["rtol"], atol=tol["atol"] * 6)
        assert got[0][~finite].isnan().all()


def test_fused_gelu_float32_against_float64_everywhere(isa):
    """The float32 GELU and its derivative (erf from a polynomial, exp and the reciprocal by hand) over the whole
    range, the tails, huge values and the specials, against F.gelu in float64: within 4e-7 (float32's own F.gelu is
    within 1.2e-6, its derivative 2.5e-7)."""
    z = torch.cat([torch.linspace(-12, 12, 200001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-40, -1e-40, 30.0, -30.0,
                                                                   1e20, -1e20, 3e38, -3e38])]).float()
    mask, row_ptr, col_idx, tr = _pattern(1, 1, 1.0, 0)
    one = torch.ones(1, requires_grad=True)
    x = z.reshape(-1, 1).clone().requires_grad_(True)
    y = _node("gelu")(x, one, None, row_ptr, col_idx, *tr)
    (dy,) = torch.autograd.grad(y, [x], torch.ones_like(y))
    z64 = z.double().requires_grad_(True)
    want = torch.nn.functional.gelu(z64)
    (want_d,) = torch.autograd.grad(want, [z64], torch.ones_like(want))
    torch.testing.assert_close(y.detach().double().flatten(), want.detach(), rtol=1e-6, atol=4e-7)
    torch.testing.assert_close(dy.double().flatten(), want_d, rtol=1e-6, atol=4e-7)
