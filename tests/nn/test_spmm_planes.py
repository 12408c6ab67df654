"""The SpMM node on plane operands (csr_nodes.cpp: spmm_planes; the CSR engine's planes, csr_internal.h): B of
shape (k, N, P) with unit stride along P (conv2d_gemm's NCHW input viewed (C, N, H*W)) is read where it lies and
the result (m, N, P) written as (N, m, P) memory, every plane out[:, n] = A @ B[:, n]. Checked against the dense
product over plane sizes that fill tiles, split them, exceed them or are single columns, one image or many, each
vector width, float32 / float64 / bfloat16, densities that run the tile loops, the gather path and the dense
fallback, and gradients whose planes are not unit-stride; plus gradcheck and gradgradcheck (create_graph)."""
import pytest
import torch

import sparsekern
from sparsekern import isa as sk_isa
from sparsekern.ops import dispatch

from sk_testing import gen, random_sparse, seed_of

pytestmark = pytest.mark.skipif(not dispatch.extension_loaded, reason="no compiled extension")

# (k, m, N, P): 49 and 16 are ResNet-50's 7x7 and 4x4 planes; 64 fills a 256-byte fp32 tile, 100 spans two; P = 1
# and N = 1 are 2-D matrices in disguise; 3 makes a run per few columns.
SHAPES = ((64, 48, 16, 49), (40, 72, 16, 16), (33, 20, 5, 64), (24, 36, 3, 100), (50, 30, 40, 3), (32, 16, 37, 1),
          (48, 40, 1, 49))


TOLERANCE = {torch.float64: {}, torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=0.05, rtol=0.02)}


def _planes(k, N, P, dtype, g):
    """A (k, N, P) view of an (N, k, P) tensor: the layout of an NCHW input viewed (C, N, H*W)."""
    return torch.randn(N, k, P, generator=g).to(dtype).transpose(0, 1)


def _expected(W, B):
    dense = W.to_dense().to(torch.float64)
    return torch.einsum("ik,knp->inp", dense, B.to(torch.float64))


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("density", [0.0, 0.02, 0.1, 0.3, 0.9])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "k{}-m{}-N{}-P{}".format(*s))
def test_forward_and_gradients_against_the_dense_product(shape, density, dtype, isa):
    if not sk_isa.supported(isa):
        pytest.skip(f"isa {isa}: not on this CPU or build")
    k, m, N, P = shape
    g = gen(seed_of("spmm_planes", shape, density, str(dtype)))
    W = random_sparse((m, k), density, torch.float32, g, empty_rows=True)
    values = W.values.detach().to(dtype).requires_grad_()
    B = _planes(k, N, P, dtype, g).requires_grad_()
    with sk_isa.use(isa):
        y = torch.ops.sparsekern._spmm_node(values, W.row_ptr, W.col_idx, B, *W.transpose_pattern())
        assert y.shape == (m, N, P) and y.transpose(0, 1).is_contiguous()
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(y.double(), _expected(W, B.detach()), **tol)
        # the output gradient as channels_last makes it (unit stride across channels, not along the planes)
        dy = torch.randn(N, P, m, generator=g).to(dtype).permute(2, 0, 1)
        assert dy.stride(2) != 1 or P == 1
        dvalues, dB = torch.autograd.grad(y, (values, B), dy)
    dense = W.to_dense().to(torch.float64)
    exp_dB = torch.einsum("ik,inp->knp", dense, dy.double())
    exp_dW = torch.einsum("inp,knp->ik", dy.double(), B.detach().double())
    rows = torch.repeat_interleave(torch.arange(m), W.row_ptr.diff())
    torch.testing.assert_close(dB.double(), exp_dB, **tol)
    torch.testing.assert_close(dvalues.double(), exp_dW[rows, W.col_idx.long()], **tol)
    assert dB.shape == B.shape


def test_a_plane_operand_with_padding_between_images():
    """Planes need not lie back to back: a slice of a wider tensor (N, k', P) keeps its image stride."""
    g = gen(seed_of("spmm_planes", "strided"))
    W = random_sparse((24, 16), 0.2, torch.float32, g)
    B = torch.randn(6, 20, 49, generator=g)[:, 2:18].transpose(0, 1)  # (16, 6, 49), image stride 20 * 49
    y = torch.ops.sparsekern._spmm_node(W.values, W.row_ptr, W.col_idx, B, *W.transpose_pattern())
    torch.testing.assert_close(y.double(), _expected(W, B), atol=1e-4, rtol=1e-4)


def test_gradcheck_and_gradgradcheck():
    g = gen(seed_of("spmm_planes", "gradcheck"))
    W = random_sparse((7, 9), 0.4, torch.float64, g)
    B = torch.randn(3, 9, 5, dtype=torch.float64, generator=g).transpose(0, 1).requires_grad_()
    values = W.values.detach().clone().requires_grad_()

    def f(values, B):
        return torch.ops.sparsekern._spmm_node(values, W.row_ptr, W.col_idx, B, *W.transpose_pattern())

    with sparsekern.backend("cpp"):
        assert torch.autograd.gradcheck(f, (values, B))
        assert torch.autograd.gradgradcheck(f, (values, B))


def test_a_pattern_of_the_wrong_width_is_rejected():
    g = gen(seed_of("spmm_planes", "bad"))
    W = random_sparse((8, 12), 0.3, torch.float32, g)
    B = torch.randn(2, 10, 4, generator=g).transpose(0, 1)  # 10 rows, the pattern has 12 columns
    with pytest.raises(RuntimeError, match="B has 10 rows"):
        torch.ops.sparsekern._spmm_node(W.values, W.row_ptr, W.col_idx, B, *W.transpose_pattern())
