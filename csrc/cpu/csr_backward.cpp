// The CSR tile engine's backward of a product (csr_engine.h): for out = A @ B, both gradients in one pass over
// the batch tiles of out's gradient G. Run apart, the input gradient's SpMM (A^T @ G) packs G's tile and the
// weight gradient's SDDMM gathers the same rows of G again, through register transposes, from wherever G lies
// (memory, in a training step); here each thread packs its tile of G once, runs A^T's rows over it, packs B's
// tile and runs the SDDMM with G's rows read straight from the packed tile, still in L2.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cpu/bf16.h"
#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/csr_internal.h"

namespace sparsekern {
namespace csr {
namespace {

using namespace detail;

std::atomic<int64_t> fused_runs{0};  // for the tests: which path ran

template <typename I>
bool spmm_backward_typed(const at::Tensor& t_values, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                         const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& G, const at::Tensor& B,
                         const at::Tensor& dB, const at::Tensor& dvals_t) {
  using S = typename bf16::Acc<I>::type;
  constexpr bool widened = !std::is_same<I, S>::value;
  constexpr auto kS = c10::CppTypeToScalarType<S>::value;
  const int64_t m = row_ptr.numel() - 1, k = B.size(0), n = operand_cols(G), nnz = col_idx.numel();
  // Only where both products would run the whole-tile loops on their own.
  if (nnz == 0 || m == 0 || k == 0 || n == 0 || use_dense(nnz, m, k) || use_gather(Core::spmm, nnz, m, G) ||
      use_gather(Core::sddmm, nnz, k, B))
    return false;
  const bool wide = isa() == Isa::avx512;
  const int TB = tile_bytes(n, sizeof(S), wide);
  const int64_t T = TB / int64_t(sizeof(S));
  const int64_t nth = at::get_num_threads();
  if (!tiles_spread_evenly((n + T - 1) / T) || (nth - 1) * nnz * int64_t(sizeof(S)) > MAX_PARTIAL_BYTES) return false;

  const at::Tensor tv = widened ? t_values.to(kS).contiguous() : t_values.contiguous();
  const at::Tensor dvals_s = widened ? at::empty({nnz}, dvals_t.options().dtype(kS)) : dvals_t;
  const S* tvals = tv.data_ptr<S>();
  S* vals = dvals_s.data_ptr<S>();
  const int64_t *trp = t_row_ptr.data_ptr<int64_t>(), *rp = row_ptr.data_ptr<int64_t>();
  const int32_t *tci = t_col_idx.data_ptr<int32_t>(), *ci = col_idx.data_ptr<int32_t>();
  I* o = dB.data_ptr<I>();
  const bool planes = dB.dim() == 3;
  const int64_t os0 = dB.stride(0), os1 = planes ? 1 : dB.stride(1);
  const bool prefetch = spmm_prefetch(m * TB);
  sddmm_whole_tiles<S>(vals, nnz, n, T, wide, (m + k) * T, dvals_s.options(),
                       [&](S* gt, int64_t b0, int64_t nc, int tb, S* out, bool first) {
                         // gt: G's tile (m x Tt), then B's (k x Tt).
                         const int64_t Tt = tb / int64_t(sizeof(S));
                         S* bt = gt + m * Tt;
                         pack_tile(gt, Tt, G, b0, nc);
                         Runs runs;
                         if (planes) runs = plane_runs(dB.size(2), dB.stride(1), b0, nc);
                         spmm_tile_rows(tb, wide,
                                        SpmmJob<S, I>{tvals, trp, tci, gt, o, os0, os1, b0, nc, nullptr, nnz - 1,
                                                      prefetch, planes ? &runs : nullptr},
                                        0, k);
                         pack_tile(bt, Tt, B, b0, nc);
                         // G's rows from its packed tile: contiguous, Tt wide, zero beyond nc as B's tile is,
                         // so the dot products run over the whole tile width.
                         sddmm_tile_rows(tb, wide, SddmmJob<S>{rp, ci, gt, Tt, 1, bt, 0, Tt, out, first, nullptr}, 0,
                                         m);
                       });
  if constexpr (widened) const_cast<at::Tensor&>(dvals_t).copy_(dvals_s);
  fused_runs.fetch_add(1, std::memory_order_relaxed);
  return true;
}

}  // namespace

bool spmm_backward(const at::Tensor& t_values, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                   const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& G_arg,
                   const at::Tensor& B_arg, const at::Tensor& dB_arg, const at::Tensor& dvals) {
  const at::Tensor G = as_matrix_if_strided(G_arg), B = as_matrix_if_strided(B_arg), dB = as_matrix_if_strided(dB_arg);
  // Planes only where all three are planes (as spmm and sddmm run them); else the separate ops take copies.
  if ((G.dim() == 3 || B.dim() == 3 || dB.dim() == 3) && !(G.dim() == 3 && B.dim() == 3 && dB.dim() == 3)) return false;
  if (G.scalar_type() == at::kFloat)
    return spmm_backward_typed<float>(t_values, t_row_ptr, t_col_idx, row_ptr, col_idx, G, B, dB, dvals);
  if (G.scalar_type() == at::kBFloat16)
    return spmm_backward_typed<c10::BFloat16>(t_values, t_row_ptr, t_col_idx, row_ptr, col_idx, G, B, dB, dvals);
  return spmm_backward_typed<double>(t_values, t_row_ptr, t_col_idx, row_ptr, col_idx, G, B, dB, dvals);
}

}  // namespace csr
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  // Private, for the tests: how many backward passes ran both products in one pass since load.
  m.def("_fused_backward_runs() -> int", [] { return sparsekern::csr::fused_runs.load(); });
}
