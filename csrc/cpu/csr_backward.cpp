// The CSR tile engine's backward of a product (csr_engine.h): for out = A @ B, both gradients in one pass over
// the batch tiles of out's gradient G. Run apart, the input gradient's SpMM (A^T @ G) packs G's tile and the
// weight gradient's SDDMM gathers the same rows of G again, through register transposes, from wherever G lies
// (memory, in a training step); here each thread packs its tile of G once, runs A^T's rows over it, packs B's
// tile and runs the SDDMM with G's rows read straight from the packed tile, still in L2.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/csr_internal.h"
#include "cpu/simd.h"

namespace sparsekern {
namespace csr {
namespace {

using namespace detail;
using namespace simd;

std::atomic<int64_t> fused_runs{0};  // for the tests: which path ran (note_fused_backward)

// The fused activation's backward on G's packed tile gt (m x T), from its packed tile act_tile (nullptr: none):
// with `scale`, gt times act_tile (the activation's derivative); else zero where act_tile (the ReLU's output) is <= 0, as nn.ReLU's
// backward. And each row's sum added to bias_part (nullptr: none), the bias gradient's share of this tile. One pass
// over the tile, in L2.
template <typename S>
SK_INLINE void mask_and_sum_impl(S* gt, const S* act_tile, bool scale, int64_t m, int64_t T, S* bias_part) {
  using v = typename Vec<S>::v;
  using vi = typename Vec<S>::vi;
  constexpr int L = Vec<S>::L;
  for (int64_t g0 = 0; g0 < m; g0 += L) {
    const int64_t rows = std::min<int64_t>(L, m - g0);
    v acc[L];
    for (int r = 0; r < L; ++r) {
      acc[r] = v{};
      if (r >= rows) continue;
      S* row = gt + (g0 + r) * T;
      for (int64_t c = 0; c < T; c += L) {
        v g = vload(row + c);
        if (act_tile) {
          const v a = vload(act_tile + (g0 + r) * T + c);
          if (scale) {
            g *= a;
          } else {
            const vi drop = a <= v{};  // NaN: kept, as threshold_backward keeps it
            g = (v)((vi)g & ~drop);
          }
          vstore(row + c, g);
        }
        acc[r] += g;
      }
    }
    if (bias_part) {
      const v sums = reduce_lanes(acc);
      for (int64_t r = 0; r < rows; ++r) bias_part[g0 + r] += sums[r];
    }
  }
}
SK_CLONED(void, mask_and_sum, (float* gt, const float* act_tile, bool scale, int64_t m, int64_t T, float* bias_part),
          { mask_and_sum_impl(gt, act_tile, scale, m, T, bias_part); })
SK_CLONED(void, mask_and_sum, (double* gt, const double* act_tile, bool scale, int64_t m, int64_t T, double* bias_part),
          { mask_and_sum_impl(gt, act_tile, scale, m, T, bias_part); })
SK_CLONE_DISPATCH(mask_and_sum)

template <typename I>
bool spmm_backward_typed(const TransposedValues& t_values, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                         const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& G, const at::Tensor& B,
                         const at::Tensor& dB, const at::Tensor& dvals_t, const at::Tensor& act, ActGrad act_grad,
                         const at::Tensor& dbias_t) {
  using S = typename bf16::Acc<I>::type;
  constexpr bool widened = !std::is_same<I, S>::value;
  constexpr auto kS = c10::CppTypeToScalarType<S>::value;
  const int64_t m = row_ptr.numel() - 1, k = B.size(0), n = operand_cols(G), nnz = col_idx.numel();
  const bool need_dB = dB.defined();
  // Only where the products would run the whole-tile loops on their own.
  if (nnz == 0 || m == 0 || k == 0 || n == 0 || use_dense(nnz, m, k) ||
      (need_dB && use_gather(Core::spmm, nnz, m, G)) || use_gather(Core::sddmm, nnz, k, B))
    return false;
  const bool wide = isa() == Isa::avx512;
  int TB = tile_bytes(n, sizeof(S), wide);
  // As spmm: a product that no L1 blocks would run over at the widest tiles reads its packed tile (G's m rows for
  // the input gradient, B's k for the SDDMM) in the column indices' order, so the tiles are only as wide as half
  // of L2 holds it.
  const int64_t random_rows =
      std::max(need_dB && !l1_block_rows(k, m, nnz, TB) ? m : 0, sddmm_l1_block_rows(m, k, nnz, TB) ? 0 : k);
  TB = tile_bytes(n, sizeof(S), wide, random_rows);
  const int64_t T = TB / int64_t(sizeof(S));
  const int64_t nth = at::get_num_threads();
  if (!tiles_spread_evenly((n + T - 1) / T) || (nth - 1) * nnz * int64_t(sizeof(S)) > MAX_PARTIAL_BYTES) return false;

  const at::Tensor dvals_s = widened ? at::empty({nnz}, dvals_t.options().dtype(kS)) : dvals_t;
  S* vals = dvals_s.data_ptr<S>();
  const int64_t *trp = t_row_ptr.data_ptr<int64_t>(), *rp = row_ptr.data_ptr<int64_t>();
  const int32_t *tci = t_col_idx.data_ptr<int32_t>(), *ci = col_idx.data_ptr<int32_t>();
  I* o = need_dB ? dB.data_ptr<I>() : nullptr;
  const bool planes = need_dB && dB.dim() == 3;
  const int64_t os0 = need_dB ? dB.stride(0) : 0, os1 = planes ? 1 : need_dB ? dB.stride(1) : 0;
  const bool prefetch = spmm_prefetch(m * TB);
  const bool has_act = act.defined(), need_bias = dbias_t.defined(), scale = act_grad == ActGrad::scale;
  // The bias gradient: a row of m sums per thread, added up at the end.
  at::Tensor bias_parts = need_bias ? at::zeros({nth, m}, dvals_s.options()) : at::Tensor();
  S* bias_part = need_bias ? bias_parts.data_ptr<S>() : nullptr;
  // The input gradient's SpMM in L1 blocks where they pay (l1_block_rows; the rows' sums between blocks in B's tile,
  // free until B is packed).
  const int64_t block_rows = need_dB ? l1_block_rows(k, m, nnz, TB) : 0;
  const std::shared_ptr<const L1Blocks> blocks =
      block_rows ? l1_blocks(t_row_ptr, t_col_idx, k, m, block_rows) : nullptr;
  // A^T's values: in the blocks' order straight from A's where it can, else gathered (and put in that order).
  at::Tensor bvals_t = blocks ? at::empty({nnz}, dvals_s.options()) : at::Tensor(), tv;
  if (need_dB &&
      !(blocks && t_block_values(t_values.values, t_values.perm, t_row_ptr, t_col_idx, block_rows, blocks, bvals_t))) {
    tv = widened ? t_values.gathered().to(kS).contiguous() : t_values.gathered().contiguous();
    if (blocks) block_values(tv.data_ptr<S>(), trp, k, *blocks, bvals_t.data_ptr<S>());
  }
  const S* tvals = tv.defined() ? tv.data_ptr<S>() : nullptr;
  // The SDDMM in L1 blocks of B's tile rows where they pay (sddmm_l1_block_rows; the forward's cached blocks of the
  // pattern), into a buffer in the blocks' order, put back in CSR order at the end.
  const int64_t sd_rows = sddmm_l1_block_rows(m, k, nnz, TB);
  const std::shared_ptr<const L1Blocks> sd_blocks = sd_rows ? l1_blocks(row_ptr, col_idx, m, k, sd_rows) : nullptr;
  at::Tensor sd_vals_t = sd_blocks ? at::empty({nnz}, dvals_s.options()) : at::Tensor();
  S* sd_vals = sd_blocks ? sd_vals_t.data_ptr<S>() : vals;
  sddmm_whole_tiles<S>(
      sd_vals, nnz, n, T, wide, (m + std::max(m, k)) * T, dvals_s.options(),
      [&](S* gt, int64_t w, int64_t b0, int64_t nc, int tb, S* out, bool first) {
        // gt: G's tile (m x Tt), then the activation's tile, later B's (k x Tt), in the same place.
        const int64_t Tt = tb / int64_t(sizeof(S));
        S* bt = gt + m * Tt;
        pack_tile(gt, Tt, G, b0, nc);
        if (has_act) pack_tile(bt, Tt, act, b0, nc);
        if (has_act || need_bias)
          mask_and_sum(gt, has_act ? bt : nullptr, scale, m, Tt, need_bias ? bias_part + w * m : nullptr);
        if (need_dB) {
          Runs runs;
          if (planes) runs = plane_runs(dB.size(2), dB.stride(1), b0, nc);
          const SpmmJob<S, I> J{
              tvals, trp, tci, gt, o, os0, os1, b0, nc, nullptr, nnz - 1, prefetch, planes ? &runs : nullptr};
          if (blocks) spmm_blocks(tb, wide, J, *blocks, bvals_t.data_ptr<S>(), k, bt);
          else spmm_tile_rows(tb, wide, J, 0, k);
        }
        pack_tile(bt, Tt, B, b0, nc);
        // G's rows from its packed tile: contiguous, Tt wide, zero beyond nc as B's tile is, so the dot
        // products run over the whole tile width.
        const SddmmJob<S> SJ{rp, ci, gt, Tt, 1, bt, 0, Tt, out, first, nullptr};
        if (sd_blocks) sddmm_blocks(tb, wide, SJ, *sd_blocks, m);
        else sddmm_tile_rows(tb, wide, SJ, 0, m);
      });
  if (sd_blocks) unblock_values(sd_vals, rp, m, *sd_blocks, vals);
  if constexpr (widened) const_cast<at::Tensor&>(dvals_t).copy_(dvals_s);
  if (need_bias) const_cast<at::Tensor&>(dbias_t).copy_(bias_parts.sum(0));
  note_fused_backward();
  return true;
}

}  // namespace

void note_fused_backward() { fused_runs.fetch_add(1, std::memory_order_relaxed); }

bool spmm_backward(const TransposedValues& t_values, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                   const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& G_arg,
                   const at::Tensor& B_arg, const at::Tensor& dB_arg, const at::Tensor& dvals, const at::Tensor& act,
                   ActGrad act_grad, const at::Tensor& dbias) {
  const at::Tensor G = as_matrix_if_strided(G_arg), B = as_matrix_if_strided(B_arg);
  const at::Tensor dB = dB_arg.defined() ? as_matrix_if_strided(dB_arg) : dB_arg;
  // Planes only where all are planes (as spmm and sddmm run them); else the separate ops take copies.
  const bool any_planes = G.dim() == 3 || B.dim() == 3 || (dB.defined() && dB.dim() == 3);
  if (any_planes && !(G.dim() == 3 && B.dim() == 3 && (!dB.defined() || dB.dim() == 3) && !act.defined())) return false;
  if (G.scalar_type() == at::kFloat)
    return spmm_backward_typed<float>(t_values, t_row_ptr, t_col_idx, row_ptr, col_idx, G, B, dB, dvals, act, act_grad,
                                      dbias);
  if (G.scalar_type() == at::kBFloat16)
    return spmm_backward_typed<c10::BFloat16>(t_values, t_row_ptr, t_col_idx, row_ptr, col_idx, G, B, dB, dvals, act,
                                              act_grad, dbias);
  return spmm_backward_typed<double>(t_values, t_row_ptr, t_col_idx, row_ptr, col_idx, G, B, dB, dvals, act, act_grad,
                                     dbias);
}

}  // namespace csr
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  // Private, for the tests: how many backward passes ran both products in one pass since load (this engine's and
  // the pointwise conv's).
  m.def("_fused_backward_runs() -> int", [] { return sparsekern::csr::fused_runs.load(); });
}
