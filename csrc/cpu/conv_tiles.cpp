// The tiled gather kernels of conv_tiles.h.
#pragma GCC optimize("fp-contract=fast")  // a*b+c -> FMA in the clones (ISO C++ mode defaults to off)

#include "cpu/conv_tiles.h"

#include <algorithm>
#include <vector>

#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/simd.h"

namespace sparsekern {
namespace conv_tiles {
namespace {

constexpr int64_t kAhead = 4;  // rows of dY the weight gradient prefetches ahead
// Rows ahead whose output lines the gather prefetches into L2: a tile's rows store into as many planes (a line or
// a few each), more streams than the hardware prefetchers follow, and in a training step those lines come from
// memory. ResNet-50 112x112 batch 16 uniform step 1.01-1.03x (Intel SPR-class, 2 threads, interleaved A/B).
constexpr int64_t kOutAhead = 4;

template <class T, int W>
using Vt = typename simd::Vec<T, W>::v;
template <class T, int W>
using Vi = typename simd::Vec<T, W>::vi;
template <class T, int W>
constexpr int64_t vwidth() {
  return W / sizeof(T);
}

// ---------------------------------------------------------------------------
// Hot loops.

// How many sets of accumulators the gather spreads a row's nonzeros over (taking that many at a time), for tiles of NV
// vectors of W bytes: each accumulator's chain of FMAs (4 cycles apart) then waits that much less, and 8-16 chains in
// all keep both FMA pipes busy where a tile of 1-7 vectors alone leaves them idle (the CSR SpMM engine does the same).
// Two sets, fwd and input gradient, density 0.48-0.58 1x1 convs at 14x14 and 28x28, batch 16, both ways interleaved in
// one process: 1.02-1.04x; 3x3 and sparser 1x1 layers 0.98-1.03x. Four for tiles of 1-3 vectors (2x2 planes at batch
// 8): 512 -> 512 3x3 fwd 1.02-1.06x, input gradient 1.03x (AMD Zen 5, 2 threads). The 32-byte loops keep one set: 16
// ymm registers hold one tile's 8 accumulators. The weight gradient's dot products (four nonzeros in flight, one chain
// each) measured 0.96-0.98x with two chains each at 28x28 1x1 layers: that loop is bound by its loads.
template <int W, int NV>
constexpr int kSets = W != 64   ? 1
                      : NV >= 4 ? 2
                                : 4;

// out[r*ostride + c] = init_r + sum over row r of ws[j] * src[offs[j] + c], for the columns c of one tile (RR runs
// of NV vectors) and rows [r0, r1), block by block of source planes (bp, nb: see Blocks); between blocks a row's
// partial sums wait in `scratch` (RR * NV vectors per row).
template <class T, int NV, int RR, int W>
SK_INLINE void gather_tile(const T* __restrict src, const int32_t* __restrict offs, const T* __restrict ws,
                           const int64_t* __restrict bp, int64_t nb, int64_t r0, int64_t r1, const Tile& tl,
                           const T* bias, T* __restrict out, int64_t ostride, T* __restrict scratch) {
  typedef Vt<T, W> V;
  constexpr int64_t vw = vwidth<T, W>();
  const T* s = src + tl.sbase;
  T* o = out + tl.obase;
  const int64_t last = tl.last, srow = tl.srow, orow = tl.orow;
  for (int64_t b = 0; b < nb; ++b) {
    const bool final = b == nb - 1;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t* rb = bp + r * (nb + 1) + b;
      const int64_t jb = rb[0], je = rb[1];
      T* sc = scratch + (r - r0) * (RR * NV * vw);
      V acc[RR][NV];
      if (b == 0) {
        const T init = bias ? bias[r] : T(0);
#pragma GCC unroll 4
        for (int i = 0; i < RR; ++i)
#pragma GCC unroll 8
          for (int k = 0; k < NV; ++k) acc[i][k] = V{} + init;
      } else if (jb == je && !final) {
        continue;
      } else {
#pragma GCC unroll 4
        for (int i = 0; i < RR; ++i)
#pragma GCC unroll 8
          for (int k = 0; k < NV; ++k) acc[i][k] = simd::vload<W>(sc + (i * NV + k) * vw);
      }
      int64_t j = jb;
      constexpr int S = kSets<W, RR * NV>;
      if constexpr (S > 1) {
        V set[S][RR][NV];  // set 0 carries on acc; the sets are added up at the row's end
#pragma GCC unroll 4
        for (int i = 0; i < RR; ++i)
#pragma GCC unroll 8
          for (int k = 0; k < NV; ++k) {
            set[0][i][k] = acc[i][k];
#pragma GCC unroll 4
            for (int u = 1; u < S; ++u) set[u][i][k] = V{};
          }
        for (; j + S <= je; j += S) {
          const T* p[S];
          T w[S];
#pragma GCC unroll 4
          for (int u = 0; u < S; ++u) p[u] = s + offs[j + u], w[u] = ws[j + u];
#pragma GCC unroll 4
          for (int i = 0; i < RR; ++i) {
#pragma GCC unroll 8
            for (int k = 0; k < NV - 1; ++k)
#pragma GCC unroll 4
              for (int u = 0; u < S; ++u) set[u][i][k] += w[u] * simd::vload<W>(p[u] + i * srow + k * vw);
#pragma GCC unroll 4
            for (int u = 0; u < S; ++u) set[u][i][NV - 1] += w[u] * simd::vload<W>(p[u] + i * srow + last);
          }
        }
#pragma GCC unroll 4
        for (int i = 0; i < RR; ++i)
#pragma GCC unroll 8
          for (int k = 0; k < NV; ++k) {
            V t = set[0][i][k];
#pragma GCC unroll 4
            for (int u = 1; u < S; ++u) t += set[u][i][k];
            acc[i][k] = t;
          }
      }
      for (; j < je; ++j) {
        const T* p = s + offs[j];
        const T w = ws[j];
#pragma GCC unroll 4
        for (int i = 0; i < RR; ++i) {
          const T* q = p + i * srow;
#pragma GCC unroll 8
          for (int k = 0; k < NV - 1; ++k) acc[i][k] += w * simd::vload<W>(q + k * vw);
          acc[i][NV - 1] += w * simd::vload<W>(q + last);
        }
      }
      if (final) {
        T* q = o + r * ostride;
        if (r + kOutAhead < r1)
#pragma GCC unroll 4
          for (int i = 0; i < RR; ++i)
            prefetch_l2(q + kOutAhead * ostride + i * orow, (last + vw) * int64_t(sizeof(T)));
#pragma GCC unroll 4
        for (int i = 0; i < RR; ++i) {
#pragma GCC unroll 8
          for (int k = 0; k < NV - 1; ++k) simd::vstore<W>(q + i * orow + k * vw, acc[i][k]);
          simd::vstore<W>(q + i * orow + last, acc[i][NV - 1]);
        }
      } else {
#pragma GCC unroll 4
        for (int i = 0; i < RR; ++i)
#pragma GCC unroll 8
          for (int k = 0; k < NV; ++k) simd::vstore<W>(sc + (i * NV + k) * vw, acc[i][k]);
      }
    }
  }
}

// c, or c in the lanes `keep` sets and 0 elsewhere.
template <bool MASK, class V, class VI>
SK_INLINE V masked(const V& c, const VI& keep) {
  if constexpr (MASK) return (V)((VI)c & keep);
  else return c;
}

// The dot product of a dY tile (RR runs of NV vectors, in registers) with the source at p, in CHAINS independent
// sums: one where four products run side by side (the 4-way reduction below), two where one runs alone.
template <class T, int NV, int RR, int W, bool MASK, int CHAINS>
SK_INLINE Vt<T, W> tile_dot(const Vt<T, W> (&dv)[RR][NV], const T* p, int64_t srow, int64_t last,
                            const Vi<T, W>& keep) {
  typedef Vt<T, W> V;
  constexpr int64_t vw = vwidth<T, W>();
  V c[CHAINS] = {};
#pragma GCC unroll 4
  for (int i = 0; i < RR; ++i) {
    const T* q = p + i * srow;
    c[i % CHAINS] += masked<MASK>(dv[i][NV - 1] * simd::vload<W>(q + last), keep);
#pragma GCC unroll 8
    for (int k = 0; k < NV - 1; ++k) c[(i * NV + k) % CHAINS] += dv[i][k] * simd::vload<W>(q + k * vw);
  }
  if constexpr (CHAINS == 1) return c[0];
  else return c[0] + c[1];
}

// g[j] += sum over the tile's columns c of dy[r*dstride + c] * src[offs[j] + c], rows [r0, r1), block by block
// of source planes. The dY tile (RR runs of NV vectors) stays in registers; each nonzero is one dot product with
// it. MASK (runs whose last vector overlaps the one before it): that vector's products count only in the lanes it
// owns; the product is masked, not dY, since 0 * Inf would put a NaN where the true sum is infinite.
template <class T, int NV, int RR, int W, bool MASK>
SK_INLINE void wgrad_tile(const T* __restrict src, const int32_t* __restrict offs, const int64_t* __restrict bp,
                          int64_t nb, int64_t r0, int64_t r1, const Tile& tl, const T* __restrict dy, int64_t dstride,
                          T* __restrict g) {
  typedef Vt<T, W> V;
  typedef Vi<T, W> VI;
  constexpr int64_t vw = vwidth<T, W>();
  const T* s = src + tl.sbase;
  const T* d = dy + tl.obase;
  const int64_t last = tl.last, srow = tl.srow, orow = tl.orow;
  VI keep;  // all-ones in the lanes a run's last vector owns
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
      V dv[RR][NV];
#pragma GCC unroll 4
      for (int i = 0; i < RR; ++i) {
#pragma GCC unroll 8
        for (int k = 0; k < NV; k += 2) __builtin_prefetch(ahead + i * orow + k * vw);
#pragma GCC unroll 8
        for (int k = 0; k < NV - 1; ++k) dv[i][k] = simd::vload<W>(dr + i * orow + k * vw);
        dv[i][NV - 1] = simd::vload<W>(dr + i * orow + last);
      }
      // Four nonzeros at a time: their dot products reduced together by one 4-way transpose-add, not a
      // horizontal sum each (the batch-innermost and pointwise weight gradients 1.03-1.09x faster at ResNet-50's
      // 7x7 and 4x4 layers, interleaved A/B, 2 threads, Zen 4); the rest one by one.
      int64_t j = b;
      for (; j + 4 <= e; j += 4) {
        typename simd::Vec<T>::v half[4];  // 64-byte sums folded to 32 bytes for the transpose-add
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q)
          half[q] = simd::fold<W, T>(tile_dot<T, NV, RR, W, MASK, 1>(dv, s + offs[j + q], srow, last, keep));
        const auto red = simd::reduce_lanes4(half);
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) g[j + q] += red[q];
      }
      for (; j < e; ++j)
        g[j] += simd::tree_sum(simd::fold<W, T>(tile_dot<T, NV, RR, W, MASK, 2>(dv, s + offs[j], srow, last, keep)));
    }
  }
}

