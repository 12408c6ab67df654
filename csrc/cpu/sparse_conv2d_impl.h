// Inner loops of the CPU sparse_conv2d kernels (included by sparse_conv2d.cpp only).
//
// Every pass is a "gather over nonzeros into a register tile": the source image is
// packed (zero padded, and split into stride phases along W) so that, for any
// nonzero of the weight, the source element feeding output position (row, col) sits
// at  src + off[nonzero] + in_off[position],  and positions along a row are
// contiguous. A tile is NACC vectors of VW consecutive positions of one row each;
// for every nonzero of a weight row we broadcast its value and FMA NACC vectors
// loaded at that shift. Accumulators stay in registers across the whole weight row.
#pragma once
#include <cstdint>

#include <cstring>
#include <type_traits>

#include "cpu/bf16.h"
#include "cpu/common.h"
#include "cpu/simd.h"

namespace sparsekern {
namespace conv2d_impl {

constexpr int NACC = 8;  // vector accumulators per tile (8 of the 16 ymm registers, or of the 32 zmm ones)
constexpr int64_t kRowsAhead = 4;  // rows ahead whose output (or dY) lines the loops prefetch, as conv_tiles.cpp's

// The W-byte vector of T (simd.h): W = 32 in every clone, 64 only in SK_AVX512 functions.
template <class T, int W = 32>
using VecOf = typename simd::Vec<T, W>::v;

// One vector position of a tile: VW consecutive output positions of one row.
// in_off: offset of its first element in the packed source (for a zero weight offset);
// out_off: offset of its first element in the destination plane; lanes [lo, hi) are
// the positions this vector owns (lanes below lo duplicate the previous vector of the
// row, lanes from hi on are past the row's end). A padding entry has lo == hi == 0.
struct Pos {
  int32_t in_off;
  int32_t lo, hi;
  int32_t pad_;
  int64_t out_off;
};

// A float32 vector rounded to bf16 at o (W / 4 lanes).
template <int W>
SK_INLINE void store_bf16(c10::BFloat16* o, const VecOf<float, W>& v) {
  if constexpr (W == 32) {
    bf16::store8(o, v);
  } else {
    VecOf<float> lo, hi;
    std::memcpy(&lo, &v, 32);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
    bf16::store8(o, lo);
    bf16::store8(o + 8, hi);
  }
}

// Destination of a tile: plane `out`, positions `pos`, columns `cstride` apart; a bf16 output (O)
// is rounded from the float32 accumulators here.
// (Element access through v[l], never the address of an accumulator, so they stay in registers.)
template <class T, class O = T, int W = 32>
SK_INLINE void store_tile(VecOf<T, W> (&acc)[NACC], const Pos* pos, O* out, int64_t cstride) {
  constexpr int VW = W / sizeof(T);
#pragma GCC unroll 16
  for (int k = 0; k < NACC; ++k) {
    const Pos& q = pos[k];
    O* o = out + q.out_off;
    if (__builtin_expect(q.hi == VW && cstride == 1, 1)) {
      // lanes below lo rewrite identical values
      if constexpr (std::is_same<O, T>::value) simd::vstore<W>(o, acc[k]);
      else store_bf16<W>(o, acc[k]);
    } else {
      for (int l = q.lo; l < q.hi; ++l) o[l * cstride] = static_cast<O>(acc[k][l]);
    }
  }
}

// The weight lists are cut into blocks of source planes (input channels for the forward,
// output channels for grad input) whose part of the source fits L1; bp[r*(nb+1) + k]
// is the first entry of row r in block k. Tiles outside, then blocks, then rows, so a
// block of planes is reused by every row while it is in L1. Between blocks a row's
// partial tile waits in `scratch` (NACC vectors per row of [r0, r1), full vectors
// whatever the tile's shape); the last block writes it to `out`.
//
// out[pos] = init + sum_j ws[j] * src[offs[j] + pos.in_off] for tiles [t0, t1), rows [r0, r1).
template <class T, class O = T, int W = 32>
SK_INLINE void gather_rows(const T* __restrict src, const int32_t* __restrict offs, const T* __restrict ws,
                           const int64_t* bp, int64_t nb, int64_t r0, int64_t r1, const Pos* pos, int64_t t0,
                           int64_t t1, const T* bias, O* __restrict out, int64_t out_plane, int64_t cstride,
                           T* __restrict scratch) {
  typedef VecOf<T, W> V;
  constexpr int VW = W / sizeof(T);
  for (int64_t t = t0; t < t1; ++t) {
    const Pos* tp = pos + t * NACC;
    // Byte offsets, the nonzero's source as a byte pointer: each load is then one base + index address. With element
    // offsets GCC added each vector's offset to the nonzero's (an lea per load) and spilled one of the eight to the
    // stack: 21 instructions a nonzero, now 14. Forward 1.03-1.08x, input gradient 1.05-1.10x at 3x3 layers of 64-128
    // channels, 14x14 to 56x56, either vector width (2 threads, Zen 4, interleaved A/B); the weight gradient's loop,
    // changed alike, read 0.96-1.02x and stays as it was.
    int64_t iob[NACC];
    for (int k = 0; k < NACC; ++k) iob[k] = tp[k].in_off * int64_t(sizeof(T));
    const char* sb = reinterpret_cast<const char*>(src);
    for (int64_t cb = 0; cb < nb; ++cb) {
      const bool last = cb == nb - 1;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t* rb = bp + r * (nb + 1) + cb;
        const int64_t b = rb[0], e = rb[1];
        T* sc = scratch + (r - r0) * (NACC * VW);
        V acc[NACC];
        if (cb == 0) {
          const T init = bias ? bias[r] : T(0);
#pragma GCC unroll 16
          for (int k = 0; k < NACC; ++k) acc[k] = V{} + init;
        } else if (b == e && !last) {
          continue;
        } else {
#pragma GCC unroll 16
          for (int k = 0; k < NACC; ++k) acc[k] = simd::vload<W>(sc + k * VW);
        }
        for (int64_t j = b; j < e; ++j) {
          const char* p = sb + int64_t(offs[j]) * int64_t(sizeof(T));
          const T w = ws[j];
#pragma GCC unroll 16
          for (int k = 0; k < NACC; ++k) acc[k] += w * simd::vload<W>(reinterpret_cast<const T*>(p + iob[k]));
        }
        if (last) {
          // The output rows ahead, for writing: each row stores into its own plane, a line or two each, more
          // streams than the hardware prefetchers follow, and in a training step those lines come from memory
          // (forward 1.02-1.07x, input gradient 1.0-1.12x at 3x3 layers of 64-128 channels, 14x14 to 56x56, either
          // vector width; interleaved A/B, 2 threads, Zen 4).
          if (r + kRowsAhead < r1)
#pragma GCC unroll 16
            for (int k = 0; k < NACC; ++k) __builtin_prefetch(out + (r + kRowsAhead) * out_plane + tp[k].out_off, 1);
          store_tile<T, O, W>(acc, tp, out + r * out_plane, cstride);
        } else {
#pragma GCC unroll 16
          for (int k = 0; k < NACC; ++k) simd::vstore<W>(sc + k * VW, acc[k]);
        }
      }
    }
  }
}

// The source vector at p for a tile vector: with MASK, its lanes outside the vector's own [lo, hi) are
// zeroed (by bits, before any multiply): dY is zero there, and 0 * Inf would put a NaN that the
// nonzero never reads into its gradient.
template <bool MASK, class V, class T, class VI>
SK_INLINE V src_lanes(const T* p, const VI& keep) {
  constexpr int W = sizeof(V);
  if constexpr (MASK) return (V)((VI)simd::vload<W>(p) & keep);
  else return simd::vload<W>(p);
}

// The lane sums of four W-byte vectors in lanes 0..3 (each folded to 32 bytes first).
template <class T, class V>
SK_INLINE VecOf<T> reduce4(const V (&part)[4]) {
  VecOf<T> half[4];
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) half[q] = simd::fold<int(sizeof(V)), T>(part[q]);
  return simd::reduce_lanes4(half);
}

