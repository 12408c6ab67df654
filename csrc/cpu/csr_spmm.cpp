// The CSR tile engine's SpMM core (csr_engine.h): out (m, n) = A (m, k) @ B (k, n) [+ bias[i]].
// B is packed into batch tiles once (csr_pack.cpp); nnz-balanced row parts (csr_partition.cpp) walk
// every tile, each nonzero adding w times one packed row; dense enough patterns run the dense
// fallback (csr_dense.cpp).
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/csr_internal.h"
#include "cpu/plan_cache.h"
#include "cpu/simd.h"

// The loops are written with explicit mul+add on GCC vectors; allow the compiler to fuse them into
// FMAs (ISO -std=c++20 otherwise turns contraction off).
#pragma GCC optimize("fp-contract=fast")

namespace sparsekern {
namespace csr {
namespace {

using namespace simd;
using namespace detail;

// Write a group of rows (buf: rows x T) into out[g0:g0+rows, b0:b0+nc].
template <typename S, int T>
SK_INLINE void store_group(const SpmmJob<S>& J, const S* buf, int64_t g0, int64_t rows) {
  constexpr int L = Vec<S>::L;
  const int64_t nc = J.nc;
  if (J.oruns) {
    for (int64_t r = 0; r < rows; ++r) {
      S* o = J.out + (g0 + r) * J.os0;
      for (int q = 0; q < J.oruns->count; ++q) {
        const Run& run = J.oruns->run[q];
        const S* s = buf + r * T + run.c;
        S* d = o + run.off;
        int64_t c = 0;
        for (; c + L <= run.len; c += L) vstore(d + c, vload(s + c));
        for (; c < run.len; ++c) d[c] = s[c];
      }
    }
  } else if (J.os1 == 1) {
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

// 16 rows of a transposed float32 output (out[:, g0:g0+16] seen as 16 rows of tokens) through 16 x 16 register
// transposes (SK_AVX512 functions only).
template <int T>
SK_INLINE void store_group16(const SpmmJob<float>& J, const float* buf, int64_t g0) {
  const int64_t nc = J.nc, cfull = nc / 16 * 16;
  float* o = J.out + g0 + J.b0 * J.os1;
  for (int64_t c = 0; c < cfull; c += 16) transpose_block16(buf + c, T, o + c * J.os1, J.os1);
  for (int64_t c = cfull; c < nc; ++c)
    for (int r = 0; r < 16; ++r) o[c * J.os1 + r] = buf[r * T + c];
}

// The same for a bf16 output: each float32 result rounded once.
template <typename S, int T>
SK_INLINE void store_group(const SpmmJob<S, c10::BFloat16>& J, const S* buf, int64_t g0, int64_t rows) {
  constexpr int L = Vec<S>::L;
  const int64_t nc = J.nc;
  if (J.oruns) {
    for (int64_t r = 0; r < rows; ++r) {
      c10::BFloat16* o = J.out + (g0 + r) * J.os0;
      for (int q = 0; q < J.oruns->count; ++q) {
        const Run& run = J.oruns->run[q];
        const S* s = buf + r * T + run.c;
        c10::BFloat16* d = o + run.off;
        int64_t c = 0;
        for (; c + L <= run.len; c += L) bf16::store8(d + c, vload(s + c));
        for (; c < run.len; ++c) d[c] = bf16::from_f32(s[c]);
      }
    }
  } else if (J.os1 == 1) {
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
      for (int64_t c = 0; c < nc; ++c) J.out[(g0 + r) * J.os0 + (J.b0 + c) * J.os1] = bf16::from_f32(buf[r * T + c]);
  }
}

// Prefetch into L2 the output lines of the q-th piece of rows n0..n1: row n0 + q, or token q where out is
// transposed. store_group's writes are scattered (64 token rows, or 64 rows or planes, a line or two each), more
// streams than the hardware prefetchers follow: in a training step the output's lines come from memory, each store
// waiting on its line. Issued a chunk of rows ahead (a float32 tile: 4 lines per row), the lines arrive in time,
// owned (no other core holds them). ViT-S/16 step 1.05x (fc1's forward, 800 tokens, 1536 outputs, with a cold cache
// 1.54 -> 1.16 ms), MLP 1.02x, BERT-style 1.01x; no change with the caches warm (Intel SPR-class, 2 threads,
// interleaved A/B).
template <typename S, typename O>
SK_INLINE void prefetch_out(const SpmmJob<S, O>& J, int64_t n0, int64_t n1, int64_t q) {
  const auto lines = [](const O* p, int64_t count) { prefetch_l2(p, count * int64_t(sizeof(O))); };
  if (J.oruns) {
    if (n0 + q >= n1) return;
    const O* o = J.out + (n0 + q) * J.os0;
    for (int r = 0; r < J.oruns->count; ++r) lines(o + J.oruns->run[r].off, J.oruns->run[r].len);
  } else if (J.os1 == 1) {
    if (n0 + q < n1) lines(J.out + (n0 + q) * J.os0 + J.b0, J.nc);
  } else if (J.os0 == 1) {
    if (q < J.nc) lines(J.out + n0 + (J.b0 + q) * J.os1, n1 - n0);
  }
}

// NV vectors of W bytes per packed row (T = NV * L elements); W = 64 only in SK_AVX512 functions. PF: prefetch.
template <typename S, int NV, typename O, int W, bool PF>
SK_INLINE void spmm_rows_loop(const SpmmJob<S, O>& J, int64_t r0, int64_t r1) {
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
    const int64_t n1 = std::min(c1 + CHUNK, r1);
    for (int64_t i = c0; i < c1; ++i) {
      if (!J.partial) {
        if (c0 == r0) prefetch_out(J, c0, c1, i - c0);  // the first chunk's own lines: as early as it can
        prefetch_out(J, c1, n1, i - c0);
      }
      v acc[SETS][NV];
      if (J.init) {  // an earlier L1 block's sums
        for (int q = 0; q < NV; ++q) acc[0][q] = vload<W>(J.init + i * T + q * L);
      } else {
        v init{};  // a splat of the loaded bias: of `bias ? bias[i] : 0` GCC built 16 masked broadcasts per vector
        if (J.bias) init = vsplat<W>(J.bias[i]);
        for (int q = 0; q < NV; ++q) acc[0][q] = init;
      }
      for (int s = 1; s < SETS; ++s)
        for (int q = 0; q < NV; ++q) acc[s][q] = v{};
      int64_t p = J.rp[i];
      const int64_t e = J.rp[i + 1];
      for (; p + SETS <= e; p += SETS) {
        // The packed rows are L2-resident but randomly addressed: prefetch the first line of each into L1.
        // One line, not the row's 2-4: the prefetches take load slots, and the rest of a row follows its first
        // line (SpMM 1.07-1.24x faster than prefetching whole rows at ViT, MLP, BERT and 4096^2 shapes,
        // either vector width, interleaved A/B on Zen 4; none at all loses 15 % at 4096^2). On Intel only for
        // packed tiles from 1 MB on (spmm_prefetch).
        if constexpr (PF)
          for (int s = 0; s < SETS; ++s) __builtin_prefetch(Bp + (int64_t)ci[std::min(p + s + PREFETCH, last)] * T);
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
      if (J.partial) {  // an L1 block before the last: the sums so far, for the next block
        for (int q = 0; q < NV; ++q) vstore<W>(J.partial + i * T + q * L, acc[0][q]);
        continue;
      }
      // The fused ReLU in registers, not a pass of its own over the output (clamp_min_: 25 us a 256 x 1024 layer).
      // `a < 0 ? 0 : a` keeps a NaN, as clamp_min does.
      if (J.relu)
        for (int q = 0; q < NV; ++q) acc[0][q] = acc[0][q] < v{} ? v{} : acc[0][q];
      for (int q = 0; q < NV; ++q) vstore<W>(cbuf + (i - c0) * T + q * L, acc[0][q]);
    }
    if (J.partial) continue;
    int64_t g0 = c0;
    if constexpr (W == 64 && std::is_same<S, float>::value && std::is_same<O, float>::value) {
      // A transposed float output in 16 x 16 blocks: one 64-byte store (a whole line) per token and block, half
      // the stores and a third fewer shuffles than the 8 x 8 blocks. Steps, each after a step of its own model
      // (Intel SPR-class, 2 threads, interleaved A/B): MLP 3.471 -> 3.397 ms; ViT-S/16, BERT-style, ConvNeXt-T within
      // 1 %. A 384 -> 1536 forward at 800 tokens, warm, 0.965 -> 0.860 ms.
      if (J.os0 == 1 && !J.oruns)
        for (; g0 + 16 <= c1; g0 += 16) store_group16<T>(J, cbuf + (g0 - c0) * T, g0);
    }
    for (; g0 < c1; g0 += G) store_group<S, T>(J, cbuf + (g0 - c0) * T, g0, std::min<int64_t>(G, c1 - g0));
  }
}

// Two loops, not a branch in one: GCC does not unswitch it, and the test costs 3-5 % at 256-byte tiles.
template <typename S, int NV, typename O = S, int W = 32>
SK_INLINE void spmm_rows_impl(const SpmmJob<S, O>& J, int64_t r0, int64_t r1) {
  if (J.prefetch) spmm_rows_loop<S, NV, O, W, true>(J, r0, r1);
  else spmm_rows_loop<S, NV, O, W, false>(J, r0, r1);
}

// The SpMM loops per type and width (the SK_ROWS_* macros: csr_internal.h).
SK_ROWS_CLONES(spmm, SpmmJob)

}  // namespace

SK_ROWS_EXPORT(spmm, SpmmJob, float, float)
SK_ROWS_EXPORT(spmm, SpmmJob, double, double)
SK_ROWS_EXPORT(spmm, SpmmJob, float, c10::BFloat16)

namespace detail {

std::shared_ptr<const L1Blocks> l1_blocks(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t m, int64_t k,
                                          int64_t rows) {
  return plan_cache::get<L1Blocks>(row_ptr, col_idx, {plan_cache::kCsrL1Blocks, m, k, rows}, [&] {
    const int64_t* rp = row_ptr.data_ptr<int64_t>();
    const int32_t* ci = col_idx.data_ptr<int32_t>();
    L1Blocks b;
    b.nb = (k + rows - 1) / rows;
    const int64_t nb = b.nb, stride = m + 1;
    b.rp.assign(nb * stride, 0);
    for (int64_t i = 0; i < m; ++i)  // counts, at each block's row i + 1
      for (int64_t p = rp[i]; p < rp[i + 1]; ++p) ++b.rp[(ci[p] / rows) * stride + i + 1];
    int64_t start = 0;
    for (int64_t blk = 0; blk < nb; ++blk) {
      int64_t* r = b.rp.data() + blk * stride;
      r[0] = start;
      for (int64_t i = 0; i < m; ++i) r[i + 1] += r[i];
      start = r[m];
    }
    b.ci.resize(rp[m] - rp[0]);
    for (int64_t i = 0; i < m; ++i) {
      int64_t p = rp[i];  // the row's entries in block order are its entries in column order
      for (int64_t blk = 0; blk < nb; ++blk)
        for (int64_t q = b.rp[blk * stride + i]; q < b.rp[blk * stride + i + 1]; ++q) b.ci[q] = ci[p++];
    }
    return b;
  });
}

// The values (CSR order, from vals[rp[0]]) in the blocks' order: each row's run of each block copied whole; with
// `back`, from the blocks' order (vals) into CSR order (out). Runs average about 13 at 4096^2, density 0.1: copied
// inline, not a memmove call each (block_values 1.1-1.3 -> 0.9-1.0 ms in a training loop). Tried and slower: by
// chunks of 64 rows, block after block (1.5-1.6 ms); runs of up to 16 copied as 16 vector moves (no faster).
template <typename S, typename O = S>
void block_values_impl(const S* vals, const int64_t* rp, int64_t m, const L1Blocks& b, O* out, bool back) {
  const int64_t stride = m + 1;
  at::parallel_for(0, m, 256, [&](int64_t i0, int64_t i1) SK_NO_MEMMOVE {
    for (int64_t i = i0; i < i1; ++i) {
      int64_t p = rp[i] - rp[0];
      for (int64_t blk = 0; blk < b.nb; ++blk) {
        const int64_t q0 = b.rp[blk * stride + i], len = b.rp[blk * stride + i + 1] - q0;
        if (back) copy_run(out + p, vals + q0, len);
        else copy_run(out + q0, vals + p, len);
        p += len;
      }
    }
  });
}

void block_values(const float* vals, const int64_t* rp, int64_t m, const L1Blocks& b, float* out) {
  block_values_impl(vals, rp, m, b, out, false);
}
void block_values(const double* vals, const int64_t* rp, int64_t m, const L1Blocks& b, double* out) {
  block_values_impl(vals, rp, m, b, out, false);
}
void unblock_values(const float* bvals, const int64_t* rp, int64_t m, const L1Blocks& b, float* out) {
  block_values_impl(bvals, rp, m, b, out, true);
}
void unblock_values(const double* bvals, const int64_t* rp, int64_t m, const L1Blocks& b, double* out) {
  block_values_impl(bvals, rp, m, b, out, true);
}

std::atomic<int64_t> t_block_values_runs{0};
constexpr int64_t T_BLOCK_PREFETCH_FROM_BYTES = int64_t(3) << 19;  // 1.5 MB, as the gather op's

namespace {
// A^T's entries in its L1 blocks' order as positions in A's values (block_values of the transpose's permutation),
// and the blocks it was built for.
struct BlockPerm {
  std::vector<int32_t> perm;
  std::shared_ptr<const L1Blocks> blocks;
  size_t bytes() const { return plan_cache::vec_bytes(perm); }
};
}  // namespace

bool t_block_values(const at::Tensor& values, const at::Tensor& t_perm, const at::Tensor& t_row_ptr,
                    const at::Tensor& t_col_idx, int64_t rows, const std::shared_ptr<const L1Blocks>& blocks,
                    const at::Tensor& out) {
  const int64_t k = t_row_ptr.numel() - 1, n = t_perm.numel();
  if (n > std::numeric_limits<int32_t>::max() || !t_perm.is_contiguous() || !values.is_contiguous() ||
      values.numel() != n)
    return false;
  const auto build = [&] {
    BlockPerm p;
    p.perm.resize(n);
    p.blocks = blocks;
    const int64_t* tp = t_perm.data_ptr<int64_t>();
    const bool in_range = std::all_of(tp, tp + n, [n](int64_t j) { return j >= 0 && j < n; });
    TORCH_CHECK(in_range, "sparse linear: the transpose's permutation indexes past the ", n, " values");
    block_values_impl(tp, t_row_ptr.data_ptr<int64_t>(), k, *blocks, p.perm.data(), false);
    return p;
  };
  std::shared_ptr<const BlockPerm> plan =
      plan_cache::get<BlockPerm>(t_perm, t_col_idx, {plan_cache::kCsrBlockPerm, k, n, rows}, build);
  // Built for other blocks (the transpose's row_ptr, which the key does not track, changed): built again, not kept.
  if (plan->blocks != blocks) plan = std::make_shared<const BlockPerm>(build());
  const int32_t* perm = plan->perm.data();
  // A block's run of values stays in L2 once read, but its first reads come from L3 or memory in no order the
  // hardware prefetchers follow: prefetched 256 entries ahead where the values outgrow L2 (4096^2 at density 0.1,
  // in a training loop: 1.2-1.4 -> 0.75-1.0 ms; 1024^2 a little slower with it).
  const int64_t ahead = n * int64_t(values.element_size()) > T_BLOCK_PREFETCH_FROM_BYTES ? 256 : 0;
  if (values.scalar_type() == at::kDouble)
    plan_cache::permute_into(values.data_ptr<double>(), perm, n, out.data_ptr<double>(), ahead);
  else if (values.scalar_type() == at::kBFloat16)
    plan_cache::permute_into(values.data_ptr<c10::BFloat16>(), perm, n, out.data_ptr<float>(), ahead);
  else plan_cache::permute_into(values.data_ptr<float>(), perm, n, out.data_ptr<float>(), ahead);
  t_block_values_runs.fetch_add(1, std::memory_order_relaxed);
  return true;
}

std::atomic<int64_t> block_runs{0};  // for the tests: tiles run in L1 blocks since load

template <typename S, typename I>
void spmm_blocks_impl(int tb, bool wide, SpmmJob<S, I> J, const L1Blocks& b, const S* bvals, int64_t m, S* sums) {
  block_runs.fetch_add(1, std::memory_order_relaxed);
  J.vals = bvals;
  J.ci = b.ci.data();
  J.prefetch = false;  // a block's rows are in L1
  const S* bias = J.bias;
  for (int64_t blk = 0; blk < b.nb; ++blk) {
    J.rp = b.rp.data() + blk * (m + 1);
    J.init = blk > 0 ? sums : nullptr;
    J.bias = blk > 0 ? nullptr : bias;
    J.partial = blk + 1 < b.nb ? sums : nullptr;
    spmm_tile_rows(tb, wide, J, 0, m);
  }
}
void spmm_blocks(int tb, bool wide, const SpmmJob<float>& J, const L1Blocks& b, const float* bvals, int64_t m,
                 float* sums) {
  spmm_blocks_impl(tb, wide, J, b, bvals, m, sums);
}
void spmm_blocks(int tb, bool wide, const SpmmJob<double>& J, const L1Blocks& b, const double* bvals, int64_t m,
                 double* sums) {
  spmm_blocks_impl(tb, wide, J, b, bvals, m, sums);
}
void spmm_blocks(int tb, bool wide, const SpmmJob<float, c10::BFloat16>& J, const L1Blocks& b, const float* bvals,
                 int64_t m, float* sums) {
  spmm_blocks_impl(tb, wide, J, b, bvals, m, sums);
}

}  // namespace detail

namespace {

// I: the element type of the operands and the output; S: the compute type (bf16 computes in
// float32: values and bias converted once, B widened as it is packed, out rounded on store).
template <typename I>
void spmm_typed(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& B,
                const c10::optional<at::Tensor>& bias, const at::Tensor& out, bool relu) {
  using S = typename bf16::Acc<I>::type;
  constexpr bool widened = !std::is_same<I, S>::value;
  constexpr auto kS = c10::CppTypeToScalarType<S>::value;
  constexpr int L = Vec<S>::L;
  const int64_t m = row_ptr.numel() - 1, k = B.size(0), n = operand_cols(B);
  if (m == 0 || n == 0) return;
  I* o = out.data_ptr<I>();
  const bool planes = out.dim() == 3;  // then B's planes too (spmm flattens the rest)
  const int64_t os0 = out.stride(0), os1 = planes ? 1 : out.stride(1);
  at::Tensor bias_c;
  const S* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_c = widened ? bias->to(kS).contiguous() : bias->contiguous();
    bp = bias_c.data_ptr<S>();
  }
  const int64_t nnz = col_idx.numel();
  if (nnz == 0 || k == 0) {
    at::parallel_for(0, m, std::max<int64_t>(1, FILL_GRAIN / std::max<int64_t>(n, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const I val = bp ? static_cast<I>(bp[i]) : I(0);
        for (int64_t c = 0; c < n; ++c) o[i * os0 + c * os1] = relu && val < I(0) ? I(0) : val;
      }
    });
    return;
  }
  const at::Tensor vals_c = widened ? values.to(kS).contiguous() : values;
  // all_finite: a NaN or Inf in B would reach every output through the GEMM's implicit zeros.
  if (use_dense(nnz, m, k) && all_finite(B)) {
    spmm_dense(vals_c, row_ptr, col_idx, B, bias_c, out);
    if (relu) out.clamp_min_(0);
    return;
  }
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const S* vals = vals_c.data_ptr<S>();
  if (use_gather(Core::spmm, nnz, k, B)) {
    spmm_gather<I, S>(vals, rp, ci, m, B, bp, out);
    if (relu) out.clamp_min_(0);
    return;
  }
  const bool wide = isa() == Isa::avx512;
  int TB = tile_bytes(n, sizeof(S), wide);
  // Where no L1 blocks would run over the widest tiles (or the row parts run, which have none), B's rows come in
  // the column indices' order from the whole packed tile: as wide as half of L2 holds.
  if (!tiles_spread_evenly((n + TB / int64_t(sizeof(S)) - 1) / (TB / int64_t(sizeof(S)))) ||
      !l1_block_rows(m, k, nnz, TB))
    TB = tile_bytes(n, sizeof(S), wide, k);
  const int64_t T = TB / int64_t(sizeof(S));
  const int64_t ntiles = (n + T - 1) / T;
  const bool prefetch = spmm_prefetch(k * TB);
  auto job = [&](const S* tile, int64_t b0, int64_t nc, Runs* runs) {
    if (planes) *runs = plane_runs(out.size(2), out.stride(1), b0, nc);
    return SpmmJob<S, I>{vals, rp, ci, tile, o, os0, os1, b0, nc, bp, nnz - 1, prefetch, planes ? runs : nullptr, relu};
  };
  // Whole tiles: each thread takes a run of batch tiles and packs each (k x T, L2-sized) just before running
  // every row over it, so the packed operand is written and read once, in L2. Row parts (below) each sweep
  // every tile of an operand packed whole beforehand: they balance any number of tiles over the threads, but
  // read the packed operand once per part, from memory once it outgrows L2. Forward, 2 threads, Zen 4,
  // density 0.1 (interleaved A/B): 768 -> 192 at 512 tokens (1.5 MB packed, 8 tiles) 2.3x faster with whole
  // tiles, 96 -> 384 at 2048 tokens 1.1-1.9x, 1024 -> 1024 at batch 256 (4 tiles) 1.0-1.2x, 1536 -> 384 at
  // 784 tokens 1.0-1.15x; a single tile (batch 16) 1.15x slower (one thread). Whole tiles therefore wherever
  // they spread evenly over the threads.
  if (tiles_spread_evenly(ntiles)) {
    const int64_t nth = at::get_num_threads();
    // L1 blocks where they pay (l1_block_rows): every row runs the tile's first block of rows, then its second, ...
    // the rows' sums parked between blocks (m x T, read and written in order).
    const int64_t block_rows = l1_block_rows(m, k, nnz, TB);
    const std::shared_ptr<const L1Blocks> blocks = block_rows ? l1_blocks(row_ptr, col_idx, m, k, block_rows) : nullptr;
    at::Tensor bvals_t;
    if (blocks) {
      bvals_t = at::empty({nnz}, B.options().dtype(c10::CppTypeToScalarType<S>::value));
      block_values(vals, rp, m, *blocks, bvals_t.data_ptr<S>());
    }
    at::parallel_for(0, nth, 1, [&](int64_t w0, int64_t w1) {
      at::Tensor buf = at::empty({(k + (blocks ? m : 0)) * T}, B.options().dtype(c10::CppTypeToScalarType<S>::value));
      S* tile = buf.data_ptr<S>();
      S* sums = tile + k * T;
      for (int64_t w = w0; w < w1; ++w) {
        const auto cols = thread_columns(n, w, nth, sizeof(S));
        for (int64_t b0 = cols.first; b0 < cols.second; b0 += T) {
          const int64_t nc = std::min(T, cols.second - b0);
          const int tb = tile_bytes(nc, sizeof(S), wide);
          const int64_t Tt = tb / int64_t(sizeof(S));
          pack_tile(tile, Tt, B, b0, nc);
          Runs runs;
          if (blocks) spmm_blocks(tb, wide, job(tile, b0, nc, &runs), *blocks, bvals_t.data_ptr<S>(), m, sums);
          else spmm_rows(tb, wide, job(tile, b0, nc, &runs), 0, m);
        }
      }
    });
    return;
  }
  const at::Tensor Bp = pack_tiles(B, T);
  const S* bpk = Bp.data_ptr<S>();
  const int64_t align = 2 * L;
  const int64_t parts = num_parts(m, align);
  const std::vector<int64_t> bounds = partition_rows(rp, m, parts, /*row_cost=*/2 + T / L, align);
  auto run = [&](int64_t part) {
    Runs runs;
    for (int64_t t = 0; t < ntiles; ++t)
      spmm_rows(TB, wide, job(bpk + t * k * T, t * T, std::min(T, n - t * T), &runs), bounds[part], bounds[part + 1]);
  };
  run_parts(parts, run);
}

}  // namespace

void spmm(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& B_arg,
          const c10::optional<at::Tensor>& bias, const at::Tensor& out_arg, bool relu) {
  const at::Tensor B = as_matrix_if_strided(B_arg), out = as_matrix_if_strided(out_arg);
  if (B.dim() == 3 || out.dim() == 3) {
    // Planes run the tile loops; every other path (no nonzeros, the dense fallback, the gather path) takes them
    // reshaped, as does an operand pair of which only one has planes.
    const int64_t m = row_ptr.numel() - 1, k = B.size(0), n = operand_cols(B), nnz = col_idx.numel();
    if (B.dim() != 3 || out.dim() != 3 || nnz == 0 || k == 0 || use_dense(nnz, m, k) ||
        use_gather(Core::spmm, nnz, k, B)) {
      const at::Tensor out2 = out.dim() == 3 ? at::empty({m, n}, out.options()) : out;
      spmm(values, row_ptr, col_idx, B.reshape({k, n}), bias, out2, relu);
      if (out.dim() == 3) out.copy_(out2.view(out.sizes()));
      return;
    }
  }
  if (B.scalar_type() == at::kFloat) spmm_typed<float>(values, row_ptr, col_idx, B, bias, out, relu);
  else if (B.scalar_type() == at::kBFloat16) spmm_typed<c10::BFloat16>(values, row_ptr, col_idx, B, bias, out, relu);
  else spmm_typed<double>(values, row_ptr, col_idx, B, bias, out, relu);
}

}  // namespace csr
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  // Private, for the tests: how many batch tiles the SpMM ran in L1 blocks since load.
  m.def("_l1_block_runs() -> int", [] { return sparsekern::csr::detail::block_runs.load(); });
  // And how many the fused backward's SDDMM ran in L1 blocks (csr_sddmm.cpp, sddmm_blocks).
  m.def("_sddmm_l1_block_runs() -> int", [] { return sparsekern::csr::detail::sddmm_block_runs.load(); });
  // And how many times W^T's values were read into its blocks' order straight from W's (t_block_values).
  m.def("_t_block_values_runs() -> int", [] { return sparsekern::csr::detail::t_block_values_runs.load(); });
}
