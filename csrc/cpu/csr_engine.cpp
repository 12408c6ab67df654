// The CSR tile engine: see csr_engine.h for the design.
#include "cpu/csr_engine.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/bf16.h"
#include "cpu/common.h"

#include <torch/library.h>

// The kernels below are written with explicit mul+add on GCC vectors; allow the
// compiler to fuse them into FMAs (ISO -std=c++20 otherwise turns contraction off).
#pragma GCC optimize("fp-contract=fast")
// 64-byte vector types appear in always_inline templates that only SK_AVX512 functions instantiate.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace sparsekern {
namespace csr {
namespace {

// ---------------------------------------------------------------------------
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

// dst[r * ldd + c] = src[c * lds + r] for an L x L block (register transpose); a bf16 source is widened.
template <typename I>
SK_INLINE void transpose_block(const I* src, int64_t lds, float* dst, int64_t ldd) {
  const vf r0 = vload_wide(src), r1 = vload_wide(src + lds), r2 = vload_wide(src + 2 * lds);
  const vf r3 = vload_wide(src + 3 * lds), r4 = vload_wide(src + 4 * lds), r5 = vload_wide(src + 5 * lds);
  const vf r6 = vload_wide(src + 6 * lds), r7 = vload_wide(src + 7 * lds);
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

// ---------------------------------------------------------------------------
// Packing: dst (rows j0..j1 of a k x T tile) = src[j, b0 + c] for c < nc, 0 for nc <= c < T.
// src is a strided (rows, cols) view: element (j, c) at base[j * s0 + c * s1]. A bf16 source is
// widened to float32 here, so the SpMM/SDDMM loops run on float32 tiles.
template <typename I, typename S = typename bf16::Acc<I>::type>
SK_INLINE void pack_impl(S* dst, int64_t T, const I* base, int64_t s0, int64_t s1, int64_t j0, int64_t j1,
                         int64_t b0, int64_t nc) {
  constexpr int L = Vec<S>::L;
  if (s1 == 1) {
    for (int64_t j = j0; j < j1; ++j) {
      const I* s = base + j * s0 + b0;
      S* d = dst + j * T;
      int64_t c = 0;
      for (; c + L <= nc; c += L) vstore(d + c, vload_wide(s + c));
      for (; c < nc; ++c) d[c] = bf16::widen(s[c]);
      for (; c < T; ++c) d[c] = S(0);
    }
    return;
  }
  if (s0 == 1) {
    // Column-major source: L x L register transposes; rows of src are read contiguously.
    const int64_t cfull = nc / L * L;
    int64_t j = j0;
    for (; j + L <= j1; j += L) {
      for (int64_t c = 0; c < cfull; c += L) transpose_block(base + j + (b0 + c) * s1, s1, dst + j * T + c, T);
      for (int64_t r = 0; r < L; ++r) {
        S* d = dst + (j + r) * T;
        for (int64_t c = cfull; c < nc; ++c) d[c] = bf16::widen(base[(j + r) + (b0 + c) * s1]);
        for (int64_t c = nc; c < T; ++c) d[c] = S(0);
      }
    }
    for (; j < j1; ++j) {
      S* d = dst + j * T;
      for (int64_t c = 0; c < nc; ++c) d[c] = bf16::widen(base[j + (b0 + c) * s1]);
      for (int64_t c = nc; c < T; ++c) d[c] = S(0);
    }
    return;
  }
  for (int64_t j = j0; j < j1; ++j) {
    S* d = dst + j * T;
    for (int64_t c = 0; c < nc; ++c) d[c] = bf16::widen(base[j * s0 + (b0 + c) * s1]);
    for (int64_t c = nc; c < T; ++c) d[c] = S(0);
  }
}

SK_CLONES void pack_f32(float* dst, int64_t T, const float* base, int64_t s0, int64_t s1, int64_t j0, int64_t j1,
                        int64_t b0, int64_t nc) {
  pack_impl<float>(dst, T, base, s0, s1, j0, j1, b0, nc);
}
SK_CLONES void pack_f64(double* dst, int64_t T, const double* base, int64_t s0, int64_t s1, int64_t j0, int64_t j1,
                        int64_t b0, int64_t nc) {
  pack_impl<double>(dst, T, base, s0, s1, j0, j1, b0, nc);
}
SK_CLONES void pack_bf16(float* dst, int64_t T, const c10::BFloat16* base, int64_t s0, int64_t s1, int64_t j0,
                         int64_t j1, int64_t b0, int64_t nc) {
  pack_impl<c10::BFloat16>(dst, T, base, s0, s1, j0, j1, b0, nc);
}
inline void pack(float* d, int64_t T, const float* b, int64_t s0, int64_t s1, int64_t j0, int64_t j1, int64_t b0,
                 int64_t nc) {
  pack_f32(d, T, b, s0, s1, j0, j1, b0, nc);
}
inline void pack(double* d, int64_t T, const double* b, int64_t s0, int64_t s1, int64_t j0, int64_t j1, int64_t b0,
                 int64_t nc) {
  pack_f64(d, T, b, s0, s1, j0, j1, b0, nc);
}
inline void pack(float* d, int64_t T, const c10::BFloat16* b, int64_t s0, int64_t s1, int64_t j0, int64_t j1,
                 int64_t b0, int64_t nc) {
  pack_bf16(d, T, b, s0, s1, j0, j1, b0, nc);
}

// ---------------------------------------------------------------------------
// SpMM core: rows r0..r1 of out[:, b0:b0+nc] from one packed tile Bp (k x T). S is the compute
// type (vals, Bp, bias), O the output's (bf16 output: S = float, rounded on store).
template <typename S, typename O = S> struct SpmmJob {
  const S* vals;
  const int64_t* rp;
  const int32_t* ci;
  const S* Bp;  // packed tile, k x T
  O* out;
  int64_t os0, os1;
  int64_t b0, nc;
  const S* bias;  // per row, or nullptr
  int64_t last;   // nnz - 1 (prefetch clamp)
};

// Software prefetch distance (nonzeros) for the packed rows the SpMM loop will read.
constexpr int64_t PREFETCH = 16;
// Rows per chunk: results of a chunk are buffered (L1), then stored (transposed if needed).
constexpr int64_t CHUNK = 64;

// Write a group of rows (buf: rows x T) into out[g0:g0+rows, b0:b0+nc].
template <typename S, int T>
SK_INLINE void store_group(const SpmmJob<S>& J, const S* buf, int64_t g0, int64_t rows) {
  constexpr int L = Vec<S>::L;
  const int64_t nc = J.nc;
  if (J.os1 == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      S* o = J.out + (g0 + r) * J.os0 + J.b0;
      const S* s = buf + r * T;
      if (nc == T) {
        for (int q = 0; q < T; q += L) vstore(o + q, vload(s + q));
      } else {
        for (int64_t c = 0; c < nc; ++c) o[c] = s[c];
      }
    }
  } else if (J.os0 == 1 && rows == L) {
    S* o = J.out + g0 + J.b0 * J.os1;
    const int64_t cfull = nc / L * L;
    for (int64_t c = 0; c < cfull; c += L) transpose_block(buf + c, T, o + c * J.os1, J.os1);
    for (int64_t c = cfull; c < nc; ++c)
      for (int r = 0; r < L; ++r) o[c * J.os1 + r] = buf[r * T + c];
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < nc; ++c) J.out[(g0 + r) * J.os0 + (J.b0 + c) * J.os1] = buf[r * T + c];
  }
}

// The same for a bf16 output: each float32 result rounded once.
template <typename S, int T>
SK_INLINE void store_group(const SpmmJob<S, c10::BFloat16>& J, const S* buf, int64_t g0, int64_t rows) {
  constexpr int L = Vec<S>::L;
  const int64_t nc = J.nc;
  if (J.os1 == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      c10::BFloat16* o = J.out + (g0 + r) * J.os0 + J.b0;
      const S* s = buf + r * T;
      int64_t c = 0;
      for (; c + L <= nc; c += L) bf16::store8(o + c, vload(s + c));
      for (; c < nc; ++c) o[c] = bf16::from_f32(s[c]);
    }
  } else if (J.os0 == 1 && rows == L) {
    c10::BFloat16* o = J.out + g0 + J.b0 * J.os1;
    const int64_t cfull = nc / L * L;
    alignas(32) S t[L * L];
    for (int64_t c = 0; c < cfull; c += L) {
      transpose_block(buf + c, T, t, L);
      for (int q = 0; q < L; ++q) bf16::store8(o + (c + q) * J.os1, vload(t + q * L));
    }
    for (int64_t c = cfull; c < nc; ++c)
      for (int r = 0; r < L; ++r) o[c * J.os1 + r] = bf16::from_f32(buf[r * T + c]);
  } else {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < nc; ++c)
        J.out[(g0 + r) * J.os0 + (J.b0 + c) * J.os1] = bf16::from_f32(buf[r * T + c]);
  }
}

