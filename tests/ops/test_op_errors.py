"""Bad arguments to the public ops (sparsekern.ops), in the style of PyTorch's OpInfo error inputs: per op,
a list of (call, error type, pattern) cases. Each call must raise that error type with a message that
names the op and the argument (and, for sizes, both sizes). The raw torch.ops.sparsekern kernels have
their own cases in test_raw_op_errors.py; the sparse formats' constructors in tests/test_sparse_matrix.py."""
import re

import pytest
import torch

from sparsekern import BlockSparseMatrix, SparseMatrix, ops

META = "meta"  # a second device on every machine: a tensor there is on the wrong device for the others


def _csr(m=3, k=4, dtype=torch.float32, shape=None):
    g = torch.Generator().manual_seed(m * 31 + k)
    dense = torch.randn(m, k, generator=g, dtype=torch.float64).to(dtype)
    W = SparseMatrix.from_dense(dense, torch.rand(m, k, generator=g) < 0.6)
    if shape is not None:
        W = SparseMatrix(W.row_ptr, W.col_idx, W.values, shape)
    return W


def _conv_weight(cout=2, cin=3, kh=3, kw=3):
    return _csr(cout, cin * kh * kw, shape=(cout, cin, kh, kw))


def _bsr(m=4, k=4, block=2, shape=None):
    dense = torch.randn(m, k, generator=torch.Generator().manual_seed(m + 7 * k), dtype=torch.float64).float()
    return BlockSparseMatrix.from_dense(dense if shape is None else dense.reshape(shape), block)


def _bsr_pattern():
    W = _bsr()
    return W.row_ptr, W.col_idx


def _r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


