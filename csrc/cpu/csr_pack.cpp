// The CSR tile engine's packing (csr_internal.h): the randomly accessed dense operand (spmm's B,
// sddmm's Y) copied once into contiguous batch tiles, so that each nonzero reads one L2-resident
// row of T values.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/csr_internal.h"
#include "cpu/simd.h"

namespace sparsekern {
namespace csr {
namespace detail {
namespace {

using namespace simd;

// Packing: dst (rows j0..j1 of a k x T tile) = src[j, b0 + c] for c < nc, 0 for nc <= c < T.
// src is a strided (rows, cols) view: element (j, c) at base[j * s0 + c * s1]. A bf16 source is
// widened to float32 here, so the SpMM/SDDMM loops run on float32 tiles.
template <typename I, typename S = typename bf16::Acc<I>::type>
SK_INLINE void pack_impl(S* dst, int64_t T, const I* base, int64_t s0, int64_t s1, int64_t j0, int64_t j1, int64_t b0,
                         int64_t nc) {
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

// The same from a plane operand (csr_internal.h): row j's runs copied from base + j * s0 + run.off.
template <typename I, typename S = typename bf16::Acc<I>::type>
SK_INLINE void pack_planes_impl(S* dst, int64_t T, const I* base, int64_t s0, const Runs& runs, int64_t j0, int64_t j1,
                                int64_t nc) {
  constexpr int L = Vec<S>::L;
  for (int64_t j = j0; j < j1; ++j) {
    S* d = dst + j * T;
    for (int r = 0; r < runs.count; ++r) {
      const Run& run = runs.run[r];
      const I* s = base + j * s0 + run.off;
      S* dr = d + run.c;
      int64_t c = 0;
      for (; c + L <= run.len; c += L) vstore(dr + c, vload_wide(s + c));
      for (; c < run.len; ++c) dr[c] = bf16::widen(s[c]);
    }
    for (int64_t c = nc; c < T; ++c) d[c] = S(0);
  }
}

SK_CLONED(void, pack_planes_f32,
          (float* dst, int64_t T, const float* base, int64_t s0, const Runs& runs, int64_t j0, int64_t j1, int64_t nc),
          { pack_planes_impl<float>(dst, T, base, s0, runs, j0, j1, nc); })
SK_CLONED(void, pack_planes_f64,
          (double* dst, int64_t T, const double* base, int64_t s0, const Runs& runs, int64_t j0, int64_t j1,
           int64_t nc),
          { pack_planes_impl<double>(dst, T, base, s0, runs, j0, j1, nc); })
SK_CLONED(void, pack_planes_bf16,
          (float* dst, int64_t T, const c10::BFloat16* base, int64_t s0, const Runs& runs, int64_t j0, int64_t j1,
           int64_t nc),
          { pack_planes_impl<c10::BFloat16>(dst, T, base, s0, runs, j0, j1, nc); })

SK_CLONED(void, pack_f32,
          (float* dst, int64_t T, const float* base, int64_t s0, int64_t s1, int64_t j0, int64_t j1, int64_t b0,
           int64_t nc),
          { pack_impl<float>(dst, T, base, s0, s1, j0, j1, b0, nc); })
SK_CLONED(void, pack_f64,
          (double* dst, int64_t T, const double* base, int64_t s0, int64_t s1, int64_t j0, int64_t j1, int64_t b0,
           int64_t nc),
          { pack_impl<double>(dst, T, base, s0, s1, j0, j1, b0, nc); })
SK_CLONED(void, pack_bf16,
          (float* dst, int64_t T, const c10::BFloat16* base, int64_t s0, int64_t s1, int64_t j0, int64_t j1, int64_t b0,
           int64_t nc),
          { pack_impl<c10::BFloat16>(dst, T, base, s0, s1, j0, j1, b0, nc); })
SK_CLONE_DISPATCH(pack_planes_f32)
SK_CLONE_DISPATCH(pack_planes_f64)
SK_CLONE_DISPATCH(pack_planes_bf16)
SK_CLONE_DISPATCH(pack_f32)
SK_CLONE_DISPATCH(pack_f64)
SK_CLONE_DISPATCH(pack_bf16)
#if SK_HAVE_AVX512
// A column-major float32 source (sparse_linear's x.t()) on 64-byte vectors: 16 x 16 register transposes, so that
// every load reads one whole line of a token's features and every store writes one whole line of the tile. The
// edges (rows past a multiple of 16, columns past one) go as pack_impl takes them. Steps on top of the 16 x 16
// transposed store, each after a step of its own model (Intel SPR-class, 2 threads, interleaved A/B): MLP 3.397 ->
// 3.359 ms, both 1.03x; BERT-style 403.8 -> 399.8 ms with both. Forwards at 800 tokens, warm: 1536 -> 384 0.917 ->
// 0.831 ms, 384 -> 1536 0.818 -> 0.720.
SK_AVX512 void pack_f32_wide(float* dst, int64_t T, const float* base, int64_t s1, int64_t j0, int64_t j1, int64_t b0,
                             int64_t nc) {
  // Token blocks outer, features inner: each 16 x 16 transpose reads the next line of the same 16 token rows, which
  // the L2 streamer then follows; features outer read one line from each of the tile's 64 token rows in turn, more
  // streams than it tracks, every line a miss where the operand is not in cache (a layer's input after other layers
  // ran). SparseLinear fwd+bwd with the caches flushed before each step: 4096^2 at density 0.01, batch 256, 6.5-6.9
  // -> 6.0-6.5 ms (1.04-1.08x); 1536 -> 384 at 800 tokens 1.02-1.06x; 384^2 even; warm even (Intel SPR-class,
  // 2 threads, interleaved A/B). The 32-byte loops' tiles (pack_impl, 32 tokens) read even either way here.
  const int64_t cfull = nc / 16 * 16, jfull = j0 + (j1 - j0) / 16 * 16;
  for (int64_t c = 0; c < cfull; c += 16)
    for (int64_t j = j0; j < jfull; j += 16) transpose_block16(base + j + (b0 + c) * s1, s1, dst + j * T + c, T);
  int64_t j = j0;
  for (; j < jfull; j += 16) {
    for (int64_t r = 0; r < 16; ++r) {
      float* d = dst + (j + r) * T;
      for (int64_t c = cfull; c < nc; ++c) d[c] = base[(j + r) + (b0 + c) * s1];
      for (int64_t c = nc; c < T; ++c) d[c] = 0.f;
    }
  }
  if (j < j1) pack_impl<float>(dst, T, base, 1, s1, j, j1, b0, nc);
}
#endif

inline void pack(float* d, int64_t T, const float* b, int64_t s0, int64_t s1, int64_t j0, int64_t j1, int64_t b0,
                 int64_t nc) {
#if SK_HAVE_AVX512
  if (s0 == 1 && s1 != 1 && isa() == Isa::avx512) return pack_f32_wide(d, T, b, s1, j0, j1, b0, nc);
#endif
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

inline void pack_planes(float* d, int64_t T, const float* b, int64_t s0, const Runs& r, int64_t j0, int64_t j1,
                        int64_t nc) {
  pack_planes_f32(d, T, b, s0, r, j0, j1, nc);
}
inline void pack_planes(double* d, int64_t T, const double* b, int64_t s0, const Runs& r, int64_t j0, int64_t j1,
                        int64_t nc) {
  pack_planes_f64(d, T, b, s0, r, j0, j1, nc);
}
inline void pack_planes(float* d, int64_t T, const c10::BFloat16* b, int64_t s0, const Runs& r, int64_t j0, int64_t j1,
                        int64_t nc) {
  pack_planes_bf16(d, T, b, s0, r, j0, j1, nc);
}

// Rows j0..j1 of the tile of columns b0 .. b0+nc of src (2-D or planes).
template <typename I, typename S>
void pack_rows(S* dst, int64_t T, const at::Tensor& src, int64_t j0, int64_t j1, int64_t b0, int64_t nc) {
  const I* base = src.data_ptr<I>();
  if (src.dim() == 3)
    pack_planes(dst, T, base, src.stride(0), plane_runs(src.size(2), src.stride(1), b0, nc), j0, j1, nc);
  else pack(dst, T, base, src.stride(0), src.stride(1), j0, j1, b0, nc);
}

// Every tile is cut into blocks of PACK_ROWS rows; the (tile, block) jobs run in parallel.
template <typename I, typename S = typename bf16::Acc<I>::type>
void pack_all(S* dst, int64_t T, const at::Tensor& src) {
  const int64_t k = src.size(0), n = operand_cols(src);
  const int64_t ntiles = (n + T - 1) / T, kchunks = (k + PACK_ROWS - 1) / PACK_ROWS;
  at::parallel_for(0, ntiles * kchunks, 1, [&](int64_t a, int64_t z) {
    for (int64_t w = a; w < z; ++w) {
      const int64_t t = w / kchunks, j0 = (w % kchunks) * PACK_ROWS, j1 = std::min(k, j0 + PACK_ROWS);
      pack_rows<I>(dst + t * k * T, T, src, j0, j1, t * T, std::min(T, n - t * T));
    }
  });
}

}  // namespace

Runs plane_runs(int64_t P, int64_t sN, int64_t b0, int64_t nc) {
  TORCH_INTERNAL_ASSERT(P > 0 && nc <= MAX_RUNS - 2, "plane_runs: P = ", P, ", nc = ", nc);
  Runs runs;
  int64_t n = b0 / P, p = b0 - n * P;
  for (int64_t c = 0; c < nc;) {
    const int64_t len = std::min(nc - c, P - p);
    runs.run[runs.count++] = Run{n * sN + p, int32_t(c), int32_t(len)};
    c += len;
    ++n;
    p = 0;
  }
  return runs;
}

at::Tensor as_matrix_if_strided(const at::Tensor& t) {
  if (t.dim() != 3) return t;
  const int64_t k = t.size(0), N = t.size(1), P = t.size(2);
  if (P == 1) return t.select(2, 0);
  if (N == 1) return t.select(1, 0);
  TORCH_INTERNAL_ASSERT(t.stride(2) == 1, "plane operands have unit stride along their planes, got strides ",
                        t.strides());
  if (t.stride(1) == P) return t.as_strided({k, N * P}, {t.stride(0), 1});
  return t;
}

void pack_tile(float* dst, int64_t T, const at::Tensor& src, int64_t b0, int64_t nc) {
  if (src.scalar_type() == at::kBFloat16) pack_rows<c10::BFloat16>(dst, T, src, 0, src.size(0), b0, nc);
  else pack_rows<float>(dst, T, src, 0, src.size(0), b0, nc);
}
void pack_tile(double* dst, int64_t T, const at::Tensor& src, int64_t b0, int64_t nc) {
  pack_rows<double>(dst, T, src, 0, src.size(0), b0, nc);
}

at::Tensor pack_tiles(const at::Tensor& src, int64_t T) {
  const int64_t k = src.size(0), n = operand_cols(src);
  const int64_t ntiles = (n + T - 1) / T;
  const at::ScalarType compute = src.scalar_type() == at::kBFloat16 ? at::kFloat : src.scalar_type();
  at::Tensor packed =
      at::empty({ntiles * k * T}, src.options().dtype(compute).memory_format(c10::MemoryFormat::Contiguous));
  if (src.scalar_type() == at::kFloat) pack_all<float>(packed.data_ptr<float>(), T, src);
  else if (src.scalar_type() == at::kBFloat16) pack_all<c10::BFloat16>(packed.data_ptr<float>(), T, src);
  else pack_all<double>(packed.data_ptr<double>(), T, src);
  return packed;
}

}  // namespace detail
}  // namespace csr
}  // namespace sparsekern
