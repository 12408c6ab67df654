// The CUDA kernels of every sparsekern op, registered for the CUDA dispatch key of the schemas in
// csrc/ops.cpp. This file is the only one that talks to torch: it checks the arguments (messages
// name the op and the argument, like the CPU kernels'), allocates outputs and workspaces with the
// caching allocator, and calls the torch-free launch functions of kernels.h on the current stream.
// c10's CUDA stream / guard headers (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS) keep it
// compilable against a CPU wheel's headers for tests/cuda/test_cuda_build.py's syntax check.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cuda/kernels.h"

namespace sparsekern {
namespace cuda {
namespace {

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

DType dtype_of(const at::Tensor& t, const char* name, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kF32;
    case at::kDouble: return DType::kF64;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name, const char* op, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but the other tensors are on ", device);
}

void check_dim(const at::Tensor& t, int64_t dim, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

void check_same_dtype(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", bn, " has dtype ", b.scalar_type(), " but ", an, " has ",
              a.scalar_type());
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({(int64_t)(bytes ? bytes : 1)}, like.options().dtype(at::kByte));
}

// A checked CSR (pattern contiguous; values any 1-D stride) of a matrix with `ncols` columns.
struct CsrArg {
  at::Tensor values, row_ptr, col_idx;
  Csr csr;
};
CsrArg csr_arg(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t ncols,
               const char* op, const at::Device& device) {
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.scalar_type() == at::kLong && row_ptr.numel() >= 1, op,
              ": row_ptr must be a 1-D int64 tensor with m+1 >= 1 entries, got ", row_ptr.scalar_type(), " of shape ",
              row_ptr.sizes());
  TORCH_CHECK(col_idx.dim() == 1 && col_idx.scalar_type() == at::kInt, op, ": col_idx must be a 1-D int32 tensor, got ",
              col_idx.scalar_type(), " of shape ", col_idx.sizes());
  check_cuda(row_ptr, "row_ptr", op, device);
  check_cuda(col_idx, "col_idx", op, device);
  TORCH_CHECK(ncols <= INT32_MAX, op, ": the matrix has ", ncols, " columns; int32 column indices allow at most ",
              INT32_MAX);
  CsrArg a;
  a.row_ptr = row_ptr.contiguous();
  a.col_idx = col_idx.contiguous();
  if (values.defined()) {
    check_dim(values, 1, "values", op);
    check_cuda(values, "values", op, device);
    TORCH_CHECK(values.numel() == col_idx.numel(), op, ": values has ", values.numel(), " entries but col_idx has ",
                col_idx.numel());
    a.values = values;
  }
  a.csr = Csr{values.defined() ? values.data_ptr() : nullptr,
              values.defined() ? values.stride(0) : 0,
              nullptr,
              a.row_ptr.data_ptr<int64_t>(),
              a.col_idx.data_ptr<int32_t>(),
              row_ptr.numel() - 1,
              ncols,
              col_idx.numel()};
  return a;
}

Dense dense_of(const at::Tensor& t) { return Dense{t.data_ptr(), t.size(0), t.size(1), t.stride(0), t.stride(1)}; }

// out (m, n) = A @ B + bias through the given (possibly transposed) views of B and out.
void run_spmm(DType dt, const CsrArg& A, at::Tensor B, const at::Tensor& out_view,
              const std::optional<at::Tensor>& bias, const char* op) {
  Dense db = dense_of(B);
  if (spmm_wants_contiguous_b(A.csr, db)) {
    B = B.contiguous();
    db = dense_of(B);
  }
  const DenseOut dout{out_view.data_ptr(), out_view.size(0), out_view.size(1), out_view.stride(0), out_view.stride(1)};
  const bool has_bias = bias.has_value() && bias->defined();
  at::Tensor ws = workspace(spmm_workspace_bytes(dt, A.csr, db), B);
  check_launch(spmm(dt, A.csr, db, dout, has_bias ? bias->data_ptr() : nullptr, has_bias ? bias->stride(0) : 0,
                    ws.data_ptr(), stream()),
               op);
}

// ---- spmm / sparse_linear / sddmm --------------------------------------------------------------
at::Tensor spmm_cuda(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     const at::Tensor& B, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                     const std::optional<at::Tensor>&) {
  const char* op = "spmm";
  check_dim(B, 2, "B", op);
  TORCH_CHECK(B.is_cuda(), op, ": B must be a CUDA tensor, got a tensor on ", B.device());
  const c10::cuda::CUDAGuard guard(B.device());
  const DType dt = dtype_of(B, "B", op);
  check_same_dtype(B, "B", values, "values", op);
  const CsrArg A = csr_arg(values, row_ptr, col_idx, B.size(0), op, B.device());
  at::Tensor out = at::empty({A.csr.m, B.size(1)}, B.options().memory_format(at::MemoryFormat::Contiguous));
  run_spmm(dt, A, B, out, std::nullopt, op);
  return out;
}

at::Tensor sparse_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&) {
  const char* op = "sparse_linear";
  check_dim(x, 2, "x", op);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const DType dt = dtype_of(x, "x", op);
  check_same_dtype(x, "x", values, "values", op);
  const CsrArg W = csr_arg(values, row_ptr, col_idx, x.size(1), op, x.device());
  if (bias.has_value() && bias->defined()) {
    check_dim(*bias, 1, "bias", op);
    check_cuda(*bias, "bias", op, x.device());
    check_same_dtype(x, "x", *bias, "bias", op);
    TORCH_CHECK(bias->size(0) == W.csr.m, op, ": bias must have ", W.csr.m, " entries (W has ", W.csr.m, " rows), got ",
                bias->size(0));
  }
  // y^T (m, N) = W @ x^T: both transposed views, no copies (the panel kernel stages x^T transposed and
  // writes y^T through a shared-memory transpose).
  at::Tensor y = at::empty({x.size(0), W.csr.m}, x.options().memory_format(at::MemoryFormat::Contiguous));
  run_spmm(dt, W, x.t(), y.t(), bias, op);
  return y;
}

at::Tensor sddmm_cuda(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& X, const at::Tensor& Y) {
  const char* op = "sddmm";
  check_dim(X, 2, "X", op);
  check_dim(Y, 2, "Y", op);
  TORCH_CHECK(X.is_cuda(), op, ": X must be a CUDA tensor, got a tensor on ", X.device());
  const c10::cuda::CUDAGuard guard(X.device());
  check_cuda(Y, "Y", op, X.device());
  const DType dt = dtype_of(X, "X", op);
  check_same_dtype(X, "X", Y, "Y", op);
  const CsrArg P = csr_arg(at::Tensor(), row_ptr, col_idx, Y.size(0), op, X.device());
  TORCH_CHECK(X.size(0) == P.csr.m, op, ": X must have ", P.csr.m, " rows (the pattern has ", P.csr.m, " rows), got ",
              X.size(0));
  TORCH_CHECK(X.size(1) == Y.size(1), op, ": X and Y must have the same number of columns, got ", X.size(1), " and ",
              Y.size(1));
  at::Tensor vals = at::empty({P.csr.nnz}, X.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(sddmm(dt, P.csr.row_ptr, P.csr.col_idx, P.csr.m, P.csr.k, P.csr.nnz, dense_of(X), dense_of(Y),
                     vals.data_ptr(), stream()),
               op);
  return vals;
}

// ---- masked ops: the mask compacted to CSR with torch, then the kernels above ------------------
struct Compacted { at::Tensor row_ptr, col_idx; };
Compacted compact(const at::Tensor& mask) {
  const int64_t m = mask.size(0);
  const at::Tensor nz = at::nonzero(mask);  // row-major order: sorted by row, then column
  const at::Tensor rows = nz.select(1, 0);
  Compacted c;
  c.row_ptr = at::zeros({m + 1}, mask.options().dtype(at::kLong));
  if (m > 0) c.row_ptr.slice(0, 1).copy_(at::bincount(rows, {}, m).cumsum(0));
  c.col_idx = nz.select(1, 1).to(at::kInt).contiguous();
  return c;
}

void check_mask(const at::Tensor& mask, int64_t rows, int64_t cols, const char* op, const at::Device& device) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be a bool tensor, got ", mask.scalar_type());
  check_cuda(mask, "mask", op, device);
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == rows && mask.size(1) == cols, op, ": mask must have shape (", rows,
              ", ", cols, "), got ", mask.sizes());
}

