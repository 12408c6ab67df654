"""Triton masked_matmul / masked_sddmm against sparsekern.reference (in float64), plus the block-occupancy
map and its cache. On a CPU the kernels run under TRITON_INTERPRET=1 (with the first autotune config; the
*_every_config tests run the others), so shapes stay small."""
import gc
import math
import zlib

import pytest
import torch
from triton_testing import CONFIG_DTYPES, DEVICE, DTYPES, OutOfResources, assert_close, forced_config, needs_gpu

import sparsekern.triton_kernels.masked_matmul as mm
from sparsekern import reference

ops = torch.ops.sparsekern_triton
BM, BK = mm.OCC_BLOCK
DENSITIES = (0.0, 0.01, 0.1, 0.5, 1.0)  # all-false, 99% / 90% / 50% sparse, all-true
# (N, m, k): ragged everywhere (none a multiple of the tiles), and a shape of whole tiles.
SHAPES = ((37, 2 * BM + 5, 2 * BK + 3), (2 * BM, BM, 2 * BK))


def _gen(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))  # hash() of str varies per run


def _mask(m, k, density, g):
    return (torch.rand(m, k, generator=g) < density).to(DEVICE)


def _randn(*shape, dtype, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


def _inputs(N, m, k, density, dtype, g):
    x = _randn(N, k, dtype=dtype, g=g)
    weight = _randn(m, k, dtype=dtype, g=g, scale=1 / math.sqrt(max(k, 1)))
    return x, weight, _mask(m, k, density, g)


def _ref_mm(x, weight, mask):
    return reference.masked_matmul(x.double(), weight.double(), mask)


def _ref_sddmm(X, Y, mask):
    return reference.masked_sddmm(X.double(), Y.double(), mask)


@pytest.fixture(autouse=True)
def _fresh_cache():
    mm.clear_cache()
    yield
    mm.clear_cache()


# -- masked_matmul ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masked_matmul(shape, density, dtype):
    N, m, k = shape
    x, weight, mask = _inputs(N, m, k, density, dtype, _gen("mm", shape, density, dtype))
    y = ops.masked_matmul(x, weight, mask)
    assert y.dtype == dtype and y.shape == (N, m)
    assert_close(y, _ref_mm(x, weight, mask), dtype)
    if density == 0:
        assert torch.count_nonzero(y) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_matmul_backward_calls(dtype):
    """The calls the ops layer makes in backward, on transposed (non-contiguous) views."""
    N, m, k = 29, BM + 7, 2 * BK + 9
    g = _gen("mm-bw", dtype)
    x, weight, mask = _inputs(N, m, k, 0.3, dtype, g)
    mask[BM:, :BK] = False  # an empty block, seen transposed by dx
    grad = _randn(N, m, dtype=dtype, g=g)
    dx = ops.masked_matmul(grad, weight.t(), mask.t())  # dx = grad @ (weight * mask)
    assert_close(dx, grad.double() @ torch.where(mask, weight.double(), 0.0), dtype)
    dW = ops.masked_sddmm(grad.t(), x.t(), mask)  # dW = (grad^T @ x) * mask
    assert_close(dW, _ref_sddmm(grad.t(), x.t(), mask), dtype)
    # masked_sddmm's own backward: d_X = masked_matmul(Y.t(), grad, mask).t()
    Y = _randn(k, 11, dtype=dtype, g=g)
    gout = _randn(m, k, dtype=dtype, g=g)
    dX = ops.masked_matmul(Y.t(), gout, mask).t()
    assert_close(dX, (gout.double() * mask) @ Y.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_matmul_strided(dtype):
    """Column-strided x, a weight sliced out of a larger tensor, a transposed-then-sliced mask."""
    N, m, k = 21, 40, 45
    g = _gen("mm-strided", dtype)
    x = _randn(N, 2 * k, dtype=dtype, g=g)[:, ::2]
    weight = _randn(m + 3, k + 5, dtype=dtype, g=g, scale=0.2)[2:m + 2, 1:k + 1]
    mask = _mask(k + 4, m, 0.4, g).t()[:, 4:]
    assert not (x.is_contiguous() or weight.is_contiguous() or mask.is_contiguous())
    assert_close(ops.masked_matmul(x, weight, mask), _ref_mm(x, weight, mask), dtype)


@pytest.mark.parametrize("N,m,k", [(0, 10, 12), (7, 0, 12), (7, 10, 0), (0, 0, 0)])
def test_masked_matmul_zero_size(N, m, k):
    x, weight, mask = _inputs(N, m, k, 1.0, torch.float32, _gen("mm-zero", N, m, k))
    y = ops.masked_matmul(x, weight, mask)
    assert y.shape == (N, m)
    assert torch.count_nonzero(y) == 0


def test_masked_matmul_masked_weights_contribute_nothing():
    """NaN / huge weights where the mask is False, in an empty block and inside occupied blocks."""
    N, m, k = 19, 2 * BM, 2 * BK + 6
    x, weight, mask = _inputs(N, m, k, 0.5, torch.float32, _gen("mm-nan"))
    mask[:BM, BK:2 * BK] = False
    poisoned = weight.clone()
    poisoned[:BM, BK:2 * BK] = float("nan")
    poisoned[BM:][~mask[BM:]] = 1e30
    y = ops.masked_matmul(x, poisoned, mask)
    assert torch.isfinite(y).all()
    assert_close(y, _ref_mm(x, weight, mask), torch.float32)


def test_masked_matmul_skips_empty_blocks():
    """x is NaN on the columns of a k-block that is empty for a row block: a kernel that visited that
    block would get NaN * 0 = NaN. (The reference, which does visit it, is NaN there.)"""
    N, m, k = 9, 2 * BM, 3 * BK
    x, weight, mask = _inputs(N, m, k, 0.5, torch.float32, _gen("mm-skip"))
    mask[:BM, BK:2 * BK] = False
    x_nan = x.clone()
    x_nan[:, BK:2 * BK] = float("nan")
    y = ops.masked_matmul(x_nan, weight, mask)
    assert torch.isfinite(y[:, :BM]).all()
    assert torch.isnan(y[:, BM:]).all()  # that row block has the k-block, so it does read the NaNs
    assert_close(y[:, :BM], _ref_mm(x, weight, mask)[:, :BM], torch.float32)


def test_kernels_follow_the_occupancy_map():
    """Clearing a block in the cached map (the mask still set there) zeroes exactly that block's
    contribution: the kernels read the map, and skip what it says is empty."""
    N, m, k = 8, 2 * BM, 2 * BK
    g = _gen("occ-follow")
    x, weight, mask = _inputs(N, m, k, 1.0, torch.float32, g)
    entry = mm._entry(mask, BM, BK)
    entry["occ"][0, 1] = 0
    entry["list"] = None  # re-derived from the edited map
    y = ops.masked_matmul(x, weight, mask)
    expected = _ref_mm(x, weight, mask)
    expected[:, :BM] -= x[:, BK:].double() @ weight[:BM, BK:].double().t()
    assert_close(y, expected, torch.float32)
    X, Y = _randn(m, 5, dtype=torch.float32, g=g), _randn(k, 5, dtype=torch.float32, g=g)
    out = ops.masked_sddmm(X, Y, mask)
    assert torch.count_nonzero(out[:BM, BK:]) == 0
    assert_close(out[BM:], _ref_sddmm(X, Y, mask)[BM:], torch.float32)


# -- masked_sddmm -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", DENSITIES)
def test_masked_sddmm(density, dtype):
    m, k, d = 2 * BM + 5, BK + 11, 37
    g = _gen("sddmm", density, dtype)
    X, Y, mask = _randn(m, d, dtype=dtype, g=g), _randn(k, d, dtype=dtype, g=g), _mask(m, k, density, g)
    mask[:BM, :BK] = False  # an empty output tile, whatever the density
    out = ops.masked_sddmm(X, Y, mask)
    assert out.dtype == dtype and out.shape == (m, k)
    assert_close(out, _ref_sddmm(X, Y, mask), dtype)
    assert torch.count_nonzero(out[~mask]) == 0


def test_masked_sddmm_exact_zero_outside_mask():
    """NaN rows of X whose mask block row is empty, and a huge Y row outside the mask: exact zeros there."""
    m, k, d = 2 * BM, BK + 3, 20
    g = _gen("sddmm-nan")
    X, Y, mask = _randn(m, d, dtype=torch.float32, g=g), _randn(k, d, dtype=torch.float32, g=g), _mask(m, k, 0.5, g)
    mask[:BM] = False
    mask[:, 0] = False
    X[:BM] = float("nan")
    Y[0] = 1e30
    out = ops.masked_sddmm(X, Y, mask)
    assert torch.count_nonzero(out[:BM]) == 0 and torch.count_nonzero(out[:, 0]) == 0
    assert torch.isfinite(out).all()
    assert_close(out[BM:], _ref_sddmm(X, Y, mask)[BM:], torch.float32)


@pytest.mark.parametrize("m,k,d", [(0, 5, 3), (5, 0, 3), (5, 7, 0), (0, 0, 0)])
def test_masked_sddmm_zero_size(m, k, d):
    g = _gen("sddmm-zero", m, k, d)
    out = ops.masked_sddmm(_randn(m, d, dtype=torch.float32, g=g), _randn(k, d, dtype=torch.float32, g=g),
                           _mask(m, k, 1.0, g))
    assert out.shape == (m, k) and torch.count_nonzero(out) == 0


# -- every autotune config ----------------------------------------------------------------------
# The autotuner only runs its winner afterwards, the interpreter only the first config: each config
# once, through the ops' own launchers (forced_config). "small" (also the CPU's): N = 300 tokens (a tail
# after 1 to 9 token tiles / d chunks of 32 / 64 / 128 / 256), m and k a tail after 2 occupancy blocks,
# density 0.3 with an empty block, an empty row and an empty column.
EVERY_CONFIG_SHAPES = [
    pytest.param((300, 2 * BM + 5, 2 * BK + 3), id="small"),
    pytest.param((1000, 6 * BM + 5, 5 * BK + 3), id="realistic", marks=needs_gpu),
]


def _every_config_inputs(shape, dtype):
    N, m, k = shape
    g = _gen("every-config", shape, dtype)
    x, weight, mask = _inputs(N, m, k, 0.3, dtype, g)
    mask[BM:2 * BM, :BK] = False
    mask[3] = False
    mask[:, 5] = False
    return x, weight, mask, _randn(N, m, dtype=dtype, g=g)


@pytest.mark.parametrize("shape", EVERY_CONFIG_SHAPES)
@pytest.mark.parametrize("config", mm._MM_CONFIGS, ids=str)
def test_masked_matmul_every_config(config, shape):
    """Forward and the backward's dx = masked_matmul(grad, weight^T, mask^T) (transposed views)."""
    for dtype in CONFIG_DTYPES:
        x, weight, mask, grad = _every_config_inputs(shape, dtype)
        try:
            with forced_config(mm, mm._masked_matmul_kernel, config):
                y = ops.masked_matmul(x, weight, mask)
                dx = ops.masked_matmul(grad, weight.t(), mask.t())
        except OutOfResources:  # over the GPU's shared memory (fp32): the autotuner drops it
            continue
        assert_close(y, _ref_mm(x, weight, mask), dtype)
        assert_close(dx, grad.double() @ torch.where(mask, weight.double(), 0.0), dtype)


@pytest.mark.parametrize("shape", EVERY_CONFIG_SHAPES)
@pytest.mark.parametrize("config", mm._SDDMM_CONFIGS, ids=str)
def test_masked_sddmm_every_config(config, shape):
    """The backward's dW = masked_sddmm(grad^T, x^T, mask): d is the token count."""
    for dtype in CONFIG_DTYPES:
        x, _, mask, grad = _every_config_inputs(shape, dtype)
        try:
            with forced_config(mm, mm._masked_sddmm_kernel, config):
                dW = ops.masked_sddmm(grad.t(), x.t(), mask)
        except OutOfResources:  # over the GPU's shared memory: the autotuner drops it
            continue
        assert_close(dW, _ref_sddmm(grad.t(), x.t(), mask), dtype)
        assert torch.count_nonzero(dW[~mask]) == 0


# -- block occupancy and its cache ----------------------------------------------------------------

def _naive_occupancy(mask, bn, bk):
    m, k = mask.shape
    occ = torch.zeros(-(-m // bn), -(-k // bk), dtype=torch.int8)
    for i in range(occ.shape[0]):
        for j in range(occ.shape[1]):
            occ[i, j] = int(bool(mask[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].any()))
    return occ


@pytest.mark.parametrize("bn,bk", [(16, 32), (32, 32), (64, 16)])
@pytest.mark.parametrize("transpose", [False, True])
def test_block_occupancy(bn, bk, transpose):
    g = _gen("occ", bn, bk, transpose)
    mask = _mask(70, 50, 0.02, g)
    mask[:16, :] = False
    mask = mask.t() if transpose else mask
    occ = mm.block_occupancy(mask, bn, bk)
    assert occ.dtype == torch.int8
    assert torch.equal(occ.cpu(), _naive_occupancy(mask.cpu(), bn, bk))
    kidx, kcnt = mm._compact(occ)
    for i in range(occ.shape[0]):  # each row's nonempty k-blocks first, in order
        nonempty = occ[i].nonzero().flatten().tolist()
        assert kcnt[i] == len(nonempty) and kidx[i, :len(nonempty)].tolist() == nonempty


def test_block_occupancy_empty_mask():
    assert mm.block_occupancy(torch.zeros(0, 5, dtype=torch.bool, device=DEVICE), 16, 16).shape == (0, 1)
    assert mm.block_occupancy(torch.zeros(5, 0, dtype=torch.bool, device=DEVICE), 16, 16).shape == (1, 0)


def test_occupancy_cache_reused_and_invalidated():
    g = _gen("cache")
    mask = _mask(2 * BM, 2 * BK, 0.5, g)
    mask[:BM, :BK] = False
    occ = mm.cached_block_occupancy(mask)
    hits = mm.cache_stats["hits"]
    assert mm.cached_block_occupancy(mask) is occ
    assert mm.cache_stats["hits"] == hits + 1
    # The op calls hit it too (forward masked_matmul and dW's masked_sddmm share the map).
    x, weight, _ = _inputs(3, 2 * BM, 2 * BK, 0.5, torch.float32, g)
    ops.masked_matmul(x, weight, mask)
    assert mm.cache_stats["hits"] == hits + 2
    # The transposed view (dx's mask.t()) is a new key whose map is the cached one transposed.
    occ_t = mm.cached_block_occupancy(mask.t(), BK, BM)
    assert torch.equal(occ_t, occ.t())
    # An in-place change bumps mask._version: recomputed, and right.
    mask[0, 0] = True
    occ2 = mm.cached_block_occupancy(mask)
    assert occ2 is not occ and occ2[0, 0] == 1 and occ[0, 0] == 0
    assert_close(ops.masked_matmul(x, weight, mask), _ref_mm(x, weight, mask), torch.float32)


def test_occupancy_cache_forgets_freed_masks():
    """A freed mask's address may be reused by another tensor with the same shape and _version."""
    mask = _mask(BM, BK, 0.5, _gen("cache-freed"))
    mm.cached_block_occupancy(mask)
    key = mm._key(mask, BM, BK)
    del mask
    gc.collect()
    assert mm._lookup(key) is None


def test_inference_mode_bypasses_the_cache():
    """Inference tensors have no version counter, so an in-place edit could not be noticed."""
    with torch.inference_mode():
        x, weight, mask = _inputs(5, BM + 1, BK + 2, 0.5, torch.float32, _gen("inference"))
        assert_close(ops.masked_matmul(x, weight, mask), _ref_mm(x, weight, mask), torch.float32)
        mask[:, :BK] = False
        assert_close(ops.masked_matmul(x, weight, mask), _ref_mm(x, weight, mask), torch.float32)
    assert len(mm._cache) == 0


def test_occupancy_cache_is_bounded():
    masks = [_mask(BM, BK, 0.5, _gen("bounded", i)) for i in range(mm._CACHE_SIZE + 3)]
    for mask in masks:
        mm.cached_block_occupancy(mask)
    assert len(mm._cache) == mm._CACHE_SIZE


# -- realistic shapes (GPU only) ----------------------------------------------------------------

@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_masked_matmul_realistic(dtype):
    N, m, k = 2048, 1024, 1024
    g = _gen("gpu", dtype)
    x, weight, mask = _inputs(N, m, k, 0.1, dtype, g)
    mask[:256, :512] = False
    y = ops.masked_matmul(x, weight, mask)
    assert_close(y, _ref_mm(x, weight, mask), dtype)
    grad = _randn(N, m, dtype=dtype, g=g)
    assert_close(ops.masked_matmul(grad, weight.t(), mask.t()),
                 grad.double() @ torch.where(mask, weight.double(), 0.0), dtype)
    assert_close(ops.masked_sddmm(grad.t(), x.t(), mask), _ref_sddmm(grad.t(), x.t(), mask), dtype)
