// The sparse layers' `csr` kernels on the CPU as C++ autograd nodes (sparsekern/nn/linear.py, conv.py). The ops'
// own autograd formulas are Python (sparsekern/ops/, one torch.autograd.Function per call): in a training step,
// with the caches cold from the layers between two calls, that Python costs 0.1-0.3 ms per fwd+bwd, as much as
// the kernels of a small layer (ConvNeXt's and BERT's linears at 128-2048 tokens take 0.3-1.5 ms). These nodes run
// the same CPU kernels, forward and backward, below autograd. Under create_graph their backward calls the ops
// through the dispatcher instead, so that the ops' own formulas make it differentiable again.
//
// Private ops (not part of the op contract): the layers call them only eagerly, on CPU tensors, outside autocast,
// on the cpp backend, after checking their input.
#include <ATen/Functions.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/sparse_linear.h"

namespace sparsekern {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<at::Tensor>;

c10::OperatorHandle op_handle(const char* name) { return c10::Dispatcher::singleton().findSchemaOrThrow(name, ""); }

// The kernels, called through the dispatcher: below autograd (the plain kernels) unless `differentiable`.
at::Tensor linear_op(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                     const at::Tensor& col_idx, const OptTensor& bias, const OptTensor& t_row_ptr,
                     const OptTensor& t_col_idx, const OptTensor& t_perm) {
  static const auto op =
      op_handle("sparsekern::sparse_linear")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&)>();
  return op.call(x, values, row_ptr, col_idx, bias, t_row_ptr, t_col_idx, t_perm);
}

at::Tensor spmm_op(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& B,
                   const OptTensor& t_row_ptr, const OptTensor& t_col_idx, const OptTensor& t_perm) {
  static const auto op =
      op_handle("sparsekern::spmm")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const OptTensor&, const OptTensor&, const OptTensor&)>();
  return op.call(values, row_ptr, col_idx, B, t_row_ptr, t_col_idx, t_perm);
}

at::Tensor gather_op(const at::Tensor& src, const at::Tensor& index) {
  static const auto op = op_handle("sparsekern::gather").typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(src, index);
}

at::Tensor sddmm_op(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& X, const at::Tensor& Y) {
  static const auto op =
      op_handle("sparsekern::sddmm")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(row_ptr, col_idx, X, Y);
}

at::Tensor conv_op(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                   at::IntArrayRef kernel_size, const OptTensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                   at::IntArrayRef dilation) {
  static const auto op =
      op_handle("sparsekern::sparse_conv2d")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                            const OptTensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  return op.call(x, values, row_ptr, col_idx, kernel_size, bias, stride, padding, dilation);
}

at::Tensor conv_backward_input_op(const at::Tensor& grad, const at::Tensor& values, const at::Tensor& row_ptr,
                                  const at::Tensor& col_idx, at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  static const auto op =
      op_handle("sparsekern::sparse_conv2d_backward_input")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  return op.call(grad, values, row_ptr, col_idx, input_size, kernel_size, stride, padding, dilation);
}

at::Tensor conv_backward_weight_op(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& row_ptr,
                                   const at::Tensor& col_idx, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                   at::IntArrayRef padding, at::IntArrayRef dilation) {
  static const auto op =
      op_handle("sparsekern::sparse_conv2d_backward_weight")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  return op.call(grad, x, row_ptr, col_idx, kernel_size, stride, padding, dilation);
}

std::tuple<at::Tensor, at::Tensor> conv_backward_op(const at::Tensor& grad, const at::Tensor& x,
                                                    const at::Tensor& values, const at::Tensor& row_ptr,
                                                    const at::Tensor& col_idx, at::IntArrayRef kernel_size,
                                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                                    at::IntArrayRef dilation, const OptTensor& x_packed) {
  static const auto op =
      op_handle("sparsekern::_sparse_conv2d_backward")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, const OptTensor&)>();
  return op.call(grad, x, values, row_ptr, col_idx, kernel_size, stride, padding, dilation, x_packed);
}

