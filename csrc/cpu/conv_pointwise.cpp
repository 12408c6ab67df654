// Pointwise sparse_conv2d on the CPU: a 1x1 conv without padding is, per image, the CSR GEMM
// Y (Cout, P) = W X (Cin, P) over its P = OH*OW output pixels, so a tile can run along the whole plane,
// flat, instead of along one output row as the direct kernel's do (a 14x14 row fills 14 of 16 lanes, a
// 4x4 one 4 of 8), with its vectors at compile-time offsets. A tile is up to NMAX vectors of consecutive
// pixels; for every nonzero of a weight row, broadcast its value and FMA the tile's vectors of its source
// plane into accumulators that stay in registers for the whole row; tiles outside, rows inside, so the
// tile's window of every source plane is reused by all rows while it is in cache. (Measured on Zen 4:
// ~2x the direct kernel's rate on ResNet-50's 1x1 layers.)
//
// How a batch is read and written:
//  flat    P >= one vector and one image at a time: the tiles cover the plane, and a plane whose size is not
//          a whole number of vectors ends in a vector that overlaps the one before it (it computes the same
//          sums in the same order, so its stores rewrite equal values; the weight gradient masks the
//          overlapped lanes of dY). float32/64 planes that are contiguous are read (and outputs written)
//          in place; anything else (a stride, bfloat16, other layouts) goes through a packed copy.
//  grouped small planes (P < NMAX vectors, e.g. 7x7, 4x4, 2x2): G images' planes are copied side by side
//          into a (C, L) buffer, L a whole number of vectors with zero pad lanes, so that the tiles stay
//          full; the result goes to a buffer of the same layout and is copied out.
#pragma GCC optimize("fp-contract=fast")  // a*b+c -> FMA in the clones (ISO C++ mode defaults to off)

#include "cpu/conv_pointwise.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/bf16.h"
#include "cpu/common.h"
#include "cpu/simd.h"

