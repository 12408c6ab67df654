"""SparseMatrix: CSR construction, conversions, cached transpose and validation."""
import math

import pytest
import torch

from sparsekern import SparseMatrix
from sparsekern.sparse_matrix import csr_from_mask, transpose_pattern

from sk_testing import DTYPES, MKN, SPARSITIES, dense_of, gen, random_mask, random_sparse, seed_of

SHAPES = [(m, k) for m, k, _ in MKN] + [(4, 3, 3, 3), (2, 5, 1, 1), (0, 2, 3, 3), (3, 1, 5, 2), (6,)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("density,empty_rows", SPARSITIES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_from_dense_roundtrip(shape, density, empty_rows, dtype):
    g = gen(seed_of(shape, density, empty_rows))
    mask = random_mask(shape, density, g, empty_rows)
    dense = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    W = SparseMatrix.from_dense(dense, mask)
    W._validate()  # what from_dense builds is a valid CSR
    m = shape[0]
    k = math.prod(shape[1:])
    assert W.shape == torch.Size(shape)
    assert W.shape2d == (m, k)
    assert W.row_ptr.dtype == torch.int64 and W.col_idx.dtype == torch.int32 and W.values.dtype == dtype
    assert W.row_ptr.shape == (m + 1,)
    assert W.nnz == int(mask.sum())
    assert W.density == (W.nnz / (m * k) if m * k else 0.0)
    # Row counts of the CSR are those of the mask.
    torch.testing.assert_close(W.row_ptr[1:] - W.row_ptr[:-1], mask.reshape(m, k).sum(1), check_dtype=False)
    expected = torch.where(mask, dense, torch.zeros((), dtype=dtype))
    assert torch.equal(W.mask(), mask)
    assert torch.equal(W.to_dense(), expected)
    assert torch.equal(dense_of(W), expected)
    # from_dense copies: mutating the source does not change W.
    dense.add_(1.0)
    assert torch.equal(W.to_dense(), expected)


def test_from_dense_without_mask_takes_nonzeros():
    dense = torch.tensor([[0.0, 2.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 4.0]])
    W = SparseMatrix.from_dense(dense)
    assert W.row_ptr.tolist() == [0, 2, 2, 4]
    assert W.col_idx.tolist() == [1, 3, 0, 3]
    assert W.values.tolist() == [2.0, -1.0, 3.0, 4.0]
    assert torch.equal(W.mask(), dense != 0)
    # A zero at the mask is stored explicitly.
    W2 = SparseMatrix.from_dense(dense, torch.ones_like(dense, dtype=torch.bool))
    assert W2.nnz == dense.numel()


def test_to_dense_is_differentiable_in_values():
    W = random_sparse((5, 7), 0.5, torch.float64, gen(1), requires_grad=True)
    v = W.values
    g = torch.randn(5, 7, dtype=torch.float64, generator=gen(2))
    (dv,) = torch.autograd.grad(W.to_dense(), v, g)
    assert torch.equal(dv, g[W.mask()])


@pytest.mark.parametrize("shape", [(7, 11), (1, 5), (5, 1), (6, 0), (0, 4), (3, 2, 3, 3)], ids=str)
@pytest.mark.parametrize("density,empty_rows", [(0.0, False), (0.4, False), (1.0, False), (0.6, True)])
def test_transpose_equals_dense_transpose(shape, density, empty_rows):
    W = random_sparse(shape, density, torch.float64, gen(seed_of(shape, density)), empty_rows)
    m, k = W.shape2d
    T = W.t()
    T._validate()  # the transpose is a valid CSR (sorted columns within rows)
    assert T.shape == (k, m)
    assert torch.equal(T.to_dense(), W.to_dense().reshape(m, k).t())
    t_row_ptr, t_col_idx, t_perm = W.transpose_pattern()
    assert t_perm.dtype == torch.int64 and t_col_idx.dtype == torch.int32 and t_row_ptr.dtype == torch.int64
    assert torch.equal(T.values, W.values[t_perm])
    # t_perm is a permutation of the nonzeros.
    assert torch.equal(torch.sort(t_perm).values, torch.arange(W.nnz))
    assert torch.equal(T.t().to_dense(), W.to_dense().reshape(m, k))


def test_transpose_is_cached():
    W = random_sparse((6, 9), 0.5, torch.float32, gen(3))
    first = W.transpose_pattern()
    second = W.transpose_pattern()
    assert first is second
    assert all(a is b for a, b in zip(first, second))
    T1, T2 = W.t(), W.t()
    assert T1.row_ptr is first[0] and T2.row_ptr is first[0] and T2.col_idx is first[1]
    # with_values keeps the cached transpose, and the new values follow it.
    v = torch.randn(W.nnz, generator=gen(4))
    W2 = W.with_values(v)
    assert W2.transpose_pattern() is first
    assert torch.equal(W2.t().values, v[first[2]])
    # to() keeps it too (same device: equal tensors).
    W3 = W.to(torch.float64)
    assert W3.dtype == torch.float64
    assert all(torch.equal(a, b) for a, b in zip(W3.transpose_pattern(), first))


def test_transpose_pattern_function_matches_dense():
    mask = random_mask((8, 5), 0.5, gen(5), empty_rows=True)
    row_ptr, col_idx = csr_from_mask(mask)
    t_row_ptr, t_col_idx, t_perm = transpose_pattern(row_ptr, col_idx, 5)
    t_mask = torch.zeros(5, 8, dtype=torch.bool)
    rows = torch.repeat_interleave(torch.arange(5), t_row_ptr[1:] - t_row_ptr[:-1])
    t_mask[rows, t_col_idx.long()] = True
    assert torch.equal(t_mask, mask.t())


def test_with_values():
    W = random_sparse((4, 6), 0.5, torch.float32, gen(6))
    v = torch.arange(W.nnz, dtype=torch.float32)
    W2 = W.with_values(v)
    assert W2.values is v
    assert W2.row_ptr is W.row_ptr and W2.col_idx is W.col_idx and W2.shape == W.shape
    assert torch.equal(W2.mask(), W.mask())
    assert torch.equal(W2.to_dense()[W.mask()], v)
    assert not torch.equal(W.values, v) or W.nnz == 0
    with pytest.raises(ValueError, match=rf"with_values: values must have shape \({W.nnz},\)"):
        W.with_values(torch.zeros(W.nnz + 1))


# -- validation --------------------------------------------------------------------------

def _csr(row_ptr, col_idx, values=None, shape=(3, 4), rp_dtype=torch.int64, ci_dtype=torch.int32,
         v_dtype=torch.float32):
    rp = torch.tensor(row_ptr, dtype=rp_dtype)
    ci = torch.tensor(col_idx, dtype=ci_dtype)
    v = torch.ones(len(col_idx), dtype=v_dtype) if values is None else values
    return rp, ci, v, shape


def test_valid_csr_passes():
    W = SparseMatrix(*_csr([0, 2, 2, 3], [0, 3, 1]))
    assert W.nnz == 3
    assert W.to_dense().tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]]


