// The pointwise (1x1, unpadded) case of the CPU sparse_conv2d kernels: per image a CSR GEMM over
// channels x pixels, with tiles that run along whole planes (see conv_pointwise.cpp). Called by
// sparse_conv2d.cpp once it has checked its arguments.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sparsekern {
namespace pointwise {

// Whether these kernels take a conv of this geometry (any stride and dilation: a 1x1 kernel reads
// one input pixel per output pixel).
inline bool applies(int64_t kh, int64_t kw, int64_t ph, int64_t pw) { return kh == 1 && kw == 1 && ph == 0 && pw == 0; }

// y (N, Cout, OH, OW), allocated, contiguous; bias undefined or (Cout) contiguous in x's dtype. Checks
// col_idx against Cin.
void forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
             const at::Tensor& bias, int64_t sh, int64_t sw, at::Tensor& y);
// dx (N, Cin, H, W), allocated, contiguous (written whole: zero where a stride skips a pixel).
void backward_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, int64_t sh, int64_t sw, at::Tensor& dx);
// gv (nnz) zeros in the compute dtype (float32 for bf16), contiguous; dy contiguous.
void backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     int64_t sh, int64_t sw, at::Tensor& gv);

// Both: dx and gv as the two above, in one pass over the image groups (dY read once), where both would run per
// group; returns false, writing nothing, elsewhere (the caller then runs them apart).
bool backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
              const at::Tensor& col_idx, int64_t sh, int64_t sw, at::Tensor& dx, at::Tensor& gv);

}  // namespace pointwise
}  // namespace sparsekern
