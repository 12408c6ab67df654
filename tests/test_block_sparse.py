"""BlockSparseMatrix (BSR): construction, conversions (dense, element CSR), cached block transpose, validation."""

import re

import pytest
import torch

from sparsekern import BlockSparseMatrix, SparseMatrix
from sparsekern.block_sparse import block_mask_of, bsr_element_order, expand_block_mask

from sk_testing import DTYPES, gen, random_mask, seed_of

BLOCKS = (1, 2, 4, 16)
# (block rows, block cols) of the block grid.
GRIDS = ((3, 5), (1, 1), (4, 2))
DENSITIES = ((0.0, False), (0.5, False), (0.5, True), (1.0, False))


def _expand_by_hand(bmask: torch.Tensor, b: int) -> torch.Tensor:
    """The element mask of a block mask, built without expand_block_mask."""
    mb, kb = bmask.shape
    out = torch.zeros(mb * b, kb * b, dtype=torch.bool)
    for i, j in bmask.nonzero().tolist():
        out[i * b:(i + 1) * b, j * b:(j + 1) * b] = True
    return out


def _blocks_by_hand(dense2d: torch.Tensor, bmask: torch.Tensor, b: int) -> torch.Tensor:
    """(nnzb, b, b) blocks of ``dense2d`` at ``bmask``, in row-major block order."""
    return torch.stack([dense2d[i * b:(i + 1) * b, j * b:(j + 1) * b] for i, j in bmask.nonzero().tolist()]) \
        if bool(bmask.any()) else dense2d.new_zeros((0, b, b))


def _random_bsr(grid, b, density, dtype=torch.float64, seed=0, empty_rows=False, shape=None):
    g = gen(seed)
    bmask = random_mask(grid, density, g, empty_rows)
    m, k = grid[0] * b, grid[1] * b
    dense = torch.randn(m, k, generator=g, dtype=torch.float64).to(dtype)
    shape = (m, k) if shape is None else shape
    W = BlockSparseMatrix.from_dense(dense.reshape(shape), b, _expand_by_hand(bmask, b).reshape(shape))
    return W, dense, bmask


# -- from_dense / to_dense ----------------------------------------------------------------

