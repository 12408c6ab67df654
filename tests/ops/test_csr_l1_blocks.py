"""The CPU CSR engine's SpMM in L1 blocks (csrc/cpu/csr_spmm.cpp, spmm_blocks): every row runs its entries in one
block of the packed tile's rows, its sums parked between blocks, then the next block. Forced to blocks of 1 to 40 rows
(`_set_l1_block_rows`), against the reference and float64 dense autograd: sparse_linear (bias, the fused ReLU and GELU,
a transposed output), spmm over NCHW planes, the one-pass backward's input gradient (W^T's values read into its blocks'
order straight from W's) and its SDDMM (the values' gradient, bit for bit the unblocked one's), over dtypes, both
vector widths, empty rows and blocks, 1 and 2 threads; the shapes that take blocks; the tiles' width."""
import contextlib
import os

import pytest
import torch

import sparsekern
from sparsekern import isa as sk_isa, reference
from sparsekern.ops import dispatch, sparse_linear

from sk_testing import assert_close, gen, make_input, random_mask, random_sparse, seed_of, threads

pytestmark = pytest.mark.skipif(not dispatch.extension_loaded, reason="no compiled extension")

DTYPES = (torch.float32, torch.float64, torch.bfloat16)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


@contextlib.contextmanager
def block_rows(rows):
    before = torch.ops.sparsekern._set_l1_block_rows(rows)
    try:
        yield
    finally:
        torch.ops.sparsekern._set_l1_block_rows(before)


def _runs():
    return torch.ops.sparsekern._l1_block_runs()


def _sddmm_runs():
    return torch.ops.sparsekern._sddmm_l1_block_runs()


def _pattern(m, k, density, seed):
    mask = random_mask((m, k), density, gen(seed), True)
    row_ptr, col_idx = sparsekern.sparse_matrix.csr_from_mask(mask)
    return mask, row_ptr, col_idx, sparsekern.sparse_matrix.transpose_pattern(row_ptr, col_idx, k)


def _dense(mask, values):
    return torch.zeros(mask.shape, dtype=values.dtype).masked_scatter(mask, values)


@pytest.fixture(params=("avx2", "avx512"))
def isa(request):
    if not sk_isa.supported(request.param):
        pytest.skip(f"isa {request.param}: this CPU lacks AVX-512F/BW/DQ/VL")
    with sk_isa.use(request.param), sparsekern.backend("cpp"):
        yield request.param


