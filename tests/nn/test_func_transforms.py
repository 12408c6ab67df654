"""torch.func transforms over sparse models (per-sample gradients, Jacobians): vmap(grad) of a model of sparse
linears (plain, ReLU and GELU fused, 3-D tokens), sparse convs (1x1, 3x3, channels_last) and fast modules, each
kernel pinned, gives each sample's gradients as plain autograd on the kernels does one sample at a time; jacrev
of a layer gives its dense twin's Jacobian."""
import copy

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.nn import SparseLinear, kernel_choice as kc

from sk_testing import assert_close, gen


@pytest.fixture(autouse=True)
def fresh_choices():
    kc.clear_cache()
    yield
    kc.clear_cache()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 12, 1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.fc = nn.Linear(12, 24)
        self.act = nn.GELU()
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        h = self.pool(self.relu(self.point(self.stem(x))))  # (N, 12, 4, 4)
        h = h.flatten(2).transpose(1, 2)  # tokens: (N, 16, 12)
        return self.head(self.act(self.fc(h))).mean(1)


def _sparse_net(kernel, channels_last):
    torch.manual_seed(0)
    net = sparsekern.sparsify(Net(), 0.5, "uniform", init="dense", fuse_activations=True, fast_modules=True,
                              generator=gen(1))
    if kernel != "auto":
        for m in net.modules():
            if hasattr(m, "kernel"):
                m.kernel = kernel if kernel in m.candidates() else "csr"  # gemm: the convs
    net.eval()
    return net.to(memory_format=torch.channels_last) if channels_last else net


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize("kernel", ["auto", "csr", "dense", "gemm"])
def test_vmap_grad_gives_per_sample_gradients(kernel, channels_last):
    net = _sparse_net(kernel, channels_last)
    x = torch.randn(4, 3, 8, 8, generator=gen(2))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randn(4, 5, generator=gen(3))
    params = {k: v.detach() for k, v in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def loss(p, xb, tb):
        out = torch.func.functional_call(net, {**p, **buffers}, (xb[None],))
        return (out - tb[None]).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target)
    for i in range(x.shape[0]):  # the kernels with plain autograd, one sample at a time
        one = copy.deepcopy(net)
        (one(x[i:i + 1]) - target[i:i + 1]).square().sum().backward()
        for name, p in one.named_parameters():
            assert_close(per_sample[name][i], p.grad, scale=10.0)


@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_jacrev_of_a_layer_is_its_dense_twins(activation):
    layer = SparseLinear(6, 4, density=0.5, generator=gen(4), activation=activation)
    x = torch.randn(3, 6, generator=gen(5))
    got = torch.func.jacrev(layer)(x)
    want = torch.func.jacrev(layer.to_dense())(x)
    assert_close(got, want, scale=10.0)
