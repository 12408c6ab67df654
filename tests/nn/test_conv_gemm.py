"""conv2d_gemm (SparseConv2d's "gemm" kernel): the conv as one CSR SpMM over channels x (batch * pixels),
against F.conv2d on the dense weight, forward and every gradient, NCHW and channels_last."""
import pytest
import torch
import torch.nn.functional as F

import sparsekern
from sparsekern.nn.conv_gemm import conv2d_gemm

from sk_testing import gen, random_sparse, seed_of

# (n, cin, cout, h, w, kernel, stride, padding, dilation)
CASES = (
    (2, 8, 12, 7, 7, (1, 1), (1, 1), (0, 0), (1, 1)),
    (3, 16, 8, 8, 6, (1, 1), (2, 2), (0, 0), (1, 1)),
    (2, 5, 7, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1)),
    (1, 6, 4, 11, 8, (3, 2), (2, 1), (1, 0), (1, 2)),
    (2, 4, 6, 4, 4, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 3, 5, 6, 6, (1, 1), (1, 1), (1, 1), (1, 1)),  # 1x1 with padding: the unfold path
)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.6, 1.0])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}x{}-k{}x{}-s{}x{}".format(c[3], c[4], *c[5], *c[6]))
def test_against_dense_conv(case, density, with_bias, channels_last):
    n, cin, cout, h, w, ks, stride, padding, dilation = case
    g = gen(seed_of("conv_gemm", case, density, with_bias))
    W = random_sparse((cout, cin * ks[0] * ks[1]), density, torch.float64, g, requires_grad=True)
    x = torch.randn(n, cin, h, w, dtype=torch.float64, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    bias = torch.randn(cout, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    with sparsekern.backend("cpp"):
        y = conv2d_gemm(x, W, bias, ks, stride, padding, dilation)
    dense = W.to_dense().detach().view(cout, cin, *ks).requires_grad_(True)
    expected = F.conv2d(x, dense, bias, stride, padding, dilation)
    assert y.shape == expected.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    torch.testing.assert_close(y, expected)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=g)
    inputs = [x] + ([bias] if with_bias else [])
    got = torch.autograd.grad(y, inputs + [W.values], dy)
    exp = torch.autograd.grad(expected, inputs + [dense], dy)
    for a, e in zip(got[:-1], exp[:-1]):
        torch.testing.assert_close(a, e)
    # the values' gradient is the dense weight's gradient at the stored positions
    rows = torch.repeat_interleave(torch.arange(cout), W.row_ptr.diff())
    torch.testing.assert_close(got[-1], exp[-1].reshape(cout, -1)[rows, W.col_idx.long()])


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_gradcheck(backend, channels_last):
    """First and second derivatives; on cpp the products run as the extension's C++ nodes (spmm for NCHW,
    sparse_linear for channels_last), on reference through the ops' Python formulas."""
    g = gen(seed_of("conv_gemm", "gradcheck"))
    W = random_sparse((4, 3 * 9), 0.4, torch.float64, g, requires_grad=True)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, generator=g)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    bias = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)

    def f(x, values, bias):
        W2 = type(W)(W.row_ptr, W.col_idx, values, W.shape)
        return conv2d_gemm(x, W2, bias, (3, 3), (2, 1), (1, 1), (1, 1))

    with sparsekern.backend(backend):
        assert torch.autograd.gradcheck(f, (x, W.values, bias))
        assert torch.autograd.gradgradcheck(f, (x, W.values, bias))
        node = f(x, W.values, bias).grad_fn
        names = set()
        while node is not None and len(names) < 20:  # the graph's nodes, first input first
            names.add(node.name())
            node = node.next_functions[0][0] if node.next_functions else None
        want = "::LinearNode>" if channels_last else "SpmmNode>"
        assert any(n.endswith(want) for n in names) == (backend == "cpp"), names