@pytest.mark.parametrize(
    "args,match",
    [
        (_csr([0, 2, 1, 3], [0, 3, 1]), r"row_ptr must be non-decreasing.*row_ptr\[2\] < row_ptr\[1\]"),
        (_csr([1, 2, 2, 3], [0, 3, 1]), r"row_ptr\[0\] must be 0"),
        (_csr([0, 2, 2, 4], [0, 3, 1]), r"row_ptr\[-1\] = 4 must equal nnz = 3"),
        (_csr([0, 2, 2, 3], [0, 4, 1]), r"col_idx must lie in \[0, 4\)"),
        (_csr([0, 2, 2, 3], [0, -1, 1]), r"col_idx must lie in \[0, 4\)"),
        (_csr([0, 2, 2, 3], [3, 0, 1]), r"col_idx must be strictly increasing within each row.*position 1"),
        (_csr([0, 2, 2, 3], [2, 2, 1]),
         r"col_idx must be strictly increasing within each row \(sorted, no duplicates\)"),
        (_csr([0, 3, 3, 4], [0, 2, 2, 1]), r"strictly increasing.*position 2"),
        (_csr([0, 2, 3], [0, 3, 1]), r"row_ptr must have m\+1 = 4 entries"),
        (_csr([0, 2, 2, 3], [0, 3, 1], values=torch.ones(2)), r"col_idx has 3 entries but values has 2"),
        (_csr([0, 2, 2, 3], [0, 3, 1], rp_dtype=torch.int32), r"row_ptr must be int64, got torch.int32"),
        (_csr([0, 2, 2, 3], [0, 3, 1], ci_dtype=torch.int64), r"col_idx must be int32, got torch.int64"),
        (_csr([0, 2, 2, 3], [0, 3, 1], v_dtype=torch.int64), r"values must be floating point, got torch.int64"),
        (_csr([0, 2, 2, 3], [0, 3, 1], values=torch.ones(3, 1)), r"values must be 1-D"),
        (_csr([[0, 2, 2, 3]], [0, 3, 1]), r"row_ptr must be 1-D"),
        (_csr([0, 2, 2, 3], [0, 3, 1], shape=(3, -4)), r"shape must be non-empty with non-negative sizes"),
        (_csr([0, 2, 2, 3], [0, 3, 1], values=[1.0, 1.0, 1.0]), r"values must be a tensor, got list"),
    ],
    ids=["non-monotone-row_ptr", "row_ptr0", "row_ptr-last", "col-too-large", "col-negative", "unsorted",
         "duplicate", "duplicate-after-empty-row", "row_ptr-size", "values-size", "row_ptr-dtype", "col_idx-dtype",
         "values-dtype", "values-rank", "row_ptr-rank", "negative-shape", "values-not-tensor"],
)
def test_validation_errors(args, match):
    with pytest.raises(ValueError, match=match):
        SparseMatrix(*args)


