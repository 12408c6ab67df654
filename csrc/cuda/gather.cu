// gather: out[i] = src[index[i]] (1-D), how the backward passes read W^T's values through the
// transpose permutation. Memory-bound: 4 independent elements per thread per step so several loads
// are in flight; an out-of-range index stops the kernel (the CPU kernel raises) instead of reading
// out of bounds.
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace sparsekern {
namespace cuda {
namespace {

constexpr int kThreads = 256, kPerThread = 4;

template <class T>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const T* __restrict__ src, int64_t src_stride, int64_t n_src, const int64_t* __restrict__ index,
                  int64_t index_stride, int64_t n, T* __restrict__ out) {
  const int64_t step = (int64_t)gridDim.x * kThreads * kPerThread;
  for (int64_t base = (int64_t)blockIdx.x * kThreads * kPerThread + threadIdx.x; base < n; base += step) {
    int64_t j[kPerThread];
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t i = base + (int64_t)u * kThreads;
      j[u] = i < n ? index[i * index_stride] : 0;
      SK_DEVICE_CHECK(j[u] >= 0 && j[u] < n_src,
                      "sparsekern.gather: index[%lld] = %lld is out of range for src of %lld entries\n", (long long)i,
                      (long long)j[u], (long long)n_src);
    }
#pragma unroll
    for (int u = 0; u < kPerThread; ++u) {
      const int64_t i = base + (int64_t)u * kThreads;
      if (i < n) out[i] = src[j[u] * src_stride];
    }
  }
}

template <class T>
cudaError_t launch(const void* src, int64_t src_stride, int64_t n_src, const int64_t* index, int64_t index_stride,
                   int64_t n, void* out, cudaStream_t stream) {
  const int64_t per_block = (int64_t)kThreads * kPerThread;
  const int64_t blocks = ceil_div(n, per_block) < 65536 ? ceil_div(n, per_block) : 65536;
  auto* kern = &gather_kernel<T>;
  SK_LAUNCH(kern, dim3((unsigned)blocks), dim3(kThreads), 0, stream, static_cast<const T*>(src), src_stride, n_src,
            index, index_stride, n, static_cast<T*>(out));
  return last_error();
}

}  // namespace

cudaError_t gather(DType dt, const void* src, int64_t src_stride, int64_t n_src, const int64_t* index,
                   int64_t index_stride, int64_t n, void* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  // Moves bits only: one kernel per element size.
  switch (dtype_size(dt)) {
    case 8: return launch<uint64_t>(src, src_stride, n_src, index, index_stride, n, out, stream);
    case 4: return launch<uint32_t>(src, src_stride, n_src, index, index_stride, n, out, stream);
    default: return launch<uint16_t>(src, src_stride, n_src, index, index_stride, n, out, stream);
  }
}

}  // namespace cuda
}  // namespace sparsekern
