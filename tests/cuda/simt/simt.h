// SIMT emulation of the CUDA subset used by csrc/cuda/*.cu, for testing kernel logic on a host
// without a GPU. Compile a .cu file as C++ with -DSK_SIMT (csrc/cuda/common.cuh then includes
// this header) and call its launch functions on host memory.
//
// Model: a launch runs its blocks one after another; the threads of a block are cooperative
// fibers (ucontext) on one OS thread. A fiber runs until it reaches a synchronization point
// (__syncthreads, a warp collective), where it yields; the scheduler resumes the fibers round
// by round in a configurable order (forward, reverse, or a seeded shuffle per round), so a
// missing barrier shows up as a wrong result under one of the orders. Checked errors (abort
// with a message): a round without progress (deadlock: a barrier or warp collective some
// threads never reach), __syncthreads after threads of the block exited, warp collectives
// with mismatched masks or kinds, a shuffle from a lane outside the mask.
// `__shared__` variables become function statics (one block runs at a time); dynamic shared
// memory is a per-launch buffer filled with 0xFF bytes (NaN for floats) to expose reads of
// unwritten shared memory.
#pragma once
// No CUDA headers: the few runtime types and fp16/bf16 conversions the kernels use are defined here,
// so these tests need only a C++ compiler.
#include <stdint.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>  // fiber stacks are reused: unpoison them before each block
#define SIMT_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define SIMT_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef enum cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidValue ? "invalid argument" : "invalid configuration";
}

