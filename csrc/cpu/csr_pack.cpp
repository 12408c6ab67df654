// The CSR tile engine's packing (csr_internal.h): the randomly accessed dense operand (spmm's B,
// sddmm's Y) copied once into contiguous batch tiles, so that each nonzero reads one L2-resident
// row of T values.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>

#include "cpu/common.h"
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

// Every tile is cut into blocks of PACK_ROWS rows; the (tile, block) jobs run in parallel.
template <typename I, typename S = typename bf16::Acc<I>::type>
void pack_all(S* dst, int64_t T, const at::Tensor& src) {
  const int64_t k = src.size(0), n = src.size(1);
  const int64_t ntiles = (n + T - 1) / T, kchunks = (k + PACK_ROWS - 1) / PACK_ROWS;
  const I* base = src.data_ptr<I>();
  const int64_t s0 = src.stride(0), s1 = src.stride(1);
  at::parallel_for(0, ntiles * kchunks, 1, [&](int64_t a, int64_t z) {
    for (int64_t w = a; w < z; ++w) {
      const int64_t t = w / kchunks, j0 = (w % kchunks) * PACK_ROWS, j1 = std::min(k, j0 + PACK_ROWS);
      pack(dst + t * k * T, T, base, s0, s1, j0, j1, t * T, std::min(T, n - t * T));
    }
  });
}

}  // namespace

void pack_tile(float* dst, int64_t T, const at::Tensor& src, int64_t b0, int64_t nc) {
  const int64_t k = src.size(0);
  if (src.scalar_type() == at::kBFloat16)
    pack(dst, T, src.data_ptr<c10::BFloat16>(), src.stride(0), src.stride(1), 0, k, b0, nc);
  else pack(dst, T, src.data_ptr<float>(), src.stride(0), src.stride(1), 0, k, b0, nc);
}
void pack_tile(double* dst, int64_t T, const at::Tensor& src, int64_t b0, int64_t nc) {
  pack(dst, T, src.data_ptr<double>(), src.stride(0), src.stride(1), 0, src.size(0), b0, nc);
}

at::Tensor pack_tiles(const at::Tensor& src, int64_t T) {
  const int64_t k = src.size(0), n = src.size(1);
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
