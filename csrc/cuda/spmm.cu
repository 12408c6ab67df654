// spmm (out = A @ B) and sparse_linear (y = x @ W^T + bias, i.e. y^T = W @ x^T through transposed
// views): the CSR SpMM kernels. Two kernels (tiling.h's choose_spmm_path picks one):
//
//  * panel (spmm_panel.cuh): 128 rows x 128 columns per block, B staged through shared
//    memory in chunks of 32 rows, so a staged B element serves every row of the panel that uses
//    it. For products where the panel reuses B (wide outputs, density >~ 1/64 for a row-major B).
//    sparse_linear's column-major x^T is transposed while staged, and y (= out^T) is written
//    through a shared-memory transpose, so x and y are used in place. sparse_conv2d.cu runs the
//    same kernel with implicit im2col / col2im operands.
//  * rows (Sputnik-style, Gale et al. SC'20): one warp per row, rows launched longest first (row
//    swizzle), each nonzero streams one vector-loaded segment of its B row; lanes are split between
//    columns and nonzeros (tiling.h: rows_column_lanes) so narrow outputs do not idle lanes. For
//    very sparse matrices (little reuse to stage) and for narrow B.
#include "cuda/kernels.h"
#include "cuda/spmm_engine.cuh"
#include "cuda/spmm_panel.cuh"

