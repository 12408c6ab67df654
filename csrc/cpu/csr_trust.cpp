// Validated patterns: a pattern a sparse module has validated once is trusted by the CSR ops after
// that, instead of each call (forward and backward) re-reading row_ptr and col_idx (O(m + nnz)).
//
// An entry remembers the tensors it validated (a weak reference to each TensorImpl, so that its
// address cannot be reused by another tensor while the entry lives), their data pointers and version
// counters, and the column count it was checked against. A call is trusted only when all of these
// still match: an in-place write to the pattern (autograd's version counter), a swapped storage or a
// different column count falls back to the full check, and a registered pattern that passes it is
// trusted again at its new version. Writes that bypass the version counter (`.data`, NumPy views) are
// not seen: the debug switch (SPARSEKERN_CHECK_PATTERNS=1, _set_check_patterns) checks every call.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <atomic>
#include <initializer_list>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/tensor_ref.h"

namespace sparsekern {
namespace csr {
namespace {

struct Entry {
  std::vector<TensorRef> refs;
  int64_t ncols;
};

// Dropped entries of tensors that died are swept when the table has doubled since the last sweep.
struct Table {
  std::mutex mutex;
  std::unordered_map<const c10::TensorImpl*, Entry> entries;  // keyed by the last tensor of the entry
  size_t sweep_at = 64;
};

Table& table() {
  static Table t;
  return t;
}

std::atomic<bool> check_every_call{false};

bool trackable(const at::Tensor& t) { return t.defined() && !t.is_inference(); }

bool refs_match(const Entry& e, std::initializer_list<const at::Tensor*> ts, bool versions) {
  if (e.refs.size() != ts.size()) return false;
  size_t i = 0;
  for (const at::Tensor* t : ts) {
    if (!e.refs[i++].matches(*t, versions)) return false;
  }
  return true;
}

std::vector<TensorRef> refs_of(std::initializer_list<const at::Tensor*> ts) {
  std::vector<TensorRef> refs;
  for (const at::Tensor* t : ts) refs.push_back(TensorRef::of(*t));
  return refs;
}

bool all_trackable(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (!trackable(*t)) return false;
  return true;
}

// True when `ts` (same tensors, data, versions) were validated against ncols.
bool is_trusted(std::initializer_list<const at::Tensor*> ts, int64_t ncols) {
  if (check_every_call.load(std::memory_order_relaxed) || !all_trackable(ts)) return false;
  Table& tb = table();
  std::lock_guard<std::mutex> lock(tb.mutex);
  auto it = tb.entries.find((*(ts.end() - 1))->unsafeGetTensorImpl());
  return it != tb.entries.end() && it->second.ncols == ncols && refs_match(it->second, ts, true);
}

// After a full check passed: record `ts` as validated (register), or refresh the entry of the same
// tensors at their new versions (a registered pattern written in place and checked again).
void record(std::initializer_list<const at::Tensor*> ts, int64_t ncols, bool register_new) {
  if (!all_trackable(ts)) return;
  Table& tb = table();
  std::lock_guard<std::mutex> lock(tb.mutex);
  const c10::TensorImpl* key = (*(ts.end() - 1))->unsafeGetTensorImpl();
  auto it = tb.entries.find(key);
  if (it != tb.entries.end() && it->second.ncols == ncols && refs_match(it->second, ts, false)) {
    it->second.refs = refs_of(ts);
    return;
  }
  if (!register_new) return;
  tb.entries[key] = Entry{refs_of(ts), ncols};
  if (tb.entries.size() >= tb.sweep_at) {
    for (auto e = tb.entries.begin(); e != tb.entries.end();) {
      bool dead = false;
      for (const TensorRef& r : e->second.refs) dead |= r.dead();
      e = dead ? tb.entries.erase(e) : std::next(e);
    }
    tb.sweep_at = 2 * tb.entries.size() + 64;
  }
}

}  // namespace

void check_pattern_once(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t ncols, const std::string& what,
                        const char* op) {
  if (is_trusted({&row_ptr, &col_idx}, ncols)) return;
  check_pattern(row_ptr, col_idx, ncols, what, op);
  record({&row_ptr, &col_idx}, ncols, false);
}

void check_transpose_once(const Csr& a, int64_t k, const c10::optional<at::Tensor>& t_row_ptr,
                          const c10::optional<at::Tensor>& t_col_idx, const c10::optional<at::Tensor>& t_perm,
                          const char* op) {
  const bool all = t_row_ptr.has_value() && t_row_ptr->defined() && t_col_idx.has_value() && t_col_idx->defined() &&
                   t_perm.has_value() && t_perm->defined();
  if (all && is_trusted({&a.row_ptr, &a.col_idx, &*t_row_ptr, &*t_col_idx, &*t_perm}, k)) return;
  check_transpose(a, k, t_row_ptr, t_col_idx, t_perm, op);
  if (all) record({&a.row_ptr, &a.col_idx, &*t_row_ptr, &*t_col_idx, &*t_perm}, k, false);
}

void trust_pattern(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t ncols,
                   const c10::optional<at::Tensor>& t_row_ptr, const c10::optional<at::Tensor>& t_col_idx,
                   const c10::optional<at::Tensor>& t_perm) {
  const char* op = "_trust_pattern";
  check_cpu(row_ptr, "row_ptr", op);
  check_cpu(col_idx, "col_idx", op);
  check_csr(row_ptr, col_idx, op);
  TORCH_CHECK(row_ptr.is_contiguous() && col_idx.is_contiguous(), op, ": row_ptr and col_idx must be contiguous");
  TORCH_CHECK(ncols >= 0, op, ": ncols must be >= 0, got ", ncols);
  const bool any = (t_row_ptr.has_value() && t_row_ptr->defined()) || (t_col_idx.has_value() && t_col_idx->defined()) ||
                   (t_perm.has_value() && t_perm->defined());
  const bool all = t_row_ptr.has_value() && t_row_ptr->defined() && t_col_idx.has_value() && t_col_idx->defined() &&
                   t_perm.has_value() && t_perm->defined();
  // Registered and unchanged already (a module moved to where it was, .to() of another dtype): done.
  if (is_trusted({&row_ptr, &col_idx}, ncols) &&
      (!any || (all && is_trusted({&row_ptr, &col_idx, &*t_row_ptr, &*t_col_idx, &*t_perm}, ncols) &&
                is_trusted({&*t_row_ptr, &*t_col_idx}, row_ptr.numel() - 1))))
    return;
  check_pattern(row_ptr, col_idx, ncols, "the pattern has " + std::to_string(ncols) + " columns", op);
  record({&row_ptr, &col_idx}, ncols, true);
  if (!any) return;
  Csr a;
  a.row_ptr = row_ptr;
  a.col_idx = col_idx;
  a.m = row_ptr.numel() - 1;
  check_transpose(a, ncols, t_row_ptr, t_col_idx, t_perm, op);
  TORCH_CHECK(t_row_ptr->is_contiguous() && t_col_idx->is_contiguous() && t_perm->is_contiguous(), op,
              ": t_row_ptr, t_col_idx and t_perm must be contiguous");
  record({&row_ptr, &col_idx, &*t_row_ptr, &*t_col_idx, &*t_perm}, ncols, true);
  // The transpose is itself the pattern of the input-gradient product (k rows, m columns).
  check_pattern(*t_row_ptr, *t_col_idx, a.m, "the pattern has " + std::to_string(a.m) + " rows", op);
  record({&*t_row_ptr, &*t_col_idx}, a.m, true);
}

bool set_check_patterns(bool every_call) { return check_every_call.exchange(every_call); }
bool check_patterns() { return check_every_call.load(); }

}  // namespace csr
}  // namespace sparsekern

// Private ops: sparse modules register their patterns (sparsekern.nn.pattern); the Python layer sets
// the debug switch from SPARSEKERN_CHECK_PATTERNS when it loads the extension. Not part of the op contract.
TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.def("_trust_pattern(Tensor row_ptr, Tensor col_idx, int ncols, Tensor? t_row_ptr=None, Tensor? t_col_idx=None, "
        "Tensor? t_perm=None) -> ()",
        &sparsekern::csr::trust_pattern);
  m.def("_check_patterns() -> bool", [] { return sparsekern::csr::check_patterns(); });
  m.def("_set_check_patterns(bool every_call) -> bool",
        [](bool every_call) { return sparsekern::csr::set_check_patterns(every_call); });
}