// The instance of a tile's shape: runs of 1-8 vectors alone, of 1-4 two to a tile, of 1-2 four to a tile.
#define SK_TILE_CASES(CALL)                                                                                            \
  switch (tl.rows * 16 + tl.nv) {                                                                                      \
    case 16 + 1: CALL(1, 1); break;                                                                                    \
    case 16 + 2: CALL(2, 1); break;                                                                                    \
    case 16 + 3: CALL(3, 1); break;                                                                                    \
    case 16 + 4: CALL(4, 1); break;                                                                                    \
    case 16 + 5: CALL(5, 1); break;                                                                                    \
    case 16 + 6: CALL(6, 1); break;                                                                                    \
    case 16 + 7: CALL(7, 1); break;                                                                                    \
    case 32 + 1: CALL(1, 2); break;                                                                                    \
    case 32 + 2: CALL(2, 2); break;                                                                                    \
    case 32 + 3: CALL(3, 2); break;                                                                                    \
    case 32 + 4: CALL(4, 2); break;                                                                                    \
    case 64 + 1: CALL(1, 4); break;                                                                                    \
    case 64 + 2: CALL(2, 4); break;                                                                                    \
    case 16 + 8: CALL(8, 1); break;                                                                                    \
    default:                                                                                                           \
      TORCH_INTERNAL_ASSERT(false, "conv_tiles: no instance for a tile of ", tl.rows, " runs of ", tl.nv, " vectors"); \
  }