// The forward, and x packed for the backward where the batch-innermost kernel can reuse it (else an empty tensor).
std::tuple<at::Tensor, at::Tensor> conv_keep_op(const at::Tensor& x, const at::Tensor& values,
                                                const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                                at::IntArrayRef kernel_size, const OptTensor& bias,
                                                at::IntArrayRef stride, at::IntArrayRef padding,
                                                at::IntArrayRef dilation) {
  static const auto op =
      op_handle("sparsekern::_sparse_conv2d_keep")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, at::IntArrayRef, const OptTensor&,
                                                    at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
  return op.call(x, values, row_ptr, col_idx, kernel_size, bias, stride, padding, dilation);
}

// The activation fused into a linear node (SparseLinear(activation=...)).
enum class Act { none, relu, gelu };

// y (N, m) = x (N, k) @ W^T + bias; the transpose (t_*) gives the input gradient, as in ops/sparse_linear.py.
// With a fused activation, y = act(x @ W^T + bias) and the activation has no autograd node of its own (the MLP
// 784-1024-1024-10 step at density 0.1 with ReLU: 4.25 -> 4.04 ms). Relu: the backward masks the output's gradient
// where y > 0 first, as nn.ReLU's does. Gelu: the forward keeps gelu' at the product (gelu.cpp), the backward
// multiplies the output's gradient by it; under create_graph it recomputes the product and takes F.gelu's own
// backward, whose gradient has gelu'' in it.
template <Act A>
struct LinearFormulas {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values, const OptTensor& bias,
                            const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& t_row_ptr,
                            const at::Tensor& t_col_idx, const at::Tensor& t_perm) {
    at::Tensor y, act;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      // The ReLU as the engine stores the product (the node runs only where the op's CPU kernel would).
      if constexpr (A == Act::relu)
        y = act = sparse_linear_cpu(x, values, row_ptr, col_idx, bias, t_row_ptr, t_col_idx, t_perm, true);
      else y = linear_op(x, values, row_ptr, col_idx, bias, t_row_ptr, t_col_idx, t_perm);
      // A pass of its own: applied as the SpMM stored its rows, the GELU made the ViT-S/16 step 5 % slower.
      if constexpr (A == Act::gelu) act = csr::gelu_(y, true);
    }
    const bool has_bias = bias.has_value() && bias->defined();
    if constexpr (A == Act::none) ctx->save_for_backward({x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm});
    else if constexpr (A == Act::relu)
      ctx->save_for_backward({x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, act});
    else  // the bias too: the product again, under create_graph
      ctx->save_for_backward(
          {x, values, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, act, has_bias ? *bias : at::Tensor()});
    ctx->saved_data["bias"] = has_bias;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &values = s[1], &row_ptr = s[2], &col_idx = s[3], &t_row_ptr = s[4], &t_col_idx = s[5],
                     &t_perm = s[6];
    at::Tensor grad = grads[0];
    const bool has_bias = ctx->saved_data["bias"].toBool();
    // needs_input_grad counts the tensor arguments given: bias, when there is one, is the third.
    const bool need_x = ctx->needs_input_grad(0), need_values = ctx->needs_input_grad(1),
               need_bias = has_bias && ctx->needs_input_grad(2);
    variable_list out(8);
    if (!grad.defined()) return out;
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();  // else create_graph: through the ops' own formulas
    // W^T's values, gathered once: where the one-pass backward declines (few tokens: the gather path), the
    // input gradient's SpMM below takes the same (a second gather cost 90 us of a 0.68 ms fwd+bwd of ResNet-18's
    // 512 -> 1000 head at 16 images, density 0.34).
    at::Tensor wt;
    const auto t_values = [&]() -> const at::Tensor& {
      if (!wt.defined()) wt = gather_op(values, t_perm);
      return wt;
    };
    if (need_values && below && (need_x || need_bias || A != Act::none)) {
      // One pass over dy's tiles (csr_backward.cpp), where the engine runs the products so: the input gradient's
      // SpMM and the SDDMM read the same packed tile; the activation's backward and the bias gradient are taken
      // from it too.
      at::Tensor dx, dbias;
      if (need_x) dx = at::empty({grad.size(0), x.size(1)}, grad.options().memory_format(at::MemoryFormat::Contiguous));
      if (need_bias) dbias = at::empty({grad.size(1)}, grad.options().memory_format(at::MemoryFormat::Contiguous));
      at::Tensor dv = at::empty({col_idx.numel()}, values.options());
      const at::Tensor act = A == Act::none ? at::Tensor() : s[7].t();
      if (csr::spmm_backward({values, t_perm, t_values}, t_row_ptr, t_col_idx, row_ptr, col_idx, grad.t(), x.t(),
                             need_x ? dx.t() : at::Tensor(), dv, act,
                             A == Act::gelu ? csr::ActGrad::scale : csr::ActGrad::relu_mask, dbias)) {
        out[0] = dx;
        out[1] = dv;
        out[2] = dbias;
        return out;
      }
    }
    // The gradient at the product: the activation's backward, in this node. (For the ReLU, applying the mask as the
    // engine packs the gradient and gathers its rows, twice, instead of a masked copy ran slower: MLP step 4.14
    // against 4.04 ms.)
    if constexpr (A == Act::relu) grad = at::threshold_backward(grad, s[7], 0);
    if constexpr (A == Act::gelu) {
      if (below) {
        grad = at::mul(grad, s[7]);
      } else {
        const OptTensor bias = has_bias ? OptTensor(s[8]) : std::nullopt;
        grad = at::gelu_backward(grad, linear_op(x, values, row_ptr, col_idx, bias, t_row_ptr, t_col_idx, t_perm));
      }
    }
    if (need_x) {
      // dx = dy @ W = dy @ (W^T)^T. Under create_graph its own gradient in dy needs W^T's transpose: W, whose
      // values are W^T's through the inverse permutation.
      OptTensor tt_row_ptr, tt_col_idx, tt_perm;
      if (!below) tt_row_ptr = row_ptr, tt_col_idx = col_idx, tt_perm = at::argsort(t_perm);
      out[0] = linear_op(grad, t_values(), t_row_ptr, t_col_idx, std::nullopt, tt_row_ptr, tt_col_idx, tt_perm);
    }
    if (need_values) out[1] = sddmm_op(row_ptr, col_idx, grad.t(), x.t());
    if (need_bias) out[2] = grad.sum(0);
    return out;
  }
};

