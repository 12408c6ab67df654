// The SDDMM engine shared by sddmm.cu and sparse_conv2d.cu (grad weight): the operands of the tile
// kernel (defined in sddmm.cu) as runtime modes, so one kernel per accumulation type serves both.
#pragma once
#include "cuda/common.cuh"
#include "cuda/kernels.h"

namespace sparsekern {
namespace cuda {

enum TileMode : int {
  kTileDense = 0,   // element (row, t) at data[row*s0 + t*s1]
  kTileConvDy = 1,  // conv grad weight's X: (co, c) = dy[n, co, p] for c = n*OH*OW + p
  kTileIm2col = 2,  // conv grad weight's Y: (j, c) = x at tiling.h's im2col map
};
struct TileSrc {
  int mode;
  const void* data;
  int64_t s0, s1;  // kTileDense strides
  ConvGeom g;      // conv modes
};

// vals[p] = sum_t X[i, t] * Y[j, t] over t < d for the p-th nonzero (i, j) of the (m, k) pattern, whose
// columns are sorted within rows (validate first). dt: the dtype of X, Y and vals.
cudaError_t launch_tile_sddmm(DType dt, const int64_t* rp, const int32_t* col, int64_t m, int64_t k, int64_t d,
                              const TileSrc& X, const TileSrc& Y, void* vals, cudaStream_t stream);

}  // namespace cuda
}  // namespace sparsekern
