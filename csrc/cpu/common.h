// Shared by the CPU kernels: argument checks and ISA dispatch.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#define SK_INLINE inline __attribute__((always_inline))

namespace sparsekern {
// Which build of a cloned function runs (SK_CLONED): 2 = x86-64-v4, 1 = x86-64-v3 (AVX2+FMA), 0 = baseline x86-64.
// The best this CPU runs, held to 1 while csr::isa() is avx2 (SPARSEKERN_ISA=avx2, sparsekern.isa.set): so an
// AVX-512 host held to AVX2 runs the very code an AVX2 host runs (16 vector registers, no EVEX), and its tests cover
// it. GCC's target_clones picked at load time by the CPU alone, so there the 32-byte loops ran their v4 build.
extern std::atomic<int> clone_level_now;  // csr_isa.cpp
SK_INLINE int clone_level() { return clone_level_now.load(std::memory_order_relaxed); }
}  // namespace sparsekern

// Hot loops are compiled for x86-64-v4 (AVX-512), v3 (AVX2+FMA) and baseline x86-64, and picked per call by
// clone_level(), so one portable wheel runs at full width everywhere. SK_CLONED(RET, NAME, (PARAMS), BODY) defines
// the three builds NAME_sk_v4, NAME_sk_v3, NAME_sk_v0 of one function (its loops in always_inline helpers, which take
// the build's target); SK_CLONE_BUILDS(M, ...) expands M(ATTR, SUFFIX, ...) once per build, for macros that define
// several functions; SK_CLONE_DISPATCH(NAME), once after every overload of NAME, defines NAME itself, which calls the
// build clone_level() picks. Lambdas inside a build are functions of the default target (pass them no vectors).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SPARSEKERN_NO_CLONES)
#define SK_V4 __attribute__((target("arch=x86-64-v4")))
#define SK_V3 __attribute__((target("arch=x86-64-v3")))
#define SK_CLONE_BUILDS(M, ...) M(SK_V4, _sk_v4, __VA_ARGS__) M(SK_V3, _sk_v3, __VA_ARGS__) M(, _sk_v0, __VA_ARGS__)
#define SK_CLONE_DISPATCH(NAME)                            \
  template <typename... A>                                 \
  SK_INLINE decltype(auto) NAME(A&&... a) {                \
    switch (::sparsekern::clone_level()) {                 \
      case 2: return NAME##_sk_v4(std::forward<A>(a)...);  \
      case 1: return NAME##_sk_v3(std::forward<A>(a)...);  \
      default: return NAME##_sk_v0(std::forward<A>(a)...); \
    }                                                      \
  }
#else
#define SK_CLONE_BUILDS(M, ...) M(, _sk_v0, __VA_ARGS__)
#define SK_CLONE_DISPATCH(NAME)                 \
  template <typename... A>                      \
  SK_INLINE decltype(auto) NAME(A&&... a) {     \
    return NAME##_sk_v0(std::forward<A>(a)...); \
  }
#endif
#define SK_CLONED_BUILD(ATTR, SUFFIX, RET, NAME, PARAMS, ...) ATTR RET NAME##SUFFIX PARAMS __VA_ARGS__
#define SK_CLONED(RET, NAME, PARAMS, ...) SK_CLONE_BUILDS(SK_CLONED_BUILD, RET, NAME, PARAMS, __VA_ARGS__)

// The 512-bit instances of the CSR and conv tile loops: x86-64-v4 alone, picked by csr::isa(), so that
// SPARSEKERN_ISA=avx2 can keep the 32-byte loops (and their v3 build) on an AVX-512 host.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SK_HAVE_AVX512 1
#define SK_AVX512 __attribute__((target("arch=x86-64-v4")))
#else
#define SK_HAVE_AVX512 0
#endif

namespace sparsekern {

// n elements from src to dst (not overlapping), inline, for short runs where a memmove call per run costs more than
// the copy: a depthwise conv's plane rows (2 to 112 elements: a call each cost more than a 3x3 kernel's arithmetic on
// 7x7 planes), the L1 blocks' runs of values (about 13 at 4096^2, density 0.1). GCC turns such a loop into a memmove
// call (-ftree-loop-distribute-patterns) unless the function it is inlined into is built without that pass
// (SK_NO_MEMMOVE) or for a target of its own (SK_CLONED).
template <class D, class S>
SK_INLINE void copy_run(D* __restrict dst, const S* __restrict src, int64_t n) {
  for (int64_t e = 0; e < n; ++e) dst[e] = src[e];
}
#define SK_NO_MEMMOVE __attribute__((optimize("no-tree-loop-distribute-patterns")))

// Prefetch into L2 every cache line of bytes [p, p + bytes) (the first and last partial lines too): for outputs
// that a kernel is about to store into, scattered over more streams than the hardware prefetchers follow.
SK_INLINE void prefetch_l2(const void* p, int64_t bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p), end = a + static_cast<uintptr_t>(bytes);
  for (uintptr_t line = a & ~uintptr_t(63); line < end; line += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(line), 0, 2);
}