// The nodes, one class each (autograd names a node by its class: LinearNode, LinearReluNode, LinearGeluNode).
struct LinearNode : public torch::autograd::Function<LinearNode>, LinearFormulas<Act::none> {};
struct LinearReluNode : public torch::autograd::Function<LinearReluNode>, LinearFormulas<Act::relu> {};
struct LinearGeluNode : public torch::autograd::Function<LinearGeluNode>, LinearFormulas<Act::gelu> {};

// A (m, k) @ B for a plane operand B (k, N, P), unit stride along P: out (m, N, P), laid out as (N, m, P) (so that
// out.transpose(0, 1) is contiguous), every plane out[:, n] = A @ B[:, n]. The CSR engine reads and writes the
// planes in place (csr_internal.h), where the ops would take (k, N*P) copies.
at::Tensor spmm_planes(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                       const at::Tensor& B) {
  const csr::Csr A = csr::checked_csr(values, row_ptr, col_idx, B.size(0),
                                      "B has " + std::to_string(B.size(0)) + " rows", "_spmm_node");
  at::Tensor out = at::empty({B.size(1), A.m, B.size(2)}, B.options()).transpose(0, 1);
  csr::spmm(A.values, A.row_ptr, A.col_idx, B, std::nullopt, out);
  return out;
}

// A 3-D tensor with unit stride along its last dimension (a copy when it has not).
at::Tensor with_unit_plane_stride(const at::Tensor& t) {
  return t.stride(2) == 1 || t.size(2) == 1 ? t : t.transpose(0, 1).contiguous().transpose(0, 1);
}

