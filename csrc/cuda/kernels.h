// The launch functions of the CUDA kernels: plain pointers, sizes and strides, no torch types, so
// that csrc/cuda/*.cu compile without torch headers. csrc/cuda/launch.cpp checks the tensors,
// allocates outputs and workspaces with torch and calls these on the current stream; the host
// tests (tests/cuda/sim_test.cpp) call them through the SIMT emulator.
//
// Every function only enqueues work on `stream` and returns the launch status (cudaSuccess or the
// first error). Index arrays are trusted to have been shape-checked by the caller; out-of-range
// column or row_ptr entries stop the kernel with a device-side trap instead of corrupting memory.
#pragma once
#include <stddef.h>
#include <stdint.h>

#if defined(SK_SIMT)
#include "simt.h"
#else
#include <cuda_runtime_api.h>
#endif

#include "cuda/tiling.h"

namespace sparsekern {
namespace cuda {

enum class DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

inline size_t dtype_size(DType t) { return t == DType::kF64 ? 8 : t == DType::kF32 ? 4 : 2; }

// A CSR matrix (m, k): row_ptr int64 (m + 1), col_idx int32 (nnz, sorted within rows), values
// (nnz) of the op's dtype with element stride values_stride. perm (optional): the matrix's values
// are values[perm[p] * values_stride] (W^T through the transpose permutation).
struct Csr {
  const void* values;
  int64_t values_stride;
  const int64_t* perm;
  const int64_t* row_ptr;
  const int32_t* col_idx;
  int64_t m, k, nnz;
};

// A dense strided 2-D view: element (r, c) at data[r * s0 + c * s1] (elements, not bytes).
struct Dense {
  const void* data;
  int64_t rows, cols, s0, s1;
};
struct DenseOut {
  void* data;
  int64_t rows, cols, s0, s1;
};

// Workspaces: the caller allocates `*_workspace_bytes` bytes (256-byte aligned) and passes them.
size_t spmm_workspace_bytes(DType dt, const Csr& A, const Dense& B);
// out (m, n) = A (m, k) @ B (k, n) (+ bias[i * bias_stride] on row i when bias is not null).
// sparse_linear is this with B = x^T and out = y^T (transposed views, no copies).
cudaError_t spmm(DType dt, const Csr& A, const Dense& B, const DenseOut& out, const void* bias, int64_t bias_stride,
                 void* workspace, cudaStream_t stream);
// Tests only: force spmm's kernel (kPathRows or kPathPanel from tiling.h; -1 restores the choice of
// choose_spmm_path). The panel kernel still needs a row- or column-major B.
void set_spmm_path_override(int path);

// Whether spmm would rather get a contiguous (row-major) copy of B: the panel kernel stages B only
// from a row- or column-major layout, and the row-per-warp kernel reads B's rows, which are strided
// in a transposed B (sparse_linear's x^T). The caller makes the copy.
inline bool spmm_wants_contiguous_b(const Csr& A, const Dense& B) {
  if (B.s1 == 1) return false;
  if (B.s0 != 1) return true;
  return choose_spmm_path(A.m, A.k, B.cols, A.nnz, true) == kPathRows && B.cols > 4;
}

// vals[p] = dot(X[i, :], Y[j, :]) for the p-th nonzero (i, j): X (m, d), Y (k, d) any strides.
cudaError_t sddmm(DType dt, const int64_t* row_ptr, const int32_t* col_idx, int64_t m, int64_t k, int64_t nnz,
                  const Dense& X, const Dense& Y, void* vals, cudaStream_t stream);

// Convolutions: x, y, dy, dx contiguous NCHW; W the CSR of (Co, C*KH*KW).
size_t conv2d_workspace_bytes(DType dt, int64_t nnz, const ConvGeom& g);
// y = conv2d(x, W) + bias.
cudaError_t conv2d_forward(DType dt, const Csr& W, const void* x, const void* bias, int64_t bias_stride, void* y,
                           const ConvGeom& g, void* workspace, cudaStream_t stream);
// dx = conv2d's input gradient. Wt is W's transpose regrouped by input channel (see tiling.h:
// row ci holds the nonzeros (co, ci, r, s) at column (r*KW + s)*Co + co, sorted), m = C,
// k = KH*KW*Co (launch.cpp builds it from the transpose permutation).
cudaError_t conv2d_backward_input(DType dt, const Csr& Wt, const void* dy, void* dx, const ConvGeom& g, void* workspace,
                                  cudaStream_t stream);
// dvals[p] = sum over images and output positions of dy[n, co, oh, ow] * x[n, ci, ih, iw] for the
// p-th nonzero (co, (ci, r, s)) of W's pattern.
cudaError_t conv2d_backward_weight(DType dt, const int64_t* row_ptr, const int32_t* col_idx, int64_t nnz,
                                   const void* dy, const void* x, void* dvals, const ConvGeom& g, cudaStream_t stream);

// Top-k: indices (ascending) of the k best of the candidate scores, ties to the lower index.
struct TopkStatus {
  int64_t nan_index;  // first candidate index holding a NaN, or INT64_MAX
  int64_t n_candidates;
};
size_t topk_workspace_bytes(DType dt, int64_t n);
// status: device memory, filled in when the work completes (read it after a sync to report errors).
// Requires 1 <= k; when k exceeds the number of candidates (or a NaN is found) the output is
// undefined but stays within out[0, k).
cudaError_t topk_select(DType dt, const void* scores, int64_t stride, const bool* candidates, int64_t cand_stride,
                        int64_t n, int64_t k, bool largest, int64_t* out, TopkStatus* status, void* workspace,
                        cudaStream_t stream);

// out[i] = src[index[i]]; out-of-range indices trap.
cudaError_t gather(DType dt, const void* src, int64_t src_stride, int64_t n_src, const int64_t* index,
                   int64_t index_stride, int64_t n, void* out, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsekern
