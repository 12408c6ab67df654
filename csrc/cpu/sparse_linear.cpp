// sparse_linear: y (N, m) = x (N, k) @ W^T + bias, W the (m, k) CSR matrix. The t_* arguments
// (cached transpose, used by autograd) are checked, not used. The shared CSR tile engine computes
// y^T = W @ x^T: x^T is packed into batch tiles once, y is written through a register transpose.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "cpu/sparse_linear.h"

#include "cpu/common.h"
#include "cpu/csr_engine.h"

namespace sparsekern {

at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& t_row_ptr, const c10::optional<at::Tensor>& t_col_idx,
                             const c10::optional<at::Tensor>& t_perm, bool relu) {
  const char* op = "sparse_linear";
  using namespace csr;
  check_dense(x, "x", 2, op);
  check_cpu(values, "values", op);
  check_float_or_bf16(values, "values", op);
  check_same_dtype(x, "x", values, "values", op);
  const csr::Csr W = csr::checked_csr(values, row_ptr, col_idx, x.size(1),
                                      "x has " + std::to_string(x.size(1)) + " columns; x must have W's columns", op);
  csr::check_transpose_once(W, x.size(1), t_row_ptr, t_col_idx, t_perm, op);
  if (bias.has_value() && bias->defined()) {
    check_dense(*bias, "bias", 1, op);
    check_same_dtype(x, "x", *bias, "bias", op);
    TORCH_CHECK(bias->size(0) == W.m, op, ": bias must have ", W.m, " entries (W has ", W.m, " rows), got ",
                bias->size(0));
  }
  at::Tensor y = at::empty({x.size(0), W.m}, x.options().memory_format(c10::MemoryFormat::Contiguous));
  csr::spmm(W.values, W.row_ptr, W.col_idx, x.t(), bias, y.t(), relu);
  return y;
}

namespace {

at::Tensor sparse_linear_op(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                            const at::Tensor& col_idx, const c10::optional<at::Tensor>& bias,
                            const c10::optional<at::Tensor>& t_row_ptr, const c10::optional<at::Tensor>& t_col_idx,
                            const c10::optional<at::Tensor>& t_perm) {
  return sparse_linear_cpu(x, values, row_ptr, col_idx, bias, t_row_ptr, t_col_idx, t_perm, false);
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("sparse_linear", &sparsekern::sparse_linear_op); }
