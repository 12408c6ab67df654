// The SpMM engine shared by spmm.cu (spmm, sparse_linear) and sparse_conv2d.cu: the CSR packing /
// validation kernel, and the operand descriptions of the panel kernel (spmm_panel.cuh), whose B
// operand (dense row- or column-major, implicit im2col of a conv input, implicit col2im of a conv
// output gradient) and epilogue (dense strided, NCHW) are runtime modes.
#pragma once
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace sparsekern {
namespace cuda {

// ---- packing and validation ------------------------------------------------------------------
// One warp per row: checks row_ptr (0 at the start, non-decreasing, nnz at the end), that the
// columns are in [0, k) and strictly increasing within the row (the kernels rely on it), that perm
// entries are in [0, nnz); and writes packed (col, value) pairs when out is not null.
// colx_shift != 0 packs the panel kernel's column form instead of the column (panel_colx).
template <class S>
__global__ void __launch_bounds__(256)
    pack_nz_kernel(const S* __restrict__ values, int64_t vstride, const int64_t* __restrict__ perm,
                   const int64_t* __restrict__ rp, const int32_t* __restrict__ col, int64_t m, int64_t k, int64_t nnz,
                   int colx_shift, Nz<AccOf<S>>* __restrict__ out) {
  using A = AccOf<S>;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t i = (int64_t)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp; i < m; i += warps) {
    const int64_t b = rp[i], e = rp[i + 1];
    SK_DEVICE_CHECK(b >= 0 && b <= e && e <= nnz && (i > 0 || b == 0) && (i < m - 1 || e == nnz),
                    "sparsekern: invalid row_ptr at row %lld: row_ptr[%lld] = %lld, row_ptr[%lld] = %lld, nnz = %lld\n",
                    (long long)i, (long long)i, (long long)b, (long long)(i + 1), (long long)e, (long long)nnz);
    int prev = -1;  // the row's previous column (lane 31 of the previous step)
    for (int64_t base = b; base < e; base += kWarp) {
      const int64_t p = base + lane;
      const bool in = p < e;
      const int c = in ? col[p] : 0x7fffffff;
      int before = __shfl_up_sync(kFullMask, c, 1);
      if (lane == 0) before = prev;
      SK_DEVICE_CHECK(!in || (c >= 0 && (int64_t)c < k && c > before),
                      "sparsekern: invalid col_idx[%lld] = %d in row %lld (must be in [0, %lld) and increasing)\n",
                      (long long)p, c, (long long)i, (long long)k);
      prev = __shfl_sync(kFullMask, c, kWarp - 1);
      if (in && out != nullptr) {
        int64_t src = p;
        if (perm != nullptr) {
          src = perm[p];
          SK_DEVICE_CHECK(src >= 0 && src < nnz, "sparsekern: invalid permutation entry %lld at %lld\n", (long long)src,
                          (long long)p);
        }
        Nz<A> z;
        if constexpr (sizeof(Nz<A>) == 16) z.pad_ = 0;
        z.col = colx_shift ? (int)panel_colx((unsigned)c, colx_shift) : c;
        z.val = Elem<S>::to_acc(values[src * vstride]);
        out[p] = z;
      }
    }
  }
}

// Validates the pattern, and packs when out is not null (then values is required).
template <class S>
inline cudaError_t launch_pack(const S* values, int64_t vstride, const int64_t* perm, const int64_t* rp,
                               const int32_t* col, int64_t m, int64_t k, int64_t nnz, int colx_shift, Nz<AccOf<S>>* out,
                               cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(m, 8) < 4096 ? ceil_div(m, 8) : 4096;
  auto* kern = &pack_nz_kernel<S>;
  SK_LAUNCH(kern, dim3((unsigned)blocks), dim3(256), 0, stream, values, vstride, perm, rp, col, m, k, nnz, colx_shift,
            out);
  return last_error();
}

// ---- panel operands --------------------------------------------------------------------------
enum PanelBMode : int {
  kBRowMajor = 0,  // B[j, c] = data[j*s0 + c]
  kBColMajor = 1,  // B[j, c] = data[c*s1 + j] (sparse_linear's x^T)
  kBIm2col = 2,    // B[j, c] = x at tiling.h's im2col map (conv forward)
  kBCol2im = 3,    // B[j', c] = dy at tiling.h's col2im map (conv grad input)
};
struct PanelB {
  int mode;
  const void* data;
  int64_t s0, s1;  // the dense modes' strides
  bool vec;        // dense modes: the contiguous dimension may be read in 16-byte vectors
  ConvGeom g;      // the conv modes' geometry
  // Conv modes: the row part of the index map for every B row (Im2colRow / Col2imRow, which share a
  // layout), precomputed by sparse_conv2d.cu so that staging an element costs no division.
  const Im2colRow* rowtab;
};
static_assert(sizeof(Im2colRow) == sizeof(Col2imRow), "one table type for both conv modes");
enum PanelOutMode : int {
  kOutDense = 0,  // out[i*s0 + c*s1]; column-major (s0 == 1) goes through a shared-memory transpose
  kOutNchw = 1,   // out[(n*rows + i)*plane + p] for column c = n*plane + p
};
struct PanelOut {
  int mode;
  void* data;
  int64_t rows, cols, s0, s1, plane;
  const void* bias;  // bias[i * bias_stride] added to row i, or null
  int64_t bias_stride;
};

}  // namespace cuda
}  // namespace sparsekern
