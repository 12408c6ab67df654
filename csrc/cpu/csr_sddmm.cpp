// The CSR tile engine's SDDMM core (csr_engine.h): vals[p] = dot(X[i, :], Y[j, :]) at the CSR
// pattern. Y is packed into batch tiles once (csr_pack.cpp); nnz-balanced row parts
// (csr_partition.cpp) walk every tile, accumulating each nonzero's partial dot product; dense
// enough patterns run the dense fallback (csr_dense.cpp).
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/csr_internal.h"
#include "cpu/simd.h"

// The loops are written with explicit mul+add on GCC vectors; allow the compiler to fuse them into
// FMAs (ISO -std=c++20 otherwise turns contraction off).
#pragma GCC optimize("fp-contract=fast")

namespace sparsekern {
namespace csr {
namespace {

using namespace simd;
using namespace detail;

// G = 32-byte lanes nonzeros at a time: G dot products of NV W-byte vectors, each folded to 32
// bytes, reduced together by one 32-byte transpose-add.
// No software prefetch: the G independent dot products keep enough L2 loads in flight, and prefetches
// take load slots (1.01-1.20x faster without them at ViT, MLP, BERT and 4096^2 shapes, either vector width;
// than one line per row: 2-4 % slower at 4096^2 on the 64-byte loops; interleaved A/B on Zen 4).
template <typename S, int NV, int W = 32>
SK_INLINE void sddmm_chunk(const typename Vec<S, W>::v* x, const S* __restrict Yp, const int32_t* j, int cnt, S* out,
                           bool first) {
  using v = typename Vec<S>::v;
  constexpr int L = Vec<S, W>::L, T = NV * L, G = Vec<S>::L;
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
  const bool direct = std::is_same<XI, S>::value && !J.xruns && J.xs1 == 1 && J.nc == T;
  const int32_t* __restrict ci = J.ci;
  const int64_t nc = J.nc;
  for (int64_t g0 = r0; g0 < r1; g0 += G) {
    const int64_t rows = std::min<int64_t>(G, r1 - g0);
    if (!direct) {
      // Gather X[g0:g0+rows, b0:b0+nc] into buf (zero-padded to T columns).
      if (J.xruns) {
        for (int64_t r = 0; r < rows; ++r) {
          S* d = buf + r * T;
          for (int q = 0; q < J.xruns->count; ++q) {
            const Run& run = J.xruns->run[q];
            const XI* src = J.X + (g0 + r) * J.xs0 + run.off;
            for (int64_t c = 0; c < run.len; ++c) d[run.c + c] = bf16::widen(src[c]);
          }
          for (int64_t c = nc; c < T; ++c) d[c] = S(0);
        }
      } else if (J.xs0 == 1 && rows == G) {
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
      for (; p + G <= e; p += G) sddmm_chunk<S, NV, W>(x, J.Yp, ci + p, G, J.vals + p, J.first);
      if (p < e) sddmm_chunk<S, NV, W>(x, J.Yp, ci + p, (int)(e - p), J.vals + p, J.first);
    }
  }
}

// The SDDMM loops per type and width (the SK_ROWS_* macros: csr_internal.h).
SK_ROWS_CLONES(sddmm, SddmmJob)

}  // namespace

SK_ROWS_EXPORT(sddmm, SddmmJob, float, float)
SK_ROWS_EXPORT(sddmm, SddmmJob, double, double)

namespace detail {

std::atomic<int64_t> sddmm_block_runs{0};  // for the tests: tiles whose SDDMM ran in L1 blocks since load

template <typename S>
void sddmm_blocks_impl(int tb, bool wide, SddmmJob<S> J, const L1Blocks& b, int64_t m) {
  sddmm_block_runs.fetch_add(1, std::memory_order_relaxed);
  J.ci = b.ci.data();
  for (int64_t blk = 0; blk < b.nb; ++blk) {
    J.rp = b.rp.data() + blk * (m + 1);
    sddmm_tile_rows(tb, wide, J, 0, m);
  }
}
void sddmm_blocks(int tb, bool wide, const SddmmJob<float>& J, const L1Blocks& b, int64_t m) {
  sddmm_blocks_impl(tb, wide, J, b, m);
}
void sddmm_blocks(int tb, bool wide, const SddmmJob<double>& J, const L1Blocks& b, int64_t m) {
  sddmm_blocks_impl(tb, wide, J, b, m);
}

}  // namespace detail

namespace {

// As spmm_typed: bf16 accumulates every value in float32 (across batch tiles too) and rounds once.
template <typename I>
void sddmm_typed(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& X, const at::Tensor& Y,
                 const at::Tensor& vals_t) {
  using S = typename bf16::Acc<I>::type;
  constexpr bool widened = !std::is_same<I, S>::value;
  constexpr auto kS = c10::CppTypeToScalarType<S>::value;
  constexpr int L = Vec<S>::L;
  const int64_t m = row_ptr.numel() - 1, k = Y.size(0), d = operand_cols(X);
  const bool planes = X.dim() == 3;  // then Y's planes too (sddmm flattens the rest)
  const int64_t nnz = col_idx.numel();
  if (nnz == 0) return;
  if (d == 0) {
    const_cast<at::Tensor&>(vals_t).zero_();
    return;
  }
  const at::Tensor vals_s = widened ? at::empty({nnz}, vals_t.options().dtype(kS)) : vals_t;
  if (use_dense(nnz, m, k)) {
    sddmm_dense(row_ptr, col_idx, X, Y, vals_s);
  } else if (use_gather(Core::sddmm, nnz, k, Y)) {
    sddmm_gather<I, S>(row_ptr.data_ptr<int64_t>(), col_idx.data_ptr<int32_t>(), m, X, Y, vals_s.data_ptr<S>());
  } else {
    S* vals = vals_s.data_ptr<S>();
    const bool wide = isa() == Isa::avx512;
    const int TB = tile_bytes(d, sizeof(S), wide, k);  // no L1 blocks here: Y's rows in the indices' order
    const int64_t T = TB / int64_t(sizeof(S));
    const int64_t ntiles = (d + T - 1) / T;
    const int64_t* rp = row_ptr.data_ptr<int64_t>();
    const int32_t* ci = col_idx.data_ptr<int32_t>();
    const I* x = X.data_ptr<I>();
    const int64_t xs0 = X.stride(0), xs1 = planes ? 1 : X.stride(1);
    auto job = [&](const S* tile, int64_t b0, int64_t nc, S* out, bool first, Runs* runs) {
      if (planes) *runs = plane_runs(X.size(2), X.stride(1), b0, nc);
      return SddmmJob<S, I>{rp, ci, x, xs0, xs1, tile, b0, nc, out, first, planes ? runs : nullptr};
    };
    // As spmm: whole tiles, each packed by the thread that runs it just before every row runs over it, wherever
    // they spread evenly over the threads; each thread sums its share of the batch into its own copy of the
    // values, added up at the end (while those copies stay small: many threads over a large pattern would
    // each need one). Else row parts over Y packed whole.
    const int64_t nth = at::get_num_threads();
    if (tiles_spread_evenly(ntiles) && (nth - 1) * nnz * int64_t(sizeof(S)) <= MAX_PARTIAL_BYTES) {
      sddmm_whole_tiles<S>(vals, nnz, d, T, wide, k * T, vals_s.options(),
                           [&](S* tile, int64_t, int64_t b0, int64_t nc, int tb, S* out, bool first) {
                             pack_tile(tile, tb / int64_t(sizeof(S)), Y, b0, nc);
                             Runs runs;
                             sddmm_rows(tb, wide, job(tile, b0, nc, out, first, &runs), 0, m);
                           });
    } else {
      const int64_t align = 2 * L;
      const int64_t parts = num_parts(m, align);
      const std::vector<int64_t> bounds = partition_rows(rp, m, parts, /*row_cost=*/T / L, align);
      const at::Tensor Yp_t = pack_tiles(Y, T);
      const S* yp = Yp_t.data_ptr<S>();
      auto run = [&](int64_t part) {
        Runs runs;
        for (int64_t t = 0; t < ntiles; ++t)
          sddmm_rows(TB, wide, job(yp + t * k * T, t * T, std::min(T, d - t * T), vals, t == 0, &runs), bounds[part],
                     bounds[part + 1]);
      };
      run_parts(parts, run);
    }
  }
  if constexpr (widened) const_cast<at::Tensor&>(vals_t).copy_(vals_s);
}

}  // namespace

void sddmm(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& X_arg, const at::Tensor& Y_arg,
           const at::Tensor& vals) {
  const at::Tensor X = as_matrix_if_strided(X_arg), Y = as_matrix_if_strided(Y_arg);
  if (X.dim() == 3 || Y.dim() == 3) {
    // As spmm: planes run the tile loops, every other path takes them reshaped.
    const int64_t m = row_ptr.numel() - 1, k = Y.size(0), d = operand_cols(X), nnz = col_idx.numel();
    if (X.dim() != 3 || Y.dim() != 3 || nnz == 0 || use_dense(nnz, m, k) || use_gather(Core::sddmm, nnz, k, Y)) {
      sddmm(row_ptr, col_idx, X.reshape({m, d}), Y.reshape({k, d}), vals);
      return;
    }
  }
  if (X.scalar_type() == at::kFloat) sddmm_typed<float>(row_ptr, col_idx, X, Y, vals);
  else if (X.scalar_type() == at::kBFloat16) sddmm_typed<c10::BFloat16>(row_ptr, col_idx, X, Y, vals);
  else sddmm_typed<double>(row_ptr, col_idx, X, Y, vals);
}

}  // namespace csr
}  // namespace sparsekern
