// sddmm: vals[p] = dot(X[i, :], Y[j, :]) at the CSR pattern (the weight gradient of sparse_linear and
// spmm: X = dy^T and Y = x^T as transposed views, read in place).
//
// Tile kernel: a block owns an output tile of 128 rows x 128 columns of the (m, k) pattern (tiles
// in grouped order, tiling.h: sddmm_tile_of). Its nonzeros are found per row by binary search
// (columns are sorted), numbered through a prefix sum over the rows, and dealt to the threads, 16
// per thread per pass, consecutive nonzeros (mostly of one row) to consecutive lanes. X's and Y's
// 128 rows are streamed through shared memory in chunks of 16 along d (register double
// buffering), so an element of X or Y fetched from memory serves every nonzero of its row or
// column in the tile (128 * density of them) instead of one: the Sputnik-style one-nonzero-per-
// thread scheme re-reads a whole Y row per nonzero, which for d = a batch of tokens is far beyond
// L2. Each nonzero then costs two shared-memory vector reads per 4 FMAs (the X read mostly a
// broadcast). Empty tiles cost two binary searches per row and are skipped. Loads and stores
// convert to the accumulation type, so the kernel is compiled once for fp32/fp16/bf16 and once for
// fp64, the storage type being a runtime argument of the load and store code only.
#include "cuda/kernels.h"
#include "cuda/sddmm_engine.cuh"
#include "cuda/spmm_engine.cuh"

