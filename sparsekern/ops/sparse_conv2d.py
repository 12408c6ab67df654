"""sparse_conv2d: 2-D convolution of an (N, C, H, W) input with a CSR weight (rows Cout, columns Cin*kh*kw);
a channels_last input gets a channels_last output and input gradient."""
from typing import Optional, Tuple, Union

import torch

from ..sparse_matrix import SparseMatrix
from . import _checks as check
from .dispatch import Op, call, declare, get_backend, kernel_for

OP = "sparse_conv2d"
IntPair = Union[int, Tuple[int, int]]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pair(op: str, name: str, v, minimum: int) -> Tuple[int, int]:
    """v as (int, int); TypeError when v is not an int or a tuple/list of ints (1.5, "1", None, True),
    ValueError for a wrong length or a value below minimum."""
    message = f"{op}: {name} must be an int or a pair of ints >= {minimum}, got {v!r}"
    if _is_int(v):
        pair = (v, v)
    elif isinstance(v, (tuple, list)) and all(_is_int(p) for p in v):
        pair = tuple(v)
    else:
        raise TypeError(message)
    if len(pair) != 2 or min(pair) < minimum:
        raise ValueError(message)
    return pair


def check_groups(owner: str, groups) -> None:
    if not _is_int(groups):  # True and 1.0 equal 1 but are not a group count
        raise TypeError(f"{owner}: groups must be an int, got {groups!r}")
    if groups != 1:
        raise ValueError(f"{owner}: only groups=1 is supported, got groups={groups}")


def output_size(h: int, w: int, kernel_size, stride, padding, dilation) -> Tuple[int, int]:
    def one(n, k, s, p, d):
        return (n + 2 * p - d * (k - 1) - 1) // s + 1
    return (one(h, kernel_size[0], stride[0], padding[0], dilation[0]),
            one(w, kernel_size[1], stride[1], padding[1], dilation[1]))


def sparse_conv2d(x: torch.Tensor, W: SparseMatrix, bias: Optional[torch.Tensor] = None, stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1, groups: int = 1) -> torch.Tensor:
    """``torch.nn.functional.conv2d(x, W.to_dense(), bias, ...)`` computed from the CSR weight."""
    check.tensor(OP, "x", x, dim=4)
    check.sparse(OP, "W", W)
    check.floating(OP, "x", x)
    check_groups(OP, groups)
    if len(W.shape) != 4:
        raise ValueError(f"{OP}: W must have the dense shape (Cout, Cin, kh, kw), got {tuple(W.shape)}")
    cout, cin, kh, kw = W.shape
    if x.shape[1] != cin:
        raise ValueError(f"{OP}: x must have {cin} channels (W has shape {tuple(W.shape)}), got {x.shape[1]}")
    stride = _pair(OP, "stride", stride, 1)
    padding = _pair(OP, "padding", padding, 0)
    dilation = _pair(OP, "dilation", dilation, 1)
    ho, wo = output_size(x.shape[2], x.shape[3], (kh, kw), stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"{OP}: input of size {tuple(x.shape[2:])} is too small for kernel {(kh, kw)} with "
                         f"padding {padding} and dilation {dilation}")
    if bias is not None:
        check.tensor(OP, "bias", bias, dim=1)
        if bias.shape[0] != cout:
            raise ValueError(f"{OP}: bias must have {cout} entries (W has {cout} output channels), got {bias.shape[0]}")
    check.same(OP, {"x": x, "W.values": W.values, "bias": bias})
    backend = get_backend(OP, x.device)
    check.backend_dtype(OP, backend, "x", x)
    # A channels_last input gets a channels_last output (every backend's op lays it out so), as from F.conv2d: the
    # layers after it keep their layout (ConvNeXt's depthwise convs, LayerNorms and residual adds ran 1.5-3x slower
    # on the NCHW tensors an NCHW output left them, against the dense model's channels_last ones).
    return call(OP, x.device, x, W.values, W.row_ptr, W.col_idx, [kh, kw], bias, list(stride), list(padding),
                list(dilation))


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether 4-D ``t`` lies channels_last (and not also contiguous, as with one channel or a 1x1 plane)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _empty_laid_out_as(t: torch.Tensor, shape) -> torch.Tensor:
    """The conv ops' result: channels_last where their input ``t`` is, else NCHW (what torch.compile checks)."""
    layout = torch.channels_last if is_channels_last(t) else torch.contiguous_format
    return torch.empty(tuple(shape), dtype=t.dtype, device=t.device, memory_format=layout)


