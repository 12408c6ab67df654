// sparse_linear's CPU kernel (sparse_linear.cpp), for the C++ nodes that fuse an activation into it.
#pragma once

#include <ATen/core/Tensor.h>

namespace sparsekern {

// y (N, m) = x (N, k) @ W^T + bias, the op's checks included; with `relu`, y = max(that, 0) as the engine stores it
// (no pass of its own over y).
at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, const c10::optional<at::Tensor>& bias,
                             const c10::optional<at::Tensor>& t_row_ptr, const c10::optional<at::Tensor>& t_col_idx,
                             const c10::optional<at::Tensor>& t_perm, bool relu);

}  // namespace sparsekern
