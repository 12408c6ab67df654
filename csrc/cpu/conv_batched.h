// Batch-innermost sparse_conv2d on the CPU (kernels larger than 1x1): the batch is laid out innermost,
// (C, H, W, N), so that a row of outputs of every image is one flat run of OW*N elements and every tap of
// the kernel shifts it uniformly; a stride splits the input into phases (see conv_batched.cpp). Called by
// sparse_conv2d.cpp once it has checked its arguments.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sparsekern {
namespace batched {

// Whether these kernels take a conv of this geometry: a kernel larger than 1x1, runs of at least one
// vector (OW*N >= 8, and N times the columns of each phase of the input gradient), and int32 extents.
bool applies(int64_t N, int64_t C_in, int64_t C_out, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh,
             int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw);

// y (N, Cout, OH, OW), allocated, contiguous or channels_last (written as it lies); bias undefined or (Cout) contiguous in x's dtype. Checks col_idx.
// x_packed (where given): set to the forward's copy of x in its phases, for backward() to reuse.
void forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
             const at::Tensor& bias, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
             int64_t dw, at::Tensor& y, at::Tensor* x_packed = nullptr);
// dx (N, Cin, H, W), allocated, contiguous or channels_last. x and dy: any layout (channels_last read by transposes).
void backward_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                    int64_t dh, int64_t dw, at::Tensor& dx);
// gv (nnz) zeros in the compute dtype (float32 for bf16), contiguous.
void backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                     at::Tensor& gv);
// Both gradients, dY packed once for the two: dx and gv as above. x_packed: forward()'s copy of this x, or
// undefined (anything else of the wrong size or dtype is not read; x is packed anew).
void backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
              const at::Tensor& col_idx, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
              int64_t dh, int64_t dw, at::Tensor& dx, at::Tensor& gv, const at::Tensor& x_packed = at::Tensor());

}  // namespace batched
}  // namespace sparsekern
