// GELU fused into a sparse linear layer (SparseLinear(activation="gelu")): the layer's node turns its product z
// into gelu(z) in place and keeps gelu'(z) for its backward, which multiplies the output's gradient by it as it
// packs the gradient's tiles (csr_backward.cpp). Apart, F.gelu's backward is a pass of its own over three tensors
// of the layer's output size (the gradient, z, the result), then read again by the layer's backward: in a
// ViT-S/16 step (800 tokens, fc1 384 -> 1536) those passes took 0.86-0.93 ms a layer, 7 % of the sparse step.
//
// The exact (erf) GELU, as F.gelu(approximate="none"): gelu(z) = z Phi(z), gelu'(z) = Phi(z) + z phi(z), with Phi
// and phi the standard normal's CDF and density. float32 (and bf16, computed in float32) takes erf from
// Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), as ATen's vectorized erf does; its exp(-z^2/2) is phi's too.
// float64 calls std::erf and std::exp. +Inf gives NaN, -Inf NaN, as F.gelu does (the dense kernel's path).
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

using simd::vf;
using simd::vi32;

constexpr int L = 8;            // float32 lanes of a 32-byte vector
constexpr int64_t GRAIN = 1 << 14;  // elements per parallel task

// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n); 0 below
// -87 (where 2^n would leave the normal range), NaN stays NaN.
SK_INLINE vf exp_nonpositive(vf x) {
  const vi32 under = x < -87.0f;
  const vf lo = vf{} - 87.0f;
  x = under ? lo : x;  // NaN compares false: kept
  vf fx = x * 1.44269504088896341f + 0.5f;
  vi32 n = __builtin_convertvector(fx, vi32);  // truncates: floor for the negative ones below
  n -= (vi32)(__builtin_convertvector(n, vf) > fx) & 1;
  fx = __builtin_convertvector(n, vf);
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  vf p = 1.9875691500e-4f * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * x * x + x + 1.0f;
  const vi32 scale = (n + 127) << 23;
  return (vf)((vi32)(p * (vf)scale) & ~under);
}

// gelu(z) into h and gelu'(z) into d, 8 lanes.
SK_INLINE void gelu_lanes(vf z, vf& h, vf& d) {
  const vf a = (vf)((vi32)z & 0x7fffffff) * 0.70710678118654752f;  // |z| / sqrt(2)
  const vf e = exp_nonpositive(vf{} - a * a);                            // exp(-z^2 / 2)
  const vf t = 1.0f / (1.0f + 0.3275911f * a);
  vf poly = 1.061405429f * t - 1.453152027f;
  poly = poly * t + 1.421413741f;
  poly = poly * t - 0.284496736f;
  poly = poly * t + 0.254829592f;
  const vf erf_abs = 1.0f - poly * t * e;
  const vf half_erf = (vf)((vi32)(0.5f * erf_abs) | ((vi32)z & (int32_t)0x80000000));  // sign(z) erf(|z|/sqrt2) / 2
  const vf cdf = 0.5f + half_erf;
  const vf nan = vf{} + __builtin_nanf("");
  h = z == __builtin_inff() ? nan : z * cdf;  // +Inf: NaN, as F.gelu gives (so the kernels agree)
  d = cdf + z * e * 0.39894228040143268f;    // 1 / sqrt(2 pi); NaN at +-Inf, as F.gelu's backward
}

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
    gelu_lanes(load(z + i), h, g);
    store(z + i, h);
    if (d) store(d + i, g);
  }
  for (; i < n; ++i) {
    vf h, g;
    gelu_lanes(vf{} + bf16::widen(z[i]), h, g);
    z[i] = static_cast<E>(h[0]);  // bf16: rounded to nearest even, as store8 does
    if (d) d[i] = static_cast<E>(g[0]);
  }
}

SK_CLONES void gelu_f32(float* z, float* d, int64_t n) { gelu_run(z, d, n); }
SK_CLONES void gelu_bf16(c10::BFloat16* z, c10::BFloat16* d, int64_t n) { gelu_run(z, d, n); }

void gelu_f64(double* z, double* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double x = z[i], cdf = 0.5 * (1.0 + std::erf(x * M_SQRT1_2));
    z[i] = x == INFINITY ? NAN : x * cdf;
    if (d) d[i] = cdf + x * std::exp(-0.5 * x * x) * (M_2_SQRTPI * M_SQRT1_2 * 0.5);
  }
}

}  // namespace

template <typename T>
T* offset(const at::Tensor& t, int64_t a) {
  return t.defined() ? t.data_ptr<T>() + a : nullptr;
}

at::Tensor gelu_(at::Tensor& z, bool keep_derivative) {
  TORCH_CHECK(z.is_contiguous(), "gelu_: z must be contiguous");
  const auto type = z.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kBFloat16 || type == at::kDouble,
              "gelu_: z must be float32, float64 or bfloat16, got ", z.dtype());
  const at::Tensor d = keep_derivative ? at::empty_like(z) : at::Tensor();
  at::parallel_for(0, z.numel(), GRAIN, [&](int64_t a, int64_t b) {
    // Tasks start on multiples of GRAIN elements: every vector but the last is whole.
    if (type == at::kFloat) gelu_f32(offset<float>(z, a), offset<float>(d, a), b - a);
    else if (type == at::kBFloat16) gelu_bf16(offset<c10::BFloat16>(z, a), offset<c10::BFloat16>(d, a), b - a);
    else gelu_f64(offset<double>(z, a), offset<double>(d, a), b - a);
  });
  return d;
}

}  // namespace csr
}  // namespace sparsekern
