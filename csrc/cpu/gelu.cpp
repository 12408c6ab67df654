// GELU fused into a sparse linear layer (SparseLinear(activation="gelu")): the layer's node turns its product z
// into gelu(z) in place and keeps gelu'(z) for its backward, which multiplies the output's gradient by it as it
// packs the gradient's tiles (csr_backward.cpp). Apart, F.gelu's backward is a pass of its own over three tensors
// of the layer's output size (the gradient, z, the result), then read again by the layer's backward: in a
// ViT-S/16 step (800 tokens, fc1 384 -> 1536) those passes took 0.86-0.93 ms a layer, 7 % of the sparse step.
//
// The exact (erf) GELU, as F.gelu(approximate="none"): gelu(z) = z Phi(z), gelu'(z) = Phi(z) + z phi(z), with Phi
// and phi the standard normal's CDF and density. float32 (and bf16, computed in float32) takes erf from Abramowitz &
// Stegun 7.1.26 (|error| <= 1.5e-7), as ATen's vectorized erf does; its exp(-z^2/2) is phi's too. float64 calls
// std::erf and std::exp. +Inf and -Inf give NaN, as F.gelu does (the path of the layer's dense kernel).
// A pass of its own after the product: computed as the SpMM stored each group of rows instead, the ViT-S/16 step
// ran 5 % slower (Intel SPR-class, 2 threads, interleaved A/B; the same op timed alone: 0.95x to 1.05x).
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <cstdint>

#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/simd.h"

#pragma GCC optimize("fp-contract=fast")

