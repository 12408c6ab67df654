"""The Triton ops under torch.autocast (the autocast rule of sparsekern.ops on sparsekern_triton::*):
16-bit outputs within a few roundings of the float64 result, float32 gradients for float32 inputs.

Without a GPU they run under TRITON_INTERPRET=1 with CPU autocast: float16 everywhere, bfloat16 only
for the kernels without a bfloat16 tl.dot (the interpreter's is wrong: triton_kernels/_common.py).
"""
import pytest
import torch
from triton_testing import DEVICE

import sparsekern
from sparsekern import reference
from sparsekern.block_sparse import BlockSparseMatrix
from sparsekern.nn import SparseLinear
from sparsekern.ops import bsr_linear, masked_matmul, masked_sddmm, sddmm, sparse_conv2d, sparse_linear, spmm

from sk_testing import check_low_precision, gen, make_input, random_mask, random_sparse, seed_of

F32 = torch.float32
# Kernels whose bfloat16 path goes through tl.dot on bfloat16 tiles.
_BF16_DOT = ("masked_matmul", "masked_sddmm", "bsr_linear")


def _on(t):
    return t.to(DEVICE).detach().requires_grad_(t.requires_grad)


def _sparse(shape, density, g):
    W = random_sparse(shape, density, F32, g, empty_rows=True)
    return W.to(DEVICE), _on(W.values).requires_grad_(True)


def _cases():
    def linear(g):
        W, v = _sparse((20, 37), 0.3, g)
        return (lambda x, v_, b: sparse_linear(x, W.with_values(v_), b),
                lambda x, v_, b: reference.sparse_linear(x, v_, W.row_ptr, W.col_idx, b),
                [_on(make_input((3, 5, 37), F32, g, requires_grad=True)), v, _on(make_input((20,), F32, g,
                                                                                             requires_grad=True))])

    def spmm_(g):
        A, v = _sparse((20, 37), 0.3, g)
        return (lambda v_, B: spmm(A.with_values(v_), B), lambda v_, B: reference.spmm(v_, A.row_ptr, A.col_idx, B),
                [v, _on(make_input((37, 40), F32, g, requires_grad=True))])

    def sddmm_(g):
        P, _ = _sparse((20, 37), 0.3, g)
        return (lambda X, Y: sddmm(P, X, Y), lambda X, Y: reference.sddmm(P.row_ptr, P.col_idx, X, Y),
                [_on(make_input((20, 9), F32, g, requires_grad=True)), _on(make_input((37, 9), F32, g,
                                                                                       requires_grad=True))])

    def masked(g):
        mask = random_mask((20, 37), 0.3, g).to(DEVICE)
        return (lambda x, w: masked_matmul(x, w, mask), lambda x, w: reference.masked_matmul(x, w, mask),
                [_on(make_input((6, 37), F32, g, requires_grad=True)), _on(make_input((20, 37), F32, g,
                                                                                       requires_grad=True))])

    def masked_sddmm_(g):
        mask = random_mask((20, 37), 0.3, g).to(DEVICE)
        return (lambda X, Y: masked_sddmm(X, Y, mask), lambda X, Y: reference.masked_sddmm(X, Y, mask),
                [_on(make_input((20, 9), F32, g, requires_grad=True)), _on(make_input((37, 9), F32, g,
                                                                                       requires_grad=True))])

    def conv(g):
        W, v = _sparse((6, 4, 3, 3), 0.4, g)
        return (lambda x, v_: sparse_conv2d(x, W.with_values(v_), None, 2, 1),
                lambda x, v_: reference.sparse_conv2d(x, v_, W.row_ptr, W.col_idx, [3, 3], None, [2, 2], [1, 1],
                                                      [1, 1]),
                [_on(make_input((2, 4, 9, 8), F32, g, requires_grad=True)), v])

    def bsr(g):
        mask = random_mask((2, 3), 0.5, g).repeat_interleave(16, 0).repeat_interleave(16, 1)
        B = BlockSparseMatrix.from_dense(torch.randn(32, 48, generator=g), 16, mask).to(DEVICE)
        v = _on(B.values).requires_grad_(True)
        return (lambda x, v_: bsr_linear(x, BlockSparseMatrix(B.row_ptr, B.col_idx, v_, B.shape, validate=False)),
                lambda x, v_: reference.bsr_linear(x, v_, B.row_ptr, B.col_idx),
                [_on(make_input((20, 48), F32, g, requires_grad=True)), v])

    return {"sparse_linear": linear, "spmm": spmm_, "sddmm": sddmm_, "masked_matmul": masked,
            "masked_sddmm": masked_sddmm_, "sparse_conv2d": conv, "bsr_linear": bsr}


def _dtypes(op):
    if DEVICE.type == "cuda" or op not in _BF16_DOT:
        return [torch.float16, torch.bfloat16]
    return [torch.float16]


CASES = [(op, dtype) for op in _cases() for dtype in _dtypes(op)]


@pytest.mark.parametrize("op,dtype", CASES, ids=[f"{op}-{str(d)[6:]}" for op, d in CASES])
def test_triton_op_under_autocast(op, dtype):
    g = gen(seed_of("triton autocast", op))
    fn, ref, inputs = _cases()[op](g)
    with sparsekern.backend("triton"), torch.autocast(DEVICE.type, dtype=dtype):
        out, got = check_low_precision(fn, ref, inputs, g, dtype)
    assert out.dtype == dtype
    assert [d.dtype for d in got] == [F32] * len(got)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_sparse_linear_module_under_autocast(dtype):
    """A SparseLinear on the Triton backend under autocast: the dtype F.linear gives, float32 master values."""
    torch.manual_seed(0)
    module = SparseLinear(48, 24, density=0.3, device=DEVICE)
    x = torch.randn(7, 48, device=DEVICE, requires_grad=True)
    with sparsekern.backend("triton"):
        with torch.autocast(DEVICE.type, dtype=dtype):
            y = module(x)
            assert y.dtype == torch.nn.functional.linear(x, module.dense_weight(), module.bias).dtype == dtype
        y.float().sum().backward()
    assert module.values.dtype == module.values.grad.dtype == module.bias.grad.dtype == x.grad.dtype == F32

