// A remembered tensor, for caches keyed by the tensors they were built from (csr_trust.cpp, plan_cache.cpp):
// a weak reference to its TensorImpl (so that its address cannot be reused by another tensor while the
// reference lives), its data pointer and its version counter (autograd's: an in-place write moves it).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdint>

namespace sparsekern {

struct TensorRef {
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  WeakImpl impl;
  const void* data;
  int64_t version;

  // t must not be an inference tensor (no version counter).
  static TensorRef of(const at::Tensor& t) {
    return TensorRef{WeakImpl(t.getIntrusivePtr()), t.data_ptr(), t._version()};
  }
  // The same tensor, storage and (unless !versions) version.
  bool matches(const at::Tensor& t, bool versions = true) const {
    return impl._unsafe_get_target() == t.unsafeGetTensorImpl() && data == t.data_ptr() &&
           (!versions || version == t._version());
  }
  bool dead() const { return impl.expired(); }
};

}  // namespace sparsekern
