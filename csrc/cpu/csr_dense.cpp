// The CSR tile engine's dense fallback (csr_internal.h): from a density of dense_above() on, a
// product runs as one GEMM on the pattern scattered into a dense matrix. The contract is unchanged.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/csr_internal.h"

namespace sparsekern {
namespace csr {
namespace {

std::atomic<double> dense_above_now{detail::DEFAULT_DENSE_ABOVE};

// A reused (m, k) buffer for the dense path: a fresh 64 MB tensor per call is mmap'ed by
// malloc and costs more in page faults than the GEMM itself on our VMs. One per calling
// thread, so concurrent ops from different threads never share it.
at::Tensor dense_workspace(int64_t m, int64_t k, const at::TensorOptions& options) {
  thread_local at::Tensor buffer;
  const int64_t bytes = m * k * int64_t(options.dtype().itemsize());
  if (!buffer.defined() || buffer.nbytes() < size_t(bytes))
    buffer = at::empty({bytes}, options.dtype(at::kByte));
  return buffer.narrow(0, 0, bytes).view(options.dtype().toScalarType()).view({m, k});
}

template <typename S>
at::Tensor scatter_dense(const at::Tensor& values, const int64_t* rp, const int32_t* ci, int64_t m, int64_t k) {
  at::Tensor dense = dense_workspace(m, k, values.options());
  S* d = dense.data_ptr<S>();
  const S* v = values.data_ptr<S>();
  at::parallel_for(0, m, detail::DENSE_ROW_GRAIN, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      std::fill(d + i * k, d + (i + 1) * k, S(0));
      for (int64_t p = rp[i]; p < rp[i + 1]; ++p) d[i * k + ci[p]] = v[p];
    }
  });
  return dense;
}

template <typename S>
void gather_pattern(const at::Tensor& D, const int64_t* rp, const int32_t* ci, int64_t m, int64_t k, S* vals) {
  const S* dp = D.data_ptr<S>();
  at::parallel_for(0, m, detail::DENSE_ROW_GRAIN, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i)
      for (int64_t p = rp[i]; p < rp[i + 1]; ++p) vals[p] = dp[i * k + ci[p]];
  });
}

}  // namespace

double dense_above() { return dense_above_now.load(std::memory_order_relaxed); }

double set_dense_above(double threshold) {
  TORCH_CHECK(!std::isnan(threshold) && threshold >= 0, "_set_dense_above: threshold must be a density >= 0 (0 "
              "runs every product dense, above 1 none), got ", threshold);
  dense_above_now.store(threshold);
  return threshold;
}

namespace detail {

bool use_dense(int64_t nnz, int64_t m, int64_t k) {
  return m > 0 && k > 0 && double(nnz) >= dense_above() * double(m) * double(k);
}

void spmm_dense(const at::Tensor& vals, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& B,
                const at::Tensor& bias, const at::Tensor& out) {
  const int64_t m = row_ptr.numel() - 1, k = B.size(0);
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const at::Tensor W = vals.scalar_type() == at::kFloat ? scatter_dense<float>(vals, rp, ci, m, k)
                                                        : scatter_dense<double>(vals, rp, ci, m, k);
  at::Tensor& o = const_cast<at::Tensor&>(out);
  if (B.scalar_type() != vals.scalar_type()) {  // bf16: a float32 GEMM, rounded once into out
    at::Tensor r = at::mm(W, B.to(vals.scalar_type()));
    if (bias.defined()) r.add_(bias.unsqueeze(1));
    o.copy_(r);
  } else {
    at::mm_out(o, W, B);
    if (bias.defined()) o.add_(bias.unsqueeze(1));
  }
}

void sddmm_dense(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& X, const at::Tensor& Y,
                 const at::Tensor& vals) {
  const int64_t m = row_ptr.numel() - 1, k = Y.size(0);
  const at::ScalarType compute = vals.scalar_type();
  at::Tensor D = dense_workspace(m, k, X.options().dtype(compute));
  if (X.scalar_type() != compute) at::mm_out(D, X.to(compute), Y.to(compute).t());
  else at::mm_out(D, X, Y.t());
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  if (compute == at::kFloat) gather_pattern<float>(D, rp, ci, m, k, vals.data_ptr<float>());
  else gather_pattern<double>(D, rp, ci, m, k, vals.data_ptr<double>());
}

}  // namespace detail
}  // namespace csr
}  // namespace sparsekern

// Private ops (the Python layer sets the threshold from SPARSEKERN_DENSE_ABOVE when it loads the
// extension; tests switch it); not part of the op contract.
TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.def("_dense_above() -> float", [] { return sparsekern::csr::dense_above(); });
  m.def("_set_dense_above(float threshold) -> float",
        [](double threshold) { return sparsekern::csr::set_dense_above(threshold); });
}