def test_validation_allows_column_reset_at_row_start_and_empty_rows():
    # Columns go down at each row start (also after an empty row): valid.
    W = SparseMatrix(*_csr([0, 2, 2, 4], [2, 3, 0, 1]))
    assert W.to_dense().tolist() == [[0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]]


def test_validation_can_be_skipped():
    W = SparseMatrix(*_csr([0, 2, 2, 3], [3, 0, 1]), validate=False)
    with pytest.raises(ValueError, match="strictly increasing"):
        W._validate()


def test_from_dense_errors():
    dense = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"mask shape \(4, 3\) does not match dense shape \(3, 4\)"):
        SparseMatrix.from_dense(dense, torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be bool, got torch.float32"):
        SparseMatrix.from_dense(dense, torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"dense must be a tensor with >= 1 dims"):
        SparseMatrix.from_dense(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"dense must be a tensor"):
        SparseMatrix.from_dense([[1.0]])
    with pytest.raises(ValueError, match=r"mask is on meta, dense on cpu"):
        SparseMatrix.from_dense(dense, torch.ones(3, 4, dtype=torch.bool, device="meta"))


def test_repr_and_properties():
    W = random_sparse((4, 2, 3, 3), 0.25, torch.float64, gen(7))
    assert W.m == 4 and W.k == 18 and W.dtype == torch.float64 and W.device == torch.device("cpu")
    assert W.nnz == round(0.25 * 72)
    assert "shape=(4, 2, 3, 3)" in repr(W) and f"nnz={W.nnz}" in repr(W)
    assert W.mask().shape == (4, 2, 3, 3)
    rows = W.row_indices()
    assert torch.equal(rows, torch.nonzero(W.mask().reshape(4, 18))[:, 0])


@pytest.mark.parametrize("shape,density", [((0, 5), 0.5), ((7, 0), 0.5), ((1, 9), 1.0), ((13, 17), 0.3), ((6, 6), 0.0)])
def test_csr_from_positions_equals_csr_from_mask(shape, density):
    from sparsekern.sparse_matrix import csr_from_mask, csr_from_positions
    g = torch.Generator().manual_seed(sum(shape))
    mask = torch.rand(shape, generator=g) < density
    positions = mask.reshape(-1).nonzero().squeeze(1)
    row_ptr, col_idx = csr_from_positions(positions, *shape)
    expected = csr_from_mask(mask)
    assert torch.equal(row_ptr, expected[0]) and torch.equal(col_idx, expected[1])
    assert col_idx.dtype == torch.int32 and row_ptr.dtype == torch.int64