// out (m, n) = A (m, k) @ B (k, n), as in ops/spmm.py (the NCHW route of conv2d_gemm); or, for a 3-D B (k, N, P)
// (conv2d_gemm's NCHW input viewed (C, N, H*W)), out (m, N, P) as spmm_planes makes it.
struct SpmmNode : public torch::autograd::Function<SpmmNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& values, const at::Tensor& row_ptr,
                            const at::Tensor& col_idx, const at::Tensor& B, const at::Tensor& t_row_ptr,
                            const at::Tensor& t_col_idx, const at::Tensor& t_perm) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      if (B.dim() == 3) y = spmm_planes(values, row_ptr, col_idx, with_unit_plane_stride(B));
      else y = spmm_op(values, row_ptr, col_idx, B, t_row_ptr, t_col_idx, t_perm);
    }
    ctx->save_for_backward({values, row_ptr, col_idx, B, t_row_ptr, t_col_idx, t_perm});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &values = s[0], &row_ptr = s[1], &col_idx = s[2], &B = s[3], &t_row_ptr = s[4], &t_col_idx = s[5],
                     &t_perm = s[6], &grad = grads[0];
    const bool need_values = ctx->needs_input_grad(0), need_B = ctx->needs_input_grad(3);
    variable_list out(7);
    if (!grad.defined()) return out;
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();  // else create_graph: through the ops' own formulas
    at::Tensor wt;  // A^T's values, gathered once (as in LinearFormulas::backward)
    const auto t_values = [&]() -> const at::Tensor& {
      if (!wt.defined()) wt = gather_op(values, t_perm);
      return wt;
    };
    if (B.dim() == 3) {
      const int64_t k = B.size(0), N = B.size(1), P = B.size(2);
      if (below) {  // the planes in place
        const at::Tensor g = with_unit_plane_stride(grad);
        if (need_values && need_B) {
          at::Tensor dv = at::empty({col_idx.numel()}, values.options());
          at::Tensor dB = at::empty({N, k, P}, g.options()).transpose(0, 1);
          if (csr::spmm_backward({values, t_perm, t_values}, t_row_ptr, t_col_idx, row_ptr, col_idx, g,
                                 with_unit_plane_stride(B), dB, dv, at::Tensor(), csr::ActGrad::relu_mask,
                                 at::Tensor())) {
            out[0] = dv;
            out[3] = dB;
            return out;
          }
        }
        if (need_values) {
          out[0] = at::empty({col_idx.numel()}, values.options());
          csr::sddmm(row_ptr, col_idx, g, with_unit_plane_stride(B), out[0]);
        }
        if (need_B) out[3] = spmm_planes(t_values(), t_row_ptr, t_col_idx, g);
      } else {  // create_graph: the ops on (rows, N*P) copies
        const at::Tensor g = grad.reshape({grad.size(0), N * P});
        if (need_values) out[0] = sddmm_op(row_ptr, col_idx, g, B.reshape({k, N * P}));
        if (need_B)
          out[3] = spmm_op(t_values(), t_row_ptr, t_col_idx, g, row_ptr, col_idx, at::argsort(t_perm)).view({k, N, P});
      }
      return out;
    }
    if (need_values && need_B && below) {
      at::Tensor dv = at::empty({col_idx.numel()}, values.options());
      at::Tensor dB = at::empty({B.size(0), grad.size(1)}, grad.options().memory_format(at::MemoryFormat::Contiguous));
      if (csr::spmm_backward({values, t_perm, t_values}, t_row_ptr, t_col_idx, row_ptr, col_idx, grad, B, dB, dv,
                             at::Tensor(), csr::ActGrad::relu_mask, at::Tensor())) {
        out[0] = dv;
        out[3] = dB;
        return out;
      }
    }
    if (need_values) out[0] = sddmm_op(row_ptr, col_idx, grad, B);
    if (need_B) {
      // dB = A^T @ dy; under create_graph its gradient in dy needs A^T's transpose: A (inverse permutation).
      OptTensor tt_row_ptr, tt_col_idx, tt_perm;
      if (!below) tt_row_ptr = row_ptr, tt_col_idx = col_idx, tt_perm = at::argsort(t_perm);
      out[3] = spmm_op(t_values(), t_row_ptr, t_col_idx, grad, tt_row_ptr, tt_col_idx, tt_perm);
    }
    return out;
  }
};

