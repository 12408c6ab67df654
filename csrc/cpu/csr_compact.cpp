// The CSR tile engine's compaction (csr_engine.h: compact): (weight, mask) (m, k), any strides ->
// CSR. Count per row, prefix sum, fill; parallel over rows, reading the mask in memory order for
// row-major and column-major (transposed view) layouts.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/csr_engine.h"
#include "cpu/csr_internal.h"

namespace sparsekern {
namespace csr {
namespace {

using namespace detail;

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
    const int64_t grain = std::max<int64_t>(1, COMPACT_FILL_GRAIN / std::max<int64_t>(k, 1));
    at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
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
    at::parallel_for(0, m, COMPACT_COLMAJOR_ROWS, [&](int64_t r0, int64_t r1) {
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
    const int64_t grain = std::max<int64_t>(1, COMPACT_COUNT_GRAIN / std::max<int64_t>(k, 1));
    at::parallel_for(0, m, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) {
        const uint8_t* p = mp + i * ms0;
        int64_t cnt = 0;
        for (int64_t j = 0; j < k; ++j) cnt += p[j] != 0;
        rp[i + 1] = cnt;
      }
    });
  } else {
    at::parallel_for(0, m, COMPACT_COLMAJOR_ROWS, [&](int64_t r0, int64_t r1) {
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
    else fill_values<double>(weight, mp, ms0, ms1, colmajor, m, k, rp, ci, c.values.data_ptr<double>());
  } else {
    fill_values<float>(weight, mp, ms0, ms1, colmajor, m, k, rp, ci, nullptr);
  }
  return c;
}

}  // namespace csr
}  // namespace sparsekern
