// sddmm: values[p] = dot(X[i, :], Y[j, :]) for the p-th nonzero (i, j); X (m, d), Y (k, d), any
// strides (sparse_linear's backward passes the transposed views dy.t(), x.t()). Runs the shared
// SDDMM core of the CSR tile engine (csr_engine.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "cpu/common.h"
#include "cpu/csr_engine.h"

namespace sparsekern {
namespace {

using namespace csr;

at::Tensor sddmm_cpu(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& X, const at::Tensor& Y) {
  const char* op = "sddmm";
  check_dense(X, "X", 2, op);
  check_dense(Y, "Y", 2, op);
  check_same_dtype(X, "X", Y, "Y", op);
  const csr::Csr P =
      csr::checked_csr(at::Tensor(), row_ptr, col_idx, Y.size(0), "Y has " + std::to_string(Y.size(0)) + " rows", op);
  TORCH_CHECK(X.size(0) == P.m, op, ": X must have ", P.m, " rows (the pattern has ", P.m, " rows), got ", X.size(0));
  TORCH_CHECK(X.size(1) == Y.size(1), op, ": X and Y must have the same number of columns, got ", X.size(1), " and ",
              Y.size(1));
  at::Tensor vals = at::empty({P.col_idx.numel()}, X.options().memory_format(c10::MemoryFormat::Contiguous));
  csr::sddmm(P.row_ptr, P.col_idx, X, Y, vals);
  return vals;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("sddmm", &sparsekern::sddmm_cpu); }
