// A linear layer with few outputs (a classifier head of 1 to 16 classes) on the CPU: forward and both gradients.
// MKL's GEMMs run such products at a fraction of their speed (the MLP's 1024 -> 10 head at batch 256, 2 threads:
// forward 113-130 us, input gradient 67-155, weight gradient 99; 27 GFLOP/s all told), which made the head 11 % of a
// 90 %-sparse MLP training step. Here every product is a loop of its own over rows or columns, the head's few
// weight rows staying in L1:
//   forward       y[r, o] = bias[o] + dot(x[r, :], w[o, :]): per row, the outputs in groups of up to 8 sharing each
//                 loaded vector of x
//   input grad    dx[r, :] = sum_o dy[r, o] w[o, :]: per row, 4 vectors of dx at a time
//   weight grad   dw[o, k] = sum_r dy[r, o] x[r, k]: per 2 vectors of columns, the outputs in groups of up to 4
// Each result is summed by one thread in a fixed order (deterministic). 32-byte vectors in every clone; float32 on
// 64-byte vectors where the loops run AVX-512, with up to 12 outputs a group: the weight gradient (weight_grad_wide,
// every output of a piece in one walk down x's rows) of the MLP's head 79 -> 27-39 us, its forward (forward_wide)
// 58-60 -> 48-51 us (Intel SPR-class, 2 threads). The input gradient so (weight rows in registers, dx in 32-column
// pieces down its rows) ran 59 -> 80 us: its stores then stride across rows.
// The loops lose to MKL at other shapes: on the Xeon 4096 rows x 256 -> 16 forward 413 against 229 us, backward 671
// against 469 (but 2048 x 768 -> 2 171 against 209 and 373 against 614): so the forward and the backward each run
// the loops or MKL's GEMMs, whichever measured faster once per shape (product_choice.h); fwd+bwd as FastNarrowLinear
// was 0.64-0.92x nn.Linear at 12-16 outputs over 2048-8192 rows before.
#pragma GCC optimize("fp-contract=fast")  // a*b+c -> FMA in the clones (ISO C++ mode defaults to off)

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/narrow_linear.h"
#include "cpu/product_choice.h"
#include "cpu/simd.h"

namespace sparsekern {
namespace {

using simd::Vec;
using simd::vload;
using simd::vsplat;
using simd::vstore;

using narrow::kMaxOut;
constexpr int64_t kGrainMacs = 1 << 15;  // multiply-adds a thread's piece takes at least

// yr[g] = bias[g] + dot(xr, w[g]) for the G weight rows w (K apart).
template <class T, int G>
SK_INLINE void row_dots(const T* __restrict xr, const T* __restrict w, int64_t K, const T* bias, T* __restrict yr) {
  using V = typename Vec<T>::v;
  constexpr int L = Vec<T>::L, S = G >= 5 ? 1 : 2;  // accumulator sets: 5-8 FMA chains in flight
  V acc[S][G] = {};
  int64_t k = 0;
  for (; k + S * L <= K; k += S * L)
    for (int s = 0; s < S; ++s) {
      const V xv = vload(xr + k + s * L);
      for (int g = 0; g < G; ++g) acc[s][g] += xv * vload(w + g * K + k + s * L);
    }
  for (; k + L <= K; k += L) {
    const V xv = vload(xr + k);
    for (int g = 0; g < G; ++g) acc[0][g] += xv * vload(w + g * K + k);
  }
  for (int g = 0; g < G; ++g) {
    V a = acc[0][g];
    for (int s = 1; s < S; ++s) a += acc[s][g];
    T sum = simd::tree_sum(a);
    for (int64_t q = k; q < K; ++q) sum += xr[q] * w[g * K + q];
    yr[g] = (bias ? bias[g] : T(0)) + sum;
  }
}

// dw[g, k0:k0+2L] (rows K apart) = sum_r dy[r, g] x[r, k0:k0+2L] for the G outputs of dy (O apart).
template <class T, int G>
SK_INLINE void column_sums(const T* __restrict x, const T* __restrict dy, int64_t N, int64_t K, int64_t O, int64_t k0,
                           T* __restrict dw) {
  using V = typename Vec<T>::v;
  constexpr int L = Vec<T>::L;
  V acc[G][2] = {};
  for (int64_t r = 0; r < N; ++r) {
    const V x0 = vload(x + r * K + k0), x1 = vload(x + r * K + k0 + L);
    for (int g = 0; g < G; ++g) {
      const V d = vsplat(dy[r * O + g]);
      acc[g][0] += d * x0;
      acc[g][1] += d * x1;
    }
  }
  for (int g = 0; g < G; ++g) {
    vstore(dw + g * K + k0, acc[g][0]);
    vstore(dw + g * K + k0 + L, acc[g][1]);
  }
}

template <class T>
SK_INLINE void forward_rows(const T* x, const T* w, const T* bias, T* y, int64_t K, int64_t O, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t o0 = 0; o0 < O; o0 += 8) {
      const T* wo = w + o0 * K;
      const T* b = bias ? bias + o0 : nullptr;
      T* yr = y + r * O + o0;
      switch (std::min<int64_t>(8, O - o0)) {
        case 1: row_dots<T, 1>(x + r * K, wo, K, b, yr); break;
        case 2: row_dots<T, 2>(x + r * K, wo, K, b, yr); break;
        case 3: row_dots<T, 3>(x + r * K, wo, K, b, yr); break;
        case 4: row_dots<T, 4>(x + r * K, wo, K, b, yr); break;
        case 5: row_dots<T, 5>(x + r * K, wo, K, b, yr); break;
        case 6: row_dots<T, 6>(x + r * K, wo, K, b, yr); break;
        case 7: row_dots<T, 7>(x + r * K, wo, K, b, yr); break;
        default: row_dots<T, 8>(x + r * K, wo, K, b, yr); break;
      }
    }
}

template <class T>
SK_INLINE void input_grad_rows(const T* dy, const T* w, T* dx, int64_t K, int64_t O, int64_t r0, int64_t r1) {
  using V = typename Vec<T>::v;
  constexpr int L = Vec<T>::L, C = 4;  // vectors of dx at a time: 4 chains of O FMAs each
  for (int64_t r = r0; r < r1; ++r) {
    const T* d = dy + r * O;
    T* out = dx + r * K;
    int64_t k = 0;
    for (; k + C * L <= K; k += C * L) {
      V acc[C] = {};
      for (int64_t o = 0; o < O; ++o) {
        const V s = vsplat(d[o]);
        for (int c = 0; c < C; ++c) acc[c] += s * vload(w + o * K + k + c * L);
      }
      for (int c = 0; c < C; ++c) vstore(out + k + c * L, acc[c]);
    }
    for (; k < K; ++k) {
      T sum = 0;
      for (int64_t o = 0; o < O; ++o) sum += d[o] * w[o * K + k];
      out[k] = sum;
    }
  }
}

// The weight gradient's columns from q0 on (past the last whole piece), one at a time.
template <class T>
SK_INLINE void leftover_column_sums(const T* x, const T* dy, T* dw, int64_t N, int64_t K, int64_t O, int64_t q0) {
  for (int64_t q = q0; q < K; ++q)
    for (int64_t o = 0; o < O; ++o) {
      T sum = 0;
      for (int64_t r = 0; r < N; ++r) sum += dy[r * O + o] * x[r * K + q];
      dw[o * K + q] = sum;
    }
}

// Columns [c0, c1) of the weight gradient in pieces of 2 vectors (the last piece's leftover columns, q >= K - K % 2L,
// by the thread that owns the last piece).
template <class T>
SK_INLINE void weight_grad_cols(const T* x, const T* dy, T* dw, int64_t N, int64_t K, int64_t O, int64_t p0,
                                int64_t p1) {
  constexpr int64_t P = 2 * Vec<T>::L;
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t o0 = 0; o0 < O; o0 += 4) {
      const T* d = dy + o0;
      T* out = dw + o0 * K;
      switch (std::min<int64_t>(4, O - o0)) {
        case 1: column_sums<T, 1>(x, d, N, K, O, p * P, out); break;
        case 2: column_sums<T, 2>(x, d, N, K, O, p * P, out); break;
        case 3: column_sums<T, 3>(x, d, N, K, O, p * P, out); break;
        default: column_sums<T, 4>(x, d, N, K, O, p * P, out); break;
      }
    }
  if (p1 == K / P) leftover_column_sums(x, dy, dw, N, K, O, K / P * P);
}