at::Tensor masked_matmul_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mask) {
  const char* op = "masked_matmul";
  check_dim(x, 2, "x", op);
  check_dim(weight, 2, "weight", op);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(weight, "weight", op, x.device());
  const DType dt = dtype_of(x, "x", op);
  check_same_dtype(x, "x", weight, "weight", op);
  TORCH_CHECK(x.size(1) == weight.size(1), op, ": x must have ", weight.size(1), " columns (weight has ",
              weight.size(1), " columns), got ", x.size(1));
  check_mask(mask, weight.size(0), weight.size(1), op, x.device());
  const Compacted c = compact(mask);
  const at::Tensor values = at::masked_select(weight, mask);  // the same row-major order
  const CsrArg W = csr_arg(values, c.row_ptr, c.col_idx, weight.size(1), op, x.device());
  at::Tensor y = at::empty({x.size(0), weight.size(0)}, x.options().memory_format(at::MemoryFormat::Contiguous));
  run_spmm(dt, W, x.t(), y.t(), std::nullopt, op);
  return y;
}

at::Tensor masked_sddmm_cuda(const at::Tensor& X, const at::Tensor& Y, const at::Tensor& mask) {
  const char* op = "masked_sddmm";
  check_dim(X, 2, "X", op);
  check_dim(Y, 2, "Y", op);
  TORCH_CHECK(X.is_cuda(), op, ": X must be a CUDA tensor, got a tensor on ", X.device());
  const c10::cuda::CUDAGuard guard(X.device());
  check_cuda(Y, "Y", op, X.device());
  const DType dt = dtype_of(X, "X", op);
  check_same_dtype(X, "X", Y, "Y", op);
  TORCH_CHECK(X.size(1) == Y.size(1), op, ": X and Y must have the same number of columns, got ", X.size(1), " and ",
              Y.size(1));
  check_mask(mask, X.size(0), Y.size(0), op, X.device());
  const Compacted c = compact(mask);
  at::Tensor vals = at::empty({c.col_idx.numel()}, X.options());
  check_launch(sddmm(dt, c.row_ptr.data_ptr<int64_t>(), c.col_idx.data_ptr<int32_t>(), X.size(0), Y.size(0),
                     c.col_idx.numel(), dense_of(X), dense_of(Y), vals.data_ptr(), stream()),
               op);
  at::Tensor out = at::zeros({X.size(0), Y.size(0)}, X.options().memory_format(at::MemoryFormat::Contiguous));
  out.masked_scatter_(mask, vals);
  return out;
}

