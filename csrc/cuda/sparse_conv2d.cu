// sparse_conv2d forward and backward (NCHW, groups = 1, the weight W the CSR of (Co, C*KH*KW)):
// implicit-GEMM convolutions on the shared engines, with no im2col buffer:
//   forward      y (Co, N*OH*OW) = W @ im2col(x): the panel SpMM (spmm.cu) whose B stage gathers
//                x through tiling.h's im2col map (zeros in the padding) and whose epilogue
//                writes NCHW; bias added there.
//   grad input   dx (C, N*H*W) = W'^T-regrouped @ col2im(dy): the panel SpMM over W's transpose
//                regrouped by input channel (launch.cpp builds it: row ci holds the nonzeros
//                (co, ci, r, s) at column (r*KW + s)*Co + co), whose B stage gathers dy at the
//                output position that reads (ih, iw) through (r, s) (zero when the stride skips
//                it): a transposed conv as one gather-only pass, no scatter, no atomics.
//   grad weight  dW[p] = <dy[:, co], im2col(x)[j]> over images and output positions: the tile
//                SDDMM (sddmm.cu) with dy and im2col(x) as its operands.
#include "cuda/kernels.h"
#include "cuda/sddmm_engine.cuh"
#include "cuda/spmm_engine.cuh"
#include "cuda/spmm_panel.cuh"