#if SK_HAVE_AVX512
// The float32 weight gradient on 64-byte vectors: a piece of 2 vectors (32 columns) for up to 12 outputs at once (24
// of the 32 registers), so that a head of 5 to 12 outputs walks down x's rows once, not once per 4 outputs.
template <int G>
SK_INLINE void column_sums_wide(const float* __restrict x, const float* __restrict dy, int64_t N, int64_t K, int64_t O,
                                int64_t k0, float* __restrict dw) {
  using V = Vec<float, 64>::v;
  V acc[G][2] = {};
  for (int64_t r = 0; r < N; ++r) {
    const V x0 = vload<64>(x + r * K + k0), x1 = vload<64>(x + r * K + k0 + 16);
    for (int g = 0; g < G; ++g) {
      const V d = vsplat<64>(dy[r * O + g]);
      acc[g][0] += d * x0;
      acc[g][1] += d * x1;
    }
  }
  for (int g = 0; g < G; ++g) {
    vstore<64>(dw + g * K + k0, acc[g][0]);
    vstore<64>(dw + g * K + k0 + 16, acc[g][1]);
  }
}

constexpr int64_t kWidePiece = 32;  // columns per piece of the wide weight gradient

// Whether the products of x take the 64-byte loops: float32 where the loops run AVX-512.
bool runs_wide(const at::Tensor& x) { return x.scalar_type() == at::kFloat && csr::isa() == csr::Isa::avx512; }

// The float32 forward on 64-byte vectors: yr[g] = bias[g] + dot(xr, w[g]) for up to 12 outputs sharing each loaded
// vector of x (G chains of FMAs), so that a head of 9 to 12 outputs reads x's row once.
template <int G>
SK_INLINE void row_dots_wide(const float* __restrict xr, const float* __restrict w, int64_t K, const float* bias,
                             float* __restrict yr) {
  using V = Vec<float, 64>::v;
  V acc[G] = {};
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const V xv = vload<64>(xr + k);
    for (int g = 0; g < G; ++g) acc[g] += xv * vload<64>(w + g * K + k);
  }
  for (int g = 0; g < G; ++g) {
    float sum = simd::lane_sum(acc[g]);
    for (int64_t q = k; q < K; ++q) sum += xr[q] * w[g * K + q];
    yr[g] = (bias ? bias[g] : 0.f) + sum;
  }
}

SK_AVX512 void forward_wide(const float* x, const float* w, const float* bias, float* y, int64_t K, int64_t O,
                            int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t o0 = 0; o0 < O; o0 += 12) {
      const float* wo = w + o0 * K;
      const float* b = bias ? bias + o0 : nullptr;
      float* yr = y + r * O + o0;
      const float* xr = x + r * K;
      switch (std::min<int64_t>(12, O - o0)) {
        case 1: row_dots_wide<1>(xr, wo, K, b, yr); break;
        case 2: row_dots_wide<2>(xr, wo, K, b, yr); break;
        case 3: row_dots_wide<3>(xr, wo, K, b, yr); break;
        case 4: row_dots_wide<4>(xr, wo, K, b, yr); break;
        case 5: row_dots_wide<5>(xr, wo, K, b, yr); break;
        case 6: row_dots_wide<6>(xr, wo, K, b, yr); break;
        case 7: row_dots_wide<7>(xr, wo, K, b, yr); break;
        case 8: row_dots_wide<8>(xr, wo, K, b, yr); break;
        case 9: row_dots_wide<9>(xr, wo, K, b, yr); break;
        case 10: row_dots_wide<10>(xr, wo, K, b, yr); break;
        case 11: row_dots_wide<11>(xr, wo, K, b, yr); break;
        default: row_dots_wide<12>(xr, wo, K, b, yr); break;
      }
    }
}

SK_AVX512 void weight_grad_wide(const float* x, const float* dy, float* dw, int64_t N, int64_t K, int64_t O, int64_t p0,
                                int64_t p1) {
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t o0 = 0; o0 < O; o0 += 12) {
      const float* d = dy + o0;
      float* out = dw + o0 * K;
      const int64_t k0 = p * kWidePiece;
      switch (std::min<int64_t>(12, O - o0)) {
        case 1: column_sums_wide<1>(x, d, N, K, O, k0, out); break;
        case 2: column_sums_wide<2>(x, d, N, K, O, k0, out); break;
        case 3: column_sums_wide<3>(x, d, N, K, O, k0, out); break;
        case 4: column_sums_wide<4>(x, d, N, K, O, k0, out); break;
        case 5: column_sums_wide<5>(x, d, N, K, O, k0, out); break;
        case 6: column_sums_wide<6>(x, d, N, K, O, k0, out); break;
        case 7: column_sums_wide<7>(x, d, N, K, O, k0, out); break;
        case 8: column_sums_wide<8>(x, d, N, K, O, k0, out); break;
        case 9: column_sums_wide<9>(x, d, N, K, O, k0, out); break;
        case 10: column_sums_wide<10>(x, d, N, K, O, k0, out); break;
        case 11: column_sums_wide<11>(x, d, N, K, O, k0, out); break;
        default: column_sums_wide<12>(x, d, N, K, O, k0, out); break;
      }
    }
  if (p1 == K / kWidePiece) leftover_column_sums(x, dy, dw, N, K, O, K / kWidePiece * kWidePiece);
}
#endif

#define SK_NARROW_LOOPS(ATTR, CS, T, SUFFIX)                                                                        \
  ATTR void forward_##SUFFIX##CS(const T* x, const T* w, const T* b, T* y, int64_t K, int64_t O, int64_t r0,        \
                                 int64_t r1) {                                                                      \
    forward_rows(x, w, b, y, K, O, r0, r1);                                                                         \
  }                                                                                                                 \
  ATTR void input_grad_##SUFFIX##CS(const T* dy, const T* w, T* dx, int64_t K, int64_t O, int64_t r0, int64_t r1) { \
    input_grad_rows(dy, w, dx, K, O, r0, r1);                                                                       \
  }                                                                                                                 \
  ATTR void weight_grad_##SUFFIX##CS(const T* x, const T* dy, T* dw, int64_t N, int64_t K, int64_t O, int64_t p0,   \
                                     int64_t p1) {                                                                  \
    weight_grad_cols(x, dy, dw, N, K, O, p0, p1);                                                                   \
  }
SK_CLONE_BUILDS(SK_NARROW_LOOPS, float, f32)
SK_CLONE_BUILDS(SK_NARROW_LOOPS, double, f64)
SK_CLONE_DISPATCH(forward_f32)
SK_CLONE_DISPATCH(input_grad_f32)
SK_CLONE_DISPATCH(weight_grad_f32)
SK_CLONE_DISPATCH(forward_f64)
SK_CLONE_DISPATCH(input_grad_f64)
SK_CLONE_DISPATCH(weight_grad_f64)

void forward_loops(const float* x, const float* w, const float* b, float* y, int64_t K, int64_t O, int64_t r0,
                   int64_t r1) {
  forward_f32(x, w, b, y, K, O, r0, r1);
}
void forward_loops(const double* x, const double* w, const double* b, double* y, int64_t K, int64_t O, int64_t r0,
                   int64_t r1) {
  forward_f64(x, w, b, y, K, O, r0, r1);
}
void input_grad(const float* dy, const float* w, float* dx, int64_t K, int64_t O, int64_t r0, int64_t r1) {
  input_grad_f32(dy, w, dx, K, O, r0, r1);
}
void input_grad(const double* dy, const double* w, double* dx, int64_t K, int64_t O, int64_t r0, int64_t r1) {
  input_grad_f64(dy, w, dx, K, O, r0, r1);
}
void weight_grad(const float* x, const float* dy, float* dw, int64_t N, int64_t K, int64_t O, int64_t p0, int64_t p1) {
  weight_grad_f32(x, dy, dw, N, K, O, p0, p1);
}
void weight_grad(const double* x, const double* dy, double* dw, int64_t N, int64_t K, int64_t O, int64_t p0,
                 int64_t p1) {
  weight_grad_f64(x, dy, dw, N, K, O, p0, p1);
}