@pytest.mark.parametrize("nthreads", (1, 2))
@pytest.mark.parametrize("rows", (1, 7, 40))
@pytest.mark.parametrize("density,empty_rows", [(0.08, True), (0.3, False), (0.3, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_linear_in_blocks(isa, dtype, density, empty_rows, rows, nthreads):
    """Batches of whole tiles (256, 240: a narrower last tile) and k = 90, 130: blocks of every size, the last one
    short; at density 0.08 many rows have no entry in a block (their sums pass through it)."""
    for n, k in ((256, 130), (240, 90)):
        g = gen(seed_of("l1-linear", isa, dtype, density, empty_rows, rows, n))
        W = random_sparse((70, k), density, dtype, g, empty_rows)
        x = make_input((n, k), dtype, g)
        b = make_input((70,), dtype, g)
        before = _runs()
        with block_rows(rows), threads(nthreads):
            y = sparse_linear(x, W, b)
            y0 = sparse_linear(x, W)
        assert _runs() > before
        assert_close(y, reference.sparse_linear(x, W.values, W.row_ptr, W.col_idx, b), scale=k)
        assert_close(y0, reference.sparse_linear(x, W.values, W.row_ptr, W.col_idx, None), scale=k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("planes", [(3, 100), (2, 128)], ids=["p100", "p128"])
def test_spmm_node_over_planes_in_blocks(isa, dtype, planes):
    """B and out as NCHW planes (conv2d_gemm's operands, viewed (C, N, H*W)): the last block stores through the
    planes' runs; the backward's input gradient over them in blocks too."""
    m, k = 40, 96
    seed = seed_of("l1-planes", isa, dtype, planes)
    g = gen(seed)
    mask, row_ptr, col_idx, tr = _pattern(m, k, 0.25, seed)
    values = torch.randn(int(mask.sum()), generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    B = torch.randn((planes[0], k, planes[1]), generator=g, dtype=torch.float64).to(dtype).transpose(0, 1)
    B.requires_grad_()
    before = _runs()
    with block_rows(16):
        out = torch.ops.sparsekern._spmm_node(values, row_ptr, col_idx, B, *tr)
        grad = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
        got = torch.autograd.grad(out, [values, B], grad)
    assert _runs() > before
    v64, B64 = values.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    out64 = torch.einsum("mk,k...->m...", _dense(mask, v64), B64)
    expected = torch.autograd.grad(out64, [v64, B64], grad.double())
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), out64.detach(), rtol=tol["rtol"], atol=tol["atol"] * k)
    for a, e, scale in zip(got, expected, (B[0].numel(), m)):
        torch.testing.assert_close(a.double(), e, rtol=tol["rtol"], atol=tol["atol"] * scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
@pytest.mark.parametrize("rows", (3, 32))
def test_linear_node_forward_and_backward_in_blocks(isa, dtype, act, rows):
    """The layer node: its forward's SpMM and its one-pass backward's input gradient (W^T's blocks over the rows of
    the output gradient's tile) in blocks; gradients of x, values and bias against float64 dense autograd."""
    m, k, n = 120, 100, 256
    seed = seed_of("l1-node", isa, dtype, act, rows)
    g = gen(seed)
    mask, row_ptr, col_idx, tr = _pattern(m, k, 0.3, seed)
    values = torch.randn(int(mask.sum()), generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    bias = torch.randn(m, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    x = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    grad = torch.randn(n, m, generator=g, dtype=torch.float64).to(dtype)
    node = getattr(torch.ops.sparsekern, f"_sparse_linear_{act}_node" if act else "_sparse_linear_node")
    before, fused, sddmm = _runs(), torch.ops.sparsekern._fused_backward_runs(), _sddmm_runs()
    with block_rows(rows):
        y = node(x, values, bias, row_ptr, col_idx, *tr)
        got = torch.autograd.grad(y, [x, values, bias], grad)
    assert _runs() - before >= 2  # the forward's tiles and the input gradient's
    assert torch.ops.sparsekern._fused_backward_runs() - fused == 1
    assert _sddmm_runs() > sddmm  # the values' gradient too
    x64, v64, b64 = (t.detach().double().requires_grad_() for t in (x, values, bias))
    y64 = x64 @ _dense(mask, v64).t() + b64
    if act:
        y64 = getattr(torch.nn.functional, act)(y64)
    expected = torch.autograd.grad(y64, [x64, v64, b64], grad.double())
    tol = TOL[dtype]
    torch.testing.assert_close(y.double(), y64.detach(), rtol=tol["rtol"], atol=tol["atol"] * k)
    for a, e, scale in zip(got, expected, (m, n, n)):
        torch.testing.assert_close(a.double(), e, rtol=tol["rtol"], atol=tol["atol"] * scale)


def _tbv_runs():
    return torch.ops.sparsekern._t_block_values_runs()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_transposed_values_in_blocks_match_the_gather(isa, dtype):
    """W^T's values read into its blocks' order straight from W's (one pass through the transpose's permutation put
    in that order, cached) give the input gradient bit for bit the one from the gathered values put in that order
    (non-contiguous values take that path), and the values' gradient too."""
    m, k, n = 150, 80, 256
    g = gen(seed_of("l1-tbv", isa, dtype))
    mask, row_ptr, col_idx, tr = _pattern(m, k, 0.3, seed_of("l1-tbv-pattern", isa, dtype))
    base = torch.randn(2 * int(mask.sum()), generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    grad = torch.randn(n, m, generator=g, dtype=torch.float64).to(dtype)
    grads = []
    for values in (base[::2].clone(), base[::2]):
        values.requires_grad_()
        before = _tbv_runs()
        with block_rows(16):
            y = torch.ops.sparsekern._sparse_linear_node(x, values, None, row_ptr, col_idx, *tr)
            grads.append(torch.autograd.grad(y, [x, values], grad))
        assert (_tbv_runs() > before) == values.is_contiguous()
    assert torch.equal(grads[0][0], grads[1][0])
    assert torch.equal(grads[0][1], grads[1][1])


def test_transposed_values_in_blocks_follow_the_transpose_row_ptr():
    """The cached order is keyed on the permutation and W^T's column indices; another W^T row_ptr with the same two
    (W with one entry per row, its columns non-decreasing: W^T's lists are 0..m-1 whatever the columns) builds it
    again: each input gradient matches dense autograd."""
    m, k, n = 96, 24, 128
    g = gen(seed_of("l1-tbv-stale"))
    t_col_idx = torch.arange(m, dtype=torch.int32)
    t_perm = torch.arange(m, dtype=torch.int64)
    row_ptr = torch.arange(m + 1, dtype=torch.int64)
    x = torch.randn(n, k, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(n, m, generator=g, dtype=torch.float64)
    for cols in (torch.arange(m) // 4, torch.zeros(m, dtype=torch.int64)):  # 24 of W^T's rows, then one
        col_idx = cols.to(torch.int32)
        t_row_ptr = torch.zeros(k + 1, dtype=torch.int64)
        t_row_ptr[1:] = torch.bincount(cols, minlength=k).cumsum(0)
        values = torch.randn(m, generator=g, dtype=torch.float64, requires_grad=True)
        before = _tbv_runs()
        with block_rows(8):
            y = torch.ops.sparsekern._sparse_linear_node(x, values, None, row_ptr, col_idx, t_row_ptr, t_col_idx,
                                                         t_perm)
            dx, dv = torch.autograd.grad(y, [x, values], grad)
        assert _tbv_runs() > before
        dense = torch.zeros(m, k, dtype=torch.float64).index_put((torch.arange(m), cols), values.detach())
        torch.testing.assert_close(dx, grad @ dense)
        torch.testing.assert_close(dv, (grad.t() @ x.detach())[torch.arange(m), cols])


def test_transposed_values_in_blocks_follow_dst_updates():
    """Dynamic sparse training rewrites a layer's pattern and its transpose in place (their versions move): the cached
    blocked order is built again, and each step's input gradient matches dense autograd on the updated weight."""
    g = gen(seed_of("l1-tbv-dst"))
    torch.manual_seed(seed_of("l1-tbv-dst-model"))
    model = sparsekern.sparsify(torch.nn.Sequential(torch.nn.Linear(96, 120)), 0.3, "uniform", init="dense")
    layer = model[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    algo = sparsekern.dst.SET(model, opt, total_steps=10, delta_t=1, drop_fraction=0.3)
    patterns = set()
    with block_rows(8):
        for _ in range(4):
            x = torch.randn(256, 96, generator=g, requires_grad=True)
            y = model(x)
            grad = torch.randn(y.shape, generator=g)
            before = _tbv_runs()
            y.backward(grad)
            assert _tbv_runs() > before
            patterns.add(tuple(layer.pattern.col_idx.tolist()))
            expected = grad.double() @ layer.weight.detach().double()
            torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-5)
            opt.step()
            algo.step()
            opt.zero_grad()
    assert len(patterns) == 4


def test_gradcheck_in_blocks():
    g = gen(seed_of("l1-gradcheck"))
    W = random_sparse((20, 70), 0.3, torch.float64, g, empty_rows=True, requires_grad=True)
    x = make_input((128, 70), torch.float64, g, requires_grad=True)
    b = make_input((20,), torch.float64, g, requires_grad=True)
    with sparsekern.backend("cpp"), block_rows(9):
        before = _runs()
        assert torch.autograd.gradcheck(lambda x, v, b: sparse_linear(x, W.with_values(v), b), (x, W.values, b))
        assert _runs() > before


def _intel_blocks() -> bool:
    """Whether the extension sizes its blocks by Intel's rule (it asks the CPU itself: under valgrind the CPU that
    CPUID describes, which need not be the host's)."""
    return torch.ops.sparsekern._l1_block_rows(4096, 4096, 4096 * 4096 // 10, 256) * 256 == 128 << 10


def test_measured_rule_sizes_blocks_by_vendor():
    """Blocks of L1's size and at least 8 of them on AMD; on Intel 128 KB of packed rows and at least 2 (measured on
    each); at least 10 entries per row and block on average either way."""
    rows = torch.ops.sparsekern._l1_block_rows
    if "SPARSEKERN_EXPECT_NO_AVX512" not in os.environ:  # not under valgrind, whose CPUID may name another vendor
        with open("/proc/cpuinfo") as f:
            assert _intel_blocks() == ("GenuineIntel" in f.read())
    for tb in (128, 256):
        r = rows(4096, 4096, 4096 * 4096 // 10, tb)
        assert r > 0
        if _intel_blocks():
            assert r == (128 << 10) // tb
            assert rows(64, 2 * r, 64 * 2 * r, tb) == r and rows(64, 2 * r - 1, 64 * (2 * r - 1), tb) == 0
        else:
            assert r * tb <= 64 << 10  # L1d
            assert rows(64, 8 * r, 64 * 8 * r, tb) == r and rows(64, 8 * r - 1, 64 * (8 * r - 1), tb) == 0
        least = -(-10 * 4096 * 4096 // r)  # 10 entries per row and block on average
        assert rows(4096, 4096, least, tb) == r and rows(4096, 4096, least - 1, tb) == 0
    assert rows(0, 4096, 0, 256) == 0
    with pytest.raises(ValueError, match="tile_bytes > 0"):
        rows(4, 4, 4, 0)


@pytest.mark.parametrize("density,blocked", [(0.1, True), (0.004, False)])
def test_measured_rule_takes_blocks_for_long_dense_enough_rows(isa, density, blocked):
    """As measured (rows 0): blocks where the packed tile spans enough of them and a row has at least 10 entries per
    block on average (test_measured_rule_sizes_blocks_by_vendor): k = 4096 at density 0.1 (13-102 a block), not at
    0.004 (0.5-4); a short k (one block's worth) never."""
    g = gen(seed_of("l1-rule", isa, density))
    x = make_input((256, 4096), torch.float32, g)
    W = random_sparse((32, 4096), density, torch.float32, g)
    short = random_sparse((32, 128), 0.5, torch.float32, g)
    with block_rows(0):
        before = _runs()
        y = sparse_linear(x, W)
        assert (_runs() > before) == blocked
        before = _runs()
        sparse_linear(x[:, :128].contiguous(), short)
        assert _runs() == before
    assert_close(y, reference.sparse_linear(x, W.values, W.row_ptr, W.col_idx, None), scale=4096)


@pytest.mark.parametrize("nthreads", (1, 2))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_sddmm_in_blocks_is_bit_exact(isa, dtype, nthreads):
    """The fused backward's SDDMM in blocks (values kept in the blocks' order, put back in CSR order) sums each
    entry's tiles in the same order as without blocks: the values' gradient is the same bit for bit, over several
    tiles per thread, rows with no entry in some blocks and empty rows."""
    m, k, n = 90, 300, 520
    seed = seed_of("l1-sddmm", isa, dtype, nthreads)
    g = gen(seed)
    mask = random_mask((m, k), 0.15, g, True)
    row_ptr, col_idx = sparsekern.sparse_matrix.csr_from_mask(mask)
    tr = sparsekern.sparse_matrix.transpose_pattern(row_ptr, col_idx, k)
    values = torch.randn(int(mask.sum()), generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    x = torch.randn(n, k, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    grad = torch.randn(n, m, generator=g, dtype=torch.float64).to(dtype)
    grads = []
    for rows in (-1, 16):
        with block_rows(rows), threads(nthreads):
            before = _sddmm_runs()
            y = torch.ops.sparsekern._sparse_linear_node(x, values, None, row_ptr, col_idx, *tr)
            grads.append(torch.autograd.grad(y, [x, values], grad))
            assert (_sddmm_runs() > before) == (rows > 0)
    assert torch.equal(grads[0][1], grads[1][1])
    assert_close(grads[1][0], grads[0][0], scale=m)


def test_measured_rule_takes_sddmm_blocks_for_large_tiles(isa):
    """As measured: the backward's SDDMM in blocks where B's packed tile takes 512 KB or more (k = 4096, a batch of
    256) and the SpMM's rule holds, not for k = 1024."""
    g = gen(seed_of("l1-sddmm-rule", isa))
    for k, blocked in ((4096, True), (1024, False)):
        mask = random_mask((64, k), 0.1, g, False)
        row_ptr, col_idx = sparsekern.sparse_matrix.csr_from_mask(mask)
        tr = sparsekern.sparse_matrix.transpose_pattern(row_ptr, col_idx, k)
        values = torch.randn(int(mask.sum()), generator=g).requires_grad_()
        x = torch.randn(256, k, generator=g, requires_grad=True)  # both gradients: the fused backward
        with block_rows(0):
            before = _sddmm_runs()
            y = torch.ops.sparsekern._sparse_linear_node(x, values, None, row_ptr, col_idx, *tr)
            y.backward(torch.randn(y.shape, generator=g))
            assert (_sddmm_runs() > before) == blocked


def test_block_rows_setting_is_checked():
    with pytest.raises(ValueError, match="rows must be -1"):
        torch.ops.sparsekern._set_l1_block_rows(-2)


def test_tile_bytes_arguments_are_checked():
    with pytest.raises(ValueError, match="elem_size must be 2, 4 or 8"):
        torch.ops.sparsekern._tile_bytes(256, 3, True, 0)
    with pytest.raises(ValueError, match="n and random_rows must be >= 0"):
        torch.ops.sparsekern._tile_bytes(256, 4, True, -1)


def test_wide_tiles_only_while_the_randomly_read_tile_fits_half_of_l2():
    """The 64-byte loops' 256-byte tiles where the rows the pattern picks at random (no L1 blocks) fit half of L2, else
    128-byte ones; the 32-byte loops and short batches as before."""
    tb, half = torch.ops.sparsekern._tile_bytes, torch.ops.sparsekern._l2_bytes() // 2
    assert half >= 4096
    assert tb(256, 4, True, 0) == 256
    assert tb(256, 4, True, half // 256) == 256
    assert tb(256, 4, True, half // 256 + 1) == 128
    assert tb(64, 8, True, half) == 128
    assert tb(256, 4, False, 0) == 128
    assert (tb(8, 4, True, half), tb(16, 4, True, half), tb(32, 4, True, 0)) == (32, 64, 128)


@pytest.mark.parametrize("density", (0.01, 0.06))
def test_long_sparse_rows_at_the_narrower_width_match_the_reference(isa, density):
    """k = 4096, batch 256: the forward's and the fused backward's tiles narrowed (0.01: no L1 blocks at either width,
    the rows too short for them; 0.06: on AMD blocks only at 128 bytes, 15 entries a row per block of 256 rows, 7.7
    per block of 128; on Intel at either, 31-61 a block), the results as the reference's."""
    g = gen(seed_of("tile-width", isa, density))
    m, k, n = 48, 4096, 256
    mask = random_mask((m, k), density, g, False)
    row_ptr, col_idx = sparsekern.sparse_matrix.csr_from_mask(mask)
    tr = sparsekern.sparse_matrix.transpose_pattern(row_ptr, col_idx, k)
    values = torch.randn(int(mask.sum()), generator=g, dtype=torch.float64)
    b = torch.randn(m, generator=g, dtype=torch.float64)
    x = torch.randn(n, k, generator=g, dtype=torch.float64)
    grad = torch.randn(n, m, generator=g, dtype=torch.float64)
    ins = [t.float().requires_grad_() for t in (x, values, b)]
    narrow = isa == "avx2" or k * 256 > torch.ops.sparsekern._l2_bytes() // 2
    blocked = torch.ops.sparsekern._l1_block_rows(m, k, int(mask.sum()), 128 if narrow else 256) > 0
    if density == 0.06:
        assert blocked == (narrow or _intel_blocks())
    with block_rows(0):
        before = _runs()
        y = torch.ops.sparsekern._sparse_linear_node(ins[0], ins[1], ins[2], row_ptr, col_idx, *tr)
        assert (_runs() > before) == (density == 0.06 and blocked)
        y.backward(grad.float())
    ref = [t.clone().requires_grad_() for t in (x, values, b)]
    y_ref = torch.nn.functional.linear(ref[0], _dense(mask, ref[1]), ref[2])
    y_ref.backward(grad)
    assert_close(y, y_ref.float(), scale=n)
    for got, want in zip(ins, ref):
        assert_close(got.grad, want.grad.float(), scale=n)