// ---- sparse_conv2d ---------------------------------------------------------------------------------
int64_t pair_at(at::IntArrayRef v, int i, const char* op, const char* name) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 entries, got ", v.size());
  return v[i];
}

ConvGeom conv_geom(const char* op, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Co, at::IntArrayRef kernel_size,
                   at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  ConvGeom g{N,
             C,
             H,
             W,
             Co,
             pair_at(kernel_size, 0, op, "kernel_size"),
             pair_at(kernel_size, 1, op, "kernel_size"),
             pair_at(stride, 0, op, "stride"),
             pair_at(stride, 1, op, "stride"),
             pair_at(padding, 0, op, "padding"),
             pair_at(padding, 1, op, "padding"),
             pair_at(dilation, 0, op, "dilation"),
             pair_at(dilation, 1, op, "dilation"),
             0,
             0};
  TORCH_CHECK(g.KH >= 1 && g.KW >= 1, op, ": kernel_size must be >= 1, got ", kernel_size);
  TORCH_CHECK(g.SH >= 1 && g.SW >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(g.PH >= 0 && g.PW >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(g.DH >= 1 && g.DW >= 1, op, ": dilation must be >= 1, got ", dilation);
  g.OH = conv_out_size(H, g.KH, g.SH, g.PH, g.DH);
  g.OW = conv_out_size(W, g.KW, g.SW, g.PW, g.DW);
  TORCH_CHECK(g.OH > 0 && g.OW > 0, op, ": input of size (", H, ", ", W, ") is too small for kernel ", kernel_size,
              " with padding ", padding, " and dilation ", dilation);
  TORCH_CHECK(H + 2 * g.PH < INT32_MAX && W + 2 * g.PW < INT32_MAX, op, ": image too large");
  return g;
}

// The conv ops' result lies as their input does (x, grad_out): channels_last for a channels_last one (not also
// contiguous), else NCHW, as their fake kernels say (torch.compile checks it); the kernels write NCHW.
at::Tensor laid_out_as(const at::Tensor& input, const at::Tensor& result) {
  const bool cl = input.dim() == 4 && !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
  return cl ? result.contiguous(at::MemoryFormat::ChannelsLast) : result;
}

at::Tensor sparse_conv2d_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                              const at::Tensor& col_idx, at::IntArrayRef kernel_size,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  const char* op = "sparse_conv2d";
  check_dim(x, 4, "x", op);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const DType dt = dtype_of(x, "x", op);
  check_same_dtype(x, "x", values, "values", op);
  const ConvGeom g = conv_geom(op, x.size(0), x.size(1), x.size(2), x.size(3), row_ptr.numel() - 1, kernel_size, stride,
                               padding, dilation);
  const CsrArg W = csr_arg(values, row_ptr, col_idx, g.C * g.KH * g.KW, op, x.device());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_dim(*bias, 1, "bias", op);
    check_cuda(*bias, "bias", op, x.device());
    check_same_dtype(x, "x", *bias, "bias", op);
    TORCH_CHECK(bias->size(0) == g.Co, op, ": bias must have ", g.Co, " entries, got ", bias->size(0));
  }
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({g.N, g.Co, g.OH, g.OW}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor ws = workspace(conv2d_workspace_bytes(dt, W.csr.nnz, g), x);
  check_launch(conv2d_forward(dt, W.csr, xc.data_ptr(), has_bias ? bias->data_ptr() : nullptr,
                              has_bias ? bias->stride(0) : 0, y.data_ptr(), g, ws.data_ptr(), stream()),
               op);
  return laid_out_as(x, y);
}

at::Tensor sparse_conv2d_backward_input_cuda(const at::Tensor& grad_out, const at::Tensor& values,
                                             const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                             at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                             at::IntArrayRef dilation) {
  const char* op = "sparse_conv2d_backward_input";
  check_dim(grad_out, 4, "grad_out", op);
  TORCH_CHECK(grad_out.is_cuda(), op, ": grad_out must be a CUDA tensor, got a tensor on ", grad_out.device());
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const DType dt = dtype_of(grad_out, "grad_out", op);
  check_same_dtype(grad_out, "grad_out", values, "values", op);
  TORCH_CHECK(input_size.size() == 4, op, ": input_size must have 4 entries, got ", input_size.size());
  const ConvGeom g = conv_geom(op, input_size[0], input_size[1], input_size[2], input_size[3], row_ptr.numel() - 1,
                               kernel_size, stride, padding, dilation);
  TORCH_CHECK(grad_out.size(0) == g.N && grad_out.size(1) == g.Co && grad_out.size(2) == g.OH &&
                  grad_out.size(3) == g.OW,
              op, ": grad_out must have shape (", g.N, ", ", g.Co, ", ", g.OH, ", ", g.OW, "), got ", grad_out.sizes());
  const int64_t KK = g.KH * g.KW;
  const CsrArg W = csr_arg(values, row_ptr, col_idx, g.C * KK, op, grad_out.device());
  // W's transpose regrouped by input channel (tiling.h: col2im): a stable sort of the nonzeros by
  // column j = ci*KK + rs keeps the rows co ascending within a column, so row ci of the result holds
  // (rs, co) in ascending order of its new column rs*Co + co.
  const at::Tensor cols = W.col_idx.to(at::kLong);
  const at::Tensor perm = at::argsort(cols, /*stable=*/true);
  const at::Tensor lengths = W.row_ptr.slice(0, 1) - W.row_ptr.slice(0, 0, -1);
  const at::Tensor rows = at::repeat_interleave(at::arange(g.Co, cols.options()), lengths, std::optional<int64_t>(0),
                                                std::optional<int64_t>(W.csr.nnz));
  const at::Tensor sorted = cols.index_select(0, perm);
  const at::Tensor tcol = (sorted.remainder(KK) * g.Co + rows.index_select(0, perm)).to(at::kInt).contiguous();
  at::Tensor t_row_ptr = at::zeros({g.C * KK + 1}, cols.options());
  if (g.C * KK > 0) t_row_ptr.slice(0, 1).copy_(at::bincount(cols, {}, g.C * KK).cumsum(0));
  const at::Tensor trp = t_row_ptr.slice(0, 0, g.C * KK + 1, KK).contiguous();  // rows ci*KK: C + 1 entries
  Csr Wt{values.data_ptr(),
         values.stride(0),
         perm.data_ptr<int64_t>(),
         trp.data_ptr<int64_t>(),
         tcol.data_ptr<int32_t>(),
         g.C,
         KK * g.Co,
         W.csr.nnz};
  const at::Tensor dyc = grad_out.contiguous();
  at::Tensor dx = at::empty({g.N, g.C, g.H, g.W}, grad_out.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor ws = workspace(conv2d_workspace_bytes(dt, W.csr.nnz, g), grad_out);
  check_launch(conv2d_backward_input(dt, Wt, dyc.data_ptr(), dx.data_ptr(), g, ws.data_ptr(), stream()), op);
  return laid_out_as(grad_out, dx);
}

at::Tensor sparse_conv2d_backward_weight_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                              const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                              at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "sparse_conv2d_backward_weight";
  check_dim(grad_out, 4, "grad_out", op);
  check_dim(x, 4, "x", op);
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got a tensor on ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  check_cuda(grad_out, "grad_out", op, x.device());
  const DType dt = dtype_of(x, "x", op);
  check_same_dtype(x, "x", grad_out, "grad_out", op);
  const ConvGeom g = conv_geom(op, x.size(0), x.size(1), x.size(2), x.size(3), row_ptr.numel() - 1, kernel_size, stride,
                               padding, dilation);
  TORCH_CHECK(grad_out.size(0) == g.N && grad_out.size(1) == g.Co && grad_out.size(2) == g.OH &&
                  grad_out.size(3) == g.OW,
              op, ": grad_out must have shape (", g.N, ", ", g.Co, ", ", g.OH, ", ", g.OW, "), got ", grad_out.sizes());
  const CsrArg P = csr_arg(at::Tensor(), row_ptr, col_idx, g.C * g.KH * g.KW, op, x.device());
  const at::Tensor dyc = grad_out.contiguous(), xc = x.contiguous();
  at::Tensor dvals = at::empty({P.csr.nnz}, x.options());
  check_launch(conv2d_backward_weight(dt, P.csr.row_ptr, P.csr.col_idx, P.csr.nnz, dyc.data_ptr(), xc.data_ptr(),
                                      dvals.data_ptr(), g, stream()),
               op);
  return dvals;
}

// ---- gather, topk_select ---------------------------------------------------------------------------
at::Tensor gather_cuda(const at::Tensor& src, const at::Tensor& index) {
  const char* op = "gather";
  TORCH_CHECK(src.is_cuda(), op, ": src must be a CUDA tensor, got a tensor on ", src.device());
  const c10::cuda::CUDAGuard guard(src.device());
  check_cuda(index, "index", op, src.device());
  TORCH_CHECK_VALUE(src.dim() == 1, op, ": src must be 1-D, got ", src.dim(), " dims");
  TORCH_CHECK_VALUE(index.dim() == 1 && index.scalar_type() == at::kLong, op,
                    ": index must be a 1-D int64 tensor, got ", index.scalar_type(), " of dim ", index.dim());
  const DType dt = dtype_of(src, "src", op);
  at::Tensor out = at::empty({index.numel()}, src.options().memory_format(at::MemoryFormat::Contiguous));
  check_launch(gather(dt, src.data_ptr(), src.stride(0), src.numel(), index.data_ptr<int64_t>(), index.stride(0),
                      index.numel(), out.data_ptr(), stream()),
               op);
  return out;
}

at::Tensor topk_select_cuda(const at::Tensor& scores, int64_t k, bool largest,
                            const std::optional<at::Tensor>& candidates) {
  const char* op = "topk_select";
  TORCH_CHECK(scores.dim() == 1, op, ": scores must be a 1-D tensor, got dim ", scores.dim(), " (shape ",
              scores.sizes(), ")");
  TORCH_CHECK(scores.is_cuda(), op, ": scores must be a CUDA tensor, got a tensor on ", scores.device());
  const c10::cuda::CUDAGuard guard(scores.device());
  const DType dt = dtype_of(scores, "scores", op);
  const int64_t n = scores.size(0);
  TORCH_CHECK(k >= 0, op, ": k must be >= 0, got k = ", k);
  const bool* cand = nullptr;
  int64_t cand_stride = 0;
  if (candidates.has_value() && candidates->defined()) {
    const at::Tensor& c = *candidates;
    TORCH_CHECK(c.scalar_type() == at::kBool, op, ": candidates must be a bool tensor, got ", c.scalar_type());
    TORCH_CHECK(c.dim() == 1 && c.size(0) == n, op, ": candidates must be 1-D with the size of scores (", n,
                "), got shape ", c.sizes());
    TORCH_CHECK(c.device() == scores.device(), op, ": candidates is on ", c.device(), " but scores is on ",
                scores.device());
    cand = c.data_ptr<bool>();
    cand_stride = c.stride(0);
  } else {
    TORCH_CHECK(k <= n, op, ": k (", k, ") is larger than the number of candidates (", n, ")");
  }
  at::Tensor out = at::empty({k}, scores.options().dtype(at::kLong));
  at::Tensor status = at::empty({2}, scores.options().dtype(at::kLong));
  at::Tensor ws = workspace(topk_workspace_bytes(dt, n), scores);
  check_launch(topk_select(dt, scores.data_ptr(), scores.stride(0), cand, cand_stride, n, k, largest,
                           out.data_ptr<int64_t>(), reinterpret_cast<TopkStatus*>(status.data_ptr<int64_t>()),
                           ws.data_ptr(), stream()),
               op);
  // One small copy back (a sync) so that NaN scores and a k above the candidate count raise like the
  // CPU kernel's; the selection itself never leaves the device.
  const at::Tensor st = status.cpu();
  const int64_t nan_index = st.data_ptr<int64_t>()[0], ncand = st.data_ptr<int64_t>()[1];
  TORCH_CHECK_VALUE(nan_index == INT64_MAX, op, ": scores contains NaN at index ", nan_index);
  TORCH_CHECK(k <= ncand, op, ": k (", k, ") is larger than the number of candidates (", ncand, ")");
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  using namespace sparsekern::cuda;
  m.impl("spmm", &spmm_cuda);
  m.impl("sddmm", &sddmm_cuda);
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("masked_matmul", &masked_matmul_cuda);
  m.impl("masked_sddmm", &masked_sddmm_cuda);
  m.impl("sparse_conv2d", &sparse_conv2d_cuda);
  m.impl("sparse_conv2d_backward_input", &sparse_conv2d_backward_input_cuda);
  m.impl("sparse_conv2d_backward_weight", &sparse_conv2d_backward_weight_cuda);
  m.impl("gather", &gather_cuda);
  m.impl("topk_select", &topk_select_cuda);
}
