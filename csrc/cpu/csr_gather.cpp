// The CSR tile engine's gather path (csr_internal.h): SpMM and SDDMM for patterns with few nonzeros
// per column of the dense operand, read where they lie instead of packed. Packing copies all k rows of
// the dense operand (k x n elements) to serve nnz x n multiply-adds: with about one nonzero per column
// or fewer (a classifier head: 10 x 1024 at density 0.1, 512 -> 2) the copy, not the arithmetic, is the
// product. Here each batch item's k values (one contiguous column of B or Y: x's row, as sparse_linear
// and its weight gradient see it) stay in L1 while every nonzero gathers from it.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/bf16.h"
#include "cpu/common.h"
#include "cpu/csr_internal.h"

#pragma GCC optimize("fp-contract=fast")

namespace sparsekern {
namespace csr {
namespace detail {
namespace {

// Batch items per pass: each nonzero's index and value are loaded once for B items, and the SpMM's B
// independent sums hide the multiply-add latency.
constexpr int64_t B = 8;

template <typename I, typename S>
SK_INLINE I narrow(S v) {
  if constexpr (std::is_same<I, c10::BFloat16>::value) return bf16::from_f32(v);
  else return static_cast<I>(v);
}

// out[i, b] = bias[i] + sum_p vals[p] * src[ci[p], b] for the batch items b0..b1; src column b at
// src + b * s1 (contiguous), out element (i, b) at out[i * os0 + b * os1].
template <typename I, typename S>
SK_INLINE void spmm_gather_impl(const S* __restrict vals, const int64_t* rp, const int32_t* __restrict ci, int64_t m,
                                const I* src, int64_t s1, const S* bias, I* out, int64_t os0, int64_t os1, int64_t b0,
                                int64_t b1) {
  int64_t b = b0;
  for (; b + B <= b1; b += B) {
    const I* x = src + b * s1;
    for (int64_t i = 0; i < m; ++i) {
      S a[B];
#pragma GCC unroll 8
      for (int u = 0; u < B; ++u) a[u] = bias ? bias[i] : S(0);
      for (int64_t p = rp[i], e = rp[i + 1]; p < e; ++p) {
        const S w = vals[p];
        const I* xc = x + ci[p];
#pragma GCC unroll 8
        for (int u = 0; u < B; ++u) a[u] += w * bf16::widen(xc[u * s1]);
      }
      I* o = out + i * os0 + b * os1;
#pragma GCC unroll 8
      for (int u = 0; u < B; ++u) o[u * os1] = narrow<I>(a[u]);
    }
  }
  for (; b < b1; ++b) {
    const I* x = src + b * s1;
    for (int64_t i = 0; i < m; ++i) {
      S a = bias ? bias[i] : S(0);
      for (int64_t p = rp[i], e = rp[i + 1]; p < e; ++p) a += vals[p] * bf16::widen(x[ci[p]]);
      out[i * os0 + b * os1] = narrow<I>(a);
    }
  }
}

// vals[p] (rows r0..r1) = sum_b X[i, b] * Y[ci[p], b]: X element (i, b) at X[i * xs0 + b * xs1], Y column b
// at Y + b * ys1 (contiguous). Summed over b in order, B items at a time.
template <typename I, typename S>
SK_INLINE void sddmm_gather_impl(const int64_t* rp, const int32_t* __restrict ci, const I* X, int64_t xs0, int64_t xs1,
                                 const I* Y, int64_t ys1, int64_t n, S* __restrict vals, int64_t r0, int64_t r1) {
  std::fill(vals + rp[r0], vals + rp[r1], S(0));
  int64_t b = 0;
  for (; b + B <= n; b += B) {
    const I* y = Y + b * ys1;
    for (int64_t i = r0; i < r1; ++i) {
      const I* xi = X + i * xs0 + b * xs1;
      S g[B];
#pragma GCC unroll 8
      for (int u = 0; u < B; ++u) g[u] = bf16::widen(xi[u * xs1]);
      for (int64_t p = rp[i], e = rp[i + 1]; p < e; ++p) {
        const I* yc = y + ci[p];
        S d = g[0] * bf16::widen(yc[0]);
#pragma GCC unroll 8
        for (int u = 1; u < B; ++u) d += g[u] * bf16::widen(yc[u * ys1]);
        vals[p] += d;
      }
    }
  }
  for (; b < n; ++b) {
    const I* y = Y + b * ys1;
    for (int64_t i = r0; i < r1; ++i) {
      const S g = bf16::widen(X[i * xs0 + b * xs1]);
      for (int64_t p = rp[i], e = rp[i + 1]; p < e; ++p) vals[p] += g * bf16::widen(y[ci[p]]);
    }
  }
}

#define SK_GATHER_LOOPS(ATTR, CS, I, S)                                                                        \
  ATTR void spmm_gather_loop##CS(const S* vals, const int64_t* rp, const int32_t* ci, int64_t m, const I* src, \
                                 int64_t s1, const S* bias, I* out, int64_t os0, int64_t os1, int64_t b0,      \
                                 int64_t b1) {                                                                 \
    spmm_gather_impl<I, S>(vals, rp, ci, m, src, s1, bias, out, os0, os1, b0, b1);                             \
  }                                                                                                            \
  ATTR void sddmm_gather_loop##CS(const int64_t* rp, const int32_t* ci, const I* X, int64_t xs0, int64_t xs1,  \
                                  const I* Y, int64_t ys1, int64_t n, S* vals, int64_t r0, int64_t r1) {       \
    sddmm_gather_impl<I, S>(rp, ci, X, xs0, xs1, Y, ys1, n, vals, r0, r1);                                     \
  }
SK_CLONE_BUILDS(SK_GATHER_LOOPS, float, float)
SK_CLONE_BUILDS(SK_GATHER_LOOPS, double, double)
SK_CLONE_BUILDS(SK_GATHER_LOOPS, c10::BFloat16, float)
#undef SK_GATHER_LOOPS
SK_CLONE_DISPATCH(spmm_gather_loop)
SK_CLONE_DISPATCH(sddmm_gather_loop)

// Multiply-adds per parallel task: below this a task's share of the parallel region's start-up (a few
// microseconds) outweighs its work, and a product that small runs on the calling thread.
constexpr int64_t GATHER_GRAIN = 1 << 16;

}  // namespace

bool use_gather(Core core, int64_t nnz, int64_t k, const at::Tensor& dense) {
  const double limit = core == Core::spmm ? GATHER_SPMM_NNZ_PER_COLUMN : GATHER_SDDMM_NNZ_PER_COLUMN;
  return dense.stride(0) == 1 && double(nnz) <= limit * double(k);
}

template <typename I, typename S>
void spmm_gather(const S* vals, const int64_t* rp, const int32_t* ci, int64_t m, const at::Tensor& Bt, const S* bias,
                 const at::Tensor& out) {
  const int64_t n = Bt.size(1), nnz = rp[m];
  const I* src = Bt.data_ptr<I>();
  I* o = out.data_ptr<I>();
  const int64_t s1 = Bt.stride(1), os0 = out.stride(0), os1 = out.stride(1);
  const int64_t grain = std::max<int64_t>(B, GATHER_GRAIN / std::max<int64_t>(nnz + m, 1) / B * B);
  at::parallel_for(0, n, grain, [&](int64_t b0, int64_t b1) {
    spmm_gather_loop(vals, rp, ci, m, src, s1, bias, o, os0, os1, b0, b1);
  });
}

template <typename I, typename S>
void sddmm_gather(const int64_t* rp, const int32_t* ci, int64_t m, const at::Tensor& X, const at::Tensor& Y, S* vals) {
  const int64_t n = X.size(1), nnz = rp[m];
  const I* x = X.data_ptr<I>();
  const I* y = Y.data_ptr<I>();
  const int64_t xs0 = X.stride(0), xs1 = X.stride(1), ys1 = Y.stride(1);
  // Rows are cut into nnz-balanced parts, each summing over the whole batch: no partial sums to add up,
  // and the order of the sum does not depend on the number of threads.
  const int64_t parts = (nnz + m) * n < GATHER_GRAIN ? 1 : std::min<int64_t>(num_parts(m, 1), at::get_num_threads());
  const std::vector<int64_t> bounds = partition_rows(rp, m, parts, /*row_cost=*/1, /*align=*/1);
  run_parts(parts, [&](int64_t part) {
    if (bounds[part] < bounds[part + 1])
      sddmm_gather_loop(rp, ci, x, xs0, xs1, y, ys1, n, vals, bounds[part], bounds[part + 1]);
  });
}

template void spmm_gather<float, float>(const float*, const int64_t*, const int32_t*, int64_t, const at::Tensor&,
                                        const float*, const at::Tensor&);
template void spmm_gather<double, double>(const double*, const int64_t*, const int32_t*, int64_t, const at::Tensor&,
                                          const double*, const at::Tensor&);
template void spmm_gather<c10::BFloat16, float>(const float*, const int64_t*, const int32_t*, int64_t,
                                                const at::Tensor&, const float*, const at::Tensor&);
template void sddmm_gather<float, float>(const int64_t*, const int32_t*, int64_t, const at::Tensor&, const at::Tensor&,
                                         float*);
template void sddmm_gather<double, double>(const int64_t*, const int32_t*, int64_t, const at::Tensor&,
                                           const at::Tensor&, double*);
template void sddmm_gather<c10::BFloat16, float>(const int64_t*, const int32_t*, int64_t, const at::Tensor&,
                                                 const at::Tensor&, float*);

}  // namespace detail
}  // namespace csr
}  // namespace sparsekern