// dot(dv tile, source window at p) as one vector, in two chains so that the FMAs of the four
// nonzeros in flight fill both pipes. MASK: a tile with partial vectors (see src_lanes).
template <bool MASK, class V, class T, class VI>
SK_INLINE V tile_dot(const V (&dv)[NACC], const T* p, const int64_t (&io)[NACC], const VI (&keep)[NACC]) {
  V s0 = dv[0] * src_lanes<MASK, V>(p + io[0], keep[0]);
  V s1 = dv[1] * src_lanes<MASK, V>(p + io[1], keep[1]);
#pragma GCC unroll 16
  for (int k = 2; k < NACC; k += 2) {
    s0 += dv[k] * src_lanes<MASK, V>(p + io[k], keep[k]);
    s1 += dv[k + 1] * src_lanes<MASK, V>(p + io[k + 1], keep[k + 1]);
  }
  return s0 + s1;
}

template <bool MASK, class V, class T, class VI>
SK_INLINE void wgrad_entries(const V (&dv)[NACC], const T* __restrict src, const int32_t* __restrict offs, int64_t b,
                             int64_t e, const int64_t (&io)[NACC], const VI (&keep)[NACC], T* __restrict g,
                             bool grouped) {
  int64_t j = b;
  if (!grouped) {
    for (; j < e; ++j) g[j] += simd::lane_sum(tile_dot<MASK>(dv, src + offs[j], io, keep));
    return;
  }
  for (; j + 4 <= e; j += 4) {
    const V part[4] = {tile_dot<MASK>(dv, src + offs[j], io, keep), tile_dot<MASK>(dv, src + offs[j + 1], io, keep),
                       tile_dot<MASK>(dv, src + offs[j + 2], io, keep),
                       tile_dot<MASK>(dv, src + offs[j + 3], io, keep)};
    const VecOf<T> s = reduce4<T>(part);
#pragma GCC unroll 4
    for (int l = 0; l < 4; ++l) g[j + l] += s[l];
  }
  if (j < e) {  // 1 to 3 left: zero vectors fill the group
    const int64_t left = e - j;
    const V z = V{};
    const V part[4] = {tile_dot<MASK>(dv, src + offs[j], io, keep),
                       left > 1 ? tile_dot<MASK>(dv, src + offs[j + 1], io, keep) : z,
                       left > 2 ? tile_dot<MASK>(dv, src + offs[j + 2], io, keep) : z, z};
    const VecOf<T> s = reduce4<T>(part);
    for (int64_t l = 0; l < left; ++l) g[j + l] += s[l];
  }
}

