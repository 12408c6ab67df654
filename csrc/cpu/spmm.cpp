// spmm: out (m, n) = A_csr (m, k) @ B (k, n), k = B.size(0). The t_* arguments (cached
// transpose, used by autograd) are checked, not used. Runs the shared CSR tile engine (csr_engine.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "cpu/common.h"
#include "cpu/csr_engine.h"

namespace sparsekern {
namespace {

using namespace csr;

at::Tensor spmm_cpu(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& B,
                    const c10::optional<at::Tensor>& t_row_ptr, const c10::optional<at::Tensor>& t_col_idx,
                    const c10::optional<at::Tensor>& t_perm) {
  const char* op = "spmm";
  check_dense(B, "B", 2, op);
  check_cpu(values, "values", op);
  check_float_or_bf16(values, "values", op);
  check_same_dtype(values, "values", B, "B", op);
  const csr::Csr A =
      csr::checked_csr(values, row_ptr, col_idx, B.size(0), "B has " + std::to_string(B.size(0)) + " rows", op);
  csr::check_transpose_once(A, B.size(0), t_row_ptr, t_col_idx, t_perm, op);
  at::Tensor out = at::empty({A.m, B.size(1)}, B.options().memory_format(c10::MemoryFormat::Contiguous));
  csr::spmm(A.values, A.row_ptr, A.col_idx, B, c10::nullopt, out);
  return out;
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("spmm", &sparsekern::spmm_cpu); }
