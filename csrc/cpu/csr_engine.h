// The CSR tile engine shared by the linear-path CPU kernels.
//
//   spmm core  : out (m, n) = A_csr (m, k) @ B (k, n) [+ bias[i]]   -> spmm, sparse_linear, masked_matmul
//   sddmm core : vals[p] = dot(X[i, :], Y[j, :]) at the CSR pattern   -> sddmm, masked_sddmm
//   compact    : (weight, mask) (m, k), any strides -> CSR            -> masked_matmul, masked_sddmm
//
// Every dense operand is a strided logical 2-D view (no copies by the caller): the
// engine packs the randomly accessed operand (B, resp. Y) once into batch tiles
// Bp[t][j][0:T] (k x T, contiguous, zero-padded; 128 B: T = 32 floats / 16 doubles; 256 B
// for the 64-byte loops; narrower for short batches),
// so that each nonzero reads one contiguous L2-resident row of T values; the
// result of a group of rows is written through a register transpose when the
// output is column-major (sparse_linear's y (N, m) seen as y^T (m, N)).
// Where the tiles spread evenly over the threads, each thread packs its own run of tiles, one at a time,
// just before running every row over it (the tile stays in L2; SDDMM sums each thread's share of the batch
// into its own copy of the values); otherwise the operand is packed whole and rows are cut into a few
// nnz-balanced parts per thread (cost nnz + a per-row term), handed out dynamically, a part walking all
// batch tiles (rows: int32 column indices, software prefetch (SpMM) of the first line of the packed row 16
// nonzeros ahead, 2 x 4 ymm accumulators per row). Patterns with at most about one nonzero per column of
// the dense operand skip the packing (csr_gather.cpp). Where a packed tile spans many L1-sized blocks of its rows
// and the pattern's rows have enough entries per block, the whole-tile SpMM runs block by block, each row's sums
// parked between blocks, so that its random reads hit L1, not L2 (l1_block_rows, csr_internal.h); the fused
// backward's SDDMM takes the same blocks where B's tile is large (sddmm_l1_block_rows).
// On AVX-512 hosts the SpMM and SDDMM loops can run on 64-byte vectors (same templates and packing,
// 256-byte tiles for long batches, instantiated for x86-64-v4); isa() says which width runs, see set_isa.
// bfloat16 operands run the float32 loops: the packed tiles are widened as they are packed, values
// and bias converted once, results rounded to bf16 on store (SDDMM: once, after all tiles).
// From a density of dense_above() (default 0.6) on, the products run as one dense GEMM instead
// (csr_dense.cpp), except an SpMM whose B has a NaN or Inf: results never depend on the path taken.
// The engine's files are listed in csr_internal.h.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>
#include <c10/util/Optional.h>

#include <string>

