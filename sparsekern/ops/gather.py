"""gather: out[i] = src[index[i]] for 1-D tensors; how backward passes read W^T's values."""
import torch

from . import _checks as check
from .dispatch import Op, declare, get_backend, implementation

OP = "gather"


def gather(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``src[index]`` for a 1-D float ``src`` and a 1-D int64 ``index``; differentiable in ``src``."""
    check.tensor(OP, "src", src, dim=1)
    check.tensor(OP, "index", index, dim=1)
    check.floating(OP, "src", src)
    if index.dtype != torch.int64:
        raise TypeError(f"{OP}: index must be int64, got {index.dtype}")
    if index.device != src.device:
        raise ValueError(f"{OP}: index is on {index.device} but src is on {src.device}")
    check.backend_dtype(OP, get_backend(OP, src.device), "src", src)
    return implementation(OP, src.device)(src, index)


def _fake(src, index):
    return src.new_empty(index.shape)


def _setup_context(ctx, inputs, output):
    src, index = inputs
    ctx.save_for_backward(index)
    ctx.src_size = src.shape[0]


def _backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return grad.new_zeros(ctx.src_size).index_add_(0, index, grad), None


declare(Op(OP, gather, fake=_fake, backward=_backward, setup_context=_setup_context, triton="gather"))
