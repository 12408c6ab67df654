// The narrow linear kernels (narrow_linear.cpp) for the other CPU code that runs a linear of few outputs: the
// dense kernel of a sparse classifier head (dense_kernel.cpp). Unchecked: the callers check what `takes` names.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <tuple>

namespace sparsekern {
namespace narrow {

constexpr int64_t kMaxOut = 16;  // outputs up to which the kernels run

// Whether the kernels take x (rows, K) W^T + bias: 1 to kMaxOut outputs, float32/float64 CPU tensors of one dtype.
inline bool takes(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  const auto dtype = x.scalar_type();
  return (dtype == at::kFloat || dtype == at::kDouble) && x.dim() == 2 && weight.dim() == 2 && weight.size(0) >= 1 &&
         weight.size(0) <= kMaxOut && weight.size(1) == x.size(1) && weight.scalar_type() == dtype &&
         x.device().is_cpu() && weight.device().is_cpu() &&
         (!bias.defined() || (bias.scalar_type() == dtype && bias.device().is_cpu()));
}

// y = x W^T + bias (bias may be undefined), (rows, outputs) contiguous: on the loops or on MKL's GEMMs, whichever
// measured faster for the shape (product_choice.h; the loops under deterministic algorithms).
at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

// The input, weight and bias gradients of forward for the output's gradient grad (rows, outputs), those mask asks
// for (undefined otherwise), chosen as forward's are (the loops sum each in a fixed order, over any threads).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& weight, std::array<bool, 3> mask);

}  // namespace narrow
}  // namespace sparsekern
