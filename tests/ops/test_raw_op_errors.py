"""Bad inputs to the raw CSR ops (torch.ops.sparsekern.spmm / sddmm / sparse_linear): each raises an
error that names the argument. Duplicate or unsorted columns are rejected on the sparse path and the
dense fallback (density >= 0.3) alike; the cached transpose (t_row_ptr, t_col_idx, t_perm) must be
the transpose of the pattern (checked in full for its structure, at each column's ends for its entries)."""
import pytest
import torch

from sparsekern.sparse_matrix import transpose_pattern

from sk_testing import has_cpu_kernel

OPS = ("spmm", "sddmm", "sparse_linear")


def _skip_without(op):
    if not has_cpu_kernel(op):
        pytest.skip(f"no CPU kernel for sparsekern::{op}")


def _call(op, row_ptr, col_idx, k, transpose=(None, None, None)):
    """op on the (m, k) pattern with random dense operands; transpose is passed where the op takes it."""
    g = torch.Generator().manual_seed(0)
    m, nnz = row_ptr.numel() - 1, col_idx.numel()
    values = torch.randn(nnz, generator=g)
    if op == "spmm":
        return torch.ops.sparsekern.spmm(values, row_ptr, col_idx, torch.randn(k, 3, generator=g), *transpose)
    if op == "sddmm":
        return torch.ops.sparsekern.sddmm(row_ptr, col_idx, torch.randn(m, 3, generator=g),
                                          torch.randn(k, 3, generator=g))
    return torch.ops.sparsekern.sparse_linear(torch.randn(4, k, generator=g), values, row_ptr, col_idx, None,
                                              *transpose)


def _csr(row_ptr, col_idx):
    return torch.tensor(row_ptr, dtype=torch.int64), torch.tensor(col_idx, dtype=torch.int32)