namespace sparsekern {
namespace pointwise {
namespace {

constexpr int NMAX = 8;  // vectors per tile: 8 accumulators of the 16 ymm registers
constexpr int64_t kAhead = 4;  // rows of dY the weight gradient prefetches ahead

template <class T>
using Vt = typename simd::Vec<T>::v;
template <class T>
using Vi = typename simd::Vec<T>::vi;
template <class T>
constexpr int64_t vwidth() {
  return 32 / sizeof(T);
}

// A tile: vectors at base + k*VW (k < nv - 1) and its last at base + last; lanes below `skip` of the last
// repeat columns of the vector before it (a plane's overlapped end).
struct Tile {
  int64_t base, last;
  int32_t nv, skip;
};

// Tiles over `cols` columns, at most NMAX vectors each, balanced; when cols is not a whole number of
// vectors (cols >= VW then) the last vector ends at cols.
template <class T>
std::vector<Tile> make_tiles(int64_t cols) {
  constexpr int64_t vw = vwidth<T>();
  const int64_t nvec = (cols + vw - 1) / vw;
  const int64_t ntiles = (nvec + NMAX - 1) / NMAX;
  std::vector<Tile> tiles;
  int64_t v = 0;
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t nv = (nvec - v + (ntiles - t) - 1) / (ntiles - t);
    Tile tl;
    tl.base = v * vw;
    tl.nv = static_cast<int32_t>(nv);
    int64_t last = (v + nv - 1) * vw;
    tl.skip = 0;
    if (last + vw > cols) {
      tl.skip = static_cast<int32_t>(last - (cols - vw));
      last = cols - vw;
    }
    tl.last = last - tl.base;
    tiles.push_back(tl);
    v += nv;
  }
  return tiles;
}

// ---------------------------------------------------------------------------
// Hot loops.

// out[r*ostride + c] = init_r + sum over row r of ws[j] * src[offs[j] + c], for the columns c of one tile
// and rows [r0, r1).
template <class T, int NV>
SK_INLINE void gather_tile(const T* __restrict src, const int32_t* __restrict offs, const T* __restrict ws,
                           const int64_t* __restrict rp, int64_t r0, int64_t r1, const Tile& tl, const T* bias,
                           T* __restrict out, int64_t ostride) {
  typedef Vt<T> V;
  constexpr int64_t vw = vwidth<T>();
  const T* s = src + tl.base;
  T* o = out + tl.base;
  const int64_t last = tl.last;
  for (int64_t r = r0; r < r1; ++r) {
    const T init = bias ? bias[r] : T(0);
    V acc[NV];
#pragma GCC unroll 8
    for (int k = 0; k < NV; ++k) acc[k] = V{} + init;
    const int64_t e = rp[r + 1];
    for (int64_t j = rp[r]; j < e; ++j) {
      const T* p = s + offs[j];
      const T w = ws[j];
#pragma GCC unroll 8
      for (int k = 0; k < NV - 1; ++k) acc[k] += w * simd::vload(p + k * vw);
      acc[NV - 1] += w * simd::vload(p + last);
    }
    T* q = o + r * ostride;
#pragma GCC unroll 8
    for (int k = 0; k < NV - 1; ++k) simd::vstore(q + k * vw, acc[k]);
    simd::vstore(q + last, acc[NV - 1]);
  }
}

// g[j] += sum over the tile's columns c of dy[r*dstride + c] * src[offs[j] + c], rows [r0, r1). The dY
// tile stays in registers; per nonzero, two FMA chains and one horizontal sum.
template <class T, int NV>
SK_INLINE void wgrad_tile(const T* __restrict src, const int32_t* __restrict offs, const int64_t* __restrict rp,
                          int64_t r0, int64_t r1, const Tile& tl, const T* __restrict dy, int64_t dstride,
                          T* __restrict g) {
  typedef Vt<T> V;
  typedef Vi<T> VI;
  constexpr int64_t vw = vwidth<T>();
  const T* s = src + tl.base;
  const T* d = dy + tl.base;
  const int64_t last = tl.last;
  VI keep;  // all-ones in the lanes the last vector owns
  for (int l = 0; l < vw; ++l) keep[l] = l >= tl.skip ? -1 : 0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = rp[r], e = rp[r + 1];
    if (b == e) continue;
    const T* dr = d + r * dstride;
    // dY is read once, row by row down the tile, a plane apart: without a prefetch every row waits on its
    // first touch (measured 2-4x slower when dY is not in cache).
    const T* ahead = dr + kAhead * dstride;
#pragma GCC unroll 8
    for (int k = 0; k < NV; k += 2) __builtin_prefetch(ahead + k * vw);
    V dv[NV];
#pragma GCC unroll 8
    for (int k = 0; k < NV - 1; ++k) dv[k] = simd::vload(dr + k * vw);
    dv[NV - 1] = (V)((VI)simd::vload(dr + last) & keep);
    for (int64_t j = b; j < e; ++j) {
      const T* p = s + offs[j];
      V c0 = dv[NV - 1] * simd::vload(p + last), c1 = V{};
#pragma GCC unroll 8
      for (int k = 0; k < NV - 1; ++k) {
        if (k & 1) c1 += dv[k] * simd::vload(p + k * vw);
        else c0 += dv[k] * simd::vload(p + k * vw);
      }
      g[j] += simd::tree_sum(c0 + c1);
    }
  }
}

#define SK_NV_CASES(CALL)    \
  switch (tl.nv) {           \
    case 1: CALL(1); break;  \
    case 2: CALL(2); break;  \
    case 3: CALL(3); break;  \
    case 4: CALL(4); break;  \
    case 5: CALL(5); break;  \
    case 6: CALL(6); break;  \
    case 7: CALL(7); break;  \
    default: CALL(8); break; \
  }

template <class T>
SK_INLINE void gather(const T* src, const int32_t* offs, const T* ws, const int64_t* rp, int64_t r0, int64_t r1,
                      const Tile* tiles, int64_t ntiles, const T* bias, T* out, int64_t ostride) {
  for (int64_t t = 0; t < ntiles; ++t) {
    const Tile& tl = tiles[t];
#define SK_GATHER(n) gather_tile<T, n>(src, offs, ws, rp, r0, r1, tl, bias, out, ostride)
    SK_NV_CASES(SK_GATHER)
#undef SK_GATHER
  }
}

template <class T>
SK_INLINE void wgrad(const T* src, const int32_t* offs, const int64_t* rp, int64_t r0, int64_t r1, const Tile* tiles,
                     int64_t ntiles, const T* dy, int64_t dstride, T* g) {
  for (int64_t t = 0; t < ntiles; ++t) {
    const Tile& tl = tiles[t];
#define SK_WGRAD(n) wgrad_tile<T, n>(src, offs, rp, r0, r1, tl, dy, dstride, g)
    SK_NV_CASES(SK_WGRAD)
#undef SK_WGRAD
  }
}
#undef SK_NV_CASES

SK_CLONES void gather_f32(const float* src, const int32_t* offs, const float* ws, const int64_t* rp, int64_t r0,
                          int64_t r1, const Tile* tiles, int64_t ntiles, const float* bias, float* out,
                          int64_t ostride) {
  gather<float>(src, offs, ws, rp, r0, r1, tiles, ntiles, bias, out, ostride);
}
SK_CLONES void gather_f64(const double* src, const int32_t* offs, const double* ws, const int64_t* rp, int64_t r0,
                          int64_t r1, const Tile* tiles, int64_t ntiles, const double* bias, double* out,
                          int64_t ostride) {
  gather<double>(src, offs, ws, rp, r0, r1, tiles, ntiles, bias, out, ostride);
}
SK_CLONES void wgrad_f32(const float* src, const int32_t* offs, const int64_t* rp, int64_t r0, int64_t r1,
                         const Tile* tiles, int64_t ntiles, const float* dy, int64_t dstride, float* g) {
  wgrad<float>(src, offs, rp, r0, r1, tiles, ntiles, dy, dstride, g);
}
SK_CLONES void wgrad_f64(const double* src, const int32_t* offs, const int64_t* rp, int64_t r0, int64_t r1,
                         const Tile* tiles, int64_t ntiles, const double* dy, int64_t dstride, double* g) {
  wgrad<double>(src, offs, rp, r0, r1, tiles, ntiles, dy, dstride, g);
}
inline void gather_any(const float* src, const int32_t* offs, const float* ws, const int64_t* rp, int64_t r0,
                       int64_t r1, const std::vector<Tile>& tiles, const float* bias, float* out, int64_t ostride) {
  gather_f32(src, offs, ws, rp, r0, r1, tiles.data(), tiles.size(), bias, out, ostride);
}
inline void gather_any(const double* src, const int32_t* offs, const double* ws, const int64_t* rp, int64_t r0,
                       int64_t r1, const std::vector<Tile>& tiles, const double* bias, double* out, int64_t ostride) {
  gather_f64(src, offs, ws, rp, r0, r1, tiles.data(), tiles.size(), bias, out, ostride);
}
inline void wgrad_any(const float* src, const int32_t* offs, const int64_t* rp, int64_t r0, int64_t r1,
                      const std::vector<Tile>& tiles, const float* dy, int64_t dstride, float* g) {
  wgrad_f32(src, offs, rp, r0, r1, tiles.data(), tiles.size(), dy, dstride, g);
}
inline void wgrad_any(const double* src, const int32_t* offs, const int64_t* rp, int64_t r0, int64_t r1,
                      const std::vector<Tile>& tiles, const double* dy, int64_t dstride, double* g) {
  wgrad_f64(src, offs, rp, r0, r1, tiles.data(), tiles.size(), dy, dstride, g);
}

// ---------------------------------------------------------------------------
// Batch layout.

int64_t num_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// How the images of one call are read: one at a time (flat tiles over the P pixels) or G at a time,
// side by side in a packed row of L columns.
template <class T>
struct Layout {
  int64_t N, P, G, L, groups;
  bool flat;
  std::vector<Tile> tiles;
  Layout(int64_t N_, int64_t P_) : N(N_), P(P_) {
    constexpr int64_t vw = vwidth<T>();
    const int64_t full = NMAX * vw;
    G = P >= full ? 1 : std::max<int64_t>(1, std::min<int64_t>(N, (full + P - 1) / P));
    flat = G == 1 && P >= vw;
    L = (G * P + vw - 1) / vw * vw;
    if ((L * int64_t(sizeof(T))) % 4096 == 0) L += vw;  // rows 4 KB apart would share L1 sets
    groups = (N + G - 1) / G;
    tiles = make_tiles<T>(flat ? P : L);
  }
  int64_t images(int64_t grp) const { return std::min(G, N - grp * G); }
};

// The packed (C, L) buffers are addressed with int32 offsets.
void check_extent(const char* op, int64_t C, int64_t L) {
  TORCH_CHECK(static_cast<__int128>(C) * L < INT32_MAX, op, ": one image is too large for this kernel (", C,
              " channels of ", L, " pixels)");
}

// A (C, OH, OW) grid of 4-D tensor t (element type I) at stride (sh, sw) as a plane of P contiguous
// elements, read in place: contiguous planes of the compute type, stride 1.
template <class I, class T>
bool in_place(const at::Tensor& t, int64_t sh, int64_t sw) {
  return std::is_same<I, T>::value && sh == 1 && sw == 1 && t.stride(3) == 1 && t.stride(2) == t.size(3) &&
         static_cast<__int128>(t.size(1)) * t.stride(1) < INT32_MAX;
}

// buf[c*L + g*P + p] = t[b0 + g, c, oh*sh, ow*sw] (p = oh*OW + ow) for the group's images; zero pad lanes.
template <class I, class T>
void pack(const at::Tensor& t, int64_t b0, int64_t nimg, int64_t OH, int64_t OW, int64_t sh, int64_t sw, int64_t L,
          T* buf) {
  const I* tp = t.data_ptr<I>();
  const int64_t C = t.size(1), sN = t.stride(0), sC = t.stride(1), sH = t.stride(2), sW = t.stride(3);
  const int64_t P = OH * OW;
  for (int64_t c = 0; c < C; ++c) {
    T* row = buf + c * L;
    for (int64_t g = 0; g < nimg; ++g) {
      const I* s = tp + (b0 + g) * sN + c * sC;
      T* d = row + g * P;
      for (int64_t oh = 0; oh < OH; ++oh) {
        const I* sr = s + oh * sh * sH;
        T* dr = d + oh * OW;
        if (sw * sW == 1 && std::is_same<I, T>::value) std::memcpy(dr, sr, sizeof(T) * OW);
        else
          for (int64_t ow = 0; ow < OW; ++ow) dr[ow] = bf16::widen(sr[ow * sw * sW]);
      }
    }
    std::memset(row + nimg * P, 0, sizeof(T) * (L - nimg * P));
  }
}

// out[b0 + g, r, oh*sh, ow*sw] = buf[r*L + g*P + p] for the group's images (out contiguous, planes H x W).
template <class I, class T>
void unpack(const T* buf, int64_t b0, int64_t nimg, int64_t R, int64_t OH, int64_t OW, int64_t sh, int64_t sw,
            int64_t L, at::Tensor& out) {
  I* op = out.data_ptr<I>();
  const int64_t H = out.size(2), W = out.size(3), P = OH * OW;
  for (int64_t g = 0; g < nimg; ++g) {
    for (int64_t r = 0; r < R; ++r) {
      const T* s = buf + r * L + g * P;
      I* d = op + ((b0 + g) * R + r) * H * W;
      if (sh == 1 && sw == 1 && std::is_same<I, T>::value) {
        std::memcpy(d, s, sizeof(T) * P);
        continue;
      }
      for (int64_t oh = 0; oh < OH; ++oh)
        for (int64_t ow = 0; ow < OW; ++ow) d[oh * sh * W + ow * sw] = static_cast<I>(s[oh * OW + ow]);
    }
  }
}

// Offsets of the nonzeros' source rows; checks col_idx against the source's row count.
std::vector<int32_t> row_offsets(const char* op, const at::Tensor& col_idx, int64_t rows, int64_t stride) {
  const int64_t nnz = col_idx.numel();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  std::vector<int32_t> offs(nnz);
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t c = ci[j];
    TORCH_CHECK(c >= 0 && c < rows, op, ": col_idx[", j, "] = ", c, " is out of range: the input has ", rows,
                " channels, so W must have Cin*kh*kw = ", rows, "*1*1 = ", rows, " columns");
    offs[j] = static_cast<int32_t>(c * stride);
  }
  return offs;
}