const char* const kOp = "_narrow_linear";

void check_args(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), kOp, ": x and weight must be CPU tensors");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kOp,
                    ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), kOp, ": weight must be x's dtype ", x.scalar_type(),
                    ", got ", weight.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, kOp, ": x must be 2-D (rows, in_features), got ", x.dim(), " dims");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == x.size(1), kOp,
                    ": weight must be (out_features, in_features = ", x.size(1), "), got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) >= 1 && weight.size(0) <= kMaxOut, kOp, ": weight must have 1 to ", kMaxOut,
                    " rows (out_features), got ", weight.size(0));
  if (bias.has_value() && bias->defined())
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type() && bias->device().is_cpu() && bias->dim() == 1 &&
                          bias->size(0) == weight.size(0),
                      kOp, ": bias must be a 1-D CPU tensor of ", weight.size(0), " ", x.scalar_type(), ", got ",
                      bias->sizes(), " ", bias->scalar_type());
}

// y = x W^T + b on the loops (x, weight and b contiguous).
at::Tensor loops_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& b) {
  const int64_t N = x.size(0), K = x.size(1), O = weight.size(0);
  at::Tensor y = at::empty({N, O}, x.options());
  if (N == 0) return y;
#if SK_HAVE_AVX512
  if (runs_wide(x)) {
    const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
    const float* bp = b.defined() ? b.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, K * O)),
                     [&](int64_t r0, int64_t r1) { forward_wide(xp, wp, bp, yp, K, O, r0, r1); });
    return y;
  }
#endif
  at::parallel_for(0, N, std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, K * O)), [&](int64_t r0, int64_t r1) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_narrow_linear", [&] {
      forward_loops(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), b.defined() ? b.data_ptr<scalar_t>() : nullptr,
                    y.data_ptr<scalar_t>(), K, O, r0, r1);
    });
  });
  return y;
}

// The gradients on the loops (grad, x and weight contiguous).
std::tuple<at::Tensor, at::Tensor, at::Tensor> loops_backward(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& weight, std::array<bool, 3> mask) {
  const int64_t N = x.size(0), K = x.size(1), O = weight.size(0);
  at::Tensor dx = mask[0] ? at::empty({N, K}, x.options()) : at::Tensor();
  at::Tensor dw = mask[1] ? at::empty({O, K}, x.options()) : at::Tensor();
  at::Tensor db = mask[2] ? at::sum(grad, 0) : at::Tensor();
  if (dx.defined() && N > 0)
    at::parallel_for(0, N, std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, K * O)), [&](int64_t r0, int64_t r1) {
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_narrow_linear", [&] {
        input_grad(grad.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), K, O, r0, r1);
      });
    });
  if (dw.defined()) {
#if SK_HAVE_AVX512
    if (runs_wide(x)) {
      const float *xp = x.data_ptr<float>(), *gp = grad.data_ptr<float>();
      float* wp = dw.data_ptr<float>();
      const int64_t pieces = K / kWidePiece;
      const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, N * O * kWidePiece));
      if (pieces == 0) weight_grad_wide(xp, gp, wp, N, K, O, 0, 0);
      else
        at::parallel_for(0, pieces, grain,
                         [&](int64_t p0, int64_t p1) { weight_grad_wide(xp, gp, wp, N, K, O, p0, p1); });
      return {dx, dw, db};
    }
#endif
    const int64_t pieces = K / (2 * (32 / int64_t(x.element_size())));
    const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, N * O * 2 * 32 / x.element_size()));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "_narrow_linear", [&] {
      const scalar_t *xp = x.data_ptr<scalar_t>(), *gp = grad.data_ptr<scalar_t>();
      scalar_t* wp = dw.data_ptr<scalar_t>();
      if (pieces == 0) return weight_grad(xp, gp, wp, N, K, O, 0, 0);
      at::parallel_for(0, pieces, grain, [&](int64_t p0, int64_t p1) { weight_grad(xp, gp, wp, N, K, O, p0, p1); });
    });
  }
  return {dx, dw, db};
}