@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("grid", GRIDS, ids=str)
@pytest.mark.parametrize("density,empty_rows", DENSITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_from_dense_roundtrip(b, grid, density, empty_rows, dtype):
    W, dense, bmask = _random_bsr(grid, b, density, dtype, seed_of("rt", b, grid, density, empty_rows), empty_rows)
    emask = _expand_by_hand(bmask, b)
    mb, kb = grid
    assert W.shape == (mb * b, kb * b) and W.block == b
    assert W.row_ptr.dtype == torch.int64 and W.col_idx.dtype == torch.int32 and W.values.dtype == dtype
    assert W.row_ptr.shape == (mb + 1,)
    assert W.nnzb == int(bmask.sum())
    if not empty_rows:
        assert W.nnzb == int(round(density * mb * kb))
    assert W.values.shape == (W.nnzb, b, b) and W.nnz == W.nnzb * b * b
    assert W.density == pytest.approx(W.nnz / (mb * b * kb * b))
    # Block-row counts and sorted block columns.
    torch.testing.assert_close(W.row_ptr[1:] - W.row_ptr[:-1], bmask.sum(1), check_dtype=False)
    rows = torch.repeat_interleave(torch.arange(mb), bmask.sum(1))
    assert torch.equal(W.col_idx.long(), bmask.nonzero()[:, 1]) and torch.equal(rows, bmask.nonzero()[:, 0])
    # What from_dense builds passes the constructor's validation.
    BlockSparseMatrix(W.row_ptr, W.col_idx, W.values, W.shape)
    expected = torch.where(emask, dense, torch.zeros((), dtype=dtype))
    assert torch.equal(W.to_dense(), expected)
    assert torch.equal(W.values, _blocks_by_hand(dense, bmask, b))
    assert torch.equal(W.block_mask(), bmask)
    assert torch.equal(W.mask(), emask)
    # from_dense copies.
    dense.add_(1.0)
    assert torch.equal(W.to_dense(), expected)


@pytest.mark.parametrize("b", (2, 4))
def test_a_kept_block_keeps_all_its_entries(b):
    g = gen(seed_of("kept", b))
    dense = torch.randn(3 * b, 4 * b, generator=g, dtype=torch.float64)
    # One element in a few blocks: those blocks are kept whole, with all b*b entries of dense.
    mask = torch.zeros_like(dense, dtype=torch.bool)
    mask[0, 0] = mask[b + 1, 3 * b + b - 1] = mask[3 * b - 1, 2 * b] = True
    bmask = torch.zeros(3, 4, dtype=torch.bool)
    bmask[0, 0] = bmask[1, 3] = bmask[2, 2] = True
    W = BlockSparseMatrix.from_dense(dense, b, mask)
    assert W.nnzb == 3 and torch.equal(W.block_mask(), bmask)
    emask = _expand_by_hand(bmask, b)
    assert torch.equal(W.to_dense(), torch.where(emask, dense, torch.zeros((), dtype=dense.dtype)))
    assert bool((W.values != 0).all())  # entries outside `mask` but inside a kept block are kept too
    # Default mask = dense != 0: a block with a single nonzero is kept (its zeros included).
    sparse_dense = torch.zeros(2 * b, 2 * b)
    sparse_dense[b, 1] = 3.0
    W2 = BlockSparseMatrix.from_dense(sparse_dense, b)
    assert W2.nnzb == 1 and W2.block_mask().tolist() == [[False, False], [True, False]]
    assert torch.equal(W2.to_dense(), sparse_dense) and int((W2.values != 0).sum()) == 1


def test_empty_shapes():
    for shape in ((0, 8), (8, 0)):
        W = BlockSparseMatrix.from_dense(torch.zeros(shape), 4)
        assert W.nnzb == 0 and W.values.shape == (0, 4, 4) and W.density == 0.0
        assert W.to_dense().shape == shape and W.mask().shape == shape and W.to_csr().nnz == 0


def test_from_mask_gives_zero_blocks_where_the_mask_has_any_nonzero():
    g = gen(1)
    mask = random_mask((8, 12), 0.1, g)
    W = BlockSparseMatrix.from_mask(mask, 4, dtype=torch.float64)
    assert W.dtype == torch.float64 and W.block == 4
    assert torch.equal(W.block_mask(), block_mask_of(mask, 4))
    assert torch.equal(W.mask(), expand_block_mask(block_mask_of(mask, 4), 4))
    assert bool((W.mask() | ~mask).all())  # covers the mask
    assert W.nnzb == int(block_mask_of(mask, 4).sum()) and bool((W.values == 0).all())


def test_from_csr_keeps_the_blocks_of_its_nonzeros_zero_filled():
    g = gen(2)
    dense = torch.randn(8, 6, generator=g, dtype=torch.float64)
    emask = random_mask((8, 6), 0.3, g)
    A = SparseMatrix.from_dense(dense, emask)
    W = BlockSparseMatrix.from_csr(A, 2)
    assert W.dtype == torch.float64
    assert torch.equal(W.block_mask(), block_mask_of(emask, 2))
    # Same dense matrix: A's nonzeros where they are, zeros in the rest of each kept block.
    assert torch.equal(W.to_dense(), A.to_dense())
    assert W.nnz == W.nnzb * 4 >= A.nnz


# -- to_csr ---------------------------------------------------------------------------------

@pytest.mark.parametrize("b", BLOCKS)
@pytest.mark.parametrize("density,empty_rows", DENSITIES)
def test_to_csr_equals_the_dense_and_is_differentiable(b, density, empty_rows):
    seed = seed_of("csr", b, density, empty_rows)
    W, dense, bmask = _random_bsr((3, 4), b, density, seed=seed, empty_rows=empty_rows)
    W.values.requires_grad_(True)
    C = W.to_csr()
    C._validate()
    assert C.shape == W.shape and C.nnz == W.nnz
    assert torch.equal(C.mask(), W.mask())
    assert torch.equal(C.to_dense(), W.to_dense())
    assert C.values.grad_fn is not None or W.nnzb == 0
    assert W.to_csr() is C  # cached
    # The gradient of <C.to_dense(), G> in the block values is G's blocks at the pattern.
    G = torch.randn(W.shape, generator=gen(seed + 1), dtype=torch.float64)
    (grad,) = torch.autograd.grad((C.to_dense() * G).sum(), W.values, allow_unused=True, materialize_grads=True)
    assert torch.equal(grad, _blocks_by_hand(G, bmask, b))
    # The element values are the CSR (row-major) order of the dense nonzeros.
    assert torch.equal(C.values.detach(), dense[W.mask()])


def test_to_csr_uses_a_given_csr():
    W0, _, _ = _random_bsr((2, 2), 2, 0.5, seed=3)
    C = W0.to_csr()
    W = BlockSparseMatrix(W0.row_ptr, W0.col_idx, W0.values, W0.shape, csr=C)
    assert W.to_csr() is C


# -- transpose ------------------------------------------------------------------------------

@pytest.mark.parametrize("b", (1, 2, 4))
@pytest.mark.parametrize("density,empty_rows", DENSITIES)
def test_transpose_pattern_gives_the_blocks_of_w_transposed(b, density, empty_rows):
    W, _, bmask = _random_bsr((3, 5), b, density, seed=seed_of("t", b, density, empty_rows), empty_rows=empty_rows)
    t_row_ptr, t_col_idx, t_perm = W.transpose_pattern()
    assert t_row_ptr.shape == (5 + 1,) and t_col_idx.dtype == torch.int32 and t_perm.dtype == torch.int64
    assert torch.equal(torch.sort(t_perm).values, torch.arange(W.nnzb))
    WT = BlockSparseMatrix(t_row_ptr, t_col_idx, W.values[t_perm].transpose(1, 2), (W.k, W.m))  # validated
    assert torch.equal(WT.to_dense(), W.to_dense().t())
    assert torch.equal(WT.block_mask(), bmask.t())
    assert W.transpose_pattern() is W._transpose  # cached
    assert all(a is c for a, c in zip(W.transpose_pattern(), (t_row_ptr, t_col_idx, t_perm)))


# -- helpers ---------------------------------------------------------------------------------

@pytest.mark.parametrize("b", (1, 2, 4))
def test_block_mask_of_and_expand_block_mask(b):
    g = gen(seed_of("bm", b))
    bmask = random_mask((3, 4), 0.5, g)
    emask = expand_block_mask(bmask, b)
    assert torch.equal(emask, _expand_by_hand(bmask, b))
    assert torch.equal(block_mask_of(emask, b), bmask)
    # A single nonzero (here a block's bottom-left corner) marks its block.
    one = torch.zeros_like(emask)
    for i, j in bmask.nonzero().tolist():
        one[i * b + b - 1, j * b] = True
    assert torch.equal(block_mask_of(one, b), bmask)


@pytest.mark.parametrize("b", (1, 2, 4))
def test_bsr_element_order(b):
    W, dense, bmask = _random_bsr((3, 4), b, 0.5, seed=seed_of("order", b), empty_rows=True)
    emask = W.mask()
    order = bsr_element_order(emask, b)
    assert order.shape == (W.nnzb, b, b) and order.dtype == torch.int64
    assert torch.equal(torch.sort(order.reshape(-1)).values, torch.arange(W.nnz))  # a permutation
    values_csr = dense[emask]  # row-major order of the nonzeros
    assert torch.equal(values_csr[order], W.values)


# -- conv-shaped weights ---------------------------------------------------------------------

def test_4d_conv_shaped_weight():
    g = gen(5)
    shape = (8, 2, 3, 3)  # rows 8, columns 18
    b = 2
    bmask = random_mask((4, 9), 0.4, g)
    emask = _expand_by_hand(bmask, b)
    dense = torch.randn(8, 18, generator=g, dtype=torch.float64)
    W = BlockSparseMatrix.from_dense(dense.reshape(shape), b, emask.reshape(shape))
    assert W.shape == shape and (W.m, W.k) == (8, 18)
    assert torch.equal(W.block_mask(), bmask)
    assert torch.equal(W.mask(), emask.reshape(shape))
    assert torch.equal(W.to_dense(), (dense * emask).reshape(shape))
    C = W.to_csr()
    assert C.shape == shape and torch.equal(C.to_dense(), W.to_dense())
    tr = W.transpose_pattern()
    WT = BlockSparseMatrix(tr[0], tr[1], W.values[tr[2]].transpose(1, 2), (18, 8))
    assert torch.equal(WT.to_dense(), (dense * emask).t())


def test_to_converts_values_and_keeps_the_pattern_and_transpose():
    W, _, _ = _random_bsr((3, 2), 2, 0.5, dtype=torch.float32, seed=6)
    tr = W.transpose_pattern()
    W64 = W.to(torch.float64)
    assert W64.dtype == torch.float64 and W64.row_ptr is not None
    assert torch.equal(W64.row_ptr, W.row_ptr) and torch.equal(W64.col_idx, W.col_idx)
    assert torch.equal(W64.to_dense(), W.to_dense().double())
    assert all(torch.equal(a, c) for a, c in zip(W64.transpose_pattern(), tr))
    assert torch.equal(W64.to_csr().to_dense(), W64.to_dense())
    assert "block=2" in repr(W64) and "float64" in repr(W64)


# -- validation ------------------------------------------------------------------------------

def test_from_dense_rejects_a_shape_not_a_multiple_of_block():
    with pytest.raises(ValueError, match=r"from_dense.*\(6, 8\).*block=4"):
        BlockSparseMatrix.from_dense(torch.randn(6, 8), 4)
    with pytest.raises(ValueError, match=r"\(8, 27\).*block=4"):
        BlockSparseMatrix.from_dense(torch.randn(8, 3, 3, 3), 4)  # conv: 27 columns
    for block in (0, -2, 2.0, True):
        with pytest.raises(ValueError, match="block must be a positive int"):
            BlockSparseMatrix.from_dense(torch.randn(4, 4), block)
    with pytest.raises(ValueError, match="dense"):
        BlockSparseMatrix.from_dense(torch.randn(8), 2)
    with pytest.raises(ValueError, match="mask must be bool"):
        BlockSparseMatrix.from_dense(torch.randn(4, 4), 2, torch.ones(4, 4))
    with pytest.raises(ValueError, match="mask must be bool of shape"):
        BlockSparseMatrix.from_dense(torch.randn(4, 4), 2, torch.ones(4, 2, dtype=torch.bool))


def _valid_parts():
    W, _, _ = _random_bsr((2, 3), 2, 0.5, seed=7)  # 3 blocks of 2x2 in an (4, 6) matrix
    assert W.nnzb == 3
    return W.row_ptr.clone(), W.col_idx.clone(), W.values.clone()


def test_constructor_validation_names_the_argument():
    rp, ci, v = _valid_parts()
    BlockSparseMatrix(rp, ci, v, (4, 6))  # valid
    with pytest.raises(ValueError, match=r"values must be \(nnzb, b, b\)"):
        BlockSparseMatrix(rp, ci, v.reshape(3, 4), (4, 6))
    with pytest.raises(ValueError, match=r"values must be \(nnzb, b, b\)"):
        BlockSparseMatrix(rp, ci, torch.zeros(3, 2, 3), (4, 6))
    with pytest.raises(ValueError, match="values has 2 blocks but col_idx has 3"):
        BlockSparseMatrix(rp, ci, v[:2], (4, 6))
    with pytest.raises(ValueError, match=r"shape.*\(4, 5\).*block=2"):
        BlockSparseMatrix(rp, ci, v, (4, 5))
    with pytest.raises(ValueError, match="shape must have >= 2 dims"):
        BlockSparseMatrix(rp, ci, v, (24,))
    # The block pattern: row_ptr, col_idx.
    with pytest.raises(ValueError, match="row_ptr must have m\\+1 = 3 entries"):
        BlockSparseMatrix(torch.cat([rp, rp[-1:]]), ci, v, (4, 6))
    with pytest.raises(ValueError, match=r"row_ptr\[0\] must be 0"):
        BlockSparseMatrix(rp + 1, ci, v, (4, 6))
    with pytest.raises(ValueError, match=r"row_ptr\[-1\] = 2 must equal nnz = 3"):
        BlockSparseMatrix(torch.tensor([0, 1, 2]), ci, v, (4, 6))
    with pytest.raises(ValueError, match="row_ptr must be non-decreasing"):
        BlockSparseMatrix(torch.tensor([0, 4, 3]), ci, v, (4, 6))
    with pytest.raises(ValueError, match="row_ptr must be int64"):
        BlockSparseMatrix(rp.int(), ci, v, (4, 6))
    with pytest.raises(ValueError, match="col_idx must be int32"):
        BlockSparseMatrix(rp, ci.long(), v, (4, 6))
    with pytest.raises(ValueError, match=r"col_idx must lie in \[0, 3\)"):
        BlockSparseMatrix(rp, torch.full_like(ci, 3), v, (4, 6))
    bad = torch.tensor([0, 0, 1], dtype=torch.int32)  # duplicate within block row 0
    with pytest.raises(ValueError, match="col_idx must be strictly increasing"):
        BlockSparseMatrix(torch.tensor([0, 2, 3]), bad, v, (4, 6))
    with pytest.raises(ValueError, match="values must be floating point"):
        BlockSparseMatrix(rp, ci, v.long(), (4, 6))
    # validate=False skips the checks (the fast path of trusted builders).
    BlockSparseMatrix(rp + 1, ci, v, (4, 6), validate=False)


_RP, _CI = torch.tensor([0, 1, 2]), torch.tensor([0, 1], dtype=torch.int32)


@pytest.mark.parametrize("args, match", [
    ((_RP, _CI, torch.ones(2, 2, 2, dtype=torch.long), (4, 4)), "values must be floating point, got torch.int64"),
    ((_RP, torch.tensor([0, 5], dtype=torch.int32), torch.randn(2, 2, 2), (4, 4)),
     "col_idx must lie in [0, 2), got values in [0, 5]"),
    ((torch.tensor([0, 2, 1]), _CI, torch.randn(2, 2, 2), (4, 4)), "row_ptr[-1] = 1 must equal nnz = 2"),
    ((_RP[:2], _CI, torch.randn(2, 2, 2), (4, 4)), "row_ptr must have m+1 = 3 entries for the 2 block rows"),
    ((_RP, _CI.long(), torch.randn(2, 2, 2), (4, 4)), "col_idx must be int32, got torch.int64"),
], ids=["int-values", "col_idx-range", "row_ptr-end", "row_ptr-size", "col_idx-dtype"])
def test_validation_errors_name_block_sparse_matrix(args, match):
    with pytest.raises(ValueError, match=re.escape(f"BlockSparseMatrix: {match}")):
        BlockSparseMatrix(*args)
