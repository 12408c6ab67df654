// Timed choices between two ways of running a product (product_choice.h).
//
// A linear's GEMMs: MKL leaves the faster orientation to the shape, and no rule by shape holds. Intel Xeon (Sapphire
// Rapids class), 2 threads: the forward y = x W^T of a 1024 -> 10 head at batch 256 0.085 ms as addmm, 0.025-0.035 ms
// as (W x^T)^T made contiguous, but 4096 tokens x 256 -> 16 0.15 against 0.38 ms and 1024 -> 32 0.085 against 0.096
// ms; the weight gradient x^T g 1.15-1.2x faster than g^T x at 2048 tokens x 384 -> 96 on Zen 4, 0.87x on the Xeon,
// 3.6x slower there for the 1024 -> 10 head. (The input gradient as (W^T g^T)^T loses: making its wide result
// contiguous costs 7x the product.)
#include "cpu/product_choice.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <mutex>

namespace sparsekern {
namespace product_choice {

std::atomic<int64_t>& mode() {
  static std::atomic<int64_t> m{0};
  return m;
}

constexpr int kTimedRounds = 5;

bool measured_faster(const Key& key, c10::function_ref<void()> as_is, c10::function_ref<void()> alternative) {
  static std::mutex mutex;
  static std::map<Key, bool> cache;
  if (at::globalContext().deterministicAlgorithms()) return false;
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto hit = cache.find(key);
    if (hit != cache.end()) return hit->second;
  }
  auto timed = [](c10::function_ref<void()> f) {
    const auto a = std::chrono::steady_clock::now();
    f();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
  };
  // Alternating calls, so that a machine that speeds up or slows down meanwhile moves both alike; the minimum of
  // each (interference only adds time).
  as_is();
  alternative();
  double t_as_is = 1e30, t_alternative = 1e30;
  for (int r = 0; r < kTimedRounds; ++r) {
    t_as_is = std::min(t_as_is, timed(as_is));
    t_alternative = std::min(t_alternative, timed(alternative));
  }
  const bool faster = t_alternative < t_as_is;
  std::lock_guard<std::mutex> lock(mutex);
  cache.emplace(key, faster);
  return faster;
}

Key linear_key(Product p, const at::Tensor& x2, int64_t out, const at::Tensor& g2, int64_t extra) {
  const int64_t layout = (x2.is_contiguous() ? 1 : 0) + (g2.defined() && g2.is_contiguous() ? 2 : 0);
  return {p, x2.size(0), x2.size(1), out, extra, static_cast<int64_t>(x2.scalar_type()), layout, at::get_num_threads()};
}

at::Tensor few_outputs_forward(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& b) {
  auto as_is = [&] { return b.defined() ? at::addmm(b, x2, weight.t()) : at::mm(x2, weight.t()); };
  auto transposed = [&] {
    return (b.defined() ? at::addmm(b.unsqueeze(1), weight, x2.t()) : at::mm(weight, x2.t())).t().contiguous();
  };
  return alternative_is_faster(linear_key(kForward, x2, weight.size(0)), as_is, transposed) ? transposed() : as_is();
}

at::Tensor linear_weight_grad(const at::Tensor& g2, const at::Tensor& x2) {
  auto as_is = [&] { return g2.t().mm(x2); };
  auto transposed = [&] { return x2.t().mm(g2).t(); };
  return alternative_is_faster(linear_key(kWeightGrad, x2, g2.size(1), g2), as_is, transposed) ? transposed() : as_is();
}

}  // namespace product_choice
}  // namespace sparsekern
