// Tiling arithmetic of the CUDA kernels, free of torch and of CUDA: plain integer functions that
// the kernels call on the device and tests/cuda/host_test.cpp checks on the host (g++ only).
// SK_HOST_DEVICE is `__host__ __device__` under nvcc (common.cuh defines it first) and empty here.
#pragma once
#include <stdint.h>

#ifndef SK_HOST_DEVICE
#if defined(__CUDACC__)
#define SK_HOST_DEVICE __host__ __device__
#else
#define SK_HOST_DEVICE
#endif
#endif

namespace sparsekern {
namespace cuda {

SK_HOST_DEVICE inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

SK_HOST_DEVICE inline int floor_log2(uint64_t x) {  // x > 0
#if defined(__CUDA_ARCH__)
  return 63 - __clzll((long long)x);
#else
  return 63 - __builtin_clzll(x);
#endif
}

// ---- row swizzle (the row-per-warp SpMM) ------------------------------------------------------
// Rows are launched longest first so that the long rows do not all land in the last wave and
// neighbouring warps of a block get rows of similar length. The order is a bucket sort on a
// log-scale length class: 4 classes per power of two (lengths in one class differ by < 25%),
// longer rows in smaller buckets; empty rows go last.
constexpr int kSwizzleBuckets = 256;

SK_HOST_DEVICE inline int swizzle_bucket(int64_t len) {
  if (len <= 0) return kSwizzleBuckets - 1;
  const int lg = floor_log2((uint64_t)len);
  const int frac = lg >= 2 ? (int)((len >> (lg - 2)) & 3) : (int)((len << (2 - lg)) & 3);
  const int cls = 1 + 4 * lg + frac;  // 1 .. 252, non-decreasing in len
  return kSwizzleBuckets - 1 - cls;
}

// ---- row-per-warp SpMM ("rows" kernel) --------------------------------------------------------
// A warp computes one row i of out over a tile of LC * V columns: its lanes are LC column lanes
// (V consecutive elements each: one vector load of B per nonzero) times 32 / LC nonzero lanes
// that split the row's nonzeros and are summed by a butterfly at the end. Wide outputs use
// LC = 32 (each nonzero streams one contiguous B row segment, Sputnik's layout); narrow ones
// (a few columns: SpMV-like) put the spare lanes on the nonzeros instead of idling them.
SK_HOST_DEVICE inline int rows_column_lanes(int64_t n, int v) {
  const int64_t need = ceil_div(n, v);
  return need <= 1 ? 1 : need <= 4 ? 4 : 32;
}

// ---- panel SpMM --------------------------------------------------------------------------------
// A block owns a panel of kPanelRows consecutive rows and kPanelCols columns of out; B is staged
// through shared memory in chunks of kPanelChunk rows (B's rows = A's columns) and every nonzero of
// the panel that falls in the chunk reads its B row from there: a staged B element serves every
// row of the panel that has a nonzero in its column (128 * density rows on average), instead of
// being fetched from L2 once per nonzero.
constexpr int kPanelWarps = 8;
constexpr int kPanelRowsPerWarp = 16;
constexpr int kPanelRows = kPanelWarps * kPanelRowsPerWarp;  // 128
constexpr int kPanelCols = 128;                              // 4 per lane
constexpr int kPanelChunk = 32;

// Load balance inside a panel: the block ranks its rows by length (longest first) and deals them
// to the warps in snake order (0..7, 7..0, ...), so every warp gets a similar number of nonzeros.
SK_HOST_DEVICE inline void panel_deal(int rank, int* warp, int* slot) {
  const int round = rank / kPanelWarps, pos = rank % kPanelWarps;
  *slot = round;
  *warp = (round & 1) ? kPanelWarps - 1 - pos : pos;
}

// Shared-memory layout of a staged chunk: row kk holds kPanelCols elements, groups of 4 columns
// XOR-permuted by bits 2..4 of kk. The compute reads a whole row (lane l: group l), which stays a
// permutation of the groups (conflict-free); the transposing store of a column-major B writes 4
// consecutive kk of 8 columns per warp instruction, which the permutation spreads over all banks.
SK_HOST_DEVICE inline int panel_swizzle(int kk, int c) { return c ^ (((kk >> 2) & 7) << 2); }

// The panel kernel's form of a column: the byte offset of the staged B row `col` (rows of 128
// elements, 1 << shift bytes: shift 9 for fp32 staging, 10 for fp64) with the row's swizzle
// already applied to the group bits. A lane then finds its 4 elements at
//   (colx ^ (lane << (shift - 5))) - k0 * row_bytes
// in unsigned 32-bit arithmetic: two integer ops per nonzero. Needs col < 2^(32 - shift).
SK_HOST_DEVICE inline uint32_t panel_colx(uint32_t col, int shift) {
  return (col << shift) | (((col >> 2) & 7u) << (shift - 5));
}
constexpr int64_t kPanelMaxK = (int64_t)1 << 22;  // columns of A the fp64 colx form can hold

// Which SpMM kernel runs a dense product out (m, n) = A (m, k, nnz) @ B.
enum SpmmPath { kPathRows = 0, kPathPanel = 1 };
SK_HOST_DEVICE inline int choose_spmm_path(int64_t m, int64_t k, int64_t n, int64_t nnz, bool b_col_major) {
  if (m < 64 || n < 32 || k == 0 || nnz == 0 || k > kPanelMaxK) return kPathRows;
  // reuse: how many rows of a panel use a staged B row, on average.
  const double reuse = (double)kPanelRows * (double)nnz / ((double)m * (double)k);
  // A column-major B (sparse_linear's x) has no fast row-per-warp path (its rows are strided):
  // the panel's transposing stage pays off sooner.
  return reuse >= (b_col_major ? 0.5 : 2.0) ? kPathPanel : kPathRows;
}

// ---- tile SDDMM --------------------------------------------------------------------------------
// A block owns an output tile of kSddmmRows x kSddmmCols of the (m, k) pattern and streams X's and
// Y's rows through shared memory in chunks of kSddmmChunk along d; its nonzeros (found by binary
// search in each row) are spread over the threads, kSddmmSlots per thread per pass.
constexpr int kSddmmThreads = 256;
constexpr int kSddmmRows = 128;
constexpr int kSddmmCols = 128;
constexpr int kSddmmChunk = 16;
constexpr int kSddmmSlots = 16;
constexpr int kSddmmGroup = 8;  // tile rasterization: 8 row tiles share each column tile in flight

// Largest r in [0, n) with prefix[r] <= q, for a non-decreasing prefix with prefix[0] = 0 <= q.
template <class P>
SK_HOST_DEVICE inline int prefix_find(const P* prefix, int n, int64_t q) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if ((int64_t)prefix[mid] <= q) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// Tile order: groups of kSddmmGroup row tiles walk the column tiles together, so the X rows of the
// group and the Y rows of a column tile are read from DRAM about once and then hit in L2.
SK_HOST_DEVICE inline void sddmm_tile_of(int64_t pid, int64_t row_tiles, int64_t col_tiles, int64_t* rt, int64_t* ct) {
  const int64_t per_group = (int64_t)kSddmmGroup * col_tiles;
  const int64_t g = pid / per_group, r = pid % per_group;
  const int64_t first = g * kSddmmGroup;
  const int64_t rows_here = row_tiles - first < kSddmmGroup ? row_tiles - first : kSddmmGroup;
  *rt = first + r % rows_here;
  *ct = r / rows_here;
}

// ---- convolution index maps ---------------------------------------------------------------------
// NCHW tensors, groups = 1. The weight is the CSR of (Co, C*KH*KW) with column j = (ci*KH + r)*KW + s.
struct ConvGeom { int64_t N, C, H, W, Co, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW; };

SK_HOST_DEVICE inline int64_t conv_out_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d) {
  const int64_t span = in + 2 * p - d * (k - 1) - 1;
  return span < 0 ? 0 : span / s + 1;
}

// Forward (implicit im2col): B[j, c] = x[n, ci, oh*SH - PH + r*DH, ow*SW - PW + s*DW] for the output
// position c = (n*OH + oh)*OW + ow, 0 in the padding. Split into a part of the column (fixed per
// thread in the kernel) and a part of the row, so the per-element work is two adds and a test.
struct Im2colCol {
  int64_t base;  // n * C*H*W
  int ih0, iw0;  // oh*SH - PH, ow*SW - PW
};
struct Im2colRow {
  int64_t off;  // ci * H*W
  int dh, dw;   // r*DH, s*DW
};
SK_HOST_DEVICE inline Im2colCol im2col_col(const ConvGeom& g, int64_t c) {
  const int64_t ow = c % g.OW, t = c / g.OW, oh = t % g.OH, n = t / g.OH;
  Im2colCol x;
  x.base = n * g.C * g.H * g.W;
  x.ih0 = (int)(oh * g.SH - g.PH);
  x.iw0 = (int)(ow * g.SW - g.PW);
  return x;
}
SK_HOST_DEVICE inline Im2colRow im2col_row(const ConvGeom& g, int64_t j) {
  const int64_t s = j % g.KW, t = j / g.KW, r = t % g.KH, ci = t / g.KH;
  Im2colRow x;
  x.off = ci * g.H * g.W;
  x.dh = (int)(r * g.DH);
  x.dw = (int)(s * g.DW);
  return x;
}
// Offset into x, or -1 in the padding.
SK_HOST_DEVICE inline int64_t im2col_offset(const ConvGeom& g, const Im2colCol& c, const Im2colRow& r) {
  const int ih = c.ih0 + r.dh, iw = c.iw0 + r.dw;
  if ((unsigned)ih >= (unsigned)g.H || (unsigned)iw >= (unsigned)g.W) return -1;
  return c.base + r.off + (int64_t)ih * g.W + iw;
}

// Grad input (transposed conv as an SpMM over W's transpose regrouped by input channel): row ci of
// A' holds the nonzeros (co, ci, r, s) at column j' = (r*KW + s)*Co + co, and
// B'[j', c] = dy[n, co, oh, ow] for the input position c = (n*H + ih)*W + iw, where
// ih + PH - r*DH = oh*SH and iw + PW - s*DW = ow*SW; 0 when that has no solution in range.
struct Col2imCol {
  int64_t base;  // n * Co*OH*OW
  int th0, tw0;  // ih + PH, iw + PW
};
struct Col2imRow {
  int64_t off;  // co * OH*OW
  int dh, dw;   // r*DH, s*DW
};
SK_HOST_DEVICE inline Col2imCol col2im_col(const ConvGeom& g, int64_t c) {
  const int64_t iw = c % g.W, t = c / g.W, ih = t % g.H, n = t / g.H;
  Col2imCol x;
  x.base = n * g.Co * g.OH * g.OW;
  x.th0 = (int)(ih + g.PH);
  x.tw0 = (int)(iw + g.PW);
  return x;
}
SK_HOST_DEVICE inline Col2imRow col2im_row(const ConvGeom& g, int64_t jp) {
  const int64_t co = jp % g.Co, rs = jp / g.Co, s = rs % g.KW, r = rs / g.KW;
  Col2imRow x;
  x.off = co * g.OH * g.OW;
  x.dh = (int)(r * g.DH);
  x.dw = (int)(s * g.DW);
  return x;
}
// Offset into dy, or -1 when no output position reads this input position through (r, s).
SK_HOST_DEVICE inline int64_t col2im_offset(const ConvGeom& g, const Col2imCol& c, const Col2imRow& r) {
  const int th = c.th0 - r.dh, tw = c.tw0 - r.dw;
  if (th < 0 || tw < 0) return -1;
  const int sh = (int)g.SH, sw = (int)g.SW;
  const int oh = th / sh, ow = tw / sw;
  if (oh * sh != th || ow * sw != tw || oh >= g.OH || ow >= g.OW) return -1;
  return c.base + r.off + (int64_t)oh * g.OW + ow;
}

// ---- top-k output plan -------------------------------------------------------------------------
// The selection is every candidate with key > T plus the first kk (in index order) with key == T.
// A tile with gt_before / eq_before such keys before it and eq_here equal keys in it writes from
// out_off on and takes eq_take of its equal keys.
SK_HOST_DEVICE inline void topk_tile_plan(uint64_t kk, uint64_t gt_before, uint64_t eq_before, uint64_t eq_here,
                                          uint64_t* out_off, uint64_t* eq_take) {
  const uint64_t eq_used = eq_before < kk ? eq_before : kk;
  *out_off = gt_before + eq_used;
  const uint64_t left = kk - eq_used;
  *eq_take = left < eq_here ? left : eq_here;
}

}  // namespace cuda
}  // namespace sparsekern
