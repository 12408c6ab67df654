"""transformers' ``Conv1D`` (the attention and MLP projections of GPT-2 and OpenAI GPT): a linear layer whose
weight is stored transposed, (in, out), computing ``x @ W + b``. sparsekern treats it as the ``nn.Linear`` it
computes: masks, densities and a sparse layer's ``weight`` are in (out, in), and a ``SparseLinear`` made from one
gives a ``Conv1D`` back when made dense, so a densified GPT-2 loads into the original architecture.

Recognized by its class (named ``Conv1D``, defined in a ``transformers`` module) and its ``nf`` (out) attribute,
without importing transformers.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_conv1d", "dense_weight_of", "conv1d_as_linear", "linear_as_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    weight = getattr(module, "weight", None)
    return (cls.__name__ == "Conv1D" and cls.__module__.split(".")[0] == "transformers"
            and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """A dense layer's weight as ``nn.Linear`` holds it, (out, in, ...): a Conv1D's transposed."""
    return module.weight.t() if is_conv1d(module) else module.weight


def conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` that computes what the Conv1D ``module`` computes (copies of its parameters, its
    requires_grad and train/eval mode)."""
    weight, bias = module.weight, module.bias
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=bias is not None, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.t())
        if bias is not None:
            linear.bias.copy_(bias)
    linear.weight.requires_grad_(weight.requires_grad)
    if bias is not None:
        linear.bias.requires_grad_(bias.requires_grad)
    return linear.train(module.training)


def linear_as_conv1d(linear: nn.Linear, cls: type) -> nn.Module:
    """The Conv1D of class ``cls`` (transformers' ``Conv1D(nf, nx)``) that computes what ``linear`` computes."""
    conv = cls(linear.out_features, linear.in_features).to(linear.weight.device, linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
        else:
            conv.bias.zero_()  # Conv1D always has a bias; a layer without one adds zeros
    conv.weight.requires_grad_(linear.weight.requires_grad)
    if linear.bias is not None:
        conv.bias.requires_grad_(linear.bias.requires_grad)
    return conv.train(linear.training)