// y = conv2d(x, W, bias) with W the CSR of (Cout, Cin, kh, kw); a channels_last x gets a channels_last y and input
// gradient, as in ops/sparse_conv2d.py.
struct ConvNode : public torch::autograd::Function<ConvNode> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values, const OptTensor& bias,
                            const at::Tensor& row_ptr, const at::Tensor& col_idx, at::IntArrayRef kernel_size,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
    at::Tensor y, x_packed;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(y, x_packed) = conv_keep_op(x, values, row_ptr, col_idx, kernel_size, bias, stride, padding, dilation);
    }
    ctx->save_for_backward({x, values, row_ptr, col_idx});
    // x as the batch-innermost forward packed it (an empty tensor where none was kept): the backward's weight
    // gradient reads it instead of packing x again. A buffer, not a saved variable: x's own version check guards it.
    // Only where both gradients can be wanted (else the passes run apart); needs_input_grad has no answer in a
    // forward that records no graph.
    if (x_packed.numel() > 0 && x.requires_grad() && values.requires_grad()) ctx->saved_data["x_packed"] = x_packed;
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["kernel_size"] = kernel_size.vec();
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    return channels_last(x) ? y.contiguous(at::MemoryFormat::ChannelsLast) : y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &values = s[1], &row_ptr = s[2], &col_idx = s[3], &grad = grads[0];
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_values = ctx->needs_input_grad(1),
               need_bias = has_bias && ctx->needs_input_grad(2);
    const auto kernel_size = ctx->saved_data["kernel_size"].toIntVector(),
               stride = ctx->saved_data["stride"].toIntVector(), padding = ctx->saved_data["padding"].toIntVector(),
               dilation = ctx->saved_data["dilation"].toIntVector();
    variable_list out(9);
    if (!grad.defined()) return out;
    std::optional<at::AutoDispatchBelowADInplaceOrView> below;
    if (!at::GradMode::is_enabled()) below.emplace();  // else create_graph: through the ops' own formulas
    if (need_x && need_values && below) {
      // Both at once: a pointwise conv reads dy once for the two (conv_pointwise.cpp), a batch-innermost one packs
      // it once (and a strided one reuses the forward's packed x: conv_batched.cpp).
      const OptTensor x_packed =
          ctx->saved_data.count("x_packed") ? OptTensor(ctx->saved_data["x_packed"].toTensor()) : std::nullopt;
      std::tie(out[0], out[1]) =
          conv_backward_op(grad, x, values, row_ptr, col_idx, kernel_size, stride, padding, dilation, x_packed);
      if (channels_last(x)) out[0] = out[0].contiguous(at::MemoryFormat::ChannelsLast);
      if (need_bias) out[2] = grad.sum({0, 2, 3});
      return out;
    }
    if (need_x) {
      out[0] =
          conv_backward_input_op(grad, values, row_ptr, col_idx, x.sizes(), kernel_size, stride, padding, dilation);
      if (channels_last(x)) out[0] = out[0].contiguous(at::MemoryFormat::ChannelsLast);
    }
    if (need_values)
      out[1] = conv_backward_weight_op(grad, x, row_ptr, col_idx, kernel_size, stride, padding, dilation);
    if (need_bias) out[2] = grad.sum({0, 2, 3});
    return out;
  }
};

at::Tensor linear_node(const at::Tensor& x, const at::Tensor& values, const OptTensor& bias, const at::Tensor& row_ptr,
                       const at::Tensor& col_idx, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                       const at::Tensor& t_perm) {
  return LinearNode::apply(x, values, bias, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm);
}

at::Tensor linear_relu_node(const at::Tensor& x, const at::Tensor& values, const OptTensor& bias,
                            const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& t_row_ptr,
                            const at::Tensor& t_col_idx, const at::Tensor& t_perm) {
  return LinearReluNode::apply(x, values, bias, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm);
}

at::Tensor linear_gelu_node(const at::Tensor& x, const at::Tensor& values, const OptTensor& bias,
                            const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& t_row_ptr,
                            const at::Tensor& t_col_idx, const at::Tensor& t_perm) {
  return LinearGeluNode::apply(x, values, bias, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm);
}

at::Tensor conv_node(const at::Tensor& x, const at::Tensor& values, const OptTensor& bias, const at::Tensor& row_ptr,
                     const at::Tensor& col_idx, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation) {
  return ConvNode::apply(x, values, bias, row_ptr, col_idx, kernel_size, stride, padding, dilation);
}

at::Tensor spmm_node(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     const at::Tensor& B, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                     const at::Tensor& t_perm) {
  return SpmmNode::apply(values, row_ptr, col_idx, B, t_row_ptr, t_col_idx, t_perm);
}