// NV vectors of W bytes per packed row (T = NV * L elements); W = 64 only in SK_AVX512 functions.
template <typename S, int NV, typename O = S, int W = 32>
SK_INLINE void spmm_rows_impl(const SpmmJob<S, O>& J, int64_t r0, int64_t r1) {
  using v = typename Vec<S, W>::v;
  constexpr int L = Vec<S, W>::L, T = NV * L;
  constexpr int G = Vec<S>::L;  // rows per stored group: the 32-byte register transpose
  // Independent accumulator sets so that FMA latency is hidden (8 chains in flight).
  constexpr int SETS = NV >= 8 ? 1 : (NV >= 4 ? 2 : 4);
  alignas(64) S cbuf[CHUNK * T];
  const S* __restrict vals = J.vals;
  const int32_t* __restrict ci = J.ci;
  const S* __restrict Bp = J.Bp;
  const int64_t last = J.last;
  for (int64_t c0 = r0; c0 < r1; c0 += CHUNK) {
    const int64_t c1 = std::min(c0 + CHUNK, r1);
    for (int64_t i = c0; i < c1; ++i) {
      v acc[SETS][NV];
      const v init = vsplat<W>(J.bias ? J.bias[i] : S(0));
      for (int q = 0; q < NV; ++q) acc[0][q] = init;
      for (int s = 1; s < SETS; ++s)
        for (int q = 0; q < NV; ++q) acc[s][q] = v{};
      int64_t p = J.rp[i];
      const int64_t e = J.rp[i + 1];
      for (; p + SETS <= e; p += SETS) {
        for (int s = 0; s < SETS; ++s) {
          // The packed rows are L2-resident but randomly addressed: prefetch them into L1.
          const S* pf = Bp + (int64_t)ci[std::min(p + s + PREFETCH, last)] * T;
          for (int c = 0; c < T * (int)sizeof(S); c += 64) __builtin_prefetch((const char*)pf + c);
        }
        for (int s = 0; s < SETS; ++s) {
          const v w = vsplat<W>(vals[p + s]);
          const S* bq = Bp + (int64_t)ci[p + s] * T;
          for (int q = 0; q < NV; ++q) acc[s][q] += w * vload<W>(bq + q * L);
        }
      }
      for (; p < e; ++p) {
        const v w = vsplat<W>(vals[p]);
        const S* bq = Bp + (int64_t)ci[p] * T;
        for (int q = 0; q < NV; ++q) acc[0][q] += w * vload<W>(bq + q * L);
      }
      for (int s = 1; s < SETS; ++s)
        for (int q = 0; q < NV; ++q) acc[0][q] += acc[s][q];
      for (int q = 0; q < NV; ++q) vstore<W>(cbuf + (i - c0) * T + q * L, acc[0][q]);
    }
    for (int64_t g0 = c0; g0 < c1; g0 += G)
      store_group<S, T>(J, cbuf + (g0 - c0) * T, g0, std::min<int64_t>(G, c1 - g0));
  }
}

// The instances of a core (spmm, sddmm): per compute type S and element type I, the 32-byte
// loops at 1, 2, 4 vectors per tile row (target_clones), the 64-byte loops at 1, 2 (SK_AVX512),
// and CORE_rows(tile_bytes, wide, job, r0, r1), which picks one. Tiles of 32 bytes always run the
// 32-byte loop, so both widths read the same packed tiles.
#define SK_ROWS_CLONE(CORE, JOB, S, I, NAME, NV)                                           \
  SK_CLONES void CORE##_rows_##NAME##_##NV(const JOB<S, I>& J, int64_t r0, int64_t r1) { \
    CORE##_rows_impl<S, NV, I>(J, r0, r1);                                                 \
  }