namespace sparsekern {
namespace csr {
namespace {
namespace gelu {

// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n; n rounded
// by adding 1.5 * 2^23, which leaves it in the sum's low bits); 0 below -87 (where 2^n would leave the normal
// range), NaN stays NaN. V: a float32 GCC vector, VI: the int32 vector of its width.
template <typename V, typename VI>
SK_INLINE V exp_nonpositive(V x) {
  const VI under = x < -87.0f;
  x = under ? V{} - 87.0f : x;  // NaN compares false: kept
  const V big = x * 1.44269504088896341f + 12582912.0f;
  const V fx = big - 12582912.0f;
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  V p = 1.9875691500e-4f * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * x * x + x + 1.0f;
  const VI scale = ((VI)big << 23) + (127 << 23);  // 2^n: big's low bits hold n
  return (V)((VI)(p * (V)scale) & ~under);
}

// gelu(z) into h and gelu'(z) into d, every lane.
template <typename V, typename VI>
SK_INLINE void gelu_lanes(V z, V& h, V& d) {
  const V a = (V)((VI)z & 0x7fffffff) * 0.70710678118654752f;  // |z| / sqrt(2)
  const V e = exp_nonpositive<V, VI>(V{} - a * a);              // exp(-z^2 / 2)
  const V t = 1.0f / (1.0f + 0.3275911f * a);
  V poly = 1.061405429f * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const V erf_abs = 1.0f - poly * t * e;
  const V half_erf = (V)((VI)(0.5f * erf_abs) | ((VI)z & (int32_t)0x80000000));  // sign(z) erf(|z|/sqrt2) / 2
  const V cdf = 0.5f + half_erf;
  h = z == __builtin_inff() ? V{} + __builtin_nanf("") : z * cdf;  // +Inf: NaN, as F.gelu gives
  d = cdf + z * e * 0.39894228040143268f;  // 1 / sqrt(2 pi); NaN at +-Inf, as F.gelu's backward
}

// gelu(z[i]) in place and gelu'(z[i]) into d[i] (nullptr: gelu alone) on W-byte vectors (64 only inside SK_AVX512
// functions), count a multiple of their lanes.
template <int W>
SK_INLINE void rows(float* z, float* d, int64_t count) {
  using V = typename simd::Vec<float, W>::v;
  using VI = typename simd::Vec<float, W>::vi;
  constexpr int L = simd::Vec<float, W>::L;
  for (int64_t i = 0; i < count; i += L) {
    V h, g;
    gelu_lanes<V, VI>(simd::vload<W>(z + i), h, g);
    simd::vstore<W>(z + i, h);
    if (d) simd::vstore<W>(d + i, g);
  }
}
// float64: std::erf and std::exp.
void rows_f64(double* z, double* d, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    const double x = z[i], cdf = 0.5 * (1.0 + std::erf(x * M_SQRT1_2));
    z[i] = x == INFINITY ? NAN : x * cdf;
    if (d) d[i] = cdf + x * std::exp(-0.5 * x * x) * (M_2_SQRTPI * M_SQRT1_2 * 0.5);
  }
}

}  // namespace gelu

constexpr int L = 8;                // float32 lanes of a 32-byte vector
constexpr int64_t GRAIN = 1 << 14;  // elements per parallel task

using simd::vf;
using simd::vi32;

SK_INLINE vf load(const float* p) { return simd::vload(p); }
SK_INLINE vf load(const c10::BFloat16* p) { return bf16::load8(p); }
SK_INLINE void store(float* p, vf x) { simd::vstore(p, x); }
SK_INLINE void store(c10::BFloat16* p, vf x) { bf16::store8(p, x); }

// gelu(z) in place and gelu'(z) into d (nullptr: gelu alone), computed in float32.
template <typename E>
SK_INLINE void gelu_run(E* z, E* d, int64_t n) {
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    vf h, g;
    gelu::gelu_lanes<vf, vi32>(load(z + i), h, g);
    store(z + i, h);
    if (d) store(d + i, g);
  }
  for (; i < n; ++i) {
    vf h, g;
    gelu::gelu_lanes<vf, vi32>(vf{} + bf16::widen(z[i]), h, g);
    z[i] = static_cast<E>(h[0]);  // bf16: rounded to nearest even, as store8 does
    if (d) d[i] = static_cast<E>(g[0]);
  }
}

SK_CLONED(void, gelu_f32, (float* z, float* d, int64_t n), { gelu_run(z, d, n); })
SK_CLONE_DISPATCH(gelu_f32)
#if SK_HAVE_AVX512
// 64-byte vectors where the CSR loops run them (csr::isa()): 1.6x the 32-byte loop's rate.
SK_AVX512 void gelu_f32_wide(float* z, float* d, int64_t n) {
  const int64_t whole = n / 16 * 16;
  gelu::rows<64>(z, d, whole);
  gelu_run(z + whole, d ? d + whole : nullptr, n - whole);
}
#endif
SK_CLONED(void, gelu_bf16, (c10::BFloat16 * z, c10::BFloat16* d, int64_t n), { gelu_run(z, d, n); })
SK_CLONE_DISPATCH(gelu_bf16)

template <typename T>
T* offset(const at::Tensor& t, int64_t a) {
  return t.defined() ? t.data_ptr<T>() + a : nullptr;
}

}  // namespace

at::Tensor gelu_(at::Tensor& z, bool keep_derivative) {
  TORCH_CHECK(z.is_contiguous(), "gelu_: z must be contiguous");
  const auto type = z.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kDouble,
              "gelu_: z must be float32, float64 or bfloat16, got ", z.dtype());
  const at::Tensor d = keep_derivative ? at::empty_like(z) : at::Tensor();
  [[maybe_unused]] const bool wide = isa() == Isa::avx512;
  // Tasks start on multiples of GRAIN elements: every vector but the last is whole.
  at::parallel_for(0, z.numel(), GRAIN, [&](int64_t a, int64_t b) {
    if (type == at::kDouble) return gelu::rows_f64(offset<double>(z, a), offset<double>(d, a), b - a);
    if (type == at::kBFloat16) return gelu_bf16(offset<c10::BFloat16>(z, a), offset<c10::BFloat16>(d, a), b - a);
#if SK_HAVE_AVX512
    if (wide) return gelu_f32_wide(offset<float>(z, a), offset<float>(d, a), b - a);
#endif
    gelu_f32(offset<float>(z, a), offset<float>(d, a), b - a);
  });
  return d;
}

}  // namespace csr
}  // namespace sparsekern