template <class T, int W>
SK_INLINE void gather_all(const T* src, const int32_t* offs, const T* ws, const int64_t* bp, int64_t nb, int64_t r0,
                          int64_t r1, const Tile* tiles, int64_t ntiles, const T* bias, T* out, int64_t ostride) {
  ThreadScratch<T, kScratchTiles> scratch(nb > 1 ? (r1 - r0) * NMAX * vwidth<T, W>() : 0);
  for (int64_t t = 0; t < ntiles; ++t) {
    const Tile& tl = tiles[t];
#define SK_GATHER(n, rr) gather_tile<T, n, rr, W>(src, offs, ws, bp, nb, r0, r1, tl, bias, out, ostride, scratch.data())
    SK_TILE_CASES(SK_GATHER)
#undef SK_GATHER
  }
}

template <class T, int W>
SK_INLINE void wgrad_all(const T* src, const int32_t* offs, const int64_t* bp, int64_t nb, int64_t r0, int64_t r1,
                         const Tile* tiles, int64_t ntiles, const T* dy, int64_t dstride, T* g) {
  for (int64_t t = 0; t < ntiles; ++t) {
    const Tile& tl = tiles[t];
#define SK_WGRAD(n, rr)                                                                      \
  if (tl.skip) wgrad_tile<T, n, rr, W, true>(src, offs, bp, nb, r0, r1, tl, dy, dstride, g); \
  else wgrad_tile<T, n, rr, W, false>(src, offs, bp, nb, r0, r1, tl, dy, dstride, g)
    SK_TILE_CASES(SK_WGRAD)
#undef SK_WGRAD
  }
}
#undef SK_TILE_CASES