def _fake(x, values, row_ptr, col_idx, kernel_size, bias, stride, padding, dilation):
    ho, wo = output_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    return _empty_laid_out_as(x, (x.shape[0], row_ptr.shape[0] - 1, ho, wo))


def _fake_backward_input(grad_out, values, row_ptr, col_idx, input_size, kernel_size, stride, padding, dilation):
    return _empty_laid_out_as(grad_out, input_size)


def _fake_backward_weight(grad_out, x, row_ptr, col_idx, kernel_size, stride, padding, dilation):
    return x.new_empty((col_idx.shape[0],))


def _setup_context(ctx, inputs, output):
    x, values, row_ptr, col_idx, kernel_size, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, values, row_ptr, col_idx)
    ctx.geometry = (list(kernel_size), list(stride), list(padding), list(dilation))
    ctx.input_size = list(x.shape)


def _backward(ctx, grad):
    x, values, row_ptr, col_idx = ctx.saved_tensors
    d_x = d_values = d_bias = None
    if ctx.needs_input_grad[0]:
        d_x = kernel_for("sparse_conv2d_backward_input", grad)(grad, values, row_ptr, col_idx, ctx.input_size,
                                                                *ctx.geometry)
        if is_channels_last(x):  # the input's layout, as the forward's output has it
            d_x = d_x.contiguous(memory_format=torch.channels_last)
    if ctx.needs_input_grad[1]:
        d_values = kernel_for("sparse_conv2d_backward_weight", grad)(grad, x, row_ptr, col_idx, *ctx.geometry)
    if ctx.needs_input_grad[5]:
        d_bias = grad.sum((0, 2, 3))
    return d_x, d_values, None, None, None, d_bias, None, None, None


# Second derivatives: both parts are bilinear, in (grad_out, values) and in (grad_out, x); with gg the gradient
# flowing into a part's output, <gg, backward_input(g, W)> = <conv(gg, W), g> and <gv, backward_weight(g, x)> =
# <conv(x, W=gv), g>. Without these formulas torch only warned, and a second derivative came out wrong.
def _setup_part(ctx, inputs, output):
    # Both parts take (grad_out, values or x, row_ptr, col_idx, ..., kernel_size, stride, padding, dilation).
    ctx.save_for_backward(*inputs[:4])
    ctx.geometry = tuple(list(a) for a in inputs[-4:])


def _backward_of_backward_input(ctx, gg):
    grad_out, values, row_ptr, col_idx = ctx.saved_tensors
    kernel_size, stride, padding, dilation = ctx.geometry
    d_grad = d_values = None
    if ctx.needs_input_grad[0]:
        d_grad = kernel_for(OP, gg)(gg, values, row_ptr, col_idx, kernel_size, None, stride, padding, dilation)
    if ctx.needs_input_grad[1]:
        d_values = kernel_for("sparse_conv2d_backward_weight", gg)(grad_out, gg, row_ptr, col_idx, *ctx.geometry)
    return d_grad, d_values, None, None, None, None, None, None, None


def _backward_of_backward_weight(ctx, gv):
    grad_out, x, row_ptr, col_idx = ctx.saved_tensors
    kernel_size, stride, padding, dilation = ctx.geometry
    d_grad = d_x = None
    if ctx.needs_input_grad[0]:
        d_grad = kernel_for(OP, gv)(x, gv, row_ptr, col_idx, kernel_size, None, stride, padding, dilation)
    if ctx.needs_input_grad[1]:
        d_x = kernel_for("sparse_conv2d_backward_input", gv)(grad_out, gv, row_ptr, col_idx, list(x.shape),
                                                               *ctx.geometry)
    return d_grad, d_x, None, None, None, None, None, None


declare(Op(OP, sparse_conv2d, fake=_fake, backward=_backward, setup_context=_setup_context, autocast=True,
           triton="sparse_conv2d", parts={"sparse_conv2d_backward_input": _fake_backward_input,
                                          "sparse_conv2d_backward_weight": _fake_backward_weight},
           part_autograd={"sparse_conv2d_backward_input": (_backward_of_backward_input, _setup_part),
                          "sparse_conv2d_backward_weight": (_backward_of_backward_weight, _setup_part)}))