#if SK_HAVE_AVX512
#define SK_ROWS_WIDE(CORE, JOB, S, I, NAME, NV)                                             \
  SK_AVX512 void CORE##_rows_##NAME##_w##NV(const JOB<S, I>& J, int64_t r0, int64_t r1) { \
    CORE##_rows_impl<S, NV, I, 64>(J, r0, r1);                                              \
  }
#define SK_ROWS_WIDE_TYPE(CORE, JOB, S, I, NAME) \
  SK_ROWS_WIDE(CORE, JOB, S, I, NAME, 1)         \
  SK_ROWS_WIDE(CORE, JOB, S, I, NAME, 2)
#define SK_ROWS_WIDE_PICK(CORE, NAME)                                                      \
  if (wide && tile_bytes >= 64)                                                            \
    return tile_bytes == 64 ? CORE##_rows_##NAME##_w1(J, r0, r1) : CORE##_rows_##NAME##_w2(J, r0, r1);
#else
#define SK_ROWS_WIDE_TYPE(CORE, JOB, S, I, NAME)
#define SK_ROWS_WIDE_PICK(CORE, NAME)
#endif
#define SK_ROWS_TYPE(CORE, JOB, S, I, NAME)                                                        \
  SK_ROWS_CLONE(CORE, JOB, S, I, NAME, 1)                                                          \
  SK_ROWS_CLONE(CORE, JOB, S, I, NAME, 2)                                                          \
  SK_ROWS_CLONE(CORE, JOB, S, I, NAME, 4)                                                          \
  SK_ROWS_WIDE_TYPE(CORE, JOB, S, I, NAME)                                                         \
  inline void CORE##_rows(int tile_bytes, bool wide, const JOB<S, I>& J, int64_t r0, int64_t r1) { \
    SK_ROWS_WIDE_PICK(CORE, NAME)                                                                  \
    switch (tile_bytes) {                                                                          \
      case 32: return CORE##_rows_##NAME##_1(J, r0, r1);                                           \
      case 64: return CORE##_rows_##NAME##_2(J, r0, r1);                                           \
      default: return CORE##_rows_##NAME##_4(J, r0, r1);                                           \
    }                                                                                              \
  }
#define SK_ROWS_CLONES(CORE, JOB)                   \
  SK_ROWS_TYPE(CORE, JOB, float, float, f32)        \
  SK_ROWS_TYPE(CORE, JOB, double, double, f64)      \
  SK_ROWS_TYPE(CORE, JOB, float, c10::BFloat16, bf16)
SK_ROWS_CLONES(spmm, SpmmJob)

// ---------------------------------------------------------------------------
// SDDMM core: vals[p] (+)= dot(X[i, b0:b0+nc], Y[j, b0:b0+nc]) for rows r0..r1, Y packed (k x T).
// X is read in its own type XI (bf16: widened as its rows are gathered; vals stay float32).
template <typename S, typename XI = S> struct SddmmJob {
  const int64_t* rp;
  const int32_t* ci;
  const XI* X;
  int64_t xs0, xs1;
  const S* Yp;
  int64_t b0, nc;
  S* vals;
  bool first;    // first tile: store, else accumulate
  int64_t last;  // nnz - 1 (prefetch clamp)
};

// G = 32-byte lanes nonzeros at a time: G dot products of NV W-byte vectors, each folded to 32
// bytes, reduced together by one 32-byte transpose-add.
template <typename S, int NV, int W = 32>
SK_INLINE void sddmm_chunk(const typename Vec<S, W>::v* x, const S* __restrict Yp, const int32_t* j, int cnt, S* out,
                           bool first, int64_t ahead) {
  using v = typename Vec<S>::v;
  constexpr int L = Vec<S, W>::L, T = NV * L, G = Vec<S>::L;
  // Prefetch the packed rows of the chunk after next (L2-resident, randomly addressed) into L1.
  for (int q = 0; q < G; ++q) {
    const S* pf = Yp + (int64_t)j[std::min<int64_t>(2 * G + q, ahead)] * T;
    for (int c = 0; c < T * (int)sizeof(S); c += 64) __builtin_prefetch((const char*)pf + c);
  }
  v acc[G];
  for (int q = 0; q < G; ++q) {
    const S* y = Yp + (int64_t)j[q < cnt ? q : cnt - 1] * T;
    typename Vec<S, W>::v a = x[0] * vload<W>(y);
    for (int u = 1; u < NV; ++u) a += x[u] * vload<W>(y + u * L);
    acc[q] = fold<W, S>(a);
  }
  const v s = reduce_lanes(acc);
  if (cnt == G) {
    vstore(out, first ? s : vload(out) + s);
  } else {
    for (int q = 0; q < cnt; ++q) out[q] = first ? s[q] : out[q] + s[q];
  }
}