// Rows of one thread's share when the batch has fewer groups than threads: about 16K multiply-adds each.
int64_t row_grain(int64_t R, int64_t nnz, int64_t cols) {
  return std::max<int64_t>(1, R * 16384 / std::max<int64_t>(1, nnz * cols));
}

// out (R rows of planes) = CSR (R rows, entries offs/ws over the source's rows) x src, for every image:
// src is `in` read at stride (sh, sw) (Cs rows), out is written at stride (osh, osw) of its planes.
template <class I, class T>
void gather_batch(const at::Tensor& in, int64_t sh, int64_t sw, const int64_t* rp, const std::vector<int32_t>& src_rows,
                  const T* ws, const T* bias, int64_t OH, int64_t OW, int64_t osh, int64_t osw, at::Tensor& out) {
  const int64_t N = in.size(0), Cs = in.size(1), R = out.size(1), P = OH * OW;
  const Layout<T> lay(N, P);
  const int64_t nnz = static_cast<int64_t>(src_rows.size());
  const bool src_direct = lay.flat && in_place<I, T>(in, sh, sw);
  const bool dst_direct = lay.flat && std::is_same<I, T>::value && osh == 1 && osw == 1;
  check_extent("sparse_conv2d", Cs, lay.L);
  const int64_t s_stride = src_direct ? in.stride(1) : lay.L;
  std::vector<int32_t> offs(nnz);
  for (int64_t j = 0; j < nnz; ++j) offs[j] = static_cast<int32_t>(src_rows[j] * s_stride);
  const int64_t o_stride = dst_direct ? P : lay.L;
  const I* ip = in.data_ptr<I>();
  I* op = out.data_ptr<I>();
  const int64_t out_img = R * out.size(2) * out.size(3);
  auto source = [&](int64_t grp, std::vector<T>& buf) -> const T* {
    if (src_direct) return reinterpret_cast<const T*>(ip + grp * in.stride(0));
    buf.resize(Cs * lay.L);
    pack<I, T>(in, grp * lay.G, lay.images(grp), OH, OW, sh, sw, lay.L, buf.data());
    return buf.data();
  };
  auto dest = [&](int64_t grp, std::vector<T>& buf) -> T* {
    if (dst_direct) return reinterpret_cast<T*>(op + grp * out_img);
    buf.resize(R * lay.L);
    return buf.data();
  };
  auto finish = [&](int64_t grp, const std::vector<T>& buf) {
    if (!dst_direct) unpack<I, T>(buf.data(), grp * lay.G, lay.images(grp), R, OH, OW, osh, osw, lay.L, out);
  };
  const int64_t nth = num_threads();
  if (lay.groups >= nth) {
    at::parallel_for(0, lay.groups, 1, [&](int64_t g0, int64_t g1) {
      std::vector<T> sbuf, obuf;
      for (int64_t grp = g0; grp < g1; ++grp) {
        const T* s = source(grp, sbuf);
        gather_any(s, offs.data(), ws, rp, 0, R, lay.tiles, bias, dest(grp, obuf), o_stride);
        finish(grp, obuf);
      }
    });
    return;
  }
  std::vector<T> sbuf, obuf;
  const int64_t grain = row_grain(R, nnz, lay.flat ? P : lay.L);
  for (int64_t grp = 0; grp < lay.groups; ++grp) {
    const T* s = source(grp, sbuf);
    T* d = dest(grp, obuf);
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      gather_any(s, offs.data(), ws, rp, r0, r1, lay.tiles, bias, d, o_stride);
    });
    finish(grp, obuf);
  }
}