namespace sparsekern {
namespace cuda {
namespace {

constexpr int kTileElems = kSddmmRows * kSddmmChunk / kSddmmThreads;  // 8 staged elements per thread
static_assert(kSddmmRows == kSddmmCols, "X and Y tiles share the staging code");

template <class A>
SK_HOST_DEVICE constexpr int tile_ld() {
  return kSddmmChunk + (int)(16 / sizeof(A));  // padded row: 16-byte aligned, rows start on other banks
}

// Which (row, t) of the chunk the thread's q-th element is: lanes along rows for a dense operand
// whose rows are contiguous (sparse_linear's transposed views), along t otherwise.
SK_DEVICE bool along_rows(const TileSrc& s) { return s.mode == kTileDense && s.s0 == 1 && s.s1 != 1; }
SK_DEVICE void tile_pos(bool ar, int q, int* r, int* t) {
  const int idx = threadIdx.x + kSddmmThreads * q;
  *r = ar ? idx % kSddmmRows : idx / kSddmmChunk;
  *t = ar ? idx / kSddmmRows : idx % kSddmmChunk;
}

template <class S, class A>
SK_DEVICE void fetch_typed(const TileSrc& src, const Im2colRow* tab, A (&g)[kTileElems], int64_t r0, int64_t rows,
                           int64_t d0, int64_t d, Cvt<S> cvt) {
  const S* p = static_cast<const S*>(src.data);
  const bool ar = along_rows(src);
  if (src.mode == kTileDense) {
#pragma unroll
    for (int q = 0; q < kTileElems; ++q) {
      int r, t;
      tile_pos(ar, q, &r, &t);
      const int64_t row = r0 + r, dd = d0 + t;
      g[q] = (row < rows && dd < d) ? cvt(p[row * src.s0 + dd * src.s1]) : A(0);
    }
    return;
  }
  // Conv modes: t = tid % kSddmmChunk is fixed, so the position c = d0 + t is decoded once.
  const int64_t c = d0 + threadIdx.x % kSddmmChunk;
  const ConvGeom& G = src.g;
  if (src.mode == kTileConvDy) {
    const int64_t plane = G.OH * G.OW, img = c / plane, pos = c - img * plane;
#pragma unroll
    for (int q = 0; q < kTileElems; ++q) {
      int r, t;
      tile_pos(false, q, &r, &t);
      const int64_t co = r0 + r;
      g[q] = (co < rows && c < d) ? cvt(p[(img * G.Co + co) * plane + pos]) : A(0);
    }
    return;
  }
  Im2colCol cc{0, 0, 0};
  if (c < d) cc = im2col_col(G, c);
#pragma unroll
  for (int q = 0; q < kTileElems; ++q) {
    int r, t;
    tile_pos(false, q, &r, &t);
    A v = A(0);
    if (r0 + r < rows && c < d) {
      const int64_t off = im2col_offset(G, cc, tab[r]);
      if (off >= 0) v = cvt(p[off]);
    }
    g[q] = v;
  }
}

template <class A>
SK_DEVICE void tile_fetch(DType dt, const TileSrc& src, const Im2colRow* tab, A (&g)[kTileElems], int64_t r0,
                          int64_t rows, int64_t d0, int64_t d) {
  if constexpr (sizeof(A) == 8) {
    fetch_typed<double, A>(src, tab, g, r0, rows, d0, d, Cvt<double>{false});
  } else {
    if (dt == DType::kF32) fetch_typed<float, A>(src, tab, g, r0, rows, d0, d, Cvt<float>{false});
    else fetch_typed<Bits16, A>(src, tab, g, r0, rows, d0, d, Cvt<Bits16>{dt == DType::kBF16});
  }
}

template <class A>
SK_DEVICE void tile_store(const TileSrc& src, A* tile, const A (&g)[kTileElems]) {
  const bool ar = along_rows(src);
#pragma unroll
  for (int q = 0; q < kTileElems; ++q) {
    int r, t;
    tile_pos(ar, q, &r, &t);
    tile[r * tile_ld<A>() + t] = g[q];
  }
}

template <class S>
SK_DEVICE void store_val(void* vals, int64_t p, AccOf<S> v) {
  static_cast<S*>(vals)[p] = Elem<S>::from_acc(v);
}

// First position in [lo, hi) whose column is >= v.
SK_DEVICE int64_t lower_bound_col(const int32_t* col, int64_t lo, int64_t hi, int64_t v) {
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (col[mid] < v) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

template <class A>
__global__ void __launch_bounds__(kSddmmThreads, 2)
    sddmm_tile_kernel(DType dt, const int64_t* __restrict__ rp, const int32_t* __restrict__ col, int64_t m, int64_t k,
                      int64_t d, TileSrc X, TileSrc Y, void* __restrict__ vals) {
  constexpr int NT = kSddmmThreads, R = kSddmmRows, C = kSddmmCols, DC = kSddmmChunk, NS = kSddmmSlots;
  constexpr int LD = tile_ld<A>();
  static_assert(R <= 256 && C <= 256, "slots pack (row, col) in 8 bits each");
  SK_DYNAMIC_SMEM(A, smem);
  A* Xs = smem;
  A* Ys = smem + R * LD;
  __shared__ int64_t s_pos[R];  // CSR position of the tile's first nonzero in each row
  __shared__ int s_pre[R + 1];  // prefix sum of the tile's nonzeros per row
  __shared__ int warp_tot[NT / kWarp];
  __shared__ Im2colRow s_tab[C];  // Y's row decode in im2col mode

  const int tid = threadIdx.x;
  const int64_t rtiles = ceil_div(m, R), ctiles = ceil_div(k, C), ntiles = rtiles * ctiles;
  for (int64_t pid = blockIdx.x; pid < ntiles; pid += gridDim.x) {
    int64_t rt, ct;
    sddmm_tile_of(pid, rtiles, ctiles, &rt, &ct);
    const int64_t i0 = rt * R, j0 = ct * C;
    __syncthreads();  // the previous tile's readers of s_pos / s_pre / s_tab are done
    int cnt = 0;
    if (tid < R) {
      const int64_t i = i0 + tid;
      int64_t lo = 0, hi = 0;
      if (i < m) {
        const int64_t b = rp[i], e = rp[i + 1];
        lo = lower_bound_col(col, b, e, j0);
        hi = lower_bound_col(col, lo, e, j0 + C);
      }
      s_pos[tid] = lo;
      cnt = (int)(hi - lo);
    }
    if (Y.mode == kTileIm2col && tid < C && j0 + tid < k) s_tab[tid] = im2col_row(Y.g, j0 + tid);
    int total;
    const int before = block_exclusive_scan<NT>(cnt, warp_tot, &total);
    if (total == 0) continue;  // uniform: every thread has the same total
    if (tid < R) s_pre[tid] = before;
    if (tid == 0) s_pre[R] = total;
    __syncthreads();

    for (int pass = 0; pass < total; pass += NT * NS) {
      int rc[NS];  // (row << 8) | column of the tile, -1 for an empty slot
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        const int q = pass + s * NT + tid;
        rc[s] = -1;
        if (q < total) {
          const int r = prefix_find(s_pre, R, q);
          const int64_t p = s_pos[r] + (q - s_pre[r]);
          rc[s] = (r << 8) | (int)(col[p] - j0);
        }
      }
      A acc[NS];
#pragma unroll
      for (int s = 0; s < NS; ++s) acc[s] = A(0);
      A xr[kTileElems], yr[kTileElems];
      if (d > 0) {
        tile_fetch<A>(dt, X, s_tab, xr, i0, m, 0, d);
        tile_fetch<A>(dt, Y, s_tab, yr, j0, k, 0, d);
      }
      for (int64_t d0 = 0; d0 < d; d0 += DC) {
        __syncthreads();  // the previous chunk has been read
        tile_store<A>(X, Xs, xr);
        tile_store<A>(Y, Ys, yr);
        __syncthreads();
        if (d0 + DC < d) {  // the next chunk's loads overlap this chunk's FMAs
          tile_fetch<A>(dt, X, s_tab, xr, i0, m, d0 + DC, d);
          tile_fetch<A>(dt, Y, s_tab, yr, j0, k, d0 + DC, d);
        }
#pragma unroll
        for (int s = 0; s < NS; ++s) {
          if (rc[s] < 0) continue;
          const A* xrow = Xs + (rc[s] >> 8) * LD;
          const A* yrow = Ys + (rc[s] & 255) * LD;
          A a = acc[s];
#pragma unroll
          for (int t = 0; t < DC; t += 4) {
            const Pack<A, 4> x4 = load_pack<A, 4>(xrow + t), y4 = load_pack<A, 4>(yrow + t);
#pragma unroll
            for (int e = 0; e < 4; ++e) a = fma_acc(x4.v[e], y4.v[e], a);
          }
          acc[s] = a;
        }
      }
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        if (rc[s] < 0) continue;
        const int q = pass + s * NT + tid, r = rc[s] >> 8;
        const int64_t p = s_pos[r] + (q - s_pre[r]);
        if constexpr (sizeof(A) == 8) {
          store_val<double>(vals, p, acc[s]);
        } else {
          if (dt == DType::kF32) store_val<float>(vals, p, acc[s]);
          else if (dt == DType::kF16) store_val<__half>(vals, p, acc[s]);
          else store_val<__nv_bfloat16>(vals, p, acc[s]);
        }
      }
    }
  }
}

template <class A>
size_t tile_smem_bytes() {
  return (size_t)(kSddmmRows + kSddmmCols) * tile_ld<A>() * sizeof(A);
}

template <class A>
cudaError_t launch_typed(DType dt, const int64_t* rp, const int32_t* col, int64_t m, int64_t k, int64_t d,
                         const TileSrc& X, const TileSrc& Y, void* vals, cudaStream_t stream) {
  const int64_t ntiles = ceil_div(m, kSddmmRows) * ceil_div(k, kSddmmCols);
  auto* kern = &sddmm_tile_kernel<A>;
  const size_t smem = tile_smem_bytes<A>();
  cudaError_t err = allow_dynamic_smem(kern, smem);
  if (err != cudaSuccess) return err;
  const int64_t blocks = ntiles < ((int64_t)1 << 30) ? ntiles : ((int64_t)1 << 30);
  SK_LAUNCH(kern, dim3((unsigned)blocks), dim3(kSddmmThreads), smem, stream, dt, rp, col, m, k, d, X, Y, vals);
  return last_error();
}

template <class S>
cudaError_t sddmm_typed(DType dt, const int64_t* rp, const int32_t* col, int64_t m, int64_t k, int64_t nnz,
                        const Dense& X, const Dense& Y, void* vals, cudaStream_t stream) {
  // Validate the pattern (the binary searches need sorted, in-range columns).
  cudaError_t err = launch_pack<S>(nullptr, 0, nullptr, rp, col, m, k, nnz, 0, nullptr, stream);
  if (err != cudaSuccess || nnz == 0) return err;
  TileSrc xs{}, ys{};
  xs.mode = ys.mode = kTileDense;
  xs.data = X.data;
  xs.s0 = X.s0;
  xs.s1 = X.s1;
  ys.data = Y.data;
  ys.s0 = Y.s0;
  ys.s1 = Y.s1;
  return launch_tile_sddmm(dt, rp, col, m, k, X.cols, xs, ys, vals, stream);
}

}  // namespace

cudaError_t launch_tile_sddmm(DType dt, const int64_t* rp, const int32_t* col, int64_t m, int64_t k, int64_t d,
                              const TileSrc& X, const TileSrc& Y, void* vals, cudaStream_t stream) {
  if (m == 0 || k == 0) return cudaSuccess;
  if (dt == DType::kF64) return launch_typed<double>(dt, rp, col, m, k, d, X, Y, vals, stream);
  return launch_typed<float>(dt, rp, col, m, k, d, X, Y, vals, stream);
}

cudaError_t sddmm(DType dt, const int64_t* row_ptr, const int32_t* col_idx, int64_t m, int64_t k, int64_t nnz,
                  const Dense& X, const Dense& Y, void* vals, cudaStream_t stream) {
  switch (dt) {
    case DType::kF32: return sddmm_typed<float>(dt, row_ptr, col_idx, m, k, nnz, X, Y, vals, stream);
    case DType::kF64: return sddmm_typed<double>(dt, row_ptr, col_idx, m, k, nnz, X, Y, vals, stream);
    case DType::kF16: return sddmm_typed<__half>(dt, row_ptr, col_idx, m, k, nnz, X, Y, vals, stream);
    case DType::kBF16: return sddmm_typed<__nv_bfloat16>(dt, row_ptr, col_idx, m, k, nnz, X, Y, vals, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparsekern
