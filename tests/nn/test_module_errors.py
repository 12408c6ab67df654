"""Bad arguments to the sparse modules, in the style of OpInfo error inputs: each case is a call, the
error type and a substring naming the argument. Forward cases run under every kernel a layer can be
pinned to: the error does not depend on the kernel."""
import re

import pytest
import torch
from torch import nn

from sparsekern.nn import SparseConv2d, SparseLinear

from sk_testing import gen

# (id, call, error type, substring)
CONSTRUCTOR_CASES = [
    ("density-string", lambda: SparseLinear(8, 4, density="0.5"), ValueError,
     "SparseLinear: density must be a number in [0, 1], got '0.5'"),
    ("density-negative", lambda: SparseLinear(8, 4, density=-0.5),
     ValueError, "density must be a number in [0, 1], got -0.5"),
    ("density-nan", lambda: SparseLinear(8, 4, density=float("nan")),
     ValueError, "density must be a number in [0, 1], got nan"),
    ("density-above-one", lambda: SparseConv2d(3, 4, 3, density=2), ValueError,
     "SparseConv2d: density must be a number in [0, 1], got 2"),
    ("density-bool", lambda: SparseLinear(8, 4, density=True),
     ValueError, "density must be a number in [0, 1], got True"),
    ("from-dense-bsr-mask-shape",
     lambda: SparseLinear.from_dense(nn.Linear(64, 64), torch.ones(10, 10, dtype=torch.bool), format="bsr", block=32),
     ValueError, "SparseLinear.from_dense: mask must be a bool tensor of the weight's shape (64, 64), "
     "got torch.bool of shape (10, 10)"),
    ("from-dense-mask-dtype", lambda: SparseConv2d.from_dense(nn.Conv2d(2, 3, 3), torch.ones(3, 2, 3, 3)), ValueError,
     "SparseConv2d.from_dense: mask must be a bool tensor of the weight's shape (3, 2, 3, 3), got torch.float32"),
    ("from-dense-mask-not-a-tensor", lambda: SparseLinear.from_dense(nn.Linear(4, 4), [[True] * 4] * 4), ValueError,
     "mask must be a bool tensor of the weight's shape (4, 4), got list"),
    ("from-dense-module", lambda: SparseLinear.from_dense(nn.Conv2d(2, 2, 1)), TypeError,
     "SparseLinear.from_dense: module must be nn.Linear, got Conv2d"),
    ("from-dense-format", lambda: SparseLinear.from_dense(nn.Linear(4, 4), format="csc"), ValueError,
     "SparseLinear: format must be one of ('csr', 'bsr'), got 'csc'"),
    ("format", lambda: SparseLinear(16, 8, format="coo"),
     ValueError, "format must be one of ('csr', 'bsr'), got 'coo'"),
    ("block-zero", lambda: SparseLinear(16, 8, format="bsr", block=0),
     ValueError, "block must be a positive int, got 0"),
    ("block-negative", lambda: SparseLinear(16, 8, format="bsr", block=-1),
     ValueError, "block must be a positive int, got -1"),
    ("block-float", lambda: SparseLinear(16, 8, format="bsr", block=4.0),
     ValueError, "block must be a positive int, got 4.0"),
    ("block-not-dividing", lambda: SparseLinear(10, 8, format="bsr", block=4), ValueError,
     "format='bsr' with block=4 needs both weight dims (rows 8, columns 10) to be multiples of 4"),
    ("conv-groups", lambda: SparseConv2d(4, 4, 3, groups=2),
     ValueError, "SparseConv2d: only groups=1 is supported, got groups=2"),
    ("conv-groups-bool", lambda: SparseConv2d(4, 4, 3, groups=True), TypeError,
     "SparseConv2d: groups must be an int, got True"),
    ("conv-groups-float", lambda: SparseConv2d(4, 4, 3, groups=1.0), TypeError,
     "SparseConv2d: groups must be an int, got 1.0"),
    ("conv-stride-zero", lambda: SparseConv2d(3, 6, 3, stride=0), ValueError,
     "SparseConv2d: stride must be an int or a pair of ints >= 1, got (0, 0)"),
    ("conv-dilation-zero", lambda: SparseConv2d(3, 6, 3, dilation=(1, 0)), ValueError,
     "SparseConv2d: dilation must be an int or a pair of ints >= 1, got (1, 0)"),
    ("conv-padding-negative", lambda: SparseConv2d(3, 6, 3, padding=-1), ValueError,
     "SparseConv2d: padding must be an int or a pair of ints >= 0, got (-1, -1)"),
    ("from-dense-stride-zero", lambda: SparseConv2d.from_dense(nn.Conv2d(3, 6, 3, stride=(2, 0))), ValueError,
     "SparseConv2d: stride must be an int or a pair of ints >= 1, got (2, 0)"),
    ("conv-padding-mode", lambda: SparseConv2d(4, 4, 3, padding_mode="mirror"), ValueError,
     "padding_mode must be one of"),
    ("generator", lambda: SparseLinear(8, 4, generator=5), TypeError,
     "SparseLinear: generator must be a torch.Generator or None, got int"),
]


@pytest.mark.parametrize("call, error, match", [c[1:] for c in CONSTRUCTOR_CASES],
                         ids=[c[0] for c in CONSTRUCTOR_CASES])
def test_constructor_errors(call, error, match):
    with pytest.raises(error, match=re.escape(match)):
        call()


def _linear():
    return SparseLinear(64, 32, density=0.5, generator=gen(1))


def _conv():
    return SparseConv2d(3, 8, 3, density=0.5, generator=gen(2))


