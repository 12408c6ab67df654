// Plans derived from a weight pattern, kept while the pattern lives unchanged.
//
// The conv kernels turn the CSR pattern into per-nonzero source offsets, L1 blocks of source planes and,
// for the input gradient, the transposed lists: O(nnz) single-threaded passes with scattered writes that
// measured 27-44 % of a ResNet-50 layer's fwd+bwd at 4x4 and 7x7 (the grad-input transpose alone 2.6 ms of
// the 9.8 ms fwd+bwd of a 512-channel 3x3 layer at 4x4). None of it depends on the values or the activations, and a
// training run keeps each pattern for many steps (dynamic sparse training changes it every hundred or so), so
// it is built once per (pattern, geometry) and looked up after that.
//
// A plan is found by the pattern tensors it was built from, as csr_trust.cpp trusts a validated pattern: a
// weak reference to each TensorImpl (its address cannot be reused while the entry lives), its data pointer
// and its version counter. An in-place write, a swapped storage or another geometry misses and builds a new
// plan; the debug switch (SPARSEKERN_CHECK_PATTERNS=1) bypasses the cache, so that every call rebuilds, and
// re-checks, its plan. Inference tensors (no version counter) are not cached. Entries of patterns that died
// are swept, and the cache drops its least recently used plans past kMaxBytes.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "cpu/bf16.h"

namespace sparsekern {
namespace plan_cache {

// What a plan was built for: its kind first, then every number its build read.
using Key = std::vector<int64_t>;
enum Kind : int64_t {
  kDirectTaps = 1,
  kDirectGrad,
  kBatchedTaps,
  kBatchedGrad,
  kPointwiseRows,
  kPointwiseGrad,
  kDenseMasks,
  kCsrL1Blocks,
  kCsrBlockPerm
};

constexpr size_t kMaxBytes = size_t(1) << 30;

// The plan cached for (row_ptr, col_idx, key), or null.
std::shared_ptr<const void> find(const at::Tensor& row_ptr, const at::Tensor& col_idx, const Key& key);
// Caches `plan` (about `bytes` bytes) for (row_ptr, col_idx, key) where both tensors can be tracked.
void store(const at::Tensor& row_ptr, const at::Tensor& col_idx, const Key& key, std::shared_ptr<const void> plan,
           size_t bytes);

// Plans cached now and their bytes (tests); clear() drops them all.
std::pair<int64_t, int64_t> stats();
void clear();

// The plan of type P for (row_ptr, col_idx, key): cached, or built by build() (which returns a P and may
// throw: nothing is cached then) and cached. P::bytes() estimates its size.
template <class P, class F>
std::shared_ptr<const P> get(const at::Tensor& row_ptr, const at::Tensor& col_idx, const Key& key, F&& build) {
  if (std::shared_ptr<const void> hit = find(row_ptr, col_idx, key)) return std::static_pointer_cast<const P>(hit);
  std::shared_ptr<const P> plan = std::make_shared<const P>(build());
  store(row_ptr, col_idx, key, plan, plan->bytes());
  return plan;
}

// out[q] = vals[perm[q]] in the compute type T: the values (which change every step) in the order of a plan's
// transposed lists (which does not).
// With `ahead` > 0, each read prefetches the element `ahead` places on (for sources past L2).
template <class T, class I, class P>
void permute_into(const I* vals, const P* perm, int64_t n, T* out, int64_t ahead = 0) {
  at::parallel_for(0, n, 1 << 15, [&](int64_t q0, int64_t q1) {
    if (ahead > 0)
      for (int64_t q = q0; q < q1; ++q) {
        __builtin_prefetch(vals + perm[std::min(q + ahead, n - 1)]);
        out[q] = bf16::widen(vals[perm[q]]);
      }
    else
      for (int64_t q = q0; q < q1; ++q) out[q] = bf16::widen(vals[perm[q]]);
  });
}
template <class T, class I>
std::vector<T> permuted(const I* vals, const std::vector<int64_t>& perm) {
  std::vector<T> out(perm.size());
  permute_into(vals, perm.data(), static_cast<int64_t>(perm.size()), out.data());
  return out;
}

// The bytes of a vector's elements (for P::bytes()).
template <class V>
size_t vec_bytes(const V& v) {
  return v.size() * sizeof(typename V::value_type);
}

}  // namespace plan_cache
}  // namespace sparsekern
