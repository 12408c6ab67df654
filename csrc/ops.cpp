// Every sparsekern op schema, declared once. Kernels register against these
// names per dispatch key (csrc/cpu/<op>.cpp for CPU, csrc/cuda/ later); the
// autograd formulas, fake kernels and autocast rules live in sparsekern/ops/.
//
// CSR convention: a logical (m, k) matrix is row_ptr (int64, m+1), col_idx
// (int32, nnz, strictly increasing within rows: duplicates are an error), values (nnz).
// The optional t_* arguments carry the cached transpose (t_row_ptr (k+1), t_col_idx
// (nnz, int32), t_perm (int64, nnz) with transpose.values = values[t_perm]) so that the
// backward pass is a CSR product too; the kernels check them (csr::check_transpose).
#include <torch/extension.h>
#include <torch/library.h>

namespace sparsekern {
namespace route {
void bind(pybind11::module_& m);  // csrc/cpu/layer_route.cpp
}
}  // namespace sparsekern

// `import sparsekern._C` loads this library, which runs the registrations below; the module holds the sparse
// layers' C++ route (LayerRoute).
PYBIND11_MODULE(_C, m) { sparsekern::route::bind(m); }

TORCH_LIBRARY(sparsekern, m) {
  // out (m, n) = A (m, k) @ B (k, n), k = B.size(0).
  m.def("spmm(Tensor values, Tensor row_ptr, Tensor col_idx, Tensor B, "
        "Tensor? t_row_ptr=None, Tensor? t_col_idx=None, Tensor? t_perm=None) -> Tensor");
  // values[p] = dot(X[i, :], Y[j, :]) for the p-th nonzero (i, j); X (m, d), Y (k, d).
  m.def("sddmm(Tensor row_ptr, Tensor col_idx, Tensor X, Tensor Y) -> Tensor");
  // y (N, m) = x (N, k) @ W^T + bias, W the (m, k) CSR matrix.
  m.def("sparse_linear(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor? bias=None, "
        "Tensor? t_row_ptr=None, Tensor? t_col_idx=None, Tensor? t_perm=None) -> Tensor");
  // y (N, m) = x (N, k) @ (weight * mask)^T, weight and mask (m, k).
  m.def("masked_matmul(Tensor x, Tensor weight, Tensor mask) -> Tensor");
  // out (m, k) = (X (m, d) @ Y (k, d)^T) * mask, exactly 0 outside the mask.
  m.def("masked_sddmm(Tensor X, Tensor Y, Tensor mask) -> Tensor");
  // NCHW conv2d, groups = 1, weight the CSR of (Cout, Cin, kh, kw): rows Cout, columns Cin*kh*kw.
  m.def("sparse_conv2d(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, int[2] kernel_size, "
        "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def("sparse_conv2d_backward_input(Tensor grad_out, Tensor values, Tensor row_ptr, Tensor col_idx, "
        "int[4] input_size, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // Gradient of the weight's values (nnz) at its pattern.
  m.def("sparse_conv2d_backward_weight(Tensor grad_out, Tensor x, Tensor row_ptr, Tensor col_idx, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // out[i] = src[index[i]] (1-D): W^T's values through the transpose permutation, in backward.
  m.def("gather(Tensor src, Tensor index) -> Tensor");
  // Indices (int64, ascending) of the k largest (or smallest) scores among candidates;
  // ties go to the lower index.
  m.def("topk_select(Tensor scores, int k, bool largest=True, Tensor? candidates=None) -> Tensor");
}