// The entry points of one vector width W, compiled with ATTR (the loops inline into them and take its target):
// gather_f32SUFFIX, gather_f64SUFFIX, wgrad_f32SUFFIX, wgrad_f64SUFFIX.
#define SK_TILE_ENTRIES(ATTR, SUFFIX, W)                                                                              \
  ATTR void gather_f32##SUFFIX(const float* src, const int32_t* offs, const float* ws, const int64_t* bp, int64_t nb, \
                               int64_t r0, int64_t r1, const Tile* tiles, int64_t ntiles, const float* bias,          \
                               float* out, int64_t ostride) {                                                         \
    gather_all<float, W>(src, offs, ws, bp, nb, r0, r1, tiles, ntiles, bias, out, ostride);                           \
  }                                                                                                                   \
  ATTR void gather_f64##SUFFIX(const double* src, const int32_t* offs, const double* ws, const int64_t* bp,           \
                               int64_t nb, int64_t r0, int64_t r1, const Tile* tiles, int64_t ntiles,                 \
                               const double* bias, double* out, int64_t ostride) {                                    \
    gather_all<double, W>(src, offs, ws, bp, nb, r0, r1, tiles, ntiles, bias, out, ostride);                          \
  }                                                                                                                   \
  ATTR void wgrad_f32##SUFFIX(const float* src, const int32_t* offs, const int64_t* bp, int64_t nb, int64_t r0,       \
                              int64_t r1, const Tile* tiles, int64_t ntiles, const float* dy, int64_t dstride,        \
                              float* g) {                                                                             \
    wgrad_all<float, W>(src, offs, bp, nb, r0, r1, tiles, ntiles, dy, dstride, g);                                    \
  }                                                                                                                   \
  ATTR void wgrad_f64##SUFFIX(const double* src, const int32_t* offs, const int64_t* bp, int64_t nb, int64_t r0,      \
                              int64_t r1, const Tile* tiles, int64_t ntiles, const double* dy, int64_t dstride,       \
                              double* g) {                                                                            \
    wgrad_all<double, W>(src, offs, bp, nb, r0, r1, tiles, ntiles, dy, dstride, g);                                   \
  }

SK_CLONE_BUILDS(SK_TILE_ENTRIES, 32)
SK_CLONE_DISPATCH(gather_f32)
SK_CLONE_DISPATCH(gather_f64)
SK_CLONE_DISPATCH(wgrad_f32)
SK_CLONE_DISPATCH(wgrad_f64)
#if SK_HAVE_AVX512
SK_TILE_ENTRIES(SK_AVX512, _w64, 64)  // for tiles cut at 64 bytes (vector_bytes)
#endif
#undef SK_TILE_ENTRIES

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

int vector_bytes(int64_t min_run, int64_t elem_size) {
  return csr::isa() == csr::Isa::avx512 && min_run * elem_size >= 64 ? 64 : 32;
}

std::vector<Tile> make_tiles(int64_t cols, int64_t elem_size, int vb) {
  const int64_t vw = vb / elem_size;
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

// The loops of the tiles' width: 64-byte instances exist only where SK_HAVE_AVX512 (vector_bytes never
// asks for them elsewhere).
#if SK_HAVE_AVX512
#define SK_WIDE(call64, call32) \
  if (vb == 64) call64;         \
  else call32
#else
#define SK_WIDE(call64, call32) call32
#endif

void gather(const float* src, const int32_t* offs, const float* ws, const Blocks& blk, int64_t r0, int64_t r1,
            const std::vector<Tile>& tiles, int vb, const float* bias, float* out, int64_t ostride) {
  SK_WIDE(gather_f32_w64(src, offs, ws, blk.bp.data(), blk.nb, r0, r1, tiles.data(), tiles.size(), bias, out, ostride),
          gather_f32(src, offs, ws, blk.bp.data(), blk.nb, r0, r1, tiles.data(), tiles.size(), bias, out, ostride));
}
void gather(const double* src, const int32_t* offs, const double* ws, const Blocks& blk, int64_t r0, int64_t r1,
            const std::vector<Tile>& tiles, int vb, const double* bias, double* out, int64_t ostride) {
  SK_WIDE(gather_f64_w64(src, offs, ws, blk.bp.data(), blk.nb, r0, r1, tiles.data(), tiles.size(), bias, out, ostride),
          gather_f64(src, offs, ws, blk.bp.data(), blk.nb, r0, r1, tiles.data(), tiles.size(), bias, out, ostride));
}
void wgrad(const float* src, const int32_t* offs, const Blocks& blk, int64_t r0, int64_t r1,
           const std::vector<Tile>& tiles, int vb, const float* dy, int64_t dstride, float* g) {
  SK_WIDE(wgrad_f32_w64(src, offs, blk.bp.data(), blk.nb, r0, r1, tiles.data(), tiles.size(), dy, dstride, g),
          wgrad_f32(src, offs, blk.bp.data(), blk.nb, r0, r1, tiles.data(), tiles.size(), dy, dstride, g));
}
void wgrad(const double* src, const int32_t* offs, const Blocks& blk, int64_t r0, int64_t r1,
           const std::vector<Tile>& tiles, int vb, const double* dy, int64_t dstride, double* g) {
  SK_WIDE(wgrad_f64_w64(src, offs, blk.bp.data(), blk.nb, r0, r1, tiles.data(), tiles.size(), dy, dstride, g),
          wgrad_f64(src, offs, blk.bp.data(), blk.nb, r0, r1, tiles.data(), tiles.size(), dy, dstride, g));
}
#undef SK_WIDE

}  // namespace conv_tiles
}  // namespace sparsekern