# (id, call, error type, regex the message must match). The regex names the op and the argument.
CASES = {
    "spmm": [
        ("A-dense", lambda: ops.spmm(_r(3, 4), _r(4, 2)), TypeError,
         r"spmm: A must be a sparsekern.SparseMatrix, got Tensor"),
        ("B-not-tensor", lambda: ops.spmm(_csr(), [[1.0]] * 4), TypeError, r"spmm: B must be a torch.Tensor, got list"),
        ("B-int", lambda: ops.spmm(_csr(), torch.ones(4, 2, dtype=torch.int64)), TypeError,
         r"spmm: B must be a floating-point tensor, got torch.int64"),
        ("B-1d", lambda: ops.spmm(_csr(), _r(4)), ValueError, r"spmm: B must be 2-D, got shape \(4,\)"),
        ("B-3d", lambda: ops.spmm(_csr(), _r(4, 2, 1)), ValueError, r"spmm: B must be 2-D, got shape \(4, 2, 1\)"),
        ("B-rows", lambda: ops.spmm(_csr(), _r(5, 2)), ValueError, r"spmm: B must have 4 rows \(A is 3x4\), got 5"),
        ("B-dtype", lambda: ops.spmm(_csr(), _r(4, 2, dtype=torch.float64)), TypeError,
         r"spmm: B has dtype torch.float64 but A.values has torch.float32"),
        ("B-device", lambda: ops.spmm(_csr(), _r(4, 2, device=META)), ValueError,
         r"spmm: B is on meta but A.values is on cpu"),
    ],
    "sparse_linear": [
        ("x-not-tensor", lambda: ops.sparse_linear("x", _csr()), TypeError,
         r"sparse_linear: x must be a torch.Tensor, got str"),
        ("W-dense", lambda: ops.sparse_linear(_r(2, 4), _r(3, 4)), TypeError,
         r"sparse_linear: W must be a sparsekern.SparseMatrix, got Tensor"),
        ("W-4d", lambda: ops.sparse_linear(_r(2, 27), _conv_weight(3, 3, 3, 3)), ValueError,
         r"sparse_linear: W must be a 2-D \(out_features, in_features\) matrix, got shape \(3, 3, 3, 3\)"),
        ("x-int", lambda: ops.sparse_linear(torch.ones(2, 4, dtype=torch.int32), _csr()), TypeError,
         r"sparse_linear: x must be a floating-point tensor, got torch.int32"),
        ("x-last-dim", lambda: ops.sparse_linear(_r(2, 5), _csr()), ValueError,
         r"sparse_linear: x must have last dim 4 \(W has 4 columns\), got shape \(2, 5\)"),
        ("x-0d", lambda: ops.sparse_linear(torch.tensor(1.0), _csr()), ValueError,
         r"sparse_linear: x must have last dim 4"),
        ("x-dtype", lambda: ops.sparse_linear(_r(2, 4, dtype=torch.float64), _csr()), TypeError,
         r"sparse_linear: W.values has dtype torch.float32 but x has torch.float64"),
        ("x-device", lambda: ops.sparse_linear(_r(2, 4, device=META), _csr()), ValueError,
         r"sparse_linear: W.values is on cpu but x is on meta"),
        ("bias-2d", lambda: ops.sparse_linear(_r(2, 4), _csr(), _r(3, 1)), ValueError,
         r"sparse_linear: bias must be 1-D, got shape \(3, 1\)"),
        ("bias-size", lambda: ops.sparse_linear(_r(2, 4), _csr(), _r(2)), ValueError,
         r"sparse_linear: bias must have 3 entries \(W has 3 rows\), got 2"),
        ("bias-dtype", lambda: ops.sparse_linear(_r(2, 4), _csr(), _r(3, dtype=torch.float64)), TypeError,
         r"sparse_linear: bias has dtype torch.float64 but x has torch.float32"),
        ("bias-not-tensor", lambda: ops.sparse_linear(_r(2, 4), _csr(), [0.0] * 3), TypeError,
         r"sparse_linear: bias must be a torch.Tensor, got list"),
    ],
    "sddmm": [
        ("pattern-dense", lambda: ops.sddmm(_r(3, 4), _r(3, 2), _r(4, 2)), TypeError,
         r"sddmm: pattern must be a sparsekern.SparseMatrix, got Tensor"),
        ("X-1d", lambda: ops.sddmm(_csr(), _r(3), _r(4, 2)), ValueError, r"sddmm: X must be 2-D, got shape \(3,\)"),
        ("Y-3d", lambda: ops.sddmm(_csr(), _r(3, 2), _r(4, 2, 1)), ValueError,
         r"sddmm: Y must be 2-D, got shape \(4, 2, 1\)"),
        ("X-int", lambda: ops.sddmm(_csr(), torch.ones(3, 2, dtype=torch.int64), _r(4, 2)), TypeError,
         r"sddmm: X must be a floating-point tensor, got torch.int64"),
        ("X-rows", lambda: ops.sddmm(_csr(), _r(2, 2), _r(4, 2)), ValueError,
         r"sddmm: X must have 3 rows \(pattern is 3x4\), got 2"),
        ("Y-rows", lambda: ops.sddmm(_csr(), _r(3, 2), _r(5, 2)), ValueError,
         r"sddmm: Y must have 4 rows \(pattern is 3x4\), got 5"),
        ("X-Y-cols", lambda: ops.sddmm(_csr(), _r(3, 2), _r(4, 3)), ValueError,
         r"sddmm: X and Y must have the same number of columns, got 2 and 3"),
        ("Y-dtype", lambda: ops.sddmm(_csr(), _r(3, 2), _r(4, 2, dtype=torch.float64)), TypeError,
         r"sddmm: Y has dtype torch.float64 but X has torch.float32"),
        ("Y-device", lambda: ops.sddmm(_csr(), _r(3, 2), _r(4, 2, device=META)), ValueError,
         r"sddmm: Y is on meta but X is on cpu"),
    ],
    "masked_matmul": [
        ("weight-1d", lambda: ops.masked_matmul(_r(2, 4), _r(4), torch.ones(4, dtype=torch.bool)), ValueError,
         r"masked_matmul: weight must be 2-D, got shape \(4,\)"),
        ("mask-float", lambda: ops.masked_matmul(_r(2, 4), _r(3, 4), torch.ones(3, 4)), TypeError,
         r"masked_matmul: mask must be a bool tensor, got torch.float32"),
        ("mask-shape", lambda: ops.masked_matmul(_r(2, 4), _r(3, 4), torch.ones(4, 3, dtype=torch.bool)), ValueError,
         r"masked_matmul: mask shape \(4, 3\) must equal weight shape \(3, 4\)"),
        ("x-last-dim", lambda: ops.masked_matmul(_r(2, 5), _r(3, 4), torch.ones(3, 4, dtype=torch.bool)), ValueError,
         r"masked_matmul: x must have last dim 4 \(weight has 4 columns\), got shape \(2, 5\)"),
        ("x-int", lambda: ops.masked_matmul(torch.ones(2, 4, dtype=torch.int32), _r(3, 4),
                                            torch.ones(3, 4, dtype=torch.bool)), TypeError,
         r"masked_matmul: x must be a floating-point tensor, got torch.int32"),
        ("weight-dtype", lambda: ops.masked_matmul(_r(2, 4), _r(3, 4, dtype=torch.float64),
                                                   torch.ones(3, 4, dtype=torch.bool)), TypeError,
         r"masked_matmul: weight has dtype torch.float64 but x has torch.float32"),
        ("mask-device", lambda: ops.masked_matmul(_r(2, 4), _r(3, 4), torch.ones(3, 4, dtype=torch.bool, device=META)),
         ValueError, r"masked_matmul: mask is on meta but weight is on cpu"),
    ],
    "masked_sddmm": [
        ("X-1d", lambda: ops.masked_sddmm(_r(3), _r(4, 2), torch.ones(3, 4, dtype=torch.bool)), ValueError,
         r"masked_sddmm: X must be 2-D, got shape \(3,\)"),
        ("mask-int", lambda: ops.masked_sddmm(_r(3, 2), _r(4, 2), torch.ones(3, 4, dtype=torch.int64)), TypeError,
         r"masked_sddmm: mask must be a bool tensor, got torch.int64"),
        ("mask-shape", lambda: ops.masked_sddmm(_r(3, 2), _r(4, 2), torch.ones(4, 3, dtype=torch.bool)), ValueError,
         r"masked_sddmm: mask must have shape \(3, 4\), got \(4, 3\)"),
        ("X-Y-cols", lambda: ops.masked_sddmm(_r(3, 2), _r(4, 3), torch.ones(3, 4, dtype=torch.bool)), ValueError,
         r"masked_sddmm: X and Y must have the same number of columns, got 2 and 3"),
        ("Y-dtype", lambda: ops.masked_sddmm(_r(3, 2), _r(4, 2, dtype=torch.float64),
                                             torch.ones(3, 4, dtype=torch.bool)), TypeError,
         r"masked_sddmm: Y has dtype torch.float64 but X has torch.float32"),
        ("mask-device", lambda: ops.masked_sddmm(_r(3, 2), _r(4, 2), torch.ones(3, 4, dtype=torch.bool, device=META)),
         ValueError, r"masked_sddmm: mask is on meta but X is on cpu"),
    ],
    "sparse_conv2d": [
        ("x-3d", lambda: ops.sparse_conv2d(_r(3, 5, 5), _conv_weight()), ValueError,
         r"sparse_conv2d: x must be 4-D, got shape \(3, 5, 5\)"),
        ("x-int", lambda: ops.sparse_conv2d(torch.ones(1, 3, 5, 5, dtype=torch.int64), _conv_weight()), TypeError,
         r"sparse_conv2d: x must be a floating-point tensor, got torch.int64"),
        ("W-2d", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _csr(2, 27)), ValueError,
         r"sparse_conv2d: W must have the dense shape \(Cout, Cin, kh, kw\), got \(2, 27\)"),
        ("x-channels", lambda: ops.sparse_conv2d(_r(1, 4, 5, 5), _conv_weight()), ValueError,
         r"sparse_conv2d: x must have 3 channels \(W has shape \(2, 3, 3, 3\)\), got 4"),
        ("stride-float", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), stride=1.5), TypeError,
         r"sparse_conv2d: stride must be an int or a pair of ints >= 1, got 1.5"),
        ("stride-str", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), stride="1"), TypeError,
         r"sparse_conv2d: stride must be an int or a pair of ints >= 1, got '1'"),
        ("stride-bool", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), stride=True), TypeError,
         r"sparse_conv2d: stride must be an int or a pair of ints >= 1, got True"),
        ("stride-triple", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), stride=(1, 1, 1)), ValueError,
         r"sparse_conv2d: stride must be an int or a pair of ints >= 1, got \(1, 1, 1\)"),
        ("stride-pair-float", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), stride=(1, 2.0)), TypeError,
         r"sparse_conv2d: stride must be an int or a pair of ints >= 1, got \(1, 2.0\)"),
        ("stride-zero", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), stride=0), ValueError,
         r"sparse_conv2d: stride must be an int or a pair of ints >= 1, got 0"),
        ("padding-negative", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), padding=(0, -1)), ValueError,
         r"sparse_conv2d: padding must be an int or a pair of ints >= 0, got \(0, -1\)"),
        ("padding-float", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), padding=0.5), TypeError,
         r"sparse_conv2d: padding must be an int or a pair of ints >= 0, got 0.5"),
        ("dilation-zero", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), dilation=0), ValueError,
         r"sparse_conv2d: dilation must be an int or a pair of ints >= 1, got 0"),
        ("dilation-none", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), dilation=None), TypeError,
         r"sparse_conv2d: dilation must be an int or a pair of ints >= 1, got None"),
        ("groups", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), groups=3), ValueError,
         r"sparse_conv2d: only groups=1 is supported, got groups=3"),
        ("groups-bool", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), groups=True), TypeError,
         r"sparse_conv2d: groups must be an int, got True"),
        ("groups-float", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), groups=1.0), TypeError,
         r"sparse_conv2d: groups must be an int, got 1.0"),
        ("x-too-small", lambda: ops.sparse_conv2d(_r(1, 3, 2, 2), _conv_weight()), ValueError,
         r"sparse_conv2d: input of size \(2, 2\) is too small for kernel \(3, 3\)"),
        ("bias-size", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), _r(3)), ValueError,
         r"sparse_conv2d: bias must have 2 entries \(W has 2 output channels\), got 3"),
        ("bias-dtype", lambda: ops.sparse_conv2d(_r(1, 3, 5, 5), _conv_weight(), _r(2, dtype=torch.float64)), TypeError,
         r"sparse_conv2d: bias has dtype torch.float64 but x has torch.float32"),
    ],
    "bsr_linear": [
        ("W-csr", lambda: ops.bsr_linear(_r(2, 4), _csr(4, 4)), TypeError,
         r"bsr_linear: W must be a sparsekern.BlockSparseMatrix, got SparseMatrix"),
        ("x-last-dim", lambda: ops.bsr_linear(_r(2, 6), _bsr()), ValueError,
         r"bsr_linear: x must have last dim 4 \(W has 4 columns\), got shape \(2, 6\)"),
        ("x-int", lambda: ops.bsr_linear(torch.ones(2, 4, dtype=torch.int64), _bsr()), TypeError,
         r"bsr_linear: x must be a floating-point tensor, got torch.int64"),
        ("bias-size", lambda: ops.bsr_linear(_r(2, 4), _bsr(), _r(3)), ValueError,
         r"bsr_linear: bias must have 4 entries \(W has 4 rows\), got 3"),
    ],
    "bsr_sddmm": [
        ("block-zero", lambda: ops.bsr_sddmm(*_bsr_pattern(), _r(4, 2), _r(4, 2), 0), ValueError,
         r"bsr_sddmm: block must be an int >= 1, got 0"),
        ("block-float", lambda: ops.bsr_sddmm(*_bsr_pattern(), _r(4, 2), _r(4, 2), 2.0), ValueError,
         r"bsr_sddmm: block must be an int >= 1, got 2.0"),
        ("X-Y-cols", lambda: ops.bsr_sddmm(*_bsr_pattern(), _r(4, 2), _r(4, 3), 2), ValueError,
         r"bsr_sddmm: X and Y must share their second dim, got \(4, 2\) and \(4, 3\)"),
        ("X-rows", lambda: ops.bsr_sddmm(*_bsr_pattern(), _r(5, 2), _r(4, 2), 2), ValueError,
         r"bsr_sddmm: X rows \(5\) and Y rows \(4\) must be multiples of block=2"),
        ("col_idx-int64", lambda: ops.bsr_sddmm(_bsr().row_ptr, _bsr().col_idx.long(), _r(4, 2), _r(4, 2), 2),
         ValueError, r"bsr_sddmm: col_idx must be int32, got torch.int64"),
        ("row_ptr-float", lambda: ops.bsr_sddmm(_bsr().row_ptr.float(), _bsr().col_idx, _r(4, 2), _r(4, 2), 2),
         ValueError, r"bsr_sddmm: row_ptr must be int64, got torch.float32"),
        ("X-1d", lambda: ops.bsr_sddmm(*_bsr_pattern(), _r(4), _r(4, 2), 2), ValueError,
         r"bsr_sddmm: X must be 2-D, got shape \(4,\)"),
    ],
    "bsr_conv2d": [
        ("W-csr", lambda: ops.bsr_conv2d(_r(1, 3, 5, 5), _conv_weight()), TypeError,
         r"bsr_conv2d: W must be a sparsekern.BlockSparseMatrix, got SparseMatrix"),
        ("x-3d", lambda: ops.bsr_conv2d(_r(3, 5, 5), _bsr(2, 8, 2, (2, 2, 2, 2))), ValueError,
         r"bsr_conv2d: x must be 4-D, got shape \(3, 5, 5\)"),
        ("x-channels", lambda: ops.bsr_conv2d(_r(1, 3, 5, 5), _bsr(2, 8, 2, (2, 2, 2, 2))), ValueError,
         r"bsr_conv2d: x must have 2 channels"),
        ("stride-float", lambda: ops.bsr_conv2d(_r(1, 2, 5, 5), _bsr(2, 8, 2, (2, 2, 2, 2)), stride=1.5), TypeError,
         r"bsr_conv2d: stride must be an int or a pair of ints >= 1, got 1.5"),
        ("padding-negative", lambda: ops.bsr_conv2d(_r(1, 2, 5, 5), _bsr(2, 8, 2, (2, 2, 2, 2)), padding=-1),
         ValueError, r"bsr_conv2d: padding must be an int or a pair of ints >= 0, got -1"),
    ],
    "gather": [
        ("src-2d", lambda: ops.gather(_r(2, 2), torch.zeros(2, dtype=torch.int64)), ValueError,
         r"gather: src must be 1-D, got shape \(2, 2\)"),
        ("src-int", lambda: ops.gather(torch.ones(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)), TypeError,
         r"gather: src must be a floating-point tensor, got torch.int64"),
        ("index-int32", lambda: ops.gather(_r(3), torch.zeros(2, dtype=torch.int32)), TypeError,
         r"gather: index must be int64, got torch.int32"),
        ("index-float", lambda: ops.gather(_r(3), torch.zeros(2)), TypeError,
         r"gather: index must be int64, got torch.float32"),
        ("index-2d", lambda: ops.gather(_r(3), torch.zeros(2, 1, dtype=torch.int64)), ValueError,
         r"gather: index must be 1-D, got shape \(2, 1\)"),
        ("index-device", lambda: ops.gather(_r(3), torch.zeros(2, dtype=torch.int64, device=META)), ValueError,
         r"gather: index is on meta but src is on cpu"),
        ("index-range", lambda: ops.gather(_r(3), torch.tensor([0, 3])), ValueError,
         r"gather: index\[1\] = 3 is out of range for src of 3 entries"),
    ],
    "topk_select": [
        ("scores-2d", lambda: ops.topk_select(_r(2, 2), 1), ValueError,
         r"topk_select: scores must be 1-D, got shape \(2, 2\)"),
        ("scores-int", lambda: ops.topk_select(torch.arange(4), 1), TypeError,
         r"topk_select: scores must be a floating-point tensor, got torch.int64"),
        ("k-float", lambda: ops.topk_select(_r(4), 1.5), TypeError, r"topk_select: k must be an int, got float"),
        ("k-negative", lambda: ops.topk_select(_r(4), -1), ValueError,
         r"topk_select: k must lie in \[0, 4\] \(the number of candidates\), got -1"),
        ("k-too-large", lambda: ops.topk_select(_r(4), 5), ValueError,
         r"topk_select: k must lie in \[0, 4\] \(the number of candidates\), got 5"),
        ("candidates-int", lambda: ops.topk_select(_r(4), 1, candidates=torch.ones(4, dtype=torch.int64)), TypeError,
         r"topk_select: candidates must be a bool tensor, got torch.int64"),
        ("candidates-size", lambda: ops.topk_select(_r(4), 1, candidates=torch.ones(3, dtype=torch.bool)), ValueError,
         r"topk_select: candidates must have 4 entries like scores, got 3"),
        ("largest-str", lambda: ops.topk_select(_r(4), 1, largest="yes"), TypeError,
         r"topk_select: largest must be a bool, got str"),
    ],
}

PARAMS = [pytest.param(call, exc, pattern, id=f"{op}-{case}") for op, cases in CASES.items()
          for case, call, exc, pattern in cases]


@pytest.mark.parametrize("call,exc,pattern", PARAMS)
def test_error(call, exc, pattern):
    with pytest.raises(exc) as info:
        call()
    assert re.search(pattern, str(info.value)), f"message {str(info.value)!r} does not match {pattern!r}"


def test_every_public_op_has_cases():
    assert set(CASES) == set(ops.dispatch.REGISTRY), "a new public op needs its bad-argument cases here"


def test_from_dense_mask_list():
    """A mask given as a nested list (not a tensor) is refused by name, not with an AttributeError."""
    with pytest.raises(TypeError, match=r"SparseMatrix.from_dense: mask must be a bool torch.Tensor .*got list"):
        SparseMatrix.from_dense(torch.randn(2, 2), [[True, False], [False, True]])