// Weight gradient: g[j] += sum_pos dy[pos] * src[offs[j] + pos.in_off] over tiles [t0, t1)
// and rows [r0, r1), dy planes out_plane apart; blocks as in gather_rows. A tile with partial vectors
// masks the source lanes its positions do not own (src_lanes): about 10 % of this pass at 28x28 and
// 14x14 rows, none for rows of whole vectors. With `grouped`, nonzeros
// go four at a time through one simd::reduce_lanes4 (reduced lane by lane, each costs about as much as its FMAs):
// measured 1.1-1.5x faster for 3x3 layers, whose neighbouring nonzeros (taps of one channel) read
// the same lines, but 10-25 % slower for 1x1 layers, whose four reads in flight hit four planes.
template <class T, int W = 32>
SK_INLINE void wgrad_rows(const T* __restrict src, const int32_t* __restrict offs, const int64_t* bp, int64_t nb,
                          int64_t r0, int64_t r1, const Pos* pos, int64_t t0, int64_t t1, const T* __restrict dy,
                          int64_t out_plane, T* __restrict g, bool grouped) {
  typedef VecOf<T, W> V;
  typedef typename simd::Vec<T, W>::vi VI;
  constexpr int VW = W / sizeof(T);
  for (int64_t t = t0; t < t1; ++t) {
    const Pos* tp = pos + t * NACC;
    int64_t io[NACC];
    VI keep[NACC];
    bool partial = false;
    for (int k = 0; k < NACC; ++k) {
      io[k] = tp[k].in_off;
      for (int l = 0; l < VW; ++l) keep[k][l] = (l >= tp[k].lo && l < tp[k].hi) ? -1 : 0;
      partial |= tp[k].lo != 0 || tp[k].hi != VW;
    }
    for (int64_t cb = 0; cb < nb; ++cb) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t* rb = bp + r * (nb + 1) + cb;
        const int64_t b = rb[0], e = rb[1];
        if (b == e) continue;
        const T* d = dy + r * out_plane;
        // dY is read once per block, row by row down the tile, a plane apart: the hardware prefetchers do not follow
        // such strides, so each row's first touch waits on memory without this (weight gradient 1.03-1.18x at 3x3
        // layers of 64-128 channels, 14x14 to 56x56, either vector width; interleaved A/B, 2 threads, Zen 4).
        if (r + kRowsAhead < r1)
#pragma GCC unroll 16
          for (int k = 0; k < NACC; ++k) __builtin_prefetch(d + kRowsAhead * out_plane + tp[k].out_off);
        V dv[NACC];
#pragma GCC unroll 16
        for (int k = 0; k < NACC; ++k) {
          const Pos& q = tp[k];
          if (__builtin_expect(q.lo == 0 && q.hi == VW, 1)) {
            dv[k] = simd::vload<W>(d + q.out_off);
          } else {
            V v = V{};
            for (int l = q.lo; l < q.hi; ++l) v[l] = d[q.out_off + l];
            dv[k] = v;
          }
        }
        if (partial) wgrad_entries<true>(dv, src, offs, b, e, io, keep, g, grouped);
        else wgrad_entries<false>(dv, src, offs, b, e, io, keep, g, grouped);
      }
    }
  }
}

}  // namespace conv2d_impl
}  // namespace sparsekern