namespace sparsekern {
namespace csr {

// Checks (op-named): row_ptr starts at 0, is non-decreasing, ends at nnz = col_idx.numel();
// column indices are strictly increasing within each row (no duplicates) and lie in [0, ncols)
// (`what` says where ncols comes from, e.g. "x has 512 columns"). One parallel pass over row_ptr
// and col_idx.
void check_pattern(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t ncols, const std::string& what,
                   const char* op);

// check_pattern, skipped when these very tensors (same data, unchanged since) passed it against ncols
// before: a pattern registered by trust_pattern, or re-checked after an in-place write (csr_trust.cpp).
void check_pattern_once(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t ncols, const std::string& what,
                        const char* op);

// Validates a pattern (and its transpose, when given) once and registers it: the ops trust it after
// that while its tensors are unchanged. The sparse modules call it whenever their pattern changes.
void trust_pattern(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t ncols,
                   const c10::optional<at::Tensor>& t_row_ptr, const c10::optional<at::Tensor>& t_col_idx,
                   const c10::optional<at::Tensor>& t_perm);
// The debug switch: true = check every call, trusted or not. Returns the previous setting.
bool set_check_patterns(bool every_call);
bool check_patterns();

// Argument checks shared by the ops; each message names the op and the argument.
void check_cpu(const at::Tensor& t, const char* name, const char* op);
void check_dense(const at::Tensor& t, const char* name, int64_t dim, const char* op);  // CPU, float32/64/bf16, dim
void check_same_dtype(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn, const char* op);
void check_mask(const at::Tensor& mask, int64_t rows, int64_t cols, const char* op);

// A validated CSR (contiguous row_ptr / col_idx / values) of `ncols` columns; values may be
// undefined (pattern only). Checks dtypes, sizes (row_ptr.numel() - 1 rows,
// values.numel() == col_idx.numel() == row_ptr[-1]), the index ranges and their order (check_pattern).
struct Csr {
  at::Tensor values, row_ptr, col_idx;
  int64_t m;
};
Csr checked_csr(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t ncols,
                const std::string& what, const char* op);

// The cached transpose (t_row_ptr, t_col_idx, t_perm) that spmm and sparse_linear take for their
// backward: none, or all three, the transpose of the checked CSR `a` of k columns as
// sparse_matrix.transpose_pattern builds it (a wrong one would give a wrong gradient silently).
// Checks dtypes, sizes, t_row_ptr in full and each column's first and last entry: O(k), not O(nnz).
void check_transpose(const Csr& a, int64_t k, const c10::optional<at::Tensor>& t_row_ptr,
                     const c10::optional<at::Tensor>& t_col_idx, const c10::optional<at::Tensor>& t_perm,
                     const char* op);

// check_transpose, skipped for a transpose registered with its pattern (trust_pattern) and unchanged.
void check_transpose_once(const Csr& a, int64_t k, const c10::optional<at::Tensor>& t_row_ptr,
                          const c10::optional<at::Tensor>& t_col_idx, const c10::optional<at::Tensor>& t_perm,
                          const char* op);

// out (m, n) = A (m, k) @ B (k, n) (+ bias[i] on row i). B and out are strided views
// (e.g. x.t() and y.t() for sparse_linear), or both plane operands (k, N, P) and (m, N, P) read as
// (k, N*P) and (m, N*P) (csr_internal.h; conv2d_gemm's NCHW planes); out is fully overwritten. With `relu`,
// out = max(A @ B (+ bias), 0) (NaN stays NaN, as clamp_min's): a ReLU fused into the layer.
void spmm(const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& B,
          const c10::optional<at::Tensor>& bias, const at::Tensor& out, bool relu = false);

// vals (nnz, contiguous) [p] = dot(X[i, :], Y[j, :]), X (m, d), Y (k, d) strided views, or both plane
// operands (m, N, P) and (k, N, P) with d = N*P.
void sddmm(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& X, const at::Tensor& Y,
           const at::Tensor& vals);

// How spmm_backward takes the gradient at out from the gradient G at an activation's output (the activation fused
// into the layer): relu_mask: `act` is the ReLU's output, G is zeroed where it is <= 0 (nn.ReLU's backward);
// scale: `act` is the activation's derivative at out (gelu_), G is multiplied by it.
enum class ActGrad { relu_mask, scale };

// A^T's values for spmm_backward: A's values, the transpose's permutation (A^T's entry p is A's entry perm[p]) and
// the caller's gather of them through it, called only where the blocks' own gather (t_block_values) does not run.
struct TransposedValues {
  const at::Tensor& values;
  const at::Tensor& perm;
  c10::function_ref<const at::Tensor&()> gathered;
};

// The backward of out = A @ B (A: the CSR row_ptr, col_idx of m rows and k columns) in one pass over G's batch tiles
// (csr_backward.cpp), G (m, n) the gradient at out: dvals (nnz, contiguous) [p] = dot(G[i, :], B[j, :]) and, where dB
// is defined, dB (k, n) = A^T @ G, A^T given as (t_values, t_row_ptr, t_col_idx). G, B and dB are strided views or
// plane operands, as spmm and sddmm take them. Where `act` (G's shape, 2-D) is defined, G is first taken through the
// fused activation's backward as act_grad says. Where dbias (m, contiguous) is defined it gets the row sums of
// (that) G, the gradient of a bias added to out's rows. Inputs are trusted (checked by the caller). Returns false,
// writing nothing, where spmm and sddmm would not both run the whole-tile loops (the dense fallback, the gather path,
// row parts): the caller then runs them apart.
bool spmm_backward(const TransposedValues& t_values, const at::Tensor& t_row_ptr, const at::Tensor& t_col_idx,
                   const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& G, const at::Tensor& B,
                   const at::Tensor& dB, const at::Tensor& dvals, const at::Tensor& act, ActGrad act_grad,
                   const at::Tensor& dbias);

// GELU fused into a sparse linear layer (gelu.cpp): z (contiguous, float32, float64 or bfloat16) becomes gelu(z)
// in place, F.gelu's exact form; returns gelu'(z) where keep_derivative (what the layer's backward multiplies its
// gradient by), else an undefined tensor.
at::Tensor gelu_(at::Tensor& z, bool keep_derivative);

// Counts a backward that ran both gradients in one pass (here, or the conv node's pointwise and batch-innermost
// backwards), for the tests (torch.ops.sparsekern._fused_backward_runs).
void note_fused_backward();

// The vector width of the SpMM / SDDMM loops: avx2 = the portable 32-byte loops (AVX2 clone, SSE on
// older x86, generic elsewhere), avx512 = 64-byte loops (AVX-512F/BW/DQ/VL hosts only). Set once at
// load from SPARSEKERN_ISA=auto|avx2|avx512 (auto: the faster width measured on this CPU family);
// set_isa changes it at run time (tests, benchmarks: torch.ops.sparsekern._set_isa).
enum class Isa { avx2, avx512 };
Isa isa();
const char* isa_name(Isa isa);
bool isa_supported(const std::string& name);  // false for unknown names
std::string set_isa(const std::string& name);  // "auto" | "avx2" | "avx512"; returns the ISA now in effect

// The density (nnz / (m k)) from which spmm and sddmm run the dense fallback: set once at load by the
// Python layer from SPARSEKERN_DENSE_ABOVE (0 runs every product dense, above 1 none), default 0.6;
// torch.ops.sparsekern._set_dense_above changes it at run time (process-wide).
double dense_above();
double set_dense_above(double threshold);  // returns the threshold now in effect

struct Compacted {
  at::Tensor row_ptr;  // int64 (m + 1)
  at::Tensor col_idx;  // int32 (nnz)
  at::Tensor values;   // weight at the mask, or undefined when no weight was given
};
// CSR of mask (m, k) (bool, any strides) and, if weight is defined, the weight's values there.
// Count per row, prefix sum, fill; parallel over rows, reading the mask in memory order
// for row-major and column-major (transposed view) layouts.
Compacted compact(const at::Tensor& weight, const at::Tensor& mask);

}  // namespace csr
}  // namespace sparsekern
