// GCC-vector helpers shared by the CPU kernels: loads, stores and broadcasts on 32- or 64-byte
// vectors, register transposes and lane reductions. Everything is always_inline, so each helper
// takes the target of the function it is inlined into (SK_CLONED or SK_AVX512, see common.h).
// A kernel written with explicit mul+add on these vectors wants `#pragma GCC optimize("fp-contract=fast")`
// after its includes: ISO -std=c++20 otherwise keeps the multiply and the add apart (no FMA).
#pragma once
// 32- and 64-byte vector types appear in always_inline helpers (here and in bf16.h) that the baseline
// clone inlines too: their ABI note does not apply. Set before the includes: a file that gets bf16.h
// through this header compiles without -Wpsabi notes.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "cpu/bf16.h"
#include "cpu/common.h"

namespace sparsekern {
namespace simd {

// 32-byte GCC vectors: one AVX2 register (two SSE registers in the baseline clone). The hot
// loops also take W = 64 (one zmm register), only inside SK_AVX512 functions.
typedef float vf __attribute__((vector_size(32)));
typedef double vd __attribute__((vector_size(32)));
typedef int32_t vi32 __attribute__((vector_size(32)));
typedef int64_t vi64 __attribute__((vector_size(32)));

template <int N> struct IntOf;
template <> struct IntOf<4> { using type = int32_t; };
template <> struct IntOf<8> { using type = int64_t; };

template <typename S, int W = 32> struct Vec {
  typedef S v __attribute__((vector_size(W)));
  typedef S vu __attribute__((vector_size(W), aligned(sizeof(S)), __may_alias__));
  typedef typename IntOf<sizeof(S)>::type vi __attribute__((vector_size(W)));
  static constexpr int L = W / sizeof(S);
};

// 64-byte vectors are passed by reference: by value they would change the ABI of these helpers.
template <int W = 32, typename S> SK_INLINE typename Vec<S, W>::v vload(const S* p) {
  return *(const typename Vec<S, W>::vu*)p;
}
template <int W = 32, typename S> SK_INLINE void vstore(S* p, const typename Vec<S, W>::v& x) {
  *(typename Vec<S, W>::vu*)p = x;
}
template <int W = 32, typename S> SK_INLINE typename Vec<S, W>::v vsplat(S s) {
  return __builtin_shuffle(typename Vec<S, W>::v{s}, typename Vec<S, W>::vi{});
}
// A W-byte vector folded to 32 bytes (lane l + lane l + L/2 ...): what the 32-byte reductions take.
template <int W, typename S> SK_INLINE typename Vec<S>::v fold(const typename Vec<S, W>::v& a) {
  if constexpr (W == 32) {
    return a;
  } else {
    static_assert(W == 64, "fold: 32- or 64-byte vectors");
    typename Vec<S>::v lo, hi;
    std::memcpy(&lo, &a, 32);
    std::memcpy(&hi, reinterpret_cast<const char*>(&a) + 32, 32);
    return lo + hi;
  }
}

// L contiguous elements as one vector of the compute type (bf16 is widened to float32).
SK_INLINE vf vload_wide(const float* p) { return vload(p); }
SK_INLINE vd vload_wide(const double* p) { return vload(p); }
SK_INLINE vf vload_wide(const c10::BFloat16* p) { return bf16::load8(p); }

// dst[r * ldd + c] = lane r of row c, for eight rows of eight floats held in registers (a register transpose).
SK_INLINE void transpose_rows(const vf& r0, const vf& r1, const vf& r2, const vf& r3, const vf& r4, const vf& r5,
                              const vf& r6, const vf& r7, float* dst, int64_t ldd) {
  const vi32 lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
  const vf t0 = __builtin_shuffle(r0, r1, lo), t1 = __builtin_shuffle(r0, r1, hi);
  const vf t2 = __builtin_shuffle(r2, r3, lo), t3 = __builtin_shuffle(r2, r3, hi);
  const vf t4 = __builtin_shuffle(r4, r5, lo), t5 = __builtin_shuffle(r4, r5, hi);
  const vf t6 = __builtin_shuffle(r6, r7, lo), t7 = __builtin_shuffle(r6, r7, hi);
  const vi32 a = {0, 1, 8, 9, 4, 5, 12, 13}, b = {2, 3, 10, 11, 6, 7, 14, 15};
  const vf u0 = __builtin_shuffle(t0, t2, a), u1 = __builtin_shuffle(t0, t2, b);
  const vf u2 = __builtin_shuffle(t1, t3, a), u3 = __builtin_shuffle(t1, t3, b);
  const vf u4 = __builtin_shuffle(t4, t6, a), u5 = __builtin_shuffle(t4, t6, b);
  const vf u6 = __builtin_shuffle(t5, t7, a), u7 = __builtin_shuffle(t5, t7, b);
  const vi32 l = {0, 1, 2, 3, 8, 9, 10, 11}, h = {4, 5, 6, 7, 12, 13, 14, 15};
  vstore(dst, __builtin_shuffle(u0, u4, l));
  vstore(dst + ldd, __builtin_shuffle(u1, u5, l));
  vstore(dst + 2 * ldd, __builtin_shuffle(u2, u6, l));
  vstore(dst + 3 * ldd, __builtin_shuffle(u3, u7, l));
  vstore(dst + 4 * ldd, __builtin_shuffle(u0, u4, h));
  vstore(dst + 5 * ldd, __builtin_shuffle(u1, u5, h));
  vstore(dst + 6 * ldd, __builtin_shuffle(u2, u6, h));
  vstore(dst + 7 * ldd, __builtin_shuffle(u3, u7, h));
}
// dst[r * ldd + c] = src[c * lds + r] for an L x L block (register transpose); a bf16 source is widened.
template <typename I>
SK_INLINE void transpose_block(const I* src, int64_t lds, float* dst, int64_t ldd) {
  transpose_rows(vload_wide(src), vload_wide(src + lds), vload_wide(src + 2 * lds), vload_wide(src + 3 * lds),
                 vload_wide(src + 4 * lds), vload_wide(src + 5 * lds), vload_wide(src + 6 * lds),
                 vload_wide(src + 7 * lds), dst, ldd);
}
// The same for a 16 x 16 float block on 64-byte vectors (SK_AVX512 functions only): every row of dst is one
// full 64-byte store.
SK_INLINE void transpose_block16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  using v = Vec<float, 64>::v;
  using vi = Vec<float, 64>::vi;
  v r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = vload<64>(src + i * lds);
  // A stage pairs row i with row i + d within each group of 2d rows: out[i] takes `lo` of the pair, out[i + d] `hi`.
  const auto stage = [](const v* in, v* out, int d, const vi& lo, const vi& hi) __attribute__((always_inline)) {
    for (int g = 0; g < 16; g += 2 * d)
      for (int i = g; i < g + d; ++i)
        out[i] = __builtin_shuffle(in[i], in[i + d], lo), out[i + d] = __builtin_shuffle(in[i], in[i + d], hi);
  };
  // Interleave pairs of rows, then pairs of pairs (as the 8 x 8 transpose, within each 128-bit lane), then 128-bit
  // lanes across groups of four rows, then 256-bit halves across groups of eight.
  stage(r, t, 1, vi{0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12, 28, 13, 29},
        vi{2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11, 27, 14, 30, 15, 31});
  stage(t, r, 2, vi{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
        vi{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  stage(r, t, 4, vi{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
        vi{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  stage(t, r, 8, vi{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
        vi{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  // r[q] now holds column col[q] of the block (the lane stages swap the middle two of each four).
  static constexpr int col[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
  for (int q = 0; q < 16; ++q) vstore<64>(dst + col[q] * ldd, r[q]);
}

SK_INLINE void transpose_block(const double* src, int64_t lds, double* dst, int64_t ldd) {
  const vd r0 = vload(src), r1 = vload(src + lds), r2 = vload(src + 2 * lds), r3 = vload(src + 3 * lds);
  const vi64 lo = {0, 4, 2, 6}, hi = {1, 5, 3, 7};
  const vd t0 = __builtin_shuffle(r0, r1, lo), t1 = __builtin_shuffle(r0, r1, hi);
  const vd t2 = __builtin_shuffle(r2, r3, lo), t3 = __builtin_shuffle(r2, r3, hi);
  const vi64 l = {0, 1, 4, 5}, h = {2, 3, 6, 7};
  vstore(dst, __builtin_shuffle(t0, t2, l));
  vstore(dst + ldd, __builtin_shuffle(t1, t3, l));
  vstore(dst + 2 * ldd, __builtin_shuffle(t0, t2, h));
  vstore(dst + 3 * ldd, __builtin_shuffle(t1, t3, h));
}

// Horizontal sums of L accumulators: result[q] = sum of the lanes of a[q].
SK_INLINE vf reduce_lanes(const vf* a) {
  const vi32 e = {0, 8, 2, 10, 4, 12, 6, 14}, o = {1, 9, 3, 11, 5, 13, 7, 15};
  const vf x = __builtin_shuffle(a[0], a[1], e) + __builtin_shuffle(a[0], a[1], o);
  const vf y = __builtin_shuffle(a[2], a[3], e) + __builtin_shuffle(a[2], a[3], o);
  const vf z = __builtin_shuffle(a[4], a[5], e) + __builtin_shuffle(a[4], a[5], o);
  const vf w = __builtin_shuffle(a[6], a[7], e) + __builtin_shuffle(a[6], a[7], o);
  const vi32 p = {0, 1, 8, 9, 4, 5, 12, 13}, q = {2, 3, 10, 11, 6, 7, 14, 15};
  const vf u = __builtin_shuffle(x, y, p) + __builtin_shuffle(x, y, q);
  const vf v = __builtin_shuffle(z, w, p) + __builtin_shuffle(z, w, q);
  const vi32 l = {0, 1, 2, 3, 8, 9, 10, 11}, h = {4, 5, 6, 7, 12, 13, 14, 15};
  return __builtin_shuffle(u, v, l) + __builtin_shuffle(u, v, h);
}
SK_INLINE vd reduce_lanes(const vd* a) {
  const vi64 e = {0, 4, 2, 6}, o = {1, 5, 3, 7};
  const vd x = __builtin_shuffle(a[0], a[1], e) + __builtin_shuffle(a[0], a[1], o);
  const vd y = __builtin_shuffle(a[2], a[3], e) + __builtin_shuffle(a[2], a[3], o);
  const vi64 l = {0, 1, 4, 5}, h = {2, 3, 6, 7};
  return __builtin_shuffle(x, y, l) + __builtin_shuffle(x, y, h);
}

// Horizontal sums of 4 accumulators: lanes 0..3 of the result are the lane sums of a[0..3] (float32:
// lanes 4..7 unspecified). For reductions that come four at a time (sparse_conv2d's weight gradient).
SK_INLINE vf reduce_lanes4(const vf* a) {
  const vi32 e = {0, 8, 2, 10, 4, 12, 6, 14}, o = {1, 9, 3, 11, 5, 13, 7, 15};
  const vf x = __builtin_shuffle(a[0], a[1], e) + __builtin_shuffle(a[0], a[1], o);
  const vf y = __builtin_shuffle(a[2], a[3], e) + __builtin_shuffle(a[2], a[3], o);
  const vi32 p = {0, 1, 8, 9, 4, 5, 12, 13}, q = {2, 3, 10, 11, 6, 7, 14, 15};
  const vf u = __builtin_shuffle(x, y, p) + __builtin_shuffle(x, y, q);
  const vi32 swap = {4, 5, 6, 7, 0, 1, 2, 3};
  return u + __builtin_shuffle(u, swap);
}
SK_INLINE vd reduce_lanes4(const vd* a) { return reduce_lanes(a); }

// The sum of one vector's lanes, in lane order (as a scalar loop would add them).
template <typename V> SK_INLINE auto lane_sum(const V& v) {
  constexpr int L = sizeof(V) / sizeof(v[0]);
  auto sum = v[0];
#pragma GCC unroll 16
  for (int l = 1; l < L; ++l) sum += v[l];
  return sum;
}

// The sum of one 32-byte vector's lanes as a tree (halves, then quarters, ...): shorter latency than
// lane_sum, in another order.
SK_INLINE float tree_sum(const vf& v) {
  const vf a = v + __builtin_shuffle(v, vi32{4, 5, 6, 7, 0, 1, 2, 3});
  const vf b = a + __builtin_shuffle(a, vi32{2, 3, 0, 1, 6, 7, 4, 5});
  return b[0] + b[1];
}
SK_INLINE double tree_sum(const vd& v) {
  const vd a = v + __builtin_shuffle(v, vi64{2, 3, 0, 1});
  return a[0] + a[1];
}

}  // namespace simd
}  // namespace sparsekern