template <typename S, int NV, typename XI = S, int W = 32>
SK_INLINE void sddmm_rows_impl(const SddmmJob<S, XI>& J, int64_t r0, int64_t r1) {
  using v = typename Vec<S, W>::v;
  constexpr int L = Vec<S, W>::L, T = NV * L;
  constexpr int G = Vec<S>::L;  // rows per gathered group, nonzeros per chunk (32-byte transposes)
  alignas(64) S buf[G * T];
  const bool direct = std::is_same<XI, S>::value && J.xs1 == 1 && J.nc == T;
  const int32_t* __restrict ci = J.ci;
  const int64_t nc = J.nc;
  for (int64_t g0 = r0; g0 < r1; g0 += G) {
    const int64_t rows = std::min<int64_t>(G, r1 - g0);
    if (!direct) {
      // Gather X[g0:g0+rows, b0:b0+nc] into buf (zero-padded to T columns).
      if (J.xs0 == 1 && rows == G) {
        const int64_t cfull = nc / G * G;
        const XI* src = J.X + g0 + J.b0 * J.xs1;
        for (int64_t c = 0; c < cfull; c += G) transpose_block(src + c * J.xs1, J.xs1, buf + c, T);
        for (int r = 0; r < G; ++r)
          for (int64_t c = cfull; c < T; ++c) buf[r * T + c] = c < nc ? bf16::widen(src[r + c * J.xs1]) : S(0);
      } else {
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < T; ++c)
            buf[r * T + c] = c < nc ? bf16::widen(J.X[(g0 + r) * J.xs0 + (J.b0 + c) * J.xs1]) : S(0);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = g0 + r;
      int64_t p = J.rp[i];
      const int64_t e = J.rp[i + 1];
      if (p == e) continue;
      const S* xr = direct ? reinterpret_cast<const S*>(J.X + i * J.xs0 + J.b0) : buf + r * T;
      v x[NV];
      for (int u = 0; u < NV; ++u) x[u] = vload<W>(xr + u * L);
      for (; p + G <= e; p += G) sddmm_chunk<S, NV, W>(x, J.Yp, ci + p, G, J.vals + p, J.first, J.last - p);
      if (p < e) sddmm_chunk<S, NV, W>(x, J.Yp, ci + p, (int)(e - p), J.vals + p, J.first, J.last - p);
    }
  }
}

SK_ROWS_CLONES(sddmm, SddmmJob)

// ---------------------------------------------------------------------------
// Helpers shared by both cores.

// Tile width in bytes for a batch of n columns: 128-byte tiles (a k x T tile of a 4096-column
// weight is 512 KB, the L2 of a Zen3 core), narrower for small batches. The same for both ISAs.
int tile_bytes(int64_t n, int64_t elem_size) {
  const int64_t bytes = n * elem_size;
  if (bytes <= 32) return 32;
  if (bytes <= 64) return 64;
  return 128;
}

// Row boundaries of `parts` ranges of about equal cost (nnz + row_cost per row),
// aligned to `align` rows.
std::vector<int64_t> partition_rows(const int64_t* rp, int64_t m, int64_t parts, int64_t row_cost, int64_t align) {
  std::vector<int64_t> b(parts + 1, 0);
  b[parts] = m;
  const double total = double(rp[m] - rp[0]) + double(row_cost) * m;
  for (int64_t t = 1; t < parts; ++t) {
    const double target = total * t / parts;
    int64_t lo = 0, hi = m;  // first row i with cost(i) >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (double(rp[mid] - rp[0]) + double(row_cost) * mid < target) lo = mid + 1; else hi = mid;
    }
    int64_t r = (lo + align / 2) / align * align;
    b[t] = std::min(m, std::max(b[t - 1], r));
  }
  return b;
}

// Work parts: a few per thread (nnz-balanced), handed out dynamically, so that a thread
// slowed down by another process on its core (or by uneven rows) does not hold up the op.
constexpr int64_t PARTS_PER_THREAD = 6;
int64_t num_parts(int64_t m, int64_t align) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(threads * PARTS_PER_THREAD, (m + align - 1) / align));
}

// Runs run(part) for every part on the intra-op threads, parts taken from a shared counter.
template <typename F>
void run_parts(int64_t parts, const F& run) {
  if (parts == 1) {
    run(0);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), parts);
  at::parallel_for(0, workers, 1, [&](int64_t a, int64_t z) {
    for (int64_t w = a; w < z; ++w)
      for (int64_t part = next++; part < parts; part = next++) run(part);
  });
}

// ---------------------------------------------------------------------------
// ISA choice: read by each op once per call (not inside the loops).

bool cpu_has_avx512() {
#if SK_HAVE_AVX512
  static const bool has = [] {
    __builtin_cpu_init();  // may run from a static initializer, before the libgcc constructor
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  }();
  return has;
#else
  return false;
#endif
}

// "auto": 64-byte loops wherever the CPU has AVX-512. Zen 4 splits them into 256-bit halves, yet
// measured there (SparseLinear 4096^2, batch 256, 1 thread) they are 5-12 % faster than 32-byte loops.
Isa auto_isa() { return cpu_has_avx512() ? Isa::avx512 : Isa::avx2; }

// Parses "auto" | "avx2" | "avx512"; false for an unknown name or an ISA this CPU lacks.
bool parse_isa(const std::string& name, Isa* out) {
  if (name == "auto") *out = auto_isa();
  else if (name == "avx2") *out = Isa::avx2;
  else if (name == "avx512" && cpu_has_avx512()) *out = Isa::avx512;
  else return false;
  return true;
}

// SPARSEKERN_ISA, read once when the extension loads; a bad value warns and means auto.
std::atomic<Isa> current_isa{[] {
  const char* env = std::getenv("SPARSEKERN_ISA");
  Isa isa = auto_isa();
  if (env && *env && !parse_isa(env, &isa))
    TORCH_WARN("SPARSEKERN_ISA=", env, " ignored: expected auto, avx2 or avx512 (avx512 only on a CPU with "
               "AVX-512F/BW/DQ/VL); using ", isa_name(isa));
  return isa;
}()};

// ---------------------------------------------------------------------------
// Dense fallback. Above a density of about 0.3 the CSR loops (one L2 load per FMA) lose to
// a dense GEMM on the scattered weight: measured on Zen3 (4096x4096, batch 256, 2 threads)
// CSR forward is 0.76x dense at density 0.5 and 2.2x at 0.2. The contract is unchanged;
// SPARSEKERN_DENSE_ABOVE overrides the threshold (0 forces the dense path, >1 disables it).
double dense_above() {
  static const double threshold = [] {
    const char* env = std::getenv("SPARSEKERN_DENSE_ABOVE");
    return env ? std::atof(env) : 0.3;
  }();
  return threshold;
}

bool use_dense(int64_t nnz, int64_t m, int64_t k) {
  return m > 0 && k > 0 && double(nnz) >= dense_above() * double(m) * double(k);
}