// Whether MKL's GEMMs ran a product faster than the loops for this key (product_choice::measured_faster: never
// under deterministic algorithms), or what product_choice::mode() forces: the loops under 3, the GEMMs under 1 and
// 2.
template <typename A, typename B>
bool gemm_is_faster(const product_choice::Key& key, A&& loops, B&& gemm) {
  if (const int64_t forced = product_choice::mode().load()) return forced != 3;
  return product_choice::measured_faster(key, [&] { (void)loops(); }, [&] { (void)gemm(); });
}

}  // namespace

namespace narrow {

at::Tensor forward(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias) {
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous();
  const at::Tensor b = bias.defined() ? bias.contiguous() : at::Tensor();
  auto loops = [&] { return loops_forward(x, weight, b); };
  auto gemm = [&] { return product_choice::few_outputs_forward(x, weight, b); };
  return gemm_is_faster(product_choice::linear_key(product_choice::kNarrowForward, x, weight.size(0)), loops, gemm)
             ? gemm()
             : loops();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                        const at::Tensor& weight_in, std::array<bool, 3> mask) {
  const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), grad = grad_in.contiguous();
  auto loops = [&] { return loops_backward(grad, x, weight, mask); };
  auto gemm = [&] {
    return std::make_tuple(mask[0] ? at::mm(grad, weight) : at::Tensor(),
                           mask[1] ? product_choice::linear_weight_grad(grad, x) : at::Tensor(),
                           mask[2] ? at::sum(grad, 0) : at::Tensor());
  };
  const auto key =
      product_choice::linear_key(product_choice::kNarrowBackward, x, weight.size(0), grad, mask[0] + 2 * mask[1]);
  return (mask[0] || mask[1]) && gemm_is_faster(key, loops, gemm) ? gemm() : loops();
}

}  // namespace narrow

namespace {

at::Tensor narrow_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  check_args(x, weight, bias);
  return narrow::forward(x, weight, bias.has_value() ? *bias : at::Tensor());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> narrow_backward(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& weight, std::array<bool, 3> mask) {
  check_args(x, weight, c10::nullopt);
  const int64_t N = x.size(0), O = weight.size(0);
  TORCH_CHECK_VALUE(grad.scalar_type() == x.scalar_type() && grad.device().is_cpu() &&
                        grad.sizes() == at::IntArrayRef({N, O}),
                    kOp, "_backward: grad must be a CPU ", x.scalar_type(), " tensor of (", N, ", ", O,
                    "), the output's shape, got ", grad.sizes());
  return narrow::backward(grad, x, weight, mask);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct NarrowLinear : public torch::autograd::Function<NarrowLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = narrow_forward(x, weight, bias);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["bias"] = bias.has_value() && bias->defined();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &grad = grads[0];
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      ctx->saved_data["bias"].toBool() && ctx->needs_input_grad(2)};
    if (!grad.defined()) return {at::Tensor(), at::Tensor(), at::Tensor()};
    if (torch::autograd::GradMode::is_enabled())  // create_graph: ATen's products, whose derivatives give the second
      return {mask[0] ? at::mm(grad, weight) : at::Tensor(), mask[1] ? at::mm(grad.t(), x) : at::Tensor(),
              mask[2] ? at::sum(grad, 0) : at::Tensor()};
    auto [dx, dw, db] = narrow_backward(grad, x, weight, mask);
    return {dx, dw, db};
  }
};

at::Tensor narrow_autograd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  return NarrowLinear::apply(x, weight, bias);
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  // Private (sparsekern/nn/fast_modules.py, the full-pattern route of a sparse linear): y = x @ weight^T + bias for
  // a 2-D float32/float64 x and a weight of 1 to 16 rows.
  m.def("_narrow_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // Its backward: (dx, dweight, dbias), those output_mask asks for.
  m.def("_narrow_linear_backward(Tensor grad, Tensor x, Tensor weight, bool[3] output_mask) -> (Tensor, Tensor, "
        "Tensor)");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("_narrow_linear", &sparsekern::narrow_forward);
  m.impl("_narrow_linear_backward", &sparsekern::narrow_backward);
}
TORCH_LIBRARY_IMPL(sparsekern, Autograd, m) { m.impl("_narrow_linear", &sparsekern::narrow_autograd); }