// Below autograd (inference mode): the kernels alone.
at::Tensor linear_plain(const at::Tensor& x, const at::Tensor& values, const OptTensor& bias, const at::Tensor& row_ptr,
                        const at::Tensor& col_idx, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                        const at::Tensor& t_perm) {
  return linear_op(x, values, row_ptr, col_idx, bias, t_row_ptr, t_col_idx, t_perm);
}

at::Tensor linear_relu_plain(const at::Tensor& x, const at::Tensor& values, const OptTensor& bias,
                             const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& t_row_ptr,
                             const at::Tensor& t_col_idx, const at::Tensor& t_perm) {
  return sparse_linear_cpu(x, values, row_ptr, col_idx, bias, t_row_ptr, t_col_idx, t_perm, true);
}

at::Tensor linear_gelu_plain(const at::Tensor& x, const at::Tensor& values, const OptTensor& bias,
                             const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& t_row_ptr,
                             const at::Tensor& t_col_idx, const at::Tensor& t_perm) {
  at::Tensor y = linear_op(x, values, row_ptr, col_idx, bias, t_row_ptr, t_col_idx, t_perm);
  csr::gelu_(y, false);  // the node's GELU, so that both give the same
  return y;
}

at::Tensor conv_plain(const at::Tensor& x, const at::Tensor& values, const OptTensor& bias, const at::Tensor& row_ptr,
                      const at::Tensor& col_idx, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation) {
  const at::Tensor y = conv_op(x, values, row_ptr, col_idx, kernel_size, bias, stride, padding, dilation);
  return channels_last(x) ? y.contiguous(at::MemoryFormat::ChannelsLast) : y;
}

at::Tensor spmm_plain(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                      const at::Tensor& B, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                      const at::Tensor& t_perm) {
  if (B.dim() == 3) return spmm_planes(values, row_ptr, col_idx, with_unit_plane_stride(B));  // as SpmmNode's forward
  return spmm_op(values, row_ptr, col_idx, B, t_row_ptr, t_col_idx, t_perm);
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  // Private (sparsekern/nn/kernel_choice.py, conv_gemm.py): sparse_linear on a 2-D x (also with a fused ReLU or GELU),
  // spmm and sparse_conv2d as one C++ node each.
  m.def("_spmm_node(Tensor values, Tensor row_ptr, Tensor col_idx, Tensor B, Tensor t_row_ptr, Tensor t_col_idx, "
        "Tensor t_perm) -> Tensor");
  m.def("_sparse_linear_node(Tensor x, Tensor values, Tensor? bias, Tensor row_ptr, Tensor col_idx, "
        "Tensor t_row_ptr, Tensor t_col_idx, Tensor t_perm) -> Tensor");
  m.def("_sparse_linear_relu_node(Tensor x, Tensor values, Tensor? bias, Tensor row_ptr, Tensor col_idx, "
        "Tensor t_row_ptr, Tensor t_col_idx, Tensor t_perm) -> Tensor");
  m.def("_sparse_linear_gelu_node(Tensor x, Tensor values, Tensor? bias, Tensor row_ptr, Tensor col_idx, "
        "Tensor t_row_ptr, Tensor t_col_idx, Tensor t_perm) -> Tensor");
  m.def("_sparse_conv2d_node(Tensor x, Tensor values, Tensor? bias, Tensor row_ptr, Tensor col_idx, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("_sparse_linear_node", &sparsekern::linear_plain);
  m.impl("_sparse_linear_relu_node", &sparsekern::linear_relu_plain);
  m.impl("_sparse_linear_gelu_node", &sparsekern::linear_gelu_plain);
  m.impl("_sparse_conv2d_node", &sparsekern::conv_plain);
  m.impl("_spmm_node", &sparsekern::spmm_plain);
}

TORCH_LIBRARY_IMPL(sparsekern, Autograd, m) {
  m.impl("_sparse_linear_node", &sparsekern::linear_node);
  m.impl("_sparse_linear_relu_node", &sparsekern::linear_relu_node);
  m.impl("_sparse_linear_gelu_node", &sparsekern::linear_gelu_node);
  m.impl("_sparse_conv2d_node", &sparsekern::conv_node);
  m.impl("_spmm_node", &sparsekern::spmm_node);
}