template <class I, class T = typename bf16::Acc<I>::type>
void forward_impl(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                  const T* bias, int64_t sh, int64_t sw, at::Tensor& y) {
  const std::vector<int32_t> rows = row_offsets("sparse_conv2d", col_idx, x.size(1), 1);
  gather_batch<I, T>(x, sh, sw, row_ptr.data_ptr<int64_t>(), rows, values.data_ptr<T>(), bias, y.size(2), y.size(3), 1,
                     1, y);
}

template <class I, class T = typename bf16::Acc<I>::type>
void backward_input_impl(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& row_ptr,
                         const at::Tensor& col_idx, int64_t sh, int64_t sw, at::Tensor& dx) {
  // W^T as CSR: rows Cin, entries (co, value), co ascending.
  const int64_t Cin = dx.size(1), Cout = dy.size(1), nnz = col_idx.numel();
  const std::vector<int32_t> cols = row_offsets("sparse_conv2d_backward_input", col_idx, Cin, 1);
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const I* vals = values.data_ptr<I>();
  std::vector<int64_t> trp(Cin + 1, 0);
  for (int64_t j = 0; j < nnz; ++j) ++trp[cols[j] + 1];
  for (int64_t c = 0; c < Cin; ++c) trp[c + 1] += trp[c];
  std::vector<int32_t> trows(nnz);
  std::vector<T> tws(nnz);
  {
    std::vector<int64_t> fill(trp.begin(), trp.end() - 1);
    for (int64_t co = 0; co < Cout; ++co) {
      for (int64_t j = rp[co]; j < rp[co + 1]; ++j) {
        const int64_t p = fill[cols[j]]++;
        trows[p] = static_cast<int32_t>(co);
        tws[p] = bf16::widen(vals[j]);
      }
    }
  }
  if (sh != 1 || sw != 1) dx.zero_();  // pixels no output reads get zero
  gather_batch<I, T>(dy, 1, 1, trp.data(), trows, tws.data(), nullptr, dy.size(2), dy.size(3), sh, sw, dx);
}