// A reused (m, k) buffer for the dense path: a fresh 64 MB tensor per call is mmap'ed by
// malloc and costs more in page faults than the GEMM itself on our VMs. One per calling
// thread, so concurrent ops from different threads never share it.
at::Tensor dense_workspace(int64_t m, int64_t k, const at::TensorOptions& options) {
  thread_local at::Tensor buffer;
  const int64_t bytes = m * k * int64_t(options.dtype().itemsize());
  if (!buffer.defined() || buffer.nbytes() < size_t(bytes))
    buffer = at::empty({bytes}, options.dtype(at::kByte));
  return buffer.narrow(0, 0, bytes).view(options.dtype().toScalarType()).view({m, k});
}

template <typename S>
at::Tensor scatter_dense(const at::Tensor& values, const int64_t* rp, const int32_t* ci, int64_t m, int64_t k) {
  at::Tensor dense = dense_workspace(m, k, values.options());
  S* d = dense.data_ptr<S>();
  const S* v = values.data_ptr<S>();
  at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      std::fill(d + i * k, d + (i + 1) * k, S(0));
      for (int64_t p = rp[i]; p < rp[i + 1]; ++p) d[i * k + ci[p]] = v[p];
    }
  });
  return dense;
}

// I: the element type of the operands and the output; S: the compute type (bf16 computes in
// float32: values and bias converted once, B widened as it is packed, out rounded on store).
template <typename I>
void spmm_typed(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& B,
                const c10::optional<at::Tensor>& bias, const at::Tensor& out) {
  using S = typename bf16::Acc<I>::type;
  constexpr bool widened = !std::is_same<I, S>::value;
  constexpr auto kS = c10::CppTypeToScalarType<S>::value;
  constexpr int L = Vec<S>::L;
  const int64_t m = row_ptr.numel() - 1, k = B.size(0), n = B.size(1);
  if (m == 0 || n == 0) return;
  I* o = out.data_ptr<I>();
  const int64_t os0 = out.stride(0), os1 = out.stride(1);
  at::Tensor bias_c;
  const S* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_c = widened ? bias->to(kS).contiguous() : bias->contiguous();
    bp = bias_c.data_ptr<S>();
  }
  const int64_t nnz = col_idx.numel();
  if (nnz == 0 || k == 0) {
    at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const I val = bp ? static_cast<I>(bp[i]) : I(0);
        for (int64_t c = 0; c < n; ++c) o[i * os0 + c * os1] = val;
      }
    });
    return;
  }
  const at::Tensor vals_c = widened ? values.to(kS).contiguous() : values;
  if (use_dense(nnz, m, k)) {
    const at::Tensor W = scatter_dense<S>(vals_c, row_ptr.data_ptr<int64_t>(), col_idx.data_ptr<int32_t>(), m, k);
    if constexpr (widened) {  // a float32 GEMM, rounded once into out
      at::Tensor r = at::mm(W, B.to(kS));
      if (bp) r.add_(bias_c.unsqueeze(1));
      const_cast<at::Tensor&>(out).copy_(r);
    } else {
      at::mm_out(const_cast<at::Tensor&>(out), W, B);
      if (bp) const_cast<at::Tensor&>(out).add_(bias_c.unsqueeze(1));
    }
    return;
  }
  const int TB = tile_bytes(n, sizeof(S));
  const bool wide = isa() == Isa::avx512;
  const int64_t T = TB / int64_t(sizeof(S));
  const int64_t ntiles = (n + T - 1) / T;
  at::Tensor Bp = at::empty({ntiles * k * T}, B.options().dtype(kS).memory_format(c10::MemoryFormat::Contiguous));
  S* bpk = Bp.data_ptr<S>();
  const I* bsrc = B.data_ptr<I>();
  const int64_t bs0 = B.stride(0), bs1 = B.stride(1);
  const int64_t KC = 256;  // rows per packing job
  const int64_t kchunks = (k + KC - 1) / KC;
  at::parallel_for(0, ntiles * kchunks, 1, [&](int64_t a, int64_t z) {
    for (int64_t w = a; w < z; ++w) {
      const int64_t t = w / kchunks, j0 = (w % kchunks) * KC, j1 = std::min(k, j0 + KC);
      pack(bpk + t * k * T, T, bsrc, bs0, bs1, j0, j1, t * T, std::min(T, n - t * T));
    }
  });
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const S* vals = vals_c.data_ptr<S>();
  const int64_t align = 2 * L;
  const int64_t parts = num_parts(m, align);
  const std::vector<int64_t> bounds = partition_rows(rp, m, parts, /*row_cost=*/2 + T / L, align);
  auto run = [&](int64_t part) {
    for (int64_t t = 0; t < ntiles; ++t) {
      const SpmmJob<S, I> J{vals, rp, ci, bpk + t * k * T, o, os0, os1, t * T, std::min(T, n - t * T), bp, nnz - 1};
      spmm_rows(TB, wide, J, bounds[part], bounds[part + 1]);
    }
  };
  run_parts(parts, run);
}

// As spmm_typed: bf16 accumulates every value in float32 (across batch tiles too) and rounds once.
template <typename I>
void sddmm_typed(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& X, const at::Tensor& Y,
                 const at::Tensor& vals_t) {
  using S = typename bf16::Acc<I>::type;
  constexpr bool widened = !std::is_same<I, S>::value;
  constexpr auto kS = c10::CppTypeToScalarType<S>::value;
  constexpr int L = Vec<S>::L;
  const int64_t m = row_ptr.numel() - 1, k = Y.size(0), d = X.size(1);
  const int64_t nnz = col_idx.numel();
  if (nnz == 0) return;
  if (d == 0) {
    const_cast<at::Tensor&>(vals_t).zero_();
    return;
  }
  const at::Tensor vals_s = widened ? at::empty({nnz}, vals_t.options().dtype(kS)) : vals_t;
  S* vals = vals_s.data_ptr<S>();
  if (use_dense(nnz, m, k)) {
    at::Tensor D = dense_workspace(m, k, X.options().dtype(kS));
    if constexpr (widened) at::mm_out(D, X.to(kS), Y.to(kS).t());
    else at::mm_out(D, X, Y.t());
    const S* dp = D.data_ptr<S>();
    const int64_t* rp = row_ptr.data_ptr<int64_t>();
    const int32_t* ci = col_idx.data_ptr<int32_t>();
    at::parallel_for(0, m, 64, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t p = rp[i]; p < rp[i + 1]; ++p) vals[p] = dp[i * k + ci[p]];
    });
    if constexpr (widened) const_cast<at::Tensor&>(vals_t).copy_(vals_s);
    return;
  }
  const int TB = tile_bytes(d, sizeof(S));
  const bool wide = isa() == Isa::avx512;
  const int64_t T = TB / int64_t(sizeof(S));
  const int64_t ntiles = (d + T - 1) / T;
  at::Tensor Yp_t = at::empty({ntiles * k * T}, Y.options().dtype(kS).memory_format(c10::MemoryFormat::Contiguous));
  S* yp = Yp_t.data_ptr<S>();
  const I* ysrc = Y.data_ptr<I>();
  const int64_t ys0 = Y.stride(0), ys1 = Y.stride(1);
  const int64_t KC = 256;
  const int64_t kchunks = (k + KC - 1) / KC;
  at::parallel_for(0, ntiles * kchunks, 1, [&](int64_t a, int64_t z) {
    for (int64_t w = a; w < z; ++w) {
      const int64_t t = w / kchunks, j0 = (w % kchunks) * KC, j1 = std::min(k, j0 + KC);
      pack(yp + t * k * T, T, ysrc, ys0, ys1, j0, j1, t * T, std::min(T, d - t * T));
    }
  });
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const I* x = X.data_ptr<I>();
  const int64_t xs0 = X.stride(0), xs1 = X.stride(1);
  const int64_t align = 2 * L;
  const int64_t parts = num_parts(m, align);
  const std::vector<int64_t> bounds = partition_rows(rp, m, parts, /*row_cost=*/T / L, align);
  auto run = [&](int64_t part) {
    for (int64_t t = 0; t < ntiles; ++t) {
      const SddmmJob<S, I> J{rp, ci, x, xs0, xs1, yp + t * k * T, t * T, std::min(T, d - t * T), vals, t == 0,
                             nnz - 1};
      sddmm_rows(TB, wide, J, bounds[part], bounds[part + 1]);
    }
  };
  run_parts(parts, run);
  if constexpr (widened) const_cast<at::Tensor&>(vals_t).copy_(vals_s);
}

// Positions of the nonzero bytes of p[0:len), in order, passed to f(index).
template <typename F>
inline void for_each_set(const uint8_t* p, int64_t len, F&& f) {
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    uint64_t w;
    std::memcpy(&w, p + j, 8);
    while (w) {
      const int b = __builtin_ctzll(w) >> 3;
      f(j + b);
      w &= ~(uint64_t(0xFF) << (b * 8));
    }
  }
  for (; j < len; ++j)
    if (p[j]) f(j);
}

template <typename S>
void fill_values(const at::Tensor& weight, const uint8_t* mp, int64_t ms0, int64_t ms1, bool colmajor, int64_t m,
                 int64_t k, const int64_t* rp, int32_t* ci, S* vals) {
  const S* w = vals ? weight.data_ptr<S>() : nullptr;
  const int64_t ws0 = vals ? weight.stride(0) : 0, ws1 = vals ? weight.stride(1) : 0;
  if (!colmajor) {
    at::parallel_for(0, m, std::max<int64_t>(1, 32768 / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        int64_t pos = rp[i];
        const S* wr = w ? w + i * ws0 : nullptr;
        for_each_set(mp + i * ms0, k, [&](int64_t j) {
          ci[pos] = (int32_t)j;
          if (wr) vals[pos] = wr[j * ws1];
          ++pos;
        });
      }
    });
  } else {
    // Column-major mask (a transposed view): memory row j holds column j of rows 0..m.
    at::parallel_for(0, m, 4096, [&](int64_t r0, int64_t r1) {
      std::vector<int64_t> cur(rp + r0, rp + r1);
      for (int64_t j = 0; j < k; ++j) {
        for_each_set(mp + j * ms1 + r0, r1 - r0, [&](int64_t rr) {
          const int64_t pos = cur[rr]++;
          ci[pos] = (int32_t)j;
          if (w) vals[pos] = w[(r0 + rr) * ws0 + j * ws1];
        });
      }
    });
  }
}

}  // namespace

// ---------------------------------------------------------------------------
Isa isa() { return current_isa.load(std::memory_order_relaxed); }

const char* isa_name(Isa isa) { return isa == Isa::avx512 ? "avx512" : "avx2"; }

bool isa_supported(const std::string& name) {
  Isa isa;
  return parse_isa(name, &isa);
}

std::string set_isa(const std::string& name) {
  Isa isa;
  TORCH_CHECK(name == "auto" || name == "avx2" || name == "avx512",
              "_set_isa: isa must be 'auto', 'avx2' or 'avx512', got '", name, "'");
  TORCH_CHECK(parse_isa(name, &isa), "_set_isa: isa 'avx512' needs a CPU with AVX-512F/BW/DQ/VL (and an x86-64 "
              "GCC build); this one has none");
  current_isa.store(isa);
  return isa_name(isa);
}

// ---------------------------------------------------------------------------
namespace {

void atomic_min(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {
  }
}

// The first i in [0, n) with p[i + 1] < p[i], or n.
int64_t first_decrease(const int64_t* p, int64_t n) {
  std::atomic<int64_t> first{n};
  at::parallel_for(0, n, 1 << 20, [&](int64_t a, int64_t z) {
    for (int64_t i = a; i < z; ++i)
      if (p[i + 1] < p[i]) return atomic_min(first, i);
  });
  return first.load();
}

// Rows per parallel chunk for about `target` nonzeros of a pattern of m rows and nnz nonzeros.
int64_t row_grain(int64_t m, int64_t nnz, int64_t target) {
  return std::max<int64_t>(1, nnz > 0 ? int64_t(double(target) * double(m) / double(nnz)) : m);
}

}  // namespace

void check_pattern(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t ncols, const std::string& what,
                   const char* op) {
  const int64_t m = row_ptr.numel() - 1;
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t nnz = col_idx.numel();
  TORCH_CHECK(rp[0] == 0, op, ": row_ptr[0] must be 0, got ", rp[0]);
  TORCH_CHECK(rp[m] == nnz, op, ": row_ptr[-1] must equal the number of nonzeros (col_idx has ", nnz,
              " entries), got ", rp[m]);
  const int64_t i = first_decrease(rp, m);
  TORCH_CHECK(i == m, op, ": row_ptr must be non-decreasing, got row_ptr[", i, "] = ", rp[i], " > row_ptr[", i + 1,
              "] = ", rp[i + 1]);
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  // Columns strictly increasing within each row (the sparse loops would add duplicates, the dense
  // fallback keep the last), so only a row's first and last column need the range check.
  std::atomic<int64_t> bad_row_of_col{m};
  at::parallel_for(0, m, row_grain(m, nnz, 1 << 18), [&](int64_t a, int64_t z) {
    for (int64_t i = a; i < z; ++i) {
      const int64_t s = rp[i], e = rp[i + 1];
      if (s == e) continue;
      int bad = ci[s] < 0 || int64_t(ci[e - 1]) >= ncols;
      for (int64_t p = s + 1; p < e; ++p) bad |= ci[p] <= ci[p - 1];
      if (bad) return atomic_min(bad_row_of_col, i);
    }
  });
  const int64_t r = bad_row_of_col.load();
  if (r == m) return;
  for (int64_t p = rp[r]; p < rp[r + 1]; ++p) {
    TORCH_CHECK(ci[p] >= 0 && int64_t(ci[p]) < ncols, op, ": col_idx entries must lie in [0, ", ncols, ") (", what,
                "), got col_idx[", p, "] = ", ci[p]);
    TORCH_CHECK(p == rp[r] || ci[p] > ci[p - 1], op,
                ": col_idx must be strictly increasing within each row (sorted, no duplicates), got col_idx[", p - 1,
                "] = ", ci[p - 1], " and col_idx[", p, "] = ", ci[p], " in row ", r);
  }
}

void check_transpose(const Csr& a, int64_t k, const c10::optional<at::Tensor>& t_row_ptr_arg,
                     const c10::optional<at::Tensor>& t_col_idx_arg, const c10::optional<at::Tensor>& t_perm_arg,
                     const char* op) {
  const bool has_rp = t_row_ptr_arg.has_value() && t_row_ptr_arg->defined();
  const bool has_ci = t_col_idx_arg.has_value() && t_col_idx_arg->defined();
  const bool has_perm = t_perm_arg.has_value() && t_perm_arg->defined();
  if (!has_rp && !has_ci && !has_perm) return;
  TORCH_CHECK(has_rp && has_ci && has_perm, op,
              ": t_row_ptr, t_col_idx and t_perm (the transpose) must be given together or not at all, got",
              has_rp ? " t_row_ptr" : "", has_ci ? " t_col_idx" : "", has_perm ? " t_perm" : "", " only");
  const int64_t m = a.m, nnz = a.col_idx.numel();
  auto check_index = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                         const char* expected) {
    check_cpu(t, name, op);
    TORCH_CHECK(t.dim() == 1 && t.scalar_type() == dtype, op, ": ", name, " must be a 1-D ", dtype, " tensor, got ",
                t.scalar_type(), " of shape ", t.sizes());
    TORCH_CHECK(t.numel() == numel, op, ": ", name, " must have ", numel, " entries (", expected, "), got ", t.numel());
    return t.contiguous();
  };
  const std::string cols = "k+1 = " + std::to_string(k + 1) + ": the transpose has k = " + std::to_string(k) + " rows";
  const std::string nz = "nnz = " + std::to_string(nnz) + ", as col_idx";
  const at::Tensor t_row_ptr = check_index(*t_row_ptr_arg, "t_row_ptr", at::kLong, k + 1, cols.c_str());
  const at::Tensor t_col_idx = check_index(*t_col_idx_arg, "t_col_idx", at::kInt, nnz, nz.c_str());
  const at::Tensor t_perm = check_index(*t_perm_arg, "t_perm", at::kLong, nnz, nz.c_str());
  const int64_t* trp = t_row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(trp[0] == 0, op, ": t_row_ptr[0] must be 0, got ", trp[0]);
  TORCH_CHECK(trp[k] == nnz, op, ": t_row_ptr[-1] must equal nnz = ", nnz, ", got ", trp[k]);
  const int64_t jr = first_decrease(trp, k);
  TORCH_CHECK(jr == k, op, ": t_row_ptr must be non-decreasing, got t_row_ptr[", jr, "] = ", trp[jr],
              " > t_row_ptr[", jr + 1, "] = ", trp[jr + 1]);
  const int64_t* rp = a.row_ptr.data_ptr<int64_t>();
  const int32_t* ci = a.col_idx.data_ptr<int32_t>();
  const int32_t* tci = t_col_idx.data_ptr<int32_t>();
  const int64_t* perm = t_perm.data_ptr<int64_t>();
  // Checking every entry costs a random col_idx read per nonzero (measured: ~0.8x the forward at
  // 4096x4096, density 0.1, batch 256); each column's first and last entry are checked instead, O(k),
  // which catches a transpose of another pattern or shape and a reversed or shifted t_perm. Interior
  // entries stay safe (gather and the transposed product check their ranges) but are not compared.
  auto check_entry = [&](int64_t j, int64_t q, int what) {
    const int64_t p = perm[q];
    if (what == 0)
      TORCH_CHECK(p >= 0 && p < nnz, op, ": t_perm entries must lie in [0, nnz = ", nnz, "), got t_perm[", q, "] = ", p);
    if (what == 1)
      TORCH_CHECK(ci[p] == j, op, ": t_perm and t_row_ptr must list column ", j, "'s nonzeros at t_perm[", trp[j], ":",
                  trp[j + 1], "], got t_perm[", q, "] = ", p, ", a nonzero of column ", ci[p]);
    const int64_t r = tci[q];
    if (what == 2 && !(r >= 0 && r < m && rp[r] <= p && p < rp[r + 1])) {
      const int64_t row = std::upper_bound(rp, rp + m + 1, p) - rp - 1;
      TORCH_CHECK(false, op, ": t_col_idx[", q, "] must be ", row, ", the row of nonzero t_perm[", q, "] = ", p,
                  ", got ", tci[q]);
    }
  };
  for (int64_t j = 0; j < k; ++j) {
    const int64_t q0 = trp[j], q1 = trp[j + 1];
    if (q0 == q1) continue;
    // Blame t_perm before t_col_idx: a wrong t_perm entry also mismatches its row.
    for (int what = 0; what < 2; ++what) {
      check_entry(j, q0, what);
      check_entry(j, q1 - 1, what);
    }
    TORCH_CHECK(q1 - q0 == 1 || perm[q0] < perm[q1 - 1], op, ": t_perm must be increasing within each column (rows ",
                "ascending in the transpose), got t_perm[", q0, "] = ", perm[q0], " and t_perm[", q1 - 1, "] = ",
                perm[q1 - 1], " in column ", j);
    check_entry(j, q0, 2);
    check_entry(j, q1 - 1, 2);
  }
}

