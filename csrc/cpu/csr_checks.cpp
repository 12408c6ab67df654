// Argument and pattern checks of the CSR ops (csr_engine.h): each message names the op and the argument.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>

#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/csr_internal.h"

namespace sparsekern {
namespace csr {
namespace {

using namespace detail;

void atomic_min(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {}
}

// The first i in [0, n) with p[i + 1] < p[i], or n.
int64_t first_decrease(const int64_t* p, int64_t n) {
  std::atomic<int64_t> first{n};
  at::parallel_for(0, n, CHECK_ROW_PTR_GRAIN, [&](int64_t a, int64_t z) {
    for (int64_t i = a; i < z; ++i)
      if (p[i + 1] < p[i]) return atomic_min(first, i);
  });
  return first.load();
}

}  // namespace

void check_pattern(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t ncols, const std::string& what,
                   const char* op) {
  const int64_t m = row_ptr.numel() - 1;
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int64_t nnz = col_idx.numel();
  TORCH_CHECK(rp[0] == 0, op, ": row_ptr[0] must be 0, got ", rp[0]);
  TORCH_CHECK(rp[m] == nnz, op, ": row_ptr[-1] must equal the number of nonzeros (col_idx has ", nnz, " entries), got ",
              rp[m]);
  const int64_t i = first_decrease(rp, m);
  TORCH_CHECK(i == m, op, ": row_ptr must be non-decreasing, got row_ptr[", i, "] = ", rp[i], " > row_ptr[", i + 1,
              "] = ", rp[i + 1]);
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  // Columns strictly increasing within each row (the sparse loops would add duplicates, the dense
  // fallback keep the last), so only a row's first and last column need the range check.
  std::atomic<int64_t> bad_row_of_col{m};
  at::parallel_for(0, m, row_grain(m, nnz, CHECK_NNZ_GRAIN), [&](int64_t a, int64_t z) {
    for (int64_t i = a; i < z; ++i) {
      const int64_t s = rp[i], e = rp[i + 1];
      if (s == e) continue;
      int bad = ci[s] < 0 || int64_t(ci[e - 1]) >= ncols;
      for (int64_t p = s + 1; p < e; ++p) bad |= ci[p] <= ci[p - 1];
      if (bad) return atomic_min(bad_row_of_col, i);
    }
  });
  const int64_t r = bad_row_of_col.load();
  if (r == m) return;
  for (int64_t p = rp[r]; p < rp[r + 1]; ++p) {
    TORCH_CHECK(ci[p] >= 0 && int64_t(ci[p]) < ncols, op, ": col_idx entries must lie in [0, ", ncols, ") (", what,
                "), got col_idx[", p, "] = ", ci[p]);
    TORCH_CHECK(p == rp[r] || ci[p] > ci[p - 1], op,
                ": col_idx must be strictly increasing within each row (sorted, no duplicates), got col_idx[", p - 1,
                "] = ", ci[p - 1], " and col_idx[", p, "] = ", ci[p], " in row ", r);
  }
}

void check_transpose(const Csr& a, int64_t k, const c10::optional<at::Tensor>& t_row_ptr_arg,
                     const c10::optional<at::Tensor>& t_col_idx_arg, const c10::optional<at::Tensor>& t_perm_arg,
                     const char* op) {
  const bool has_rp = t_row_ptr_arg.has_value() && t_row_ptr_arg->defined();
  const bool has_ci = t_col_idx_arg.has_value() && t_col_idx_arg->defined();
  const bool has_perm = t_perm_arg.has_value() && t_perm_arg->defined();
  if (!has_rp && !has_ci && !has_perm) return;
  TORCH_CHECK(has_rp && has_ci && has_perm, op,
              ": t_row_ptr, t_col_idx and t_perm (the transpose) must be given together or not at all, got",
              has_rp ? " t_row_ptr" : "", has_ci ? " t_col_idx" : "", has_perm ? " t_perm" : "", " only");
  const int64_t m = a.m, nnz = a.col_idx.numel();
  auto check_index = [&](const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t numel,
                         const char* expected) {
    check_cpu(t, name, op);
    TORCH_CHECK(t.dim() == 1 && t.scalar_type() == dtype, op, ": ", name, " must be a 1-D ", dtype, " tensor, got ",
                t.scalar_type(), " of shape ", t.sizes());
    TORCH_CHECK(t.numel() == numel, op, ": ", name, " must have ", numel, " entries (", expected, "), got ", t.numel());
    return t.contiguous();
  };
  const std::string cols = "k+1 = " + std::to_string(k + 1) + ": the transpose has k = " + std::to_string(k) + " rows";
  const std::string nz = "nnz = " + std::to_string(nnz) + ", as col_idx";
  const at::Tensor t_row_ptr = check_index(*t_row_ptr_arg, "t_row_ptr", at::kLong, k + 1, cols.c_str());
  const at::Tensor t_col_idx = check_index(*t_col_idx_arg, "t_col_idx", at::kInt, nnz, nz.c_str());
  const at::Tensor t_perm = check_index(*t_perm_arg, "t_perm", at::kLong, nnz, nz.c_str());
  const int64_t* trp = t_row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(trp[0] == 0, op, ": t_row_ptr[0] must be 0, got ", trp[0]);
  TORCH_CHECK(trp[k] == nnz, op, ": t_row_ptr[-1] must equal nnz = ", nnz, ", got ", trp[k]);
  const int64_t jr = first_decrease(trp, k);
  TORCH_CHECK(jr == k, op, ": t_row_ptr must be non-decreasing, got t_row_ptr[", jr, "] = ", trp[jr], " > t_row_ptr[",
              jr + 1, "] = ", trp[jr + 1]);
  const int64_t* rp = a.row_ptr.data_ptr<int64_t>();
  const int32_t* ci = a.col_idx.data_ptr<int32_t>();
  const int32_t* tci = t_col_idx.data_ptr<int32_t>();
  const int64_t* perm = t_perm.data_ptr<int64_t>();
  // Checking every entry costs a random col_idx read per nonzero (measured: ~0.8x the forward at
  // 4096x4096, density 0.1, batch 256); each column's first and last entry are checked instead, O(k),
  // which catches a transpose of another pattern or shape and a reversed or shifted t_perm. Interior
  // entries stay safe (gather and the transposed product check their ranges) but are not compared.
  auto check_entry = [&](int64_t j, int64_t q, int what) {
    const int64_t p = perm[q];
    if (what == 0)
      TORCH_CHECK(p >= 0 && p < nnz, op, ": t_perm entries must lie in [0, nnz = ", nnz, "), got t_perm[", q,
                  "] = ", p);
    if (what == 1)
      TORCH_CHECK(ci[p] == j, op, ": t_perm and t_row_ptr must list column ", j, "'s nonzeros at t_perm[", trp[j], ":",
                  trp[j + 1], "], got t_perm[", q, "] = ", p, ", a nonzero of column ", ci[p]);
    const int64_t r = tci[q];
    if (what == 2 && !(r >= 0 && r < m && rp[r] <= p && p < rp[r + 1])) {
      const int64_t row = std::upper_bound(rp, rp + m + 1, p) - rp - 1;
      TORCH_CHECK(false, op, ": t_col_idx[", q, "] must be ", row, ", the row of nonzero t_perm[", q, "] = ", p,
                  ", got ", tci[q]);
    }
  };
  for (int64_t j = 0; j < k; ++j) {
    const int64_t q0 = trp[j], q1 = trp[j + 1];
    if (q0 == q1) continue;
    // Blame t_perm before t_col_idx: a wrong t_perm entry also mismatches its row.
    for (int what = 0; what < 2; ++what) {
      check_entry(j, q0, what);
      check_entry(j, q1 - 1, what);
    }
    TORCH_CHECK(q1 - q0 == 1 || perm[q0] < perm[q1 - 1], op, ": t_perm must be increasing within each column (rows ",
                "ascending in the transpose), got t_perm[", q0, "] = ", perm[q0], " and t_perm[", q1 - 1,
                "] = ", perm[q1 - 1], " in column ", j);
    check_entry(j, q0, 2);
    check_entry(j, q1 - 1, 2);
  }
}

void check_cpu(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got device ", t.device());
}

void check_dense(const at::Tensor& t, const char* name, int64_t dim, const char* op) {
  check_cpu(t, name, op);
  check_float_or_bf16(t, name, op);
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_same_dtype(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", an, " and ", bn, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

void check_mask(const at::Tensor& mask, int64_t rows, int64_t cols, const char* op) {
  check_cpu(mask, "mask", op);
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == rows && mask.size(1) == cols, op, ": mask must have shape (", rows,
              ", ", cols, "), got ", mask.sizes());
}

Csr checked_csr(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t ncols,
                const std::string& what, const char* op) {
  check_cpu(row_ptr, "row_ptr", op);
  check_cpu(col_idx, "col_idx", op);
  check_csr(row_ptr, col_idx, op);
  Csr c;
  c.row_ptr = row_ptr.contiguous();
  c.col_idx = col_idx.contiguous();
  c.m = row_ptr.numel() - 1;
  if (values.defined()) {
    check_cpu(values, "values", op);
    check_float_or_bf16(values, "values", op);
    TORCH_CHECK(values.dim() == 1, op, ": values must be 1-D, got shape ", values.sizes());
    TORCH_CHECK(values.numel() == col_idx.numel(), op, ": values and col_idx must have the same length, got ",
                values.numel(), " and ", col_idx.numel());
    c.values = values.contiguous();
  }
  check_pattern_once(c.row_ptr, c.col_idx, ncols, what, op);
  return c;
}

}  // namespace csr
}  // namespace sparsekern