// ---- 16-bit floats (round to nearest even, like the device conversions) ------------------------
struct __half {
  uint16_t x;
};
struct __nv_bfloat16 {
  uint16_t x;
};
inline uint32_t simt_f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float simt_u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __ushort_as_half(unsigned short u) { return __half{u}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float __half2float(__half h) {
  const uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16;
  int exp = (h.x >> 10) & 0x1f;
  uint32_t mant = h.x & 0x3ffu;
  if (exp == 0) {
    if (mant == 0) return simt_u2f(sign);
    int e = -14;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --e;
    }
    return simt_u2f(sign | (uint32_t)(e + 127) << 23 | (mant & 0x3ffu) << 13);
  }
  if (exp == 31) return simt_u2f(sign | 0x7f800000u | mant << 13);
  return simt_u2f(sign | (uint32_t)(exp - 15 + 127) << 23 | mant << 13);
}
inline __half __float2half_rn(float f) {
  const uint32_t x = simt_f2u(f);
  const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  const int e8 = (x >> 23) & 0xff;
  uint32_t mant = x & 0x7fffffu;
  if (e8 == 0xff) return __half{(uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0u))};
  const int exp = e8 - 127 + 15;
  if (exp >= 31) return __half{(uint16_t)(sign | 0x7c00u)};
  if (exp <= 0) {
    if (exp < -10) return __half{sign};
    mant |= 0x800000u;
    const int shift = 14 - exp;
    uint32_t hm = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (hm & 1u))) ++hm;
    return __half{(uint16_t)(sign | hm)};
  }
  uint32_t h = sign | (uint32_t)exp << 10 | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return __half{(uint16_t)h};
}
inline float __bfloat162float(__nv_bfloat16 b) { return simt_u2f((uint32_t)b.x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = simt_f2u(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(uint16_t)((x >> 16) | 0x40u)};
  return __nv_bfloat16{(uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace simt {

[[noreturn]] inline void fail(const char* what) {
  std::fflush(stdout);
  std::fprintf(stderr, "simt error: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x, blockIdx.y, blockIdx.z,
               threadIdx.x, threadIdx.y, threadIdx.z);
  std::fflush(stderr);
  std::abort();
}

enum Order { kForward = 0, kReverse = 1, kShuffle = 2 };

// Context switch: a few instructions on x86-64 (callee-saved registers and the stack pointer; no
// signal-mask system call as in swapcontext, which dominated the run time); ucontext elsewhere.
#if defined(__x86_64__) && defined(__linux__)
#define SIMT_FAST_SWITCH 1
extern "C" void simt_ctx_switch(void** save_sp, void* load_sp);
__asm__(
    ".text\n"
    ".weak simt_ctx_switch\n"
    ".type simt_ctx_switch,@function\n"
    "simt_ctx_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size simt_ctx_switch,.-simt_ctx_switch\n");
#endif

struct Fiber {
#if defined(SIMT_FAST_SWITCH)
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  std::vector<char> stack;
  bool done = false;
};

struct WarpState {
  int phase = 0;  // 0: collecting values, 1: lanes reading the result
  unsigned arrived = 0, readers = 0, mask = 0;
  int op = 0;
  uint64_t vals[32];
};

struct Sched {
#if defined(SIMT_FAST_SWITCH)
  void* main_sp = nullptr;
#else
  ucontext_t main_ctx;
#endif
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  unsigned nthreads = 0, live = 0, bar_arrived = 0;
  uint64_t bar_gen = 0;
  int cur = -1;
  bool progress = false;
  std::function<void()> body;
  std::vector<unsigned char> dyn;
  int order = kForward;
  uint64_t seed = 12345;
  cudaError_t last_error = cudaSuccess;
  uint64_t launches = 0;
};

inline Sched& sched() {
  static Sched s;
  return s;
}

inline void set_order(int order, uint64_t seed = 12345) {
  sched().order = order;
  sched().seed = seed;
}

inline unsigned char* dynamic_smem() { return sched().dyn.data(); }

inline void yield() {
  Sched& s = sched();
#if defined(SIMT_FAST_SWITCH)
  simt_ctx_switch(&s.fibers[s.cur].sp, s.main_sp);
#else
  swapcontext(&s.fibers[s.cur].ctx, &s.main_ctx);
#endif
}

inline unsigned tid_linear() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

inline void fiber_entry() {
  Sched& s = sched();
  s.body();
  if (s.bar_arrived > 0) fail("thread exited while other threads of its block wait at __syncthreads");
  s.fibers[s.cur].done = true;
  s.live--;
  s.progress = true;
#if defined(SIMT_FAST_SWITCH)
  void* dead;
  simt_ctx_switch(&dead, s.main_sp);  // never resumed
  std::abort();
#endif
  // ucontext: returns to main_ctx through uc_link
}

inline void syncthreads() {
  Sched& s = sched();
  if (s.live != s.nthreads) fail("__syncthreads after some threads of the block exited");
  const uint64_t gen = s.bar_gen;
  s.bar_arrived++;
  s.progress = true;
  if (s.bar_arrived == s.live) {
    s.bar_arrived = 0;
    s.bar_gen++;
  }
  while (s.bar_gen == gen) yield();
}

template <class T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "warp collectives move at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// A warp collective: every lane of `mask` deposits `val`, then each computes its result from all
// deposited values with f(vals, lane).
template <class R, class F>
inline R warp_op(unsigned mask, int op, uint64_t val, F f) {
  Sched& s = sched();
  const unsigned t = tid_linear();
  const unsigned lane = t % 32;
  WarpState& w = s.warps[t / 32];
  if (!((mask >> lane) & 1u)) fail("warp collective called by a lane outside its mask");
  while (w.phase != 0) yield();
  if (w.arrived == 0) {
    w.mask = mask;
    w.op = op;
  } else if (w.mask != mask || w.op != op) {
    fail("lanes of a warp in different collectives (mask or kind differs): divergent code?");
  }
  w.vals[lane] = val;
  w.arrived++;
  s.progress = true;
  if (w.arrived == (unsigned)__builtin_popcount(mask)) {
    w.phase = 1;
    w.readers = 0;
  }
  while (w.phase != 1) yield();
  const R r = f(w.vals, lane);
  w.readers++;
  s.progress = true;
  if (w.readers == (unsigned)__builtin_popcount(mask)) {
    w.phase = 0;
    w.arrived = 0;
  }
  return r;
}

inline void run_block(const std::function<void()>& body) {
  Sched& s = sched();
  const unsigned n = s.nthreads;
  if (s.fibers.size() < n) s.fibers.resize(n);
  s.warps.assign((n + 31) / 32, WarpState());
  s.body = body;
  s.live = n;
  s.bar_arrived = 0;
  std::fill(s.dyn.begin(), s.dyn.end(), (unsigned char)0xFF);
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = s.fibers[t];
    if (f.stack.empty()) f.stack.resize(256 * 1024);
    SIMT_UNPOISON(f.stack.data(), f.stack.size());
    f.done = false;
#if defined(SIMT_FAST_SWITCH)
    // A stack that "returns" into fiber_entry after simt_ctx_switch pops six registers; entry sees
    // the stack pointer as after a call (8 mod 16).
    uintptr_t top = ((uintptr_t)(f.stack.data() + f.stack.size())) & ~(uintptr_t)15;
    void** sp = reinterpret_cast<void**>(top);
    *--sp = nullptr;                                    // fiber_entry's return address: never used
    *--sp = reinterpret_cast<void*>(&fiber_entry);      // where simt_ctx_switch's ret goes
    for (int r = 0; r < 6; ++r) *--sp = nullptr;        // rbp, rbx, r12-r15
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &s.main_ctx;
    makecontext(&f.ctx, &fiber_entry, 0);
#endif
  }
  std::vector<unsigned> order(n);
  for (unsigned t = 0; t < n; ++t) order[t] = t;
  if (s.order == kReverse) std::reverse(order.begin(), order.end());
  std::mt19937_64 rng(s.seed + s.launches * 7919u + blockIdx.x * 131u + blockIdx.y * 17u + blockIdx.z);
  for (;;) {
    if (s.order == kShuffle) std::shuffle(order.begin(), order.end(), rng);
    s.progress = false;
    bool any = false;
    for (unsigned t : order) {
      Fiber& f = s.fibers[t];
      if (f.done) continue;
      any = true;
      threadIdx.x = t % blockDim.x;
      threadIdx.y = (t / blockDim.x) % blockDim.y;
      threadIdx.z = t / (blockDim.x * blockDim.y);
      s.cur = (int)t;
#if defined(SIMT_FAST_SWITCH)
      simt_ctx_switch(&s.main_sp, f.sp);
#else
      swapcontext(&s.main_ctx, &f.ctx);
#endif
    }
    if (!any) break;
    if (!s.progress) fail("deadlock: no thread of the block can proceed (a barrier or warp collective is not reached by all)");
  }
  s.cur = -1;
}

template <class... P, class... A>
inline void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, A&&... args) {
  Sched& s = sched();
  const uint64_t nthreads = (uint64_t)block.x * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || nthreads == 0 || nthreads > 1024 || grid.y > 65535 ||
      grid.z > 65535 || smem > 227 * 1024) {
    s.last_error = cudaErrorInvalidConfiguration;
    return;
  }
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  s.nthreads = (unsigned)nthreads;
  s.dyn.assign(smem + 16, 0xFF);
  blockDim = block;
  gridDim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx.x = x;
        blockIdx.y = y;
        blockIdx.z = z;
        run_block([&] {
          std::tuple<std::decay_t<P>...> copy = params;  // by-value kernel parameters, per thread
          std::apply(kernel, copy);
        });
      }
  s.launches++;
}

inline cudaError_t take_error() {
  const cudaError_t e = sched().last_error;
  sched().last_error = cudaSuccess;
  return e;
}

}  // namespace simt

// ---- device intrinsics -------------------------------------------------------------------------
inline void __syncthreads() { simt::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::warp_op<int>(mask, 1, 0, [](const uint64_t*, unsigned) { return 0; });
}
[[noreturn]] inline void __trap() { simt::fail("__trap() (device-side check failed)"); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <class T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return simt::warp_op<T>(mask, 2, simt::to_bits(v), [&](const uint64_t* vals, unsigned lane) {
    const unsigned s = (lane & ~(unsigned)(width - 1)) | ((unsigned)src & (unsigned)(width - 1));
    if (!((mask >> s) & 1u)) simt::fail("__shfl_sync from a lane outside the mask");
    return simt::from_bits<T>(vals[s]);
  });
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return simt::warp_op<T>(mask, 3, simt::to_bits(v), [&](const uint64_t* vals, unsigned lane) {
    const unsigned s = lane ^ (unsigned)lane_mask;
    if (s / (unsigned)width != lane / (unsigned)width || s >= 32) return simt::from_bits<T>(vals[lane]);
    if (!((mask >> s) & 1u)) simt::fail("__shfl_xor_sync from a lane outside the mask");
    return simt::from_bits<T>(vals[s]);
  });
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::warp_op<T>(mask, 4, simt::to_bits(v), [&](const uint64_t* vals, unsigned lane) {
    const unsigned s = lane + delta;
    if ((lane % (unsigned)width) + delta >= (unsigned)width) return simt::from_bits<T>(vals[lane]);
    if (!((mask >> s) & 1u)) simt::fail("__shfl_down_sync from a lane outside the mask");
    return simt::from_bits<T>(vals[s]);
  });
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return simt::warp_op<T>(mask, 5, simt::to_bits(v), [&](const uint64_t* vals, unsigned lane) {
    if ((lane % (unsigned)width) < delta) return simt::from_bits<T>(vals[lane]);
    const unsigned s = lane - delta;
    if (!((mask >> s) & 1u)) simt::fail("__shfl_up_sync from a lane outside the mask");
    return simt::from_bits<T>(vals[s]);
  });
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return simt::warp_op<unsigned>(mask, 6, pred ? 1u : 0u, [&](const uint64_t* vals, unsigned) {
    unsigned r = 0;
    for (unsigned l = 0; l < 32; ++l)
      if (((mask >> l) & 1u) && vals[l]) r |= 1u << l;
    return r;
  });
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

inline unsigned __float_as_uint(float x) { return simt::from_bits<unsigned>(simt::to_bits(x)); }
inline float __uint_as_float(unsigned x) { return simt::from_bits<float>(simt::to_bits(x)); }
inline int __float_as_int(float x) { return simt::from_bits<int>(simt::to_bits(x)); }
inline float __int_as_float(int x) { return simt::from_bits<float>(simt::to_bits(x)); }
inline long long __double_as_longlong(double x) { return simt::from_bits<long long>(simt::to_bits(x)); }
inline double __longlong_as_double(long long x) { return simt::from_bits<double>(simt::to_bits(x)); }

template <class T>
inline T __ldg(const T* p) { return *p; }

// Atomics: one OS thread runs all fibers and they switch only at barriers, so plain updates are atomic.
template <class T>
inline T atomicAdd(T* p, T v) {
  const T old = *p;
  *p = old + v;
  return old;
}
template <class T>
inline T atomicMin(T* p, T v) {
  const T old = *p;
  *p = v < old ? v : old;
  return old;
}
template <class T>
inline T atomicMax(T* p, T v) {
  const T old = *p;
  *p = v > old ? v : old;
  return old;
}
template <class T>
inline T atomicOr(T* p, T v) {
  const T old = *p;
  *p = old | v;
  return old;
}
template <class T>
inline T atomicExch(T* p, T v) {
  const T old = *p;
  *p = v;
  return old;
}
