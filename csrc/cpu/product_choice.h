// Products whose faster way round (or faster kernel) the shape decides, timed once per shape: a linear's GEMMs as
// x W^T or (W x^T)^T and g^T x or (x^T g)^T, a 1x1 conv as oneDNN's convolution or GEMMs (dense_kernel.cpp), a
// narrow linear's own loops or MKL's GEMMs (narrow_linear.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>

#include <array>
#include <atomic>
#include <cstdint>

namespace sparsekern {
namespace product_choice {

// 0: measured; 1: always the op as nn.Linear / nn.Conv2d run it; 2: always the alternative way round (GEMMs);
// 3: a narrow linear's loops, the rest as 1 (tests: _set_dense_products).
std::atomic<int64_t>& mode();

// Which product a key is for.
enum Product : int64_t {
  kForward = 1,
  kWeightGrad,
  kConvForward,
  kConvInputGrad,
  kConvWeightGrad,
  kNarrowForward,
  kNarrowBackward
};
using Key = std::array<int64_t, 8>;

// Whether `alternative` ran faster than `as_is` for this key: both timed once per key (the minimum of a few calls
// each, alternating, after a warm-up call), the answer cached for the process; false under
// torch.use_deterministic_algorithms (a measured choice can differ between processes). Ignores mode().
bool measured_faster(const Key& key, c10::function_ref<void()> as_is, c10::function_ref<void()> alternative);

// measured_faster, or what mode() forces: the alternative under 2, `as_is` under 1 and 3.
template <typename A, typename B>
bool alternative_is_faster(const Key& key, A&& as_is, B&& alternative) {
  if (const int64_t forced = mode().load()) return forced == 2;
  return measured_faster(key, [&] { (void)as_is(); }, [&] { (void)alternative(); });
}

// The product, shape, dtype, layout (of x2, and of g2 where given) and thread count of a linear's product over x2
// (rows, in) with `out` features; `extra`: what else sets the work (a backward's gradients asked for).
Key linear_key(Product p, const at::Tensor& x2, int64_t out, const at::Tensor& g2 = at::Tensor(), int64_t extra = 0);

// y = x2 W^T + b (b may be undefined) over a 2-D x2, as addmm or as (W x2^T)^T made contiguous, whichever measured
// faster: for a linear of fewer than kTimedForwardBelow outputs (the transposed result is made contiguous, cheap
// while it is narrow).
constexpr int64_t kTimedForwardBelow = 64;
at::Tensor few_outputs_forward(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& b);

// A linear's weight gradient (out, in) from g2 (rows, out) and x2 (rows, in): g2^T x2, or (x2^T g2)^T (a transposed
// view), whichever measured faster.
at::Tensor linear_weight_grad(const at::Tensor& g2, const at::Tensor& x2);

}  // namespace product_choice
}  // namespace sparsekern
