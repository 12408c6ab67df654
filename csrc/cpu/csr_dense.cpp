// The CSR tile engine's dense fallback (csr_internal.h): from a density of dense_above() on, a
// product runs as one GEMM on the pattern scattered into a dense matrix. The contract is unchanged:
// spmm keeps the sparse loops when B has a NaN or Inf, which the GEMM would spread through the
// implicit zeros; sddmm samples X @ Y^T at the pattern, which reads the same products either way.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/isfinite.h>
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

// Elements per task of the non-finite scan: at about 16 GB/s per core, 64K floats take ~16 us,
// well above a parallel region's start-up.
constexpr int64_t FINITE_SCAN_GRAIN = 1 << 16;

std::atomic<double> dense_above_now{detail::DEFAULT_DENSE_ABOVE};

// A reused (m, k) buffer for the dense path: a fresh 64 MB tensor per call is mmap'ed by
// malloc and costs more in page faults than the GEMM itself on our VMs. One per calling
// thread, so concurrent ops from different threads never share it.
at::Tensor dense_workspace(int64_t m, int64_t k, const at::TensorOptions& options) {
  thread_local at::Tensor buffer;
  const int64_t bytes = m * k * int64_t(options.dtype().itemsize());
  if (!buffer.defined() || buffer.nbytes() < size_t(bytes)) buffer = at::empty({bytes}, options.dtype(at::kByte));
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

// Whether any of n elements, read as their bit patterns U, has all exponent bits set (Inf or NaN).
// An OR over integer compares: it vectorizes, unlike a float reduction without -ffast-math.
template <typename U>
bool any_nonfinite(const void* data, int64_t n, U exponent) {
  typedef U alias_t __attribute__((__may_alias__));
  const alias_t* bits = static_cast<const alias_t*>(data);
  std::atomic<bool> found{false};
  at::parallel_for(0, n, FINITE_SCAN_GRAIN, [&](int64_t a, int64_t z) {
    if (found.load(std::memory_order_relaxed)) return;
    U hit = 0;
    for (int64_t i = a; i < z; ++i) hit |= U((bits[i] & exponent) == exponent);
    if (hit) found.store(true, std::memory_order_relaxed);
  });
  return found.load();
}

}  // namespace

double dense_above() { return dense_above_now.load(std::memory_order_relaxed); }

double set_dense_above(double threshold) {
  TORCH_CHECK(!std::isnan(threshold) && threshold >= 0,
              "_set_dense_above: threshold must be a density >= 0 (0 "
              "runs every product dense, above 1 none), got ",
              threshold);
  dense_above_now.store(threshold);
  return threshold;
}

namespace detail {

bool use_dense(int64_t nnz, int64_t m, int64_t k) {
  return m > 0 && k > 0 && double(nnz) >= dense_above() * double(m) * double(k);
}

bool all_finite(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  // Dense in memory (contiguous or a transpose of it): one pass over the storage in order.
  if (!t.is_non_overlapping_and_dense()) return at::isfinite(t).all().item<bool>();
  const void* p = t.data_ptr();
  switch (t.scalar_type()) {
    case at::kFloat: return !any_nonfinite<uint32_t>(p, t.numel(), 0x7F800000u);
    case at::kDouble: return !any_nonfinite<uint64_t>(p, t.numel(), 0x7FF0000000000000ull);
    case at::kBFloat16: return !any_nonfinite<uint16_t>(p, t.numel(), uint16_t(0x7F80u));
    default: return at::isfinite(t).all().item<bool>();
  }
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