void check_cpu(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

void check_dense(const at::Tensor& t, const char* name, int64_t dim, const char* op) {
  check_cpu(t, name, op);
  check_float_or_bf16(t, name, op);
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_same_dtype(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " and ", bn, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

void check_mask(const at::Tensor& mask, int64_t rows, int64_t cols, const char* op) {
  check_cpu(mask, "mask", op);
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == rows && mask.size(1) == cols, op, ": mask must have shape (", rows,
              ", ", cols, "), got ", mask.sizes());
}

Csr checked_csr(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t ncols,
                const std::string& what, const char* op) {
  check_cpu(row_ptr, "row_ptr", op);
  check_cpu(col_idx, "col_idx", op);
  check_csr(row_ptr, col_idx, op);
  Csr c;
  c.row_ptr = row_ptr.contiguous();
  c.col_idx = col_idx.contiguous();
  c.m = row_ptr.numel() - 1;
  if (values.defined()) {
    check_cpu(values, "values", op);
    check_float_or_bf16(values, "values", op);
    TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D, got shape ", values.sizes());
    TORCH_CHECK(values.numel() == col_idx.numel(), op, ": values and col_idx must have the same length, got ",
                values.numel(), " and ", col_idx.numel());
    c.values = values.contiguous();
  }
  check_pattern(c.row_ptr, c.col_idx, ncols, what, op);
  return c;
}

void spmm(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& B,
          const c10::optional<at::Tensor>& bias, const at::Tensor& out) {
  if (B.scalar_type() == at::kFloat) spmm_typed<float>(values, row_ptr, col_idx, B, bias, out);
  else if (B.scalar_type() == at::kBFloat16) spmm_typed<c10::BFloat16>(values, row_ptr, col_idx, B, bias, out);
  else spmm_typed<double>(values, row_ptr, col_idx, B, bias, out);
}

void sddmm(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& X, const at::Tensor& Y,
           const at::Tensor& vals) {
  if (X.scalar_type() == at::kFloat) sddmm_typed<float>(row_ptr, col_idx, X, Y, vals);
  else if (X.scalar_type() == at::kBFloat16) sddmm_typed<c10::BFloat16>(row_ptr, col_idx, X, Y, vals);
  else sddmm_typed<double>(row_ptr, col_idx, X, Y, vals);
}

Compacted compact(const at::Tensor& weight, const at::Tensor& mask_in) {
  at::Tensor mask = mask_in;
  const int64_t m = mask.size(0), k = mask.size(1);
  bool colmajor = false;
  if (mask.stride(1) == 1 || k <= 1) {
    colmajor = false;
  } else if (mask.stride(0) == 1 || m <= 1) {
    colmajor = true;
  } else {
    mask = mask.contiguous();
  }
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());
  const int64_t ms0 = mask.stride(0), ms1 = mask.stride(1);
  Compacted c;
  c.row_ptr = at::empty({m + 1}, mask.options().dtype(at::kLong));
  int64_t* rp = c.row_ptr.data_ptr<int64_t>();
  rp[0] = 0;
  if (!colmajor) {
    at::parallel_for(0, m, std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const uint8_t* p = mp + i * ms0;
        int64_t cnt = 0;
        for (int64_t j = 0; j < k; ++j) cnt += p[j] != 0;
        rp[i + 1] = cnt;
      }
    });
  } else {
    at::parallel_for(0, m, 4096, [&](int64_t r0, int64_t r1) {
      std::vector<int32_t> cnt(r1 - r0, 0);
      int32_t* cp = cnt.data();
      for (int64_t j = 0; j < k; ++j) {
        const uint8_t* p = mp + j * ms1 + r0;
        for (int64_t r = 0; r < r1 - r0; ++r) cp[r] += p[r] != 0;
      }
      for (int64_t r = 0; r < r1 - r0; ++r) rp[r0 + r + 1] = cnt[r];
    });
  }
  for (int64_t i = 0; i < m; ++i) rp[i + 1] += rp[i];
  const int64_t nnz = rp[m];
  c.col_idx = at::empty({nnz}, mask.options().dtype(at::kInt));
  int32_t* ci = c.col_idx.data_ptr<int32_t>();
  if (weight.defined()) {
    c.values = at::empty({nnz}, weight.options().memory_format(c10::MemoryFormat::Contiguous));
    if (weight.scalar_type() == at::kFloat)
      fill_values<float>(weight, mp, ms0, ms1, colmajor, m, k, rp, ci, c.values.data_ptr<float>());
    else if (weight.scalar_type() == at::kBFloat16)
      fill_values<c10::BFloat16>(weight, mp, ms0, ms1, colmajor, m, k, rp, ci, c.values.data_ptr<c10::BFloat16>());
    else
      fill_values<double>(weight, mp, ms0, ms1, colmajor, m, k, rp, ci, c.values.data_ptr<double>());
  } else {
    fill_values<float>(weight, mp, ms0, ms1, colmajor, m, k, rp, ci, nullptr);
  }
  return c;
}

}  // namespace csr
}  // namespace sparsekern

// Private ops for tests and benchmarks (wrapped by sparsekern/isa.py); not part of the op contract.
TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.def("_isa() -> str", [] { return std::string(sparsekern::csr::isa_name(sparsekern::csr::isa())); });
  m.def("_isa_supported(str isa) -> bool", [](const std::string& name) { return sparsekern::csr::isa_supported(name); });
  m.def("_set_isa(str isa) -> str", [](const std::string& name) { return sparsekern::csr::set_isa(name); });
}