namespace sparsekern {
namespace cuda {

namespace {

// ---- row swizzle -------------------------------------------------------------------------------
// order[0, m) = the rows by descending length class (tiling.h: swizzle_bucket), in one block: a
// shared-memory histogram of the classes, its scan, and a scatter. Rows within a class come in
// arbitrary order, which changes no result (rows are computed independently).
constexpr int kSwizzleThreads = 1024;

__global__ void __launch_bounds__(kSwizzleThreads)
    row_swizzle_kernel(const int64_t* __restrict__ rp, int64_t m, int32_t* __restrict__ order) {
  __shared__ unsigned hist[kSwizzleBuckets];
  __shared__ unsigned warp_tot[kSwizzleThreads / kWarp];
  const int tid = threadIdx.x;
  for (int b = tid; b < kSwizzleBuckets; b += kSwizzleThreads) hist[b] = 0;
  __syncthreads();
  for (int64_t i = tid; i < m; i += kSwizzleThreads) atomicAdd(&hist[swizzle_bucket(rp[i + 1] - rp[i])], 1u);
  __syncthreads();
  unsigned total;
  const unsigned start =
      block_exclusive_scan<kSwizzleThreads>(tid < kSwizzleBuckets ? hist[tid] : 0u, warp_tot, &total);
  if (tid < kSwizzleBuckets) hist[tid] = start;
  __syncthreads();
  for (int64_t i = tid; i < m; i += kSwizzleThreads) {
    const unsigned pos = atomicAdd(&hist[swizzle_bucket(rp[i + 1] - rp[i])], 1u);
    order[pos] = (int32_t)i;
  }
}

// ---- rows kernel -------------------------------------------------------------------------------
constexpr int kRowsWarps = 4;

template <class S>
SK_DEVICE AccOf<S> out_bias(const PanelOut& o, int64_t i) {
  return o.bias != nullptr ? Elem<S>::to_acc(static_cast<const S*>(o.bias)[i * o.bias_stride]) : AccOf<S>(0);
}
// N consecutive columns c.. of row i of a dense out, + add (columns past o.cols dropped).
template <class S, int N>
SK_DEVICE void out_store(const PanelOut& o, int64_t i, int64_t c, const AccOf<S> (&v)[N], AccOf<S> add) {
  S* p = static_cast<S*>(o.data) + i * o.s0 + c * o.s1;
  if (N > 1 && o.s1 == 1 && c + N <= o.cols && ((uintptr_t)p % (sizeof(S) * N)) == 0) {
    Pack<S, N> pk;
#pragma unroll
    for (int j = 0; j < N; ++j) pk.v[j] = Elem<S>::from_acc(v[j] + add);
    store_pack<S, N>(p, pk);
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j)
    if (c + j < o.cols) p[j * o.s1] = Elem<S>::from_acc(v[j] + add);
}

template <class S, int V>
SK_DEVICE Pack<S, V> load_b(const S* p) {
  if constexpr (V == 1) {
    Pack<S, 1> r;
    r.v[0] = *p;
    return r;
  } else {
    return load_pack<S, V>(p);  // B.s1 == 1 and aligned (checked by the launcher)
  }
}

template <class S, int V, int LC>
__global__ void __launch_bounds__(kRowsWarps* kWarp)
    spmm_rows_kernel(const Nz<AccOf<S>>* __restrict__ nz, const int64_t* __restrict__ rp,
                     const int32_t* __restrict__ order, int64_t m, const S* __restrict__ B, int64_t s0, int64_t s1,
                     int64_t n, PanelOut O) {
  using A = AccOf<S>;
  constexpr int LN = kWarp / LC, TW = LC * V;
  const int lane = threadIdx.x % kWarp, lc = lane % LC, ln = lane / LC;
  const int64_t slot = (int64_t)blockIdx.x * kRowsWarps + threadIdx.x / kWarp;
  if (slot >= m) return;  // whole warps: no collective is skipped by part of a warp
  const int64_t i = order[slot];
  const int64_t b = rp[i], e = rp[i + 1];
  const A bias = out_bias<S>(O, i);
  for (int64_t c0 = (int64_t)blockIdx.y * TW; c0 < n; c0 += (int64_t)gridDim.y * TW) {
    const int64_t c = c0 + (int64_t)lc * V;
    A acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = A(0);
    if (c < n) {
      const S* Bc = B + c * s1;
      int64_t p = b + ln;
      // 4 nonzeros per step: their B loads are independent and overlap.
      for (; p + 3 * LN < e; p += 4 * LN) {
        const Nz<A> z0 = nz[p], z1 = nz[p + LN], z2 = nz[p + 2 * LN], z3 = nz[p + 3 * LN];
        const Pack<S, V> b0 = load_b<S, V>(Bc + z0.col * s0);
        const Pack<S, V> b1 = load_b<S, V>(Bc + z1.col * s0);
        const Pack<S, V> b2 = load_b<S, V>(Bc + z2.col * s0);
        const Pack<S, V> b3 = load_b<S, V>(Bc + z3.col * s0);
#pragma unroll
        for (int v = 0; v < V; ++v) {
          acc[v] += z0.val * Elem<S>::to_acc(b0.v[v]);
          acc[v] += z1.val * Elem<S>::to_acc(b1.v[v]);
          acc[v] += z2.val * Elem<S>::to_acc(b2.v[v]);
          acc[v] += z3.val * Elem<S>::to_acc(b3.v[v]);
        }
      }
      for (; p < e; p += LN) {  // residue: fewer than 4 nonzeros left for this lane group
        const Nz<A> z = nz[p];
        const Pack<S, V> bv = load_b<S, V>(Bc + z.col * s0);
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += z.val * Elem<S>::to_acc(bv.v[v]);
      }
    }
    if constexpr (LN > 1) {
#pragma unroll
      for (int v = 0; v < V; ++v)
#pragma unroll
        for (int off = LC; off < kWarp; off <<= 1) acc[v] += __shfl_xor_sync(kFullMask, acc[v], off);
    }
    if (ln == 0 && c < n) out_store<S, V>(O, i, c, acc, bias);
  }
}

template <class S>
bool aligned_to(const void* p, int elems) {
  return ((uintptr_t)p % (sizeof(S) * (size_t)elems)) == 0;
}

template <class S, int V, int LC>
cudaError_t launch_rows(const Nz<AccOf<S>>* nz, const int64_t* rp, const int32_t* order, int64_t m, const Dense& B,
                        const PanelOut& O, cudaStream_t stream) {
  const int64_t tiles = ceil_div(B.cols, (int64_t)LC * V);
  const dim3 grid((unsigned)ceil_div(m, kRowsWarps), (unsigned)(tiles < 65535 ? tiles : 65535));
  auto* kern = &spmm_rows_kernel<S, V, LC>;
  SK_LAUNCH(kern, grid, dim3(kRowsWarps * kWarp), 0, stream, nz, rp, order, m, static_cast<const S*>(B.data), B.s0,
            B.s1, B.cols, O);
  return last_error();
}

template <class S, int V>
cudaError_t launch_rows_v(const Nz<AccOf<S>>* nz, const int64_t* rp, const int32_t* order, int64_t m, const Dense& B,
                          const PanelOut& O, cudaStream_t stream) {
  switch (rows_column_lanes(B.cols, V)) {
    case 1: return launch_rows<S, V, 1>(nz, rp, order, m, B, O, stream);
    case 4: return launch_rows<S, V, 4>(nz, rp, order, m, B, O, stream);
    default: return launch_rows<S, V, 32>(nz, rp, order, m, B, O, stream);
  }
}

int g_path_override = -1;

template <class S> DType dtype_of();
template <> DType dtype_of<float>() { return DType::kF32; }
template <> DType dtype_of<double>() { return DType::kF64; }
template <> DType dtype_of<__half>() { return DType::kF16; }
template <> DType dtype_of<__nv_bfloat16>() { return DType::kBF16; }

constexpr size_t kAlign = 256;
size_t round_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

template <class S>
cudaError_t spmm_typed(const Csr& A, const Dense& B, const DenseOut& out, const void* bias, int64_t bias_stride,
                       void* workspace, cudaStream_t stream) {
  using Acc = AccOf<S>;
  constexpr int V = vec_elems<S>();
  const int64_t m = A.m, n = B.cols;
  if (m == 0 || n == 0) return cudaSuccess;
  Nz<Acc>* nz = static_cast<Nz<Acc>*>(workspace);
  int32_t* order = reinterpret_cast<int32_t*>(static_cast<char*>(workspace) + round_up(A.nnz * sizeof(Nz<Acc>)));
  const bool col_major = B.s0 == 1 && B.s1 != 1;
  const int path = g_path_override >= 0 ? g_path_override : choose_spmm_path(m, A.k, n, A.nnz, col_major);
  const bool panel = path == kPathPanel && (B.s1 == 1 || B.s0 == 1) && A.k <= kPanelMaxK;
  cudaError_t err = launch_pack<S>(static_cast<const S*>(A.values), A.values_stride, A.perm, A.row_ptr, A.col_idx, m,
                                   A.k, A.nnz, panel ? panel_colx_shift<Acc>() : 0, nz, stream);
  if (err != cudaSuccess) return err;
  const PanelOut O{kOutDense, out.data, out.rows, out.cols, out.s0, out.s1, 0, bias, bias_stride};
  const S* b = static_cast<const S*>(B.data);
  if (panel) {
    PanelB pb{};
    pb.data = b;
    pb.s0 = B.s0;
    pb.s1 = B.s1;
    if (B.s1 == 1) {
      pb.mode = kBRowMajor;
      pb.vec = B.s0 % V == 0 && aligned_to<S>(b, V);
    } else {
      pb.mode = kBColMajor;
      pb.vec = B.s1 % V == 0 && aligned_to<S>(b, V);
    }
    return launch_panel_modes<kPanelDense>(dtype_of<S>(), nz, A.col_idx, A.row_ptr, m, A.k, n, pb, O, stream);
  }
  auto* sw = &row_swizzle_kernel;
  SK_LAUNCH(sw, dim3(1), dim3(kSwizzleThreads), 0, stream, A.row_ptr, m, order);
  if ((err = last_error()) != cudaSuccess) return err;
  if (B.s1 == 1 && B.s0 % V == 0 && n % V == 0 && aligned_to<S>(b, V))
    return launch_rows_v<S, V>(nz, A.row_ptr, order, m, B, O, stream);
  return launch_rows_v<S, 1>(nz, A.row_ptr, order, m, B, O, stream);
}

}  // namespace

void set_spmm_path_override(int path) { g_path_override = path; }

size_t spmm_workspace_bytes(DType dt, const Csr& A, const Dense&) {
  const size_t nzb = dt == DType::kF64 ? sizeof(Nz<double>) : sizeof(Nz<float>);
  return round_up((size_t)A.nnz * nzb) + round_up((size_t)A.m * sizeof(int32_t));
}

cudaError_t spmm(DType dt, const Csr& A, const Dense& B, const DenseOut& out, const void* bias, int64_t bias_stride,
                 void* workspace, cudaStream_t stream) {
  switch (dt) {
    case DType::kF32: return spmm_typed<float>(A, B, out, bias, bias_stride, workspace, stream);
    case DType::kF64: return spmm_typed<double>(A, B, out, bias, bias_stride, workspace, stream);
    case DType::kF16: return spmm_typed<__half>(A, B, out, bias, bias_stride, workspace, stream);
    case DType::kBF16: return spmm_typed<__nv_bfloat16>(A, B, out, bias, bias_stride, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparsekern
