// The tiled gather kernels of conv_tiles.h.
#pragma GCC optimize("fp-contract=fast")  // a*b+c -> FMA in the clones (ISO C++ mode defaults to off)

#include "cpu/conv_tiles.h"

#include <algorithm>
#include <vector>

#include "cpu/common.h"
#include "cpu/simd.h"

namespace sparsekern {
namespace conv_tiles {
namespace {

constexpr int64_t kAhead = 4;  // rows of dY the weight gradient prefetches ahead

template <class T>
using Vt = typename simd::Vec<T>::v;
template <class T>
using Vi = typename simd::Vec<T>::vi;
template <class T>
constexpr int64_t vwidth() {
  return 32 / sizeof(T);
}

// ---------------------------------------------------------------------------
// Hot loops.

// out[r*ostride + c] = init_r + sum over row r of ws[j] * src[offs[j] + c], for the columns c of one tile
// and rows [r0, r1), block by block of source planes (bp, nb: see Blocks); between blocks a row's partial
// sums wait in `scratch` (NV vectors per row).
template <class T, int NV>
SK_INLINE void gather_tile(const T* __restrict src, const int32_t* __restrict offs, const T* __restrict ws,
                           const int64_t* __restrict bp, int64_t nb, int64_t r0, int64_t r1, const Tile& tl,
                           const T* bias, T* __restrict out, int64_t ostride, T* __restrict scratch) {
  typedef Vt<T> V;
  constexpr int64_t vw = vwidth<T>();
  const T* s = src + tl.sbase;
  T* o = out + tl.obase;
  const int64_t last = tl.last;
  for (int64_t b = 0; b < nb; ++b) {
    const bool final = b == nb - 1;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t* rb = bp + r * (nb + 1) + b;
      const int64_t jb = rb[0], je = rb[1];
      T* sc = scratch + (r - r0) * (NV * vw);
      V acc[NV];
      if (b == 0) {
        const T init = bias ? bias[r] : T(0);
#pragma GCC unroll 8
        for (int k = 0; k < NV; ++k) acc[k] = V{} + init;
      } else if (jb == je && !final) {
        continue;
      } else {
#pragma GCC unroll 8
        for (int k = 0; k < NV; ++k) acc[k] = simd::vload(sc + k * vw);
      }
      for (int64_t j = jb; j < je; ++j) {
        const T* p = s + offs[j];
        const T w = ws[j];
#pragma GCC unroll 8
        for (int k = 0; k < NV - 1; ++k) acc[k] += w * simd::vload(p + k * vw);
        acc[NV - 1] += w * simd::vload(p + last);
      }
      if (final) {
        T* q = o + r * ostride;
#pragma GCC unroll 8
        for (int k = 0; k < NV - 1; ++k) simd::vstore(q + k * vw, acc[k]);
        simd::vstore(q + last, acc[NV - 1]);
      } else {
#pragma GCC unroll 8
        for (int k = 0; k < NV; ++k) simd::vstore(sc + k * vw, acc[k]);
      }
    }
  }
}

// g[j] += sum over the tile's columns c of dy[r*dstride + c] * src[offs[j] + c], rows [r0, r1), block by block
// of source planes. The dY tile stays in registers; each nonzero is one dot product with it.
template <class T, int NV>
SK_INLINE void wgrad_tile(const T* __restrict src, const int32_t* __restrict offs, const int64_t* __restrict bp,
                          int64_t nb, int64_t r0, int64_t r1, const Tile& tl, const T* __restrict dy, int64_t dstride,
                          T* __restrict g) {
  typedef Vt<T> V;
  typedef Vi<T> VI;
  constexpr int64_t vw = vwidth<T>();
  const T* s = src + tl.sbase;
  const T* d = dy + tl.obase;
  const int64_t last = tl.last;
  VI keep;  // all-ones in the lanes the last vector owns
  for (int l = 0; l < vw; ++l) keep[l] = l >= tl.skip ? -1 : 0;
  for (int64_t blk = 0; blk < nb; ++blk) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t* rb = bp + r * (nb + 1) + blk;
      const int64_t b = rb[0], e = rb[1];
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
      // Four nonzeros at a time: their dot products reduced together by one 4-way transpose-add, not a
      // horizontal sum each (the batch-innermost and pointwise weight gradients 1.03-1.09x faster at ResNet-50's
      // 7x7 and 4x4 layers, interleaved A/B, 2 threads, Zen 4); the rest one by one.
      int64_t j = b;
      for (; j + 4 <= e; j += 4) {
        V acc[4];
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) {
          const T* p = s + offs[j + q];
          V c = dv[NV - 1] * simd::vload(p + last);
#pragma GCC unroll 8
          for (int k = 0; k < NV - 1; ++k) c += dv[k] * simd::vload(p + k * vw);
          acc[q] = c;
        }
        const V r = simd::reduce_lanes4(acc);
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) g[j + q] += r[q];
      }
      for (; j < e; ++j) {
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
SK_INLINE void gather_all(const T* src, const int32_t* offs, const T* ws, const int64_t* bp, int64_t nb, int64_t r0,
                          int64_t r1, const Tile* tiles, int64_t ntiles, const T* bias, T* out, int64_t ostride) {
  std::vector<T> scratch(nb > 1 ? (r1 - r0) * NMAX * vwidth<T>() : 0);
  for (int64_t t = 0; t < ntiles; ++t) {
    const Tile& tl = tiles[t];
#define SK_GATHER(n) gather_tile<T, n>(src, offs, ws, bp, nb, r0, r1, tl, bias, out, ostride, scratch.data())
    SK_NV_CASES(SK_GATHER)
#undef SK_GATHER
  }
}

template <class T>
SK_INLINE void wgrad_all(const T* src, const int32_t* offs, const int64_t* bp, int64_t nb, int64_t r0, int64_t r1,
                         const Tile* tiles, int64_t ntiles, const T* dy, int64_t dstride, T* g) {
  for (int64_t t = 0; t < ntiles; ++t) {
    const Tile& tl = tiles[t];
#define SK_WGRAD(n) wgrad_tile<T, n>(src, offs, bp, nb, r0, r1, tl, dy, dstride, g)
    SK_NV_CASES(SK_WGRAD)
#undef SK_WGRAD
  }
}
#undef SK_NV_CASES

SK_CLONES void gather_f32(const float* src, const int32_t* offs, const float* ws, const int64_t* bp, int64_t nb,
                          int64_t r0, int64_t r1, const Tile* tiles, int64_t ntiles, const float* bias, float* out,
                          int64_t ostride) {
  gather_all<float>(src, offs, ws, bp, nb, r0, r1, tiles, ntiles, bias, out, ostride);
}
SK_CLONES void gather_f64(const double* src, const int32_t* offs, const double* ws, const int64_t* bp, int64_t nb,
                          int64_t r0, int64_t r1, const Tile* tiles, int64_t ntiles, const double* bias, double* out,
                          int64_t ostride) {
  gather_all<double>(src, offs, ws, bp, nb, r0, r1, tiles, ntiles, bias, out, ostride);
}
SK_CLONES void wgrad_f32(const float* src, const int32_t* offs, const int64_t* bp, int64_t nb, int64_t r0, int64_t r1,
                         const Tile* tiles, int64_t ntiles, const float* dy, int64_t dstride, float* g) {
  wgrad_all<float>(src, offs, bp, nb, r0, r1, tiles, ntiles, dy, dstride, g);
}
SK_CLONES void wgrad_f64(const double* src, const int32_t* offs, const int64_t* bp, int64_t nb, int64_t r0, int64_t r1,
                         const Tile* tiles, int64_t ntiles, const double* dy, int64_t dstride, double* g) {
  wgrad_all<double>(src, offs, bp, nb, r0, r1, tiles, ntiles, dy, dstride, g);
}

// A block costs a reload and a store of the row's partial tile: the direct kernel measured best near 24
// entries of a row per block.
constexpr int64_t kMinPerBlock = 24;
constexpr int64_t kL1Budget = 16384;  // bytes of source window per block: half of a 32 KB L1d

}  // namespace

Blocks make_blocks(int64_t R, const int64_t* rp, const int32_t* plane_of, int64_t nplanes, int64_t window_bytes) {
  Blocks blk;
  const int64_t nnz = rp[R];
  int64_t bsize = std::max<int64_t>(1, kL1Budget / std::max<int64_t>(1, window_bytes));
  int64_t nb = std::max<int64_t>(1, (nplanes + bsize - 1) / bsize);
  const int64_t max_nb = std::max<int64_t>(1, nnz / std::max<int64_t>(1, R * kMinPerBlock));
  if (nb > max_nb) {
    nb = max_nb;
    bsize = (nplanes + nb - 1) / nb;
    nb = std::max<int64_t>(1, (nplanes + bsize - 1) / bsize);
  }
  blk.nb = nb;
  blk.bp.resize(R * (nb + 1));
  for (int64_t r = 0; r < R; ++r) {
    int64_t j = rp[r];
    const int64_t e = rp[r + 1];
    int64_t* row = blk.bp.data() + r * (nb + 1);
    for (int64_t k = 0; k < nb; ++k) {
      row[k] = j;
      while (j < e && plane_of[j] < (k + 1) * bsize) ++j;
    }
    row[nb] = e;
  }
  return blk;
}

std::vector<Tile> make_tiles(int64_t cols, int64_t elem_size) {
  const int64_t vw = 32 / elem_size;
  const int64_t nvec = (cols + vw - 1) / vw;
  const int64_t ntiles = (nvec + NMAX - 1) / NMAX;
  std::vector<Tile> tiles;
  int64_t v = 0;
  for (int64_t t = 0; t < ntiles; ++t) {
    const int64_t nv = (nvec - v + (ntiles - t) - 1) / (ntiles - t);
    Tile tl;
    tl.sbase = tl.obase = v * vw;
    tl.nv = static_cast<int32_t>(nv);
    int64_t last = (v + nv - 1) * vw;
    tl.skip = 0;
    if (last + vw > cols) {
      tl.skip = static_cast<int32_t>(last - (cols - vw));
      last = cols - vw;
    }
    tl.last = last - tl.sbase;
    tiles.push_back(tl);
    v += nv;
  }
  return tiles;
}

void gather(const float* src, const int32_t* offs, const float* ws, const Blocks& blk, int64_t r0, int64_t r1,
            const std::vector<Tile>& tiles, const float* bias, float* out, int64_t ostride) {
  gather_f32(src, offs, ws, blk.bp.data(), blk.nb, r0, r1, tiles.data(), tiles.size(), bias, out, ostride);
}
void gather(const double* src, const int32_t* offs, const double* ws, const Blocks& blk, int64_t r0, int64_t r1,
            const std::vector<Tile>& tiles, const double* bias, double* out, int64_t ostride) {
  gather_f64(src, offs, ws, blk.bp.data(), blk.nb, r0, r1, tiles.data(), tiles.size(), bias, out, ostride);
}
void wgrad(const float* src, const int32_t* offs, const Blocks& blk, int64_t r0, int64_t r1,
           const std::vector<Tile>& tiles, const float* dy, int64_t dstride, float* g) {
  wgrad_f32(src, offs, blk.bp.data(), blk.nb, r0, r1, tiles.data(), tiles.size(), dy, dstride, g);
}
void wgrad(const double* src, const int32_t* offs, const Blocks& blk, int64_t r0, int64_t r1,
           const std::vector<Tile>& tiles, const double* dy, int64_t dstride, double* g) {
  wgrad_f64(src, offs, blk.bp.data(), blk.nb, r0, r1, tiles.data(), tiles.size(), dy, dstride, g);
}

}  // namespace conv_tiles
}  // namespace sparsekern