template <class I, class T = typename bf16::Acc<I>::type>
void backward_weight_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, int64_t sh, int64_t sw, at::Tensor& gv) {
  const int64_t N = x.size(0), Cin = x.size(1), Cout = dy.size(1), OH = dy.size(2), OW = dy.size(3);
  const int64_t P = OH * OW, nnz = col_idx.numel();
  const std::vector<int32_t> rows = row_offsets("sparse_conv2d_backward_weight", col_idx, Cin, 1);
  const Layout<T> lay(N, P);
  const bool x_direct = lay.flat && in_place<I, T>(x, sh, sw);
  const bool dy_direct = lay.flat && in_place<I, T>(dy, 1, 1);
  check_extent("sparse_conv2d_backward_weight", Cin, lay.L);
  const int64_t x_stride = x_direct ? x.stride(1) : lay.L;
  std::vector<int32_t> offs(nnz);
  for (int64_t j = 0; j < nnz; ++j) offs[j] = static_cast<int32_t>(rows[j] * x_stride);
  const int64_t d_stride = dy_direct ? dy.stride(1) : lay.L;
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const I* xp = x.data_ptr<I>();
  const I* dp = dy.data_ptr<I>();
  auto sources = [&](int64_t grp, std::vector<T>& xb, std::vector<T>& db, const T*& xs, const T*& ds) {
    if (x_direct) {
      xs = reinterpret_cast<const T*>(xp + grp * x.stride(0));
    } else {
      xb.resize(Cin * lay.L);
      pack<I, T>(x, grp * lay.G, lay.images(grp), OH, OW, sh, sw, lay.L, xb.data());
      xs = xb.data();
    }
    if (dy_direct) {
      ds = reinterpret_cast<const T*>(dp + grp * dy.stride(0));
    } else {
      db.resize(Cout * lay.L);
      pack<I, T>(dy, grp * lay.G, lay.images(grp), OH, OW, 1, 1, lay.L, db.data());
      ds = db.data();
    }
  };
  T* gp = gv.data_ptr<T>();
  const int64_t nth = num_threads();
  if (lay.groups >= nth && nth > 1) {
    std::vector<T> parts(nth * nnz, T(0));
    at::parallel_for(0, lay.groups, 1, [&](int64_t g0, int64_t g1) {
      T* acc = parts.data() + at::get_thread_num() * nnz;
      std::vector<T> xb, db;
      for (int64_t grp = g0; grp < g1; ++grp) {
        const T *xs, *ds;
        sources(grp, xb, db, xs, ds);
        wgrad_any(xs, offs.data(), rp, 0, Cout, lay.tiles, ds, d_stride, acc);
      }
    });
    at::parallel_for(0, nnz, 4096, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        T s = 0;
        for (int64_t t = 0; t < nth; ++t) s += parts[t * nnz + j];
        gp[j] = s;
      }
    });
    return;
  }
  std::vector<T> xb, db;
  const int64_t grain = row_grain(Cout, nnz, lay.flat ? P : lay.L);
  for (int64_t grp = 0; grp < lay.groups; ++grp) {
    const T *xs, *ds;
    sources(grp, xb, db, xs, ds);
    at::parallel_for(0, Cout, grain, [&](int64_t r0, int64_t r1) {
      wgrad_any(xs, offs.data(), rp, r0, r1, lay.tiles, ds, d_stride, gp);
    });
  }
}

}  // namespace

void forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
             const at::Tensor& bias, int64_t sh, int64_t sw, at::Tensor& y) {
  if (x.scalar_type() == at::kBFloat16) {  // values and bias once in float32
    const at::Tensor v32 = values.to(at::kFloat).contiguous();
    const at::Tensor b32 = bias.defined() ? bias.to(at::kFloat).contiguous() : bias;
    forward_impl<c10::BFloat16>(x, v32, row_ptr, col_idx, b32.defined() ? b32.data_ptr<float>() : nullptr, sh, sw, y);
  } else if (x.scalar_type() == at::kFloat) {
    forward_impl<float>(x, values.contiguous(), row_ptr, col_idx, bias.defined() ? bias.data_ptr<float>() : nullptr, sh,
                        sw, y);
  } else {
    forward_impl<double>(x, values.contiguous(), row_ptr, col_idx, bias.defined() ? bias.data_ptr<double>() : nullptr,
                         sh, sw, y);
  }
}

void backward_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, int64_t sh, int64_t sw, at::Tensor& dx) {
  const at::Tensor vc = values.contiguous();
  if (dy.scalar_type() == at::kFloat) backward_input_impl<float>(dy, vc, row_ptr, col_idx, sh, sw, dx);
  else if (dy.scalar_type() == at::kBFloat16) backward_input_impl<c10::BFloat16>(dy, vc, row_ptr, col_idx, sh, sw, dx);
  else backward_input_impl<double>(dy, vc, row_ptr, col_idx, sh, sw, dx);
}

void backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     int64_t sh, int64_t sw, at::Tensor& gv) {
  if (x.scalar_type() == at::kFloat) backward_weight_impl<float>(dy, x, row_ptr, col_idx, sh, sw, gv);
  else if (x.scalar_type() == at::kBFloat16) backward_weight_impl<c10::BFloat16>(dy, x, row_ptr, col_idx, sh, sw, gv);
  else backward_weight_impl<double>(dy, x, row_ptr, col_idx, sh, sw, gv);
}

}  // namespace pointwise
}  // namespace sparsekern