namespace sparsekern {
namespace cuda {
namespace {

constexpr size_t kAlign = 256;
size_t round_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// The row part of the panel kernel's conv index map for every B row (tiling.h: im2col_row /
// col2im_row), so that its staging does no division.
__global__ void conv_rowtab_kernel(ConvGeom g, bool col2im, int64_t K, Im2colRow* tab) {
  for (int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; j < K; j += (int64_t)gridDim.x * blockDim.x) {
    if (col2im) {
      const Col2imRow r = col2im_row(g, j);
      tab[j] = Im2colRow{r.off, r.dh, r.dw};
    } else {
      tab[j] = im2col_row(g, j);
    }
  }
}

cudaError_t fill_rowtab(const ConvGeom& g, bool col2im, int64_t K, Im2colRow* tab, cudaStream_t stream) {
  if (K == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(K, 256) < 1024 ? ceil_div(K, 256) : 1024;
  auto* kern = &conv_rowtab_kernel;
  SK_LAUNCH(kern, dim3((unsigned)blocks), dim3(256), 0, stream, g, col2im, K, tab);
  return last_error();
}

template <class S>
cudaError_t forward_typed(DType dt, const Csr& W, const void* x, const void* bias, int64_t bias_stride, void* y,
                          const ConvGeom& g, void* ws, cudaStream_t stream) {
  using A = AccOf<S>;
  const int64_t K = g.C * g.KH * g.KW, cols = g.N * g.OH * g.OW;
  if (K > kPanelMaxK) return cudaErrorInvalidValue;
  Nz<A>* nz = static_cast<Nz<A>*>(ws);
  cudaError_t err = launch_pack<S>(static_cast<const S*>(W.values), W.values_stride, W.perm, W.row_ptr, W.col_idx, g.Co,
                                   K, W.nnz, sizeof(A) == 8 ? 10 : 9, nz, stream);
  if (err != cudaSuccess) return err;
  Im2colRow* tab = reinterpret_cast<Im2colRow*>(static_cast<char*>(ws) + round_up(W.nnz * sizeof(Nz<A>)));
  if ((err = fill_rowtab(g, false, K, tab, stream)) != cudaSuccess) return err;
  PanelB b{};
  b.mode = kBIm2col;
  b.data = x;
  b.g = g;
  b.rowtab = tab;
  const PanelOut o{kOutNchw, y, g.Co, cols, 0, 0, g.OH * g.OW, bias, bias_stride};
  return launch_panel_modes<kPanelConv>(dt, nz, W.col_idx, W.row_ptr, g.Co, K, cols, b, o, stream);
}

template <class S>
cudaError_t backward_input_typed(DType dt, const Csr& Wt, const void* dy, void* dx, const ConvGeom& g, void* ws,
                                 cudaStream_t stream) {
  using A = AccOf<S>;
  const int64_t K = g.KH * g.KW * g.Co, cols = g.N * g.H * g.W;
  if (K > kPanelMaxK) return cudaErrorInvalidValue;
  Nz<A>* nz = static_cast<Nz<A>*>(ws);
  cudaError_t err = launch_pack<S>(static_cast<const S*>(Wt.values), Wt.values_stride, Wt.perm, Wt.row_ptr, Wt.col_idx,
                                   g.C, K, Wt.nnz, sizeof(A) == 8 ? 10 : 9, nz, stream);
  if (err != cudaSuccess) return err;
  Im2colRow* tab = reinterpret_cast<Im2colRow*>(static_cast<char*>(ws) + round_up(Wt.nnz * sizeof(Nz<A>)));
  if ((err = fill_rowtab(g, true, K, tab, stream)) != cudaSuccess) return err;
  PanelB b{};
  b.mode = kBCol2im;
  b.data = dy;
  b.g = g;
  b.rowtab = tab;
  const PanelOut o{kOutNchw, dx, g.C, cols, 0, 0, g.H * g.W, nullptr, 0};
  return launch_panel_modes<kPanelConv>(dt, nz, Wt.col_idx, Wt.row_ptr, g.C, K, cols, b, o, stream);
}

template <class S>
cudaError_t backward_weight_typed(DType dt, const int64_t* rp, const int32_t* col, int64_t nnz, const void* dy,
                                  const void* x, void* dvals, const ConvGeom& g, cudaStream_t stream) {
  const int64_t K = g.C * g.KH * g.KW;
  cudaError_t err = launch_pack<S>(nullptr, 0, nullptr, rp, col, g.Co, K, nnz, 0, nullptr, stream);
  if (err != cudaSuccess || nnz == 0) return err;
  TileSrc xs{}, ys{};
  xs.mode = kTileConvDy;
  xs.data = dy;
  xs.g = g;
  ys.mode = kTileIm2col;
  ys.data = x;
  ys.g = g;
  return launch_tile_sddmm(dt, rp, col, g.Co, K, g.N * g.OH * g.OW, xs, ys, dvals, stream);
}

}  // namespace

size_t conv2d_workspace_bytes(DType dt, int64_t nnz, const ConvGeom& g) {
  const size_t b = (size_t)nnz * (dt == DType::kF64 ? sizeof(Nz<double>) : sizeof(Nz<float>));
  const int64_t rows = g.C * g.KH * g.KW > g.Co * g.KH * g.KW ? g.C * g.KH * g.KW : g.Co * g.KH * g.KW;
  return round_up(b) + round_up((size_t)rows * sizeof(Im2colRow));
}

#define SK_CONV_DISPATCH(fn, ...)                             \
  switch (dt) {                                               \
    case DType::kF32: return fn<float>(__VA_ARGS__);          \
    case DType::kF64: return fn<double>(__VA_ARGS__);         \
    case DType::kF16: return fn<__half>(__VA_ARGS__);         \
    case DType::kBF16: return fn<__nv_bfloat16>(__VA_ARGS__); \
  }                                                           \
  return cudaErrorInvalidValue

cudaError_t conv2d_forward(DType dt, const Csr& W, const void* x, const void* bias, int64_t bias_stride, void* y,
                           const ConvGeom& g, void* workspace, cudaStream_t stream) {
  if (g.Co == 0 || g.N * g.OH * g.OW == 0) return cudaSuccess;
  SK_CONV_DISPATCH(forward_typed, dt, W, x, bias, bias_stride, y, g, workspace, stream);
}

cudaError_t conv2d_backward_input(DType dt, const Csr& Wt, const void* dy, void* dx, const ConvGeom& g, void* workspace,
                                  cudaStream_t stream) {
  if (g.C == 0 || g.N * g.H * g.W == 0) return cudaSuccess;
  SK_CONV_DISPATCH(backward_input_typed, dt, Wt, dy, dx, g, workspace, stream);
}

cudaError_t conv2d_backward_weight(DType dt, const int64_t* row_ptr, const int32_t* col_idx, int64_t nnz,
                                   const void* dy, const void* x, void* dvals, const ConvGeom& g, cudaStream_t stream) {
  if (g.Co == 0) return cudaSuccess;
  SK_CONV_DISPATCH(backward_weight_typed, dt, row_ptr, col_idx, nnz, dy, x, dvals, g, stream);
}

}  // namespace cuda
}  // namespace sparsekern
