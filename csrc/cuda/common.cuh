// Device-side helpers shared by the kernels in csrc/cuda/*.cu. Torch-free: plain CUDA plus our
// own headers, so a .cu compiles in seconds and can also be compiled as host C++ for the SIMT
// emulator of the tests (-DSK_SIMT: tests/cuda/simt/simt.h stands in for the device).
#pragma once
#include <stdint.h>
#include <stdio.h>

#if defined(SK_SIMT)
#include "simt.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

// __host__ __device__ for the torch-free headers shared with host code (tiling.h, radix_select.h):
// defined before they are included, so their functions are callable from kernels.
#if defined(__CUDACC__)
#define SK_HOST_DEVICE __host__ __device__
#else
#define SK_HOST_DEVICE
#endif
#define SK_DEVICE __device__ __forceinline__

#include "cuda/tiling.h"

// Kernel launch and dynamic shared memory, spelled so that the SIMT emulator can run them.
#if defined(SK_SIMT)
#define SK_LAUNCH(kernel, grid, block, smem, stream, ...) ::simt::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
#define SK_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::simt::dynamic_smem())
#else
#define SK_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define SK_DYNAMIC_SMEM(T, name)                            \
  extern __shared__ __align__(16) unsigned char sk_smem_[]; \
  T* name = reinterpret_cast<T*>(sk_smem_)
#endif

// A violated precondition that the host could not check without a device sync (an index out of
// range): stop the kernel with a message rather than read or write out of bounds.
#define SK_DEVICE_CHECK(cond, ...) \
  do {                             \
    if (!(cond)) {                 \
      printf(__VA_ARGS__);         \
      __trap();                    \
    }                              \
  } while (0)

namespace sparsekern {
namespace cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// ---- host-side runtime wrappers (the emulator has no CUDA runtime) ---------------------------
inline cudaError_t last_error() {
#if defined(SK_SIMT)
  return ::simt::take_error();
#else
  return cudaGetLastError();
#endif
}
inline cudaError_t memset_async(void* p, int value, size_t bytes, cudaStream_t stream) {
#if defined(SK_SIMT)
  (void)stream;
  if (bytes) memset(p, value, bytes);
  return cudaSuccess;
#else
  return bytes ? cudaMemsetAsync(p, value, bytes, stream) : cudaSuccess;
#endif
}
// Kernels that use more than 48 KB of dynamic shared memory must opt in.
template <class K>
inline cudaError_t allow_dynamic_smem(K kernel, size_t bytes) {
#if defined(SK_SIMT)
  (void)kernel;
  (void)bytes;
  return cudaSuccess;
#else
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
#endif
}

// ---- element types ---------------------------------------------------------------------------
// S: the storage type of a tensor (float, double, __half, __nv_bfloat16); Acc: what we accumulate
// in (fp32 for the 16-bit types: products of halves summed over hundreds of terms need it).
template <class S> struct Elem;
template <> struct Elem<float> {
  using Acc = float;
  static SK_DEVICE float to_acc(float x) { return x; }
  static SK_DEVICE float from_acc(float a) { return a; }
  static SK_DEVICE float zero() { return 0.f; }
};
template <> struct Elem<double> {
  using Acc = double;
  static SK_DEVICE double to_acc(double x) { return x; }
  static SK_DEVICE double from_acc(double a) { return a; }
  static SK_DEVICE double zero() { return 0.0; }
};
template <> struct Elem<__half> {
  using Acc = float;
  static SK_DEVICE float to_acc(__half x) { return __half2float(x); }
  static SK_DEVICE __half from_acc(float a) { return __float2half_rn(a); }
  static SK_DEVICE __half zero() { return __float2half_rn(0.f); }
};
template <> struct Elem<__nv_bfloat16> {
  using Acc = float;
  static SK_DEVICE float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
  static SK_DEVICE __nv_bfloat16 from_acc(float a) { return __float2bfloat16_rn(a); }
  static SK_DEVICE __nv_bfloat16 zero() { return __float2bfloat16_rn(0.f); }
};
template <class S> using AccOf = typename Elem<S>::Acc;

// Kernels compiled once for fp32, fp16 and bf16 (the dtype a runtime argument of their load code)
// read the 16-bit types as raw bits and convert with a runtime choice, so one copy of the load code
// serves both: fp16 through the hardware conversion, bf16 as the top half of an fp32.
struct Bits16 { uint16_t u; };
template <class S>
struct Cvt {
  bool bf16;
  SK_DEVICE AccOf<S> operator()(S x) const { return Elem<S>::to_acc(x); }
};
template <>
struct Cvt<Bits16> {
  bool bf16;
  SK_DEVICE float operator()(Bits16 x) const {
    return bf16 ? __uint_as_float((unsigned)x.u << 16) : __half2float(__ushort_as_half(x.u));
  }
};

// a * b + c as one fused multiply-add.
SK_DEVICE float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
SK_DEVICE double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// N consecutive elements moved as one vector instruction (N * sizeof(S) <= 16: LDG/LDS.32/64/128;
// 32 bytes (4 doubles) become two 128-bit accesses).
template <class S, int N>
struct alignas(sizeof(S) * N < 16 ? sizeof(S) * N : 16) Pack {
  S v[N];
};
// The emulator checks what the hardware requires of a vector access: its alignment.
template <class T>
SK_DEVICE void check_aligned(const void* p) {
#if defined(SK_SIMT)
  if ((uintptr_t)p % alignof(T) != 0) ::simt::fail("misaligned vector access");
#else
  (void)p;
#endif
}
template <class T>
SK_DEVICE T load_vec(const void* p) {
  check_aligned<T>(p);
  return *reinterpret_cast<const T*>(p);
}
template <class S, int N>
SK_DEVICE Pack<S, N> load_pack(const S* p) {
  return load_vec<Pack<S, N>>(p);
}
template <class S, int N>
SK_DEVICE void store_pack(S* p, const Pack<S, N>& x) {
  check_aligned<Pack<S, N>>(p);
  *reinterpret_cast<Pack<S, N>*>(p) = x;
}

// One CSR nonzero as (column, value) in one aligned load: the hot loops read a nonzero with a single
// warp-uniform load instead of two. Values are converted to the accumulation type when packed.
template <class A> struct Nz;
template <> struct alignas(8) Nz<float> {
  int col;
  float val;
};
template <> struct alignas(16) Nz<double> {
  int col;
  int pad_;
  double val;
};

// ---- warp / block collectives ----------------------------------------------------------------
template <class T>
SK_DEVICE T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Inclusive scan over the warp's lanes.
template <class T>
SK_DEVICE T warp_inclusive_scan(T v, int lane) {
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const T u = __shfl_up_sync(kFullMask, v, off);
    if (lane >= off) v += u;
  }
  return v;
}

// Exclusive scan of one value per thread over a block of NT threads (NT a multiple of 32, <= 1024).
// `warp_tot` is shared scratch of NT / 32 entries; *total receives the block sum. Contains barriers:
// every thread of the block must call it.
template <int NT, class T>
SK_DEVICE T block_exclusive_scan(T v, T* warp_tot, T* total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const T inc = warp_inclusive_scan(v, lane);
  if (lane == kWarp - 1) warp_tot[warp] = inc;
  __syncthreads();
  T before = 0, sum = 0;
#pragma unroll
  for (int w = 0; w < NT / kWarp; ++w) {
    const T t = warp_tot[w];
    before += w < warp ? t : T(0);
    sum += t;
  }
  __syncthreads();  // warp_tot may be reused by the caller right after
  *total = sum;
  return before + inc - v;
}

}  // namespace cuda
}  // namespace sparsekern
