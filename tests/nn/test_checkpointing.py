"""Activation checkpointing (torch.utils.checkpoint) around sparse layers from their very first call: that call
measures the kernels (kernel_choice) and later ones take the kept route, yet the checkpoint's recompute must save
the tensors its forward saved, and the gradients must be those of the step without it."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsekern.nn import SparseConv2d, SparseLinear, kernel_choice

from sk_testing import assert_close, gen


def _block(kind):
    if kind == "linear":  # (batch, tokens, features), a fused GELU between the two layers
        torch.manual_seed(31)
        first = SparseLinear(48, 96, density=0.2, generator=gen(31))
        first.activation = "gelu"
        return nn.Sequential(first, SparseLinear(96, 48, density=0.2, generator=gen(32))), \
            torch.randn(4, 24, 48, generator=gen(33))
    return nn.Sequential(SparseConv2d(8, 16, 3, padding=1, density=0.2, generator=gen(34)), nn.ReLU(),
                         SparseConv2d(16, 16, 1, stride=2, density=0.3, generator=gen(35))), \
        torch.randn(4, 8, 12, 12, generator=gen(36))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("kernel", [None, "csr", "gemm", "dense"], ids=["measured", "csr", "gemm", "dense"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_checkpointed_first_step_gives_the_plain_gradients(kind, kernel, reentrant, monkeypatch):
    monkeypatch.setattr(kernel_choice, "_autotune", True)  # (the tests' default is off)
    monkeypatch.setattr(kernel_choice, "_store", lambda key, choice: None)  # nor written to the user's cache file
    block, x = _block(kind)
    plain = copy.deepcopy(block)
    kernel_choice.clear_cache()  # measured inside the checkpoint, not reused from another test
    monkeypatch.setattr(kernel_choice, "_stored", {})
    kernel_choice.set_kernel(kernel)
    try:
        xs = x.clone().requires_grad_(True)
        y = checkpoint(block, xs, use_reentrant=reentrant)
        g = torch.randn(y.shape, generator=gen(37))
        y.backward(g)
        xp = x.clone().requires_grad_(True)
        yp = plain(xp)
        yp.backward(g)
    finally:
        kernel_choice.set_kernel(None)
    assert_close(y.detach(), yp.detach(), scale=100)
    assert_close(xs.grad, xp.grad, scale=100)
    for (name, p), q in zip(block.named_parameters(), plain.parameters()):
        assert p.grad is not None, name
        assert_close(p.grad, q.grad, scale=1000)
