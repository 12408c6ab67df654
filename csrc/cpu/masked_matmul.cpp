// masked_matmul: y (N, m) = x (N, k) @ (weight * mask)^T, and masked_sddmm:
// out (m, k) = (X (m, d) @ Y (k, d)^T) * mask, exactly 0 outside the mask.
// Both compact the mask to CSR in one parallel pass (count, prefix sum, fill; transposed
// views such as weight.t(), mask.t() in the backward are read in memory order) and run the
// shared SpMM / SDDMM cores of the CSR tile engine (csr_engine.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/common.h"
#include "cpu/csr_engine.h"

namespace sparsekern {
namespace {

using namespace csr;

at::Tensor masked_matmul_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask) {
  const char* op = "masked_matmul";
  check_dense(x, "x", 2, op);
  check_dense(weight, "weight", 2, op);
  check_same_dtype(x, "x", weight, "weight", op);
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x must have ", weight.size(1), " columns (weight has ",
              weight.size(1), " columns), got ", x.size(1));
  check_mask(mask, weight.size(0), weight.size(1), op);
  const csr::Compacted W = csr::compact(weight, mask);
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options().memory_format(c10::MemoryFormat::Contiguous));
  csr::spmm(W.values, W.row_ptr, W.col_idx, x.t(), c10::nullopt, y.t());
  return y;
}

template <typename S>
void scatter_rows(const at::Tensor& out, const csr::Compacted& P, const at::Tensor& vals) {
  const int64_t m = out.size(0), k = out.size(1);
  S* o = out.data_ptr<S>();
  const S* v = vals.data_ptr<S>();
  const int64_t* rp = P.row_ptr.data_ptr<int64_t>();
  const int32_t* ci = P.col_idx.data_ptr<int32_t>();
  at::parallel_for(0, m, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      S* row = o + i * k;
      std::fill(row, row + k, S(0));
      for (int64_t p = rp[i]; p < rp[i + 1]; ++p) row[ci[p]] = v[p];
    }
  });
}

at::Tensor masked_sddmm_cpu(const at::Tensor& X, const at::Tensor& Y, const at::Tensor& mask) {
  const char* op = "masked_sddmm";
  check_dense(X, "X", 2, op);
  check_dense(Y, "Y", 2, op);
  check_same_dtype(X, "X", Y, "Y", op);
  TORCH_CHECK(X.size(1) == Y.size(1), op, ": X and Y must have the same number of columns, got ", X.size(1), " and ",
              Y.size(1));
  check_mask(mask, X.size(0), Y.size(0), op);
  const csr::Compacted P = csr::compact(at::Tensor(), mask);
  at::Tensor vals = at::empty({P.col_idx.numel()}, X.options().memory_format(c10::MemoryFormat::Contiguous));
  csr::sddmm(P.row_ptr, P.col_idx, X, Y, vals);
  at::Tensor out = at::empty({X.size(0), Y.size(0)}, X.options().memory_format(c10::MemoryFormat::Contiguous));
  if (X.scalar_type() == at::kFloat) scatter_rows<float>(out, P, vals);
  else if (X.scalar_type() == at::kBFloat16) scatter_rows<c10::BFloat16>(out, P, vals);
  else scatter_rows<double>(out, P, vals);
  return out;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("masked_matmul", &sparsekern::masked_matmul_cpu);
  m.impl("masked_sddmm", &sparsekern::masked_sddmm_cpu);
}
