// The cache of pattern-derived plans (plan_cache.h).
#include "cpu/plan_cache.h"

#include <torch/library.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "cpu/csr_engine.h"
#include "cpu/tensor_ref.h"

namespace sparsekern {
namespace plan_cache {
namespace {

struct Entry {
  TensorRef row_ptr, col_idx;
  std::shared_ptr<const void> plan;
  size_t bytes;
  uint64_t used;  // the lookup count when it was last found or stored
};

using MapKey = std::pair<const c10::TensorImpl*, Key>;

struct Cache {
  std::mutex mutex;
  std::map<MapKey, Entry> entries;
  size_t bytes = 0;
  uint64_t clock = 0;
  size_t sweep_at = 256;

  void erase(std::map<MapKey, Entry>::iterator it) {
    bytes -= it->second.bytes;
    entries.erase(it);
  }
  // Drops the entries whose pattern died; then, past kMaxBytes, the least recently used.
  void trim() {
    for (auto it = entries.begin(); it != entries.end();) {
      auto next = std::next(it);
      if (it->second.row_ptr.dead() || it->second.col_idx.dead()) erase(it);
      it = next;
    }
    while (bytes > kMaxBytes && !entries.empty()) {
      auto oldest = std::min_element(entries.begin(), entries.end(),
                                     [](const auto& a, const auto& b) { return a.second.used < b.second.used; });
      erase(oldest);
    }
    sweep_at = 2 * entries.size() + 256;
  }
};

Cache& cache() {
  static Cache* c = new Cache();  // never destroyed: ops may run during interpreter shutdown
  return *c;
}

bool cacheable(const at::Tensor& row_ptr, const at::Tensor& col_idx) {
  return row_ptr.defined() && col_idx.defined() && !row_ptr.is_inference() && !col_idx.is_inference() &&
         !csr::check_patterns();
}

}  // namespace

std::shared_ptr<const void> find(const at::Tensor& row_ptr, const at::Tensor& col_idx, const Key& key) {
  if (!cacheable(row_ptr, col_idx)) return nullptr;
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto it = c.entries.find(MapKey(col_idx.unsafeGetTensorImpl(), key));
  if (it == c.entries.end()) return nullptr;
  if (!it->second.row_ptr.matches(row_ptr) || !it->second.col_idx.matches(col_idx)) {
    c.erase(it);  // written in place or another row_ptr: stale
    return nullptr;
  }
  it->second.used = ++c.clock;
  return it->second.plan;
}

void store(const at::Tensor& row_ptr, const at::Tensor& col_idx, const Key& key, std::shared_ptr<const void> plan,
           size_t bytes) {
  if (!cacheable(row_ptr, col_idx) || bytes > kMaxBytes / 4) return;
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  MapKey mk(col_idx.unsafeGetTensorImpl(), key);
  auto it = c.entries.find(mk);
  if (it != c.entries.end()) c.erase(it);
  c.entries.emplace(std::move(mk),
                    Entry{TensorRef::of(row_ptr), TensorRef::of(col_idx), std::move(plan), bytes, ++c.clock});
  c.bytes += bytes;
  if (c.entries.size() >= c.sweep_at || c.bytes > kMaxBytes) c.trim();
}

std::pair<int64_t, int64_t> stats() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return {static_cast<int64_t>(c.entries.size()), static_cast<int64_t>(c.bytes)};
}

void clear() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.entries.clear();
  c.bytes = 0;
}

}  // namespace plan_cache
}  // namespace sparsekern

// Private ops for tests: not part of the op contract.
TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.def("_plan_cache_stats() -> int[]", [] {
    const auto s = sparsekern::plan_cache::stats();
    return std::vector<int64_t>{s.first, s.second};
  });
  m.def("_plan_cache_clear() -> ()", [] { sparsekern::plan_cache::clear(); });
}