FORWARD_CASES = [
    ("linear-last-dim", _linear, lambda: torch.randn(4, 63), ValueError, "sparse_linear: x must have last dim 64"),
    ("linear-scalar", _linear, lambda: torch.tensor(1.0), ValueError, "sparse_linear: x must have last dim 64"),
    ("linear-not-a-tensor", _linear, lambda: [0.0] * 64,
     TypeError, "sparse_linear: x must be a torch.Tensor, got list"),
    ("linear-int", _linear, lambda: torch.ones(4, 64, dtype=torch.long), TypeError,
     "sparse_linear: x must be a floating-point tensor, got torch.int64"),
    ("linear-dtype", _linear, lambda: torch.randn(4, 64, dtype=torch.float64), TypeError,
     "sparse_linear: W.values has dtype torch.float32 but x has torch.float64"),
    ("linear-device", _linear, lambda: torch.randn(4, 64, device="meta"), ValueError,
     "sparse_linear: W.values is on cpu but x is on meta"),
    ("conv-2d", _conv, lambda: torch.randn(16, 16),
     ValueError, "sparse_conv2d: x must be 4-D, got shape (16, 16)"),
    ("conv-channels", _conv, lambda: torch.randn(2, 4, 16, 16), ValueError, "sparse_conv2d: x must have 3 channels"),
    ("conv-int", _conv, lambda: torch.ones(2, 3, 16, 16, dtype=torch.int32), TypeError,
     "sparse_conv2d: x must be a floating-point tensor, got torch.int32"),
    ("conv-dtype", _conv, lambda: torch.randn(2, 3, 16, 16, dtype=torch.float64), TypeError,
     "sparse_conv2d: W.values has dtype torch.float32 but x has torch.float64"),
    ("conv-device", _conv, lambda: torch.randn(2, 3, 16, 16, device="meta"), ValueError,
     "sparse_conv2d: W.values is on cpu but x is on meta"),
    ("conv-too-small", _conv, lambda: torch.randn(2, 3, 2, 2),
     ValueError, "sparse_conv2d: input of size (2, 2) is too small"),
]


KERNELS = {"linear": ("auto", "csr", "dense"), "conv": ("auto", "csr", "gemm", "dense")}


@pytest.mark.parametrize("make, x, error, match, kernel",
                         [c[1:] + (k,) for c in FORWARD_CASES for k in KERNELS[c[0].split("-")[0]]],
                         ids=[f"{c[0]}-{k}" for c in FORWARD_CASES for k in KERNELS[c[0].split("-")[0]]])
def test_forward_errors_name_the_argument_whatever_the_kernel(make, x, error, match, kernel):
    layer = make()
    layer.kernel = kernel
    with pytest.raises(error, match=re.escape(match)):
        layer(x())


def test_bad_kernel_name():
    layer = _linear()
    layer.kernel = "fast"
    message = "SparseLinear: kernel must be one of ('auto', 'csr', 'gemm', 'dense'), got 'fast'"
    with pytest.raises(ValueError, match=re.escape(message)):
        layer(torch.randn(2, 64))
    layer.kernel = "gemm"
    with pytest.raises(ValueError, match="kernel 'gemm' is not one of this layer's kernels"):
        layer(torch.randn(2, 64))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("make", [
    lambda: SparseLinear(0, 5), lambda: SparseLinear(6, 0), lambda: SparseLinear.from_dense(nn.Linear(0, 5)),
], ids=["no-inputs", "no-outputs", "from-dense-no-inputs"])
def test_a_layer_without_weights_has_density_zero(make):
    layer = make()
    assert layer.nnz == 0 and layer.density == 0.0
    assert "density=0.0000, nnz=0" in repr(layer)


def _values_of_two_columns(layer):
    v = layer.values.detach()
    return nn.Parameter(torch.stack([v, v + 100], 1))


@pytest.mark.parametrize("bad, got", [
    (_values_of_two_columns, "Parameter of torch.float32, shape (32, 2)"),
    (lambda layer: nn.Parameter(torch.randn(3)), "Parameter of torch.float32, shape (3,)"),
    (lambda layer: nn.Parameter(torch.zeros(layer.nnz, dtype=torch.int64), requires_grad=False),
     "Parameter of torch.int64, shape (32,)"),
    (lambda layer: torch.randn(layer.nnz), "Tensor of torch.float32, shape (32,)"),
    (lambda layer: None, "NoneType"),
], ids=["two-columns", "too-short", "int", "not-a-parameter", "none"])
@pytest.mark.parametrize("kernel", KERNELS["linear"])
def test_assigning_values_of_the_wrong_shape_or_type_raises_and_keeps_the_layer(bad, got, kernel):
    layer = SparseLinear(8, 8, density=0.5, generator=gen(3))  # nnz 32: a (32, 2) tensor has the full 64 entries
    layer.kernel = kernel
    x = torch.randn(4, 8, generator=gen(4))
    before, want = layer.values, layer(x)
    message = ("SparseLinear.values must be a floating-point nn.Parameter of shape (32,) (the pattern's nnz) on cpu, "
               "got ")
    with pytest.raises(ValueError, match=re.escape(message) + ".*" + re.escape(got)):
        layer.values = bad(layer)
    assert layer.values is before
    torch.testing.assert_close(layer(x), want)
    layer.values = nn.Parameter(torch.ones(32, dtype=torch.float64))  # the right size, another float dtype: accepted
    assert layer.values.dtype == torch.float64


# explain (nn.kernel_choice) checks its arguments before running the model
@pytest.mark.parametrize("args, match", [
    ((None,), "explain: model must be an nn.Module, got NoneType"),
    ((nn.Sequential(SparseLinear(8, 4, density=0.5)),), "explain: example_inputs are missing"),
], ids=["model-none", "no-example-input"])
def test_explain_bad_arguments(args, match):
    from sparsekern import explain
    with pytest.raises(TypeError, match=re.escape(match)):
        explain(*args, print_table=False)