// A std::vector whose data starts on a 64-byte boundary, as at::empty's does, so that the kernels' 64-byte loads
// from it never straddle two cache lines. std::vector only guarantees 16 bytes: a standalone copy of the SpMM loop
// on such buffers ran 33 GFLOP/s per thread against 74-76 aligned (Intel, 2026-12).
template <class T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <class U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U>
  bool operator==(const Aligned64<U>&) const {
    return true;
  }
};
template <class T>
using AlignedVector = std::vector<T, Aligned64<T>>;

// SPARSEKERN_POISON_SCRATCH=1 (read once): the kernels' scratch buffers (ThreadScratch, the batch-innermost conv's
// copies) are handed out filled with NaN, and kPoisonGuard NaN elements past their end, so that a kernel reading
// lanes it never wrote, or past its buffer, puts NaN in its result. Left alone, such a read meets zero pages or finite
// leftovers and, times the zero of a padding, passes: the one-pack conv backward read a cropped copy of dY past its
// planes (the last one past the buffer) and failed only on a host whose memory held a NaN there. `make test` runs the
// conv op tests with it.
inline bool poison_scratch() {
  static const bool on = [] {
    const char* v = std::getenv("SPARSEKERN_POISON_SCRATCH");
    return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
  }();
  return on;
}

constexpr int64_t kPoisonGuard = 4096;

// Elements to allocate for a scratch buffer of n: n, and the guard where poison_scratch().
inline int64_t scratch_alloc(int64_t n) { return n > 0 && poison_scratch() ? n + kPoisonGuard : n; }

// n elements at p set to NaN where poison_scratch() (floating types; others are left as they are).
template <class T>
void poison(T* p, int64_t n) {
  if constexpr (std::is_floating_point<T>::value) {
    if (poison_scratch() && n > 0) std::fill(p, p + n, std::numeric_limits<T>::quiet_NaN());
  }
}

// The slots of ThreadScratch: one per buffer a thread holds at once, distinct across kernels that call each other.
enum ScratchSlot : int { kScratchPack, kScratchOut, kScratchRows, kScratchDy, kScratchTiles };

// A buffer of the calling thread that outlives the call: resize(n) makes it at least n elements of T (64-byte
// aligned, contents unspecified), reusing what this thread's earlier calls left in the slot. The conv kernels'
// per-thread buffers, fresh vectors per call, were zero-filled on every call and, in the OpenMP workers' malloc
// arenas, took fresh pages on their first calls (113 page faults a call for ResNet-50's 128-channel stride-2 3x3
// layer), the calls in which the direct and batch-innermost kernels are timed against each other. A request above
// kKeepBytes stays the call's own. One object per slot and thread at a time (checked).
template <class T, int Slot>
class ThreadScratch {
 public:
  static constexpr size_t kKeepBytes = size_t(16) << 20;
  ThreadScratch() { claim(true); }
  explicit ThreadScratch(int64_t n) : ThreadScratch() { resize(n); }
  ThreadScratch(const ThreadScratch&) = delete;
  ThreadScratch& operator=(const ThreadScratch&) = delete;
  ~ThreadScratch() { claim(false); }
  void resize(int64_t n) {
    const size_t want = n > 0 ? static_cast<size_t>(scratch_alloc(n)) : 0;
    if (want * sizeof(T) > kKeepBytes) {
      own_.resize(want);
      p_ = own_.data();
      poison(p_, static_cast<int64_t>(want));
      return;
    }
    AlignedVector<T>& kept = state().kept;
    if (kept.size() < want) {
      AlignedVector<T>().swap(kept);  // nothing to copy: the contents are unspecified
      kept.resize(want);
    }
    p_ = kept.data();
    poison(p_, static_cast<int64_t>(want));
  }
  T* data() const { return p_; }

 private:
  struct State {
    AlignedVector<T> kept;
    bool taken = false;
  };
  static State& state() {
    thread_local State st;
    return st;
  }
  static void claim(bool take) {
    State& st = state();
    TORCH_INTERNAL_ASSERT(st.taken != take, "ThreadScratch slot ", Slot, " is already in use on this thread");
    st.taken = take;
  }
  T* p_ = nullptr;
  AlignedVector<T> own_;
};

// Whether t (N, C, H, W) lies channels_last (and not also contiguous: C, or H and W, of 1).
inline bool channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline void check_csr(const at::Tensor& row_ptr, const at::Tensor& col_idx, const char* op) {
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.scalar_type() == at::kLong, op,
              ": row_ptr must be a 1-D int64 tensor, got ", row_ptr.scalar_type(), " of dim ", row_ptr.dim());
  TORCH_CHECK(col_idx.dim() == 1 && col_idx.scalar_type() == at::kInt, op, ": col_idx must be a 1-D int32 tensor, got ",
              col_idx.scalar_type(), " of dim ", col_idx.dim());
  TORCH_CHECK(row_ptr.numel() >= 1, op, ": row_ptr must have m+1 >= 1 entries");
}

inline void check_float(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64 on the CPU, got ", t.scalar_type());
}

// The matmul-like kernels also run bfloat16 (float32 accumulation; see bf16.h).
inline void check_float_or_bf16(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kBFloat16, op,
              ": ", name, " must be float32, float64 or bfloat16 on the CPU, got ", t.scalar_type());
}

}  // namespace sparsekern