# -- item: col_idx strictly increasing within each row, the same on every path ------------------
# (row_ptr, col_idx, k): k = 3 puts 4 nonzeros at density 0.67 (dense fallback), k = 40 at 0.05.
BAD_ORDER = {
    "duplicate-dense-path": ([0, 2, 4], [1, 1, 0, 2], 3, r"col_idx\[0\] = 1 and col_idx\[1\] = 1 in row 0"),
    "duplicate-sparse-path": ([0, 2, 4], [0, 2, 7, 7], 40, r"col_idx\[2\] = 7 and col_idx\[3\] = 7 in row 1"),
    "duplicate-after-empty-row": ([0, 1, 1, 3], [5, 9, 9], 40, r"col_idx\[1\] = 9 and col_idx\[2\] = 9 in row 2"),
    "unsorted-dense-path": ([0, 2, 4], [0, 2, 2, 1], 3, r"col_idx\[2\] = 2 and col_idx\[3\] = 1 in row 1"),
    "unsorted-sparse-path": ([0, 3, 4], [4, 30, 12, 0], 40, r"col_idx\[1\] = 30 and col_idx\[2\] = 12 in row 0"),
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", list(BAD_ORDER))
def test_unsorted_or_duplicate_columns_raise(op, case):
    _skip_without(op)
    row_ptr, col_idx, k, where = BAD_ORDER[case]
    with pytest.raises(RuntimeError, match=rf"{op}: col_idx must be strictly increasing within each row "
                                           rf"\(sorted, no duplicates\), got {where}"):
        _call(op, *_csr(row_ptr, col_idx), k)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("k", [3, 40], ids=["dense-path", "sparse-path"])
def test_columns_may_restart_at_each_row(op, k):
    _skip_without(op)
    row_ptr, col_idx = _csr([0, 2, 2, 4], [1, 2, 0, 1])
    out = _call(op, row_ptr, col_idx, k)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("col,k", [(3, 3), (-1, 3), (40, 40)], ids=["too-large", "negative", "too-large-sparse"])
def test_column_out_of_range_names_col_idx_and_value(op, col, k):
    _skip_without(op)
    with pytest.raises(RuntimeError, match=rf"{op}: col_idx entries must lie in \[0, {k}\) .*got col_idx\[2\] = {col}"):
        _call(op, *_csr([0, 2, 3], [0, 1, col]), k)


@pytest.mark.parametrize("op", OPS)
def test_row_ptr_outside_nnz_names_the_decrease(op):
    _skip_without(op)
    # Each row but the last is in order locally; row_ptr[1] = 5 lies past nnz = 2.
    with pytest.raises(RuntimeError, match=rf"{op}: row_ptr must be non-decreasing, got row_ptr\[1\] = 5 > "
                                           r"row_ptr\[2\] = 2"):
        _call(op, *_csr([0, 5, 2], [0, 1]), 3)


# -- item: the cached transpose of spmm and sparse_linear is checked -----------------------------
T_OPS = ("spmm", "sparse_linear")
ROW_PTR, COL_IDX = _csr([0, 2, 3, 5], [0, 2, 1, 0, 2])  # (3, 4): columns 0: rows 0, 2; 1: row 1; 2: rows 0, 2; 3: -
K = 4


def _transpose():
    t_row_ptr, t_col_idx, t_perm = transpose_pattern(ROW_PTR, COL_IDX, K)
    assert t_row_ptr.tolist() == [0, 2, 3, 5, 5] and t_perm.tolist() == [0, 3, 2, 1, 4]
    return t_row_ptr.clone(), t_col_idx.clone(), t_perm.clone()


def _edit(t_row_ptr=None, t_col_idx=None, t_perm=None):
    good = _transpose()
    return tuple(good[i] if new is None else new for i, new in enumerate((t_row_ptr, t_col_idx, t_perm)))


def _long(values):
    return torch.tensor(values, dtype=torch.int64)


BAD_TRANSPOSE = {
    "flipped-t_perm": (_edit(t_perm=_long([4, 1, 2, 3, 0])),
                       r"t_perm and t_row_ptr must list column 0's nonzeros at t_perm\[0:2\], got t_perm\[0\] = 4, "
                       r"a nonzero of column 2"),
    "t_perm-swapped-within-a-column": (_edit(t_perm=_long([3, 0, 2, 1, 4])),
                                       r"t_perm must be increasing within each column .*got t_perm\[0\] = 3 and "
                                       r"t_perm\[1\] = 0 in column 0"),
    "t_perm-duplicate": (_edit(t_perm=_long([0, 0, 2, 1, 4])), r"t_perm must be increasing within each column"),
    "t_perm-too-large": (_edit(t_perm=_long([0, 3, 2, 1, 5])),
                         r"t_perm entries must lie in \[0, nnz = 5\), got t_perm\[4\] = 5"),
    "t_perm-negative": (_edit(t_perm=_long([0, 3, 2, -1, 4])), r"t_perm entries must lie in \[0, nnz = 5\), "
                                                                r"got t_perm\[3\] = -1"),
    "t_perm-size": (_edit(t_perm=_long([0, 3, 2, 1])), r"t_perm must have 5 entries \(nnz = 5, as col_idx\), got 4"),
    "t_perm-dtype": (_edit(t_perm=torch.tensor([0, 3, 2, 1, 4], dtype=torch.int32)),
                     r"t_perm must be a 1-D Long tensor, got Int"),
    "t_col_idx-wrong-row": (_edit(t_col_idx=torch.tensor([0, 2, 1, 0, 1], dtype=torch.int32)),
                            r"t_col_idx\[4\] must be 2, the row of nonzero t_perm\[4\] = 4, got 1"),
    "t_col_idx-out-of-range": (_edit(t_col_idx=torch.tensor([0, 3, 1, 0, 2], dtype=torch.int32)),
                               r"t_col_idx\[1\] must be 2, the row of nonzero t_perm\[1\] = 3, got 3"),
    "t_col_idx-size": (_edit(t_col_idx=torch.tensor([0, 2, 1, 0], dtype=torch.int32)),
                       r"t_col_idx must have 5 entries \(nnz = 5, as col_idx\), got 4"),
    "t_col_idx-dtype": (_edit(t_col_idx=_long([0, 2, 1, 0, 2])), r"t_col_idx must be a 1-D Int tensor, got Long"),
    "t_row_ptr-shifted": (_edit(t_row_ptr=_long([0, 1, 3, 5, 5])),
                          r"t_perm and t_row_ptr must list column 1's nonzeros at t_perm\[1:3\], got t_perm\[1\] = 3, "
                          r"a nonzero of column 0"),
    "t_row_ptr-size": (_edit(t_row_ptr=_long([0, 2, 3, 5])),
                       r"t_row_ptr must have 5 entries \(k\+1 = 5: the transpose has k = 4 rows\), got 4"),
    "t_row_ptr-last": (_edit(t_row_ptr=_long([0, 2, 3, 5, 6])), r"t_row_ptr\[-1\] must equal nnz = 5, got 6"),
    "t_row_ptr-first": (_edit(t_row_ptr=_long([1, 2, 3, 5, 5])), r"t_row_ptr\[0\] must be 0, got 1"),
    "t_row_ptr-decreasing": (_edit(t_row_ptr=_long([0, 3, 2, 5, 5])),
                             r"t_row_ptr must be non-decreasing, got t_row_ptr\[1\] = 3 > t_row_ptr\[2\] = 2"),
    "t_row_ptr-past-nnz": (_edit(t_row_ptr=_long([0, 2, 9, 5, 5])),
                           r"t_row_ptr must be non-decreasing, got t_row_ptr\[2\] = 9 > t_row_ptr\[3\] = 5"),
    "t_perm-only": ((None, None, _transpose()[2]),
                    r"t_row_ptr, t_col_idx and t_perm \(the transpose\) must be given together or not at all, "
                    r"got t_perm only"),
    "t_row_ptr-and-t_col_idx-only": (_transpose()[:2] + (None,),
                                     r"t_row_ptr, t_col_idx and t_perm \(the transpose\) must be given together or "
                                     r"not at all, got t_row_ptr t_col_idx only"),
}


@pytest.mark.parametrize("op", T_OPS)
@pytest.mark.parametrize("case", list(BAD_TRANSPOSE))
def test_inconsistent_transpose_raises(op, case):
    _skip_without(op)
    transpose, match = BAD_TRANSPOSE[case]
    with pytest.raises(RuntimeError, match=rf"{op}: {match}"):
        _call(op, ROW_PTR, COL_IDX, K, transpose)


@pytest.mark.parametrize("op", T_OPS)
def test_transpose_of_the_wrong_width_raises(op):
    _skip_without(op)
    # The transpose of the same pattern taken as (3, 5): one column too many for the operand.
    with pytest.raises(RuntimeError, match=rf"{op}: t_row_ptr must have 5 entries .*got 6"):
        _call(op, ROW_PTR, COL_IDX, K, transpose_pattern(ROW_PTR, COL_IDX, K + 1))


def _random_pattern(m, k, density, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(m, k, generator=g) < density
    mask[m // 2] = False  # an empty row
    row_ptr = torch.zeros(m + 1, dtype=torch.int64)
    row_ptr[1:] = mask.sum(1).cumsum(0)
    return row_ptr, mask.nonzero()[:, 1].to(torch.int32)


@pytest.mark.parametrize("op", T_OPS)
@pytest.mark.parametrize("density", [0.05, 0.5], ids=["sparse-path", "dense-path"])
def test_the_exact_transpose_passes_and_gives_the_gradient(op, density):
    _skip_without(op)
    m, k = 37, 53
    row_ptr, col_idx = _random_pattern(m, k, density, seed=1)
    transpose = transpose_pattern(row_ptr, col_idx, k)
    values = torch.randn(col_idx.numel(), dtype=torch.float64)
    dense_W = torch.zeros(m, k, dtype=torch.float64)
    dense_W[torch.repeat_interleave(torch.arange(m), row_ptr.diff()), col_idx.long()] = values
    if op == "spmm":
        B = torch.randn(k, 6, dtype=torch.float64, requires_grad=True)
        out = torch.ops.sparsekern.spmm(values, row_ptr, col_idx, B, *transpose)
        expected, operand = dense_W @ B, B
    else:
        x = torch.randn(6, k, dtype=torch.float64, requires_grad=True)
        out = torch.ops.sparsekern.sparse_linear(x, values, row_ptr, col_idx, None, *transpose)
        expected, operand = x @ dense_W.t(), x
    grad = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, operand, grad)
    (want,) = torch.autograd.grad(expected, operand, grad)
    torch.testing.assert_close(out, expected.detach())
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("op", T_OPS)
def test_reversed_columns_are_caught(op):
    _skip_without(op)
    # Larger pattern: swapping the first and last entry of any column of t_perm (a wrong dx) raises.
    m, k = 64, 48
    row_ptr, col_idx = _random_pattern(m, k, 0.2, seed=2)
    t_row_ptr, t_col_idx, t_perm = transpose_pattern(row_ptr, col_idx, k)
    for j in range(0, k, 7):
        q0, q1 = int(t_row_ptr[j]), int(t_row_ptr[j + 1])
        assert q1 - q0 >= 2
        bad = t_perm.clone()
        bad[q0], bad[q1 - 1] = t_perm[q1 - 1], t_perm[q0]
        with pytest.raises(RuntimeError, match=rf"{op}: t_perm must be increasing within each column .* in column {j}"):
            _call(op, row_ptr, col_idx, k, (t_row_ptr, t_col_idx, bad))


# -- the other raw CPU kernels: what the Python layer checks, the kernel checks again ------------
def _bool(*shape):
    return torch.ones(*shape, dtype=torch.bool)


_RP1, _CI1 = torch.tensor([0, 1]), torch.tensor([0], dtype=torch.int32)  # one row, one nonzero at column 0
RAW_CASES = {
    "masked_matmul-mask-float": ("masked_matmul", lambda: torch.ops.sparsekern.masked_matmul(
        torch.randn(2, 4), torch.randn(3, 4), torch.ones(3, 4)),
        r"masked_matmul: mask must be a bool tensor, got Float"),
    "masked_matmul-mask-shape": ("masked_matmul", lambda: torch.ops.sparsekern.masked_matmul(
        torch.randn(2, 4), torch.randn(3, 4), _bool(4, 3)),
        r"masked_matmul: mask must have shape \(3, 4\), got \[4, 3\]"),
    "masked_matmul-x-cols": ("masked_matmul", lambda: torch.ops.sparsekern.masked_matmul(
        torch.randn(2, 5), torch.randn(3, 4), _bool(3, 4)), r"masked_matmul: x must have 4 columns .*, got 5"),
    "masked_sddmm-cols": ("masked_sddmm", lambda: torch.ops.sparsekern.masked_sddmm(
        torch.randn(3, 2), torch.randn(4, 3), _bool(3, 4)),
        r"masked_sddmm: X and Y must have the same number of columns, got 2 and 3"),
    "topk_select-k-negative": ("topk_select", lambda: torch.ops.sparsekern.topk_select(torch.randn(5), -1),
                               r"topk_select: k must be >= 0, got k = -1"),
    "topk_select-k-too-large": ("topk_select", lambda: torch.ops.sparsekern.topk_select(torch.randn(5), 6),
                                r"topk_select: k \(6\) is larger than the number of candidates \(5\)"),
    "topk_select-scores-int": ("topk_select", lambda: torch.ops.sparsekern.topk_select(torch.arange(5), 1),
                               r"topk_select: scores must be float32 or float64 on the CPU, got Long"),
    "topk_select-candidates-size": ("topk_select", lambda: torch.ops.sparsekern.topk_select(
        torch.randn(5), 1, True, _bool(4)), r"topk_select: candidates must be 1-D with the size of scores \(5\)"),
    "sparse_conv2d-x-3d": ("sparse_conv2d", lambda: torch.ops.sparsekern.sparse_conv2d(
        torch.randn(1, 8, 8), torch.randn(1), _RP1, _CI1, [1, 1], None, [1, 1], [0, 0], [1, 1]),
        r"sparse_conv2d: x must be 4-D"),
    "sparse_conv2d-bias-size": ("sparse_conv2d", lambda: torch.ops.sparsekern.sparse_conv2d(
        torch.randn(1, 1, 8, 8), torch.randn(1), _RP1, _CI1, [1, 1], torch.randn(3), [1, 1], [0, 0], [1, 1]),
        r"sparse_conv2d: bias must have shape \(1\) .*, got \[3\]"),
}


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_other_raw_ops_name_the_argument(case):
    op, call, match = RAW_CASES[case]
    _skip_without(op)
    with pytest.raises(RuntimeError, match=match):
        call()
