// Depthwise 2-D convolution (groups = in = out channels) at stride 1 and dilation 1 on the CPU, forward and both
// backwards (sparsekern.nn.FastDepthwiseConv2d): ConvNeXt's and MobileNet's dense 7x7 / 3x3 depthwise layers, which
// stay dense when their neighbours are sparsified. ATen's CPU backward of such a layer runs at a few GFLOP/s: 4.3 ms
// for 8x96x16x16 with a 7x7 kernel, fwd+bwd, where the forward alone takes 0.4 ms (Zen 4, 2 threads); in a 90 %
// sparse ConvNeXt-T step at 64x64, 34 of 126 ms (BENCHMARKS.md).
//
// Each plane is copied into a zero-bordered buffer of (H + 2 ph) rows of Wp = W + 2 pw columns; an output row then
// reads the same columns of kh buffer rows, and so does the flat output: out[q] = b + sum_ij w_ij P[q + i Wp + j] for
// q in [0, Ho Wp) is the output with Wp - Wo columns of each row to drop. One contiguous vector loop of kh kw taps
// per plane, whatever its width (a 4x4 plane is 40 flat outputs, 16 kept), every tap a broadcast and a row of
// unaligned loads from L1. The input gradient is the same correlation of dY, bordered by k - 1 - p, with the kernel
// flipped; the weight gradient's tap (i, j) is the dot product of dY laid out at row stride Wp (zeros in the
// dropped columns) with the x buffer from i Wp + j on, kw taps of a kernel row sharing each load of dY.
// The backward runs channel by channel (each thread its own channels, all images), so the weight gradient of a
// channel is summed in one place, in the same order on every run.
#pragma GCC optimize("fp-contract=fast")

#include <ATen/Parallel.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/common.h"
#include "cpu/simd.h"

namespace sparsekern {
namespace {

constexpr int kVecBytes = 32;  // GCC's 32-byte vectors: AVX2 on x86-64-v3 and v4 (the clones), SSE elsewhere

// The geometry of one correlation: a plane of H x W into a bordered buffer of Hp x Wp (top and left borders ph, pw),
// kh x kw taps, Ho x Wo outputs, Ho * Wp flat outputs computed in whole vectors of L.
struct Geometry {
  int64_t H, W, ph, pw, kh, kw, Hp, Wp, Ho, Wo, flat, buffer;
  Geometry(int64_t H_, int64_t W_, int64_t ph_, int64_t pw_, int64_t kh_, int64_t kw_, int64_t L)
      : H(H_), W(W_), ph(ph_), pw(pw_), kh(kh_), kw(kw_), Hp(H_ + 2 * ph_), Wp(W_ + 2 * pw_) {
    Ho = Hp - kh + 1;
    Wo = Wp - kw + 1;
    flat = (Ho * Wp + L - 1) / L * L;
    // The furthest read: flat - 1 + (kh - 1) Wp + kw - 1 < Hp Wp + L + kw.
    buffer = (Hp * Wp + L + kw + L - 1) / L * L;
  }
};

// The interior of the bordered buffer P (borders already zero) from a plane of g.H x g.W.
template <class T>
SK_INLINE void fill_interior(T* P, const T* src, const Geometry& g) {
  for (int64_t h = 0; h < g.H; ++h) copy_run(P + (g.ph + h) * g.Wp + g.pw, src + h * g.W, g.W);
}

// out[q] = bias + sum over taps t of w[t] P[q + off[t]], for R vectors of L from q0.
template <class T, int R>
SK_INLINE void correlate_block(const T* P, const int64_t* off, const T* w, int64_t taps, T bias, T* out, int64_t q0) {
  using V = typename simd::Vec<T, kVecBytes>::v;
  constexpr int64_t L = simd::Vec<T, kVecBytes>::L;
  const V b = simd::vsplat<kVecBytes>(bias);
  V acc[R] = {};
  const T* base = P + q0;
  for (int64_t t = 0; t < taps; ++t) {
    const V wt = simd::vsplat<kVecBytes>(w[t]);
    const T* p = base + off[t];
    for (int r = 0; r < R; ++r) acc[r] += wt * simd::vload<kVecBytes>(p + r * L);
  }
  for (int r = 0; r < R; ++r) simd::vstore<kVecBytes>(out + q0 + r * L, acc[r] + b);
}

// out[0, flat) = bias + the correlation of P with the taps w at offsets off.
template <class T>
SK_INLINE void correlate(const T* P, const int64_t* off, const T* w, int64_t taps, T bias, T* out, int64_t flat) {
  constexpr int64_t L = simd::Vec<T, kVecBytes>::L;
  int64_t q = 0;
  for (; q + 8 * L <= flat; q += 8 * L) correlate_block<T, 8>(P, off, w, taps, bias, out, q);
  if (q + 4 * L <= flat) {
    correlate_block<T, 4>(P, off, w, taps, bias, out, q);
    q += 4 * L;
  }
  if (q + 2 * L <= flat) {
    correlate_block<T, 2>(P, off, w, taps, bias, out, q);
    q += 2 * L;
  }
  if (q < flat) correlate_block<T, 1>(P, off, w, taps, bias, out, q);
}

// The kept columns of the flat output (Ho rows of Wp) into a plane of Ho x Wo.
template <class T>
SK_INLINE void store_plane(T* dst, const T* flat, const Geometry& g) {
  for (int64_t h = 0; h < g.Ho; ++h) copy_run(dst + h * g.Wo, flat + h * g.Wp, g.Wo);
}

// acc[i kw + j] (vectors of L) += sum over q in [0, flat) of D[q] P[q + i Wp + j]: the weight gradient's taps.
template <class T>
SK_INLINE void weight_taps(const T* D, const T* P, const Geometry& g, T* acc) {
  using V = typename simd::Vec<T, kVecBytes>::v;
  constexpr int64_t L = simd::Vec<T, kVecBytes>::L;
  constexpr int64_t J = 8;  // taps of a kernel row at a time, each its own accumulator
  for (int64_t i = 0; i < g.kh; ++i) {
    for (int64_t j0 = 0; j0 < g.kw; j0 += J) {
      const int64_t nj = std::min(J, g.kw - j0);
      V a[J];
      for (int64_t j = 0; j < J; ++j) a[j] = j < nj ? simd::vload<kVecBytes>(acc + (i * g.kw + j0 + j) * L) : V{};
      const T* p = P + i * g.Wp + j0;
      for (int64_t q = 0; q < g.flat; q += L) {
        const V d = simd::vload<kVecBytes>(D + q);
        for (int64_t j = 0; j < J; ++j)
          if (j < nj) a[j] += d * simd::vload<kVecBytes>(p + q + j);
      }
      for (int64_t j = 0; j < nj; ++j) simd::vstore<kVecBytes>(acc + (i * g.kw + j0 + j) * L, a[j]);
    }
  }
}

// Tap offsets in a buffer of row stride Wp, in the kernel's row-major order.
std::vector<int64_t> tap_offsets(const Geometry& g) {
  std::vector<int64_t> off(g.kh * g.kw);
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) off[i * g.kw + j] = i * g.Wp + j;
  return off;
}

// Forward of planes [p0, p1) (plane p = image p / C, channel p % C).
template <class T>
SK_INLINE void forward_planes(const T* x, const T* w, const T* b, T* y, int64_t C, const Geometry& g, int64_t p0,
                              int64_t p1) {
  ThreadScratch<T, kScratchPack> pbuf(g.buffer);
  ThreadScratch<T, kScratchOut> obuf(g.flat);
  T* P = pbuf.data();
  std::fill(P, P + g.buffer, T(0));
  const std::vector<int64_t> off = tap_offsets(g);
  const int64_t taps = g.kh * g.kw;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c = p % C;
    fill_interior(P, x + p * g.H * g.W, g);
    correlate(P, off.data(), w + c * taps, taps, b ? b[c] : T(0), obuf.data(), g.flat);
    store_plane(y + p * g.Ho * g.Wo, obuf.data(), g);
  }
}

// Backward of channels [c0, c1): dx (where defined), dw and db (where defined) of every image.
// gx: x's geometry (the forward's); gd: dY bordered by k - 1 - p, whose correlation with the flipped kernel is dx.
template <class T>
SK_INLINE void backward_channels(const T* x, const T* w, const T* dy, T* dx, T* dw, T* db, int64_t N, int64_t C,
                                 const Geometry& gx, const Geometry& gd, int64_t c0, int64_t c1) {
  constexpr int64_t L = simd::Vec<T, kVecBytes>::L;
  const int64_t taps = gx.kh * gx.kw, plane = gx.H * gx.W, oplane = gx.Ho * gx.Wo;
  // xb: x bordered (gx); dz: dY at row stride gx.Wp, zero in the dropped columns and past the flat outputs; db_: dY
  // bordered (gd); out: the flat input gradient.
  const bool need_dw = dw != nullptr, need_dx = dx != nullptr;
  ThreadScratch<T, kScratchPack> xbuf(need_dw ? gx.buffer + gx.flat : 0);
  ThreadScratch<T, kScratchDy> dbuf(need_dx ? gd.buffer : 0);
  ThreadScratch<T, kScratchOut> obuf(need_dx ? gd.flat : 0);
  ThreadScratch<T, kScratchRows> abuf(need_dw ? taps * L : 0);
  T *xb = xbuf.data(), *dz = need_dw ? xb + gx.buffer : nullptr, *dyb = dbuf.data(), *acc = abuf.data();
  if (need_dw) std::fill(xb, xb + gx.buffer + gx.flat, T(0));
  if (need_dx) std::fill(dyb, dyb + gd.buffer, T(0));
  const std::vector<int64_t> off = tap_offsets(gd);
  std::vector<T> flipped(taps);
  for (int64_t c = c0; c < c1; ++c) {
    if (need_dx)
      for (int64_t t = 0; t < taps; ++t) flipped[t] = w[c * taps + taps - 1 - t];
    if (need_dw) std::fill(acc, acc + taps * L, T(0));
    T bias_sum = 0;
    for (int64_t n = 0; n < N; ++n) {
      const T* dyp = dy + (n * C + c) * oplane;
      if (db)
        for (int64_t e = 0; e < oplane; ++e) bias_sum += dyp[e];
      if (need_dw) {
        fill_interior(xb, x + (n * C + c) * plane, gx);
        for (int64_t h = 0; h < gx.Ho; ++h) copy_run(dz + h * gx.Wp, dyp + h * gx.Wo, gx.Wo);
        weight_taps(dz, xb, gx, acc);
      }
      if (need_dx) {
        fill_interior(dyb, dyp, gd);
        correlate(dyb, off.data(), flipped.data(), taps, T(0), obuf.data(), gd.flat);
        store_plane(dx + (n * C + c) * plane, obuf.data(), gd);
      }
    }
    if (need_dw)
      for (int64_t t = 0; t < taps; ++t) {
        T s = 0;
        for (int64_t l = 0; l < L; ++l) s += acc[t * L + l];
        dw[c * taps + t] = s;
      }
    if (db) db[c] = bias_sum;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// channels_last (NHWC): vectors over the channels. A block of CB channels (two vectors) of one image is copied into
// a buffer of H rows of Wp = W + 2 pw pixels (zero in the bordering columns; rows outside the plane are skipped
// taps), and each output row runs in runs of P pixels, P x 2 accumulators, each tap one load of its two weight
// vectors (weights (kh kw, C) transposed once a call) for P pixels.

template <class T>
struct Nhwc {
  using V = typename simd::Vec<T, kVecBytes>::v;
  static constexpr int64_t L = simd::Vec<T, kVecBytes>::L;
  static constexpr int NV = 2;  // vectors per channel block
  static constexpr int64_t CB = NV * L;
  static constexpr int P = 6;  // output pixels a run: 12 accumulators
};

// Channels [c0, c0 + CB) of an NHWC plane src (H x W, pixel stride C) into the bordered block buffer buf (H x Wp x
// CB; the border columns already zero): lanes past C are zero.
template <class T>
SK_INLINE void fill_block(T* buf, const T* src, int64_t H, int64_t W, int64_t C, int64_t c0, int64_t pw, int64_t Wp) {
  constexpr int64_t CB = Nhwc<T>::CB;
  const int64_t nc = std::min<int64_t>(CB, C - c0);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) {
      T* d = buf + (h * Wp + pw + w) * CB;
      const T* s = src + (h * W + w) * C + c0;
      if (nc == CB) {
        for (int v = 0; v < Nhwc<T>::NV; ++v)
          simd::vstore<kVecBytes>(d + v * Nhwc<T>::L, simd::vload<kVecBytes>(s + v * Nhwc<T>::L));
      } else {
        for (int64_t e = 0; e < CB; ++e) d[e] = e < nc ? s[e] : T(0);
      }
    }
}

// Output pixels [w0, w0 + R) of row h: y(h, w) = bias + sum_ij wt(i kw + j) buf(h + i - ph, w + j), the block's
// channels, stored at dst (pixel stride C, nc channels of the block).
template <class T, int R>
SK_INLINE void nhwc_run(const T* buf, const T* wt, int64_t Cp, const T* bias, int64_t i0, int64_t i1, int64_t rbase,
                        int64_t kw, int64_t Wp, int64_t w0, T* dst, int64_t C, int64_t nc) {
  using V = typename Nhwc<T>::V;
  constexpr int64_t L = Nhwc<T>::L, CB = Nhwc<T>::CB;
  constexpr int NV = Nhwc<T>::NV;
  V acc[R][NV];
  for (int v = 0; v < NV; ++v) {
    const V b = simd::vload<kVecBytes>(bias + v * L);
    for (int r = 0; r < R; ++r) acc[r][v] = b;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const T* row = buf + ((rbase + i) * Wp + w0) * CB;
    const T* wi = wt + i * kw * Cp;
    for (int64_t j = 0; j < kw; ++j) {
      V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = simd::vload<kVecBytes>(wi + j * Cp + v * L);
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < NV; ++v) acc[r][v] += wv[v] * simd::vload<kVecBytes>(row + (r + j) * CB + v * L);
    }
  }
  for (int r = 0; r < R; ++r) {
    T* d = dst + (w0 + r) * C;
    if (nc == CB) {
      for (int v = 0; v < NV; ++v) simd::vstore<kVecBytes>(d + v * L, acc[r][v]);
    } else {
      alignas(64) T tmp[CB];
      for (int v = 0; v < NV; ++v) simd::vstore<kVecBytes>(tmp + v * L, acc[r][v]);
      for (int64_t e = 0; e < nc; ++e) d[e] = tmp[e];
    }
  }
}

// The correlation of a bordered block buffer (H rows x Wp, top border ph: rows outside skipped) with kh x kw taps wt
// (taps x Cp, the block's channels from wt's start), Ho x Wo outputs to dst (an NHWC plane of C channels, the block's
// first channel), bias (CB values) added.
template <class T>
SK_INLINE void nhwc_correlate(const T* buf, int64_t H, int64_t Wp, int64_t ph, int64_t kh, int64_t kw, const T* wt,
                              int64_t Cp, const T* bias, T* dst, int64_t Ho, int64_t Wo, int64_t C, int64_t nc) {
  constexpr int P = Nhwc<T>::P;
  for (int64_t h = 0; h < Ho; ++h) {
    // Taps i with input row h + i - ph in [0, H).
    const int64_t i0 = std::max<int64_t>(0, ph - h), i1 = std::min<int64_t>(kh, H + ph - h);
    const int64_t rbase = h - ph;
    T* drow = dst + h * Wo * C;
    int64_t w0 = 0;
    for (; w0 + P <= Wo; w0 += P) nhwc_run<T, P>(buf, wt, Cp, bias, i0, i1, rbase, kw, Wp, w0, drow, C, nc);
    switch (Wo - w0) {
      case 5: nhwc_run<T, 5>(buf, wt, Cp, bias, i0, i1, rbase, kw, Wp, w0, drow, C, nc); break;
      case 4: nhwc_run<T, 4>(buf, wt, Cp, bias, i0, i1, rbase, kw, Wp, w0, drow, C, nc); break;
      case 3: nhwc_run<T, 3>(buf, wt, Cp, bias, i0, i1, rbase, kw, Wp, w0, drow, C, nc); break;
      case 2: nhwc_run<T, 2>(buf, wt, Cp, bias, i0, i1, rbase, kw, Wp, w0, drow, C, nc); break;
      case 1: nhwc_run<T, 1>(buf, wt, Cp, bias, i0, i1, rbase, kw, Wp, w0, drow, C, nc); break;
      default: break;
    }
  }
}

// Forward of blocks [b0, b1) (block b = image b / nb, channels (b % nb) CB on); wt (taps x Cp) and bp (Cp) padded
// with zeros to whole blocks.
template <class T>
SK_INLINE void nhwc_forward_blocks(const T* x, const T* wt, const T* bp, T* y, int64_t C, int64_t Cp, const Geometry& g,
                                   int64_t b0, int64_t b1) {
  constexpr int64_t CB = Nhwc<T>::CB;
  const int64_t nb = Cp / CB, n_buf = g.H * g.Wp * CB;
  ThreadScratch<T, kScratchPack> bbuf(n_buf);
  T* buf = bbuf.data();
  std::fill(buf, buf + n_buf, T(0));
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t n = b / nb, c0 = (b % nb) * CB;
    fill_block(buf, x + n * g.H * g.W * C, g.H, g.W, C, c0, g.pw, g.Wp);
    nhwc_correlate(buf, g.H, g.Wp, g.ph, g.kh, g.kw, wt + c0, Cp, bp + c0, y + n * g.Ho * g.Wo * C + c0, g.Ho, g.Wo, C,
                   std::min<int64_t>(CB, C - c0));
  }
}

// Backward of channel blocks [b0, b1), every image: dx (the correlation of dY bordered by k - 1 - p with the
// flipped taps wf), dw (taps x C: dw(i, j) = sum over pixels of dY(h, w) x(h + i - ph, w + j - pw)) and db.
template <class T>
SK_INLINE void nhwc_backward_blocks(const T* x, const T* wf, const T* dy, T* dx, T* dw, T* db, int64_t N, int64_t C,
                                    int64_t Cp, const Geometry& gx, const Geometry& gd, int64_t b0, int64_t b1) {
  using V = typename Nhwc<T>::V;
  constexpr int64_t L = Nhwc<T>::L, CB = Nhwc<T>::CB;
  constexpr int NV = Nhwc<T>::NV;
  constexpr int64_t J = 6;  // taps of a kernel row at a time: J x NV accumulators
  const int64_t taps = gx.kh * gx.kw, kw = gx.kw;
  const bool need_dw = dw != nullptr, need_dx = dx != nullptr;
  // xb: x's block bordered as the forward's; yb: dY's block bordered by k - 1 - p (gd); acc: dw's sums (taps x CB).
  const int64_t n_x = need_dw ? gx.H * gx.Wp * CB : 0, n_y = gd.H * gd.Wp * CB;
  ThreadScratch<T, kScratchPack> xbuf(n_x);
  ThreadScratch<T, kScratchDy> ybuf(n_y);
  ThreadScratch<T, kScratchRows> abuf(taps * CB + CB);
  T *xb = xbuf.data(), *yb = ybuf.data(), *acc = abuf.data(), *bacc = acc + taps * CB;
  if (need_dw) std::fill(xb, xb + n_x, T(0));
  std::fill(yb, yb + n_y, T(0));
  const T zero[CB] = {};
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t c0 = b * CB, nc = std::min<int64_t>(CB, C - c0);
    std::fill(acc, acc + taps * CB + CB, T(0));
    for (int64_t n = 0; n < N; ++n) {
      fill_block(yb, dy + n * gx.Ho * gx.Wo * C, gx.Ho, gx.Wo, C, c0, gd.pw, gd.Wp);
      if (need_dx)
        nhwc_correlate(yb, gd.H, gd.Wp, gd.ph, gd.kh, gd.kw, wf + c0, Cp, zero, dx + n * gx.H * gx.W * C + c0, gd.Ho,
                       gd.Wo, C, nc);
      if (db) {
        V s[NV] = {};
        for (int64_t h = 0; h < gx.Ho; ++h)
          for (int64_t w = 0; w < gx.Wo; ++w)
            for (int v = 0; v < NV; ++v) s[v] += simd::vload<kVecBytes>(yb + (h * gd.Wp + gd.pw + w) * CB + v * L);
        for (int v = 0; v < NV; ++v) simd::vstore<kVecBytes>(bacc + v * L, simd::vload<kVecBytes>(bacc + v * L) + s[v]);
      }
      if (!need_dw) continue;
      fill_block(xb, x + n * gx.H * gx.W * C, gx.H, gx.W, C, c0, gx.pw, gx.Wp);
      for (int64_t i = 0; i < gx.kh; ++i) {
        // Output rows h whose input row h + i - ph lies in [0, H).
        const int64_t h0 = std::max<int64_t>(0, gx.ph - i), h1 = std::min<int64_t>(gx.Ho, gx.H + gx.ph - i);
        for (int64_t j0 = 0; j0 < kw; j0 += J) {
          const int64_t nj = std::min(J, kw - j0);
          V a[J][NV];
          for (int64_t j = 0; j < J; ++j)
            for (int v = 0; v < NV; ++v)
              a[j][v] = j < nj ? simd::vload<kVecBytes>(acc + (i * kw + j0 + j) * CB + v * L) : V{};
          for (int64_t h = h0; h < h1; ++h) {
            const T* drow = yb + (h * gd.Wp + gd.pw) * CB;
            const T* xrow = xb + ((h + i - gx.ph) * gx.Wp + j0) * CB;
            for (int64_t w = 0; w < gx.Wo; ++w) {
              V d[NV];
              for (int v = 0; v < NV; ++v) d[v] = simd::vload<kVecBytes>(drow + w * CB + v * L);
              for (int64_t j = 0; j < J; ++j)
                if (j < nj)
                  for (int v = 0; v < NV; ++v) a[j][v] += d[v] * simd::vload<kVecBytes>(xrow + (w + j) * CB + v * L);
            }
          }
          for (int64_t j = 0; j < nj; ++j)
            for (int v = 0; v < NV; ++v) simd::vstore<kVecBytes>(acc + (i * kw + j0 + j) * CB + v * L, a[j][v]);
        }
      }
    }
    for (int64_t e = 0; e < nc; ++e) {
      if (need_dw)
        for (int64_t t = 0; t < taps; ++t) dw[(c0 + e) * taps + t] = acc[t * CB + e];
      if (db) db[c0 + e] = bacc[e];
    }
  }
}

SK_CLONED(void, forward_f32,
          (const float* x, const float* w, const float* b, float* y, int64_t C, const Geometry& g, int64_t p0,
           int64_t p1),
          { forward_planes(x, w, b, y, C, g, p0, p1); })
SK_CLONED(void, forward_f64,
          (const double* x, const double* w, const double* b, double* y, int64_t C, const Geometry& g, int64_t p0,
           int64_t p1),
          { forward_planes(x, w, b, y, C, g, p0, p1); })
SK_CLONED(void, backward_f32,
          (const float* x, const float* w, const float* dy, float* dx, float* dw, float* db, int64_t N, int64_t C,
           const Geometry& gx, const Geometry& gd, int64_t c0, int64_t c1),
          { backward_channels(x, w, dy, dx, dw, db, N, C, gx, gd, c0, c1); })
SK_CLONED(void, backward_f64,
          (const double* x, const double* w, const double* dy, double* dx, double* dw, double* db, int64_t N, int64_t C,
           const Geometry& gx, const Geometry& gd, int64_t c0, int64_t c1),
          { backward_channels(x, w, dy, dx, dw, db, N, C, gx, gd, c0, c1); })

SK_CLONED(void, nhwc_forward_f32,
          (const float* x, const float* wt, const float* bp, float* y, int64_t C, int64_t Cp, const Geometry& g,
           int64_t b0, int64_t b1),
          { nhwc_forward_blocks(x, wt, bp, y, C, Cp, g, b0, b1); })
SK_CLONED(void, nhwc_forward_f64,
          (const double* x, const double* wt, const double* bp, double* y, int64_t C, int64_t Cp, const Geometry& g,
           int64_t b0, int64_t b1),
          { nhwc_forward_blocks(x, wt, bp, y, C, Cp, g, b0, b1); })
SK_CLONED(void, nhwc_backward_f32,
          (const float* x, const float* wf, const float* dy, float* dx, float* dw, float* db, int64_t N, int64_t C,
           int64_t Cp, const Geometry& gx, const Geometry& gd, int64_t b0, int64_t b1),
          { nhwc_backward_blocks(x, wf, dy, dx, dw, db, N, C, Cp, gx, gd, b0, b1); })
SK_CLONED(void, nhwc_backward_f64,
          (const double* x, const double* wf, const double* dy, double* dx, double* dw, double* db, int64_t N,
           int64_t C, int64_t Cp, const Geometry& gx, const Geometry& gd, int64_t b0, int64_t b1),
          { nhwc_backward_blocks(x, wf, dy, dx, dw, db, N, C, Cp, gx, gd, b0, b1); })
SK_CLONE_DISPATCH(forward_f32)
SK_CLONE_DISPATCH(forward_f64)
SK_CLONE_DISPATCH(backward_f32)
SK_CLONE_DISPATCH(backward_f64)
SK_CLONE_DISPATCH(nhwc_forward_f32)
SK_CLONE_DISPATCH(nhwc_forward_f64)
SK_CLONE_DISPATCH(nhwc_backward_f32)
SK_CLONE_DISPATCH(nhwc_backward_f64)

// The weights (C, 1, kh, kw) as taps x Cp (channels padded with zeros to Cp), the kernel flipped where `flip`.
at::Tensor taps_by_channel(const at::Tensor& weight, int64_t Cp, bool flip) {
  const int64_t C = weight.size(0);
  at::Tensor w = weight.reshape({C, weight.size(2) * weight.size(3)});
  if (flip) w = w.flip({1});
  at::Tensor out = at::zeros({w.size(1), Cp}, weight.options());
  out.narrow(1, 0, C).copy_(w.t());
  return out;
}

int64_t block_channels(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? 8 : 16; }

constexpr const char* kOp = "_depthwise_conv2d";

int64_t lanes(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? 4 : 8; }

// Checks x (N, C, H, W) and weight (C, 1, kh, kw), bias (C) and padding, naming the argument; the forward's geometry.
Geometry checked(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                 at::IntArrayRef padding) {
  TORCH_CHECK_VALUE(x.device().is_cpu() && weight.device().is_cpu(), kOp, ": x and weight must be CPU tensors");
  TORCH_CHECK_VALUE(x.dim() == 4, kOp, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.is_contiguous() || channels_last(x), kOp, ": x must be contiguous (NCHW) or channels_last");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kOp,
                    ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), kOp, ": weight must have x's dtype ", x.scalar_type(),
                    ", got ", weight.scalar_type());
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(weight.dim() == 4 && weight.size(0) == C && weight.size(1) == 1, kOp,
                    ": weight must be (C, 1, kh, kw) with C = x.size(1) = ", C, ", got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(2) > 0 && weight.size(3) > 0, kOp, ": weight must have a kernel of at least 1x1, got ",
                    weight.sizes());
  if (bias) {
    TORCH_CHECK_VALUE(bias->device().is_cpu() && bias->scalar_type() == x.scalar_type(), kOp,
                      ": bias must be a CPU tensor of x's dtype ", x.scalar_type());
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == C, kOp, ": bias must be (C) with C = ", C, ", got ",
                      bias->sizes());
  }
  TORCH_CHECK_VALUE(padding.size() == 2, kOp, ": padding must have 2 entries, got ", padding.size());
  const int64_t kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0 && padding[0] < kh && padding[1] < kw, kOp,
                    ": padding must lie in [0, kernel size - 1] per dimension, got ", padding, " for a ", kh, "x", kw,
                    " kernel");
  const Geometry g(x.size(2), x.size(3), padding[0], padding[1], kh, kw, lanes(x));
  TORCH_CHECK_VALUE(g.Ho > 0 && g.Wo > 0, kOp, ": the ", kh, "x", kw, " kernel with padding ", padding,
                    " leaves no output for planes of ", g.H, "x", g.W);
  TORCH_CHECK_VALUE(g.buffer < (int64_t(1) << 31), kOp, ": planes of 2^31 elements or more");
  return g;
}

at::Tensor depthwise_forward(const at::Tensor& x, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
                             at::IntArrayRef padding) {
  const Geometry g = checked(x, weight_in, bias_in, padding);
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor bias = bias_in ? bias_in->contiguous() : at::Tensor();
  const int64_t N = x.size(0), C = x.size(1);
  if (channels_last(x)) {
    at::Tensor y = at::empty({N, C, g.Ho, g.Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (y.numel() == 0) return y;
    const int64_t CB = block_channels(x), Cp = (C + CB - 1) / CB * CB;
    const at::Tensor wt = taps_by_channel(weight, Cp, false);
    at::Tensor bp = at::zeros({Cp}, x.options());
    if (bias.defined()) bp.narrow(0, 0, C).copy_(bias);
    const int64_t blocks = N * (Cp / CB);
    const int64_t grain = std::max<int64_t>(1, 16384 / (g.H * g.W * g.kh * g.kw * CB / 8 + 1));
    at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
      if (x.scalar_type() == at::kDouble)
        return nhwc_forward_f64(x.data_ptr<double>(), wt.data_ptr<double>(), bp.data_ptr<double>(),
                                y.data_ptr<double>(), C, Cp, g, b0, b1);
      nhwc_forward_f32(x.data_ptr<float>(), wt.data_ptr<float>(), bp.data_ptr<float>(), y.data_ptr<float>(), C, Cp, g,
                       b0, b1);
    });
    return y;
  }
  at::Tensor y = at::empty({N, C, g.Ho, g.Wo}, x.options());
  if (y.numel() == 0) return y;
  const int64_t grain = std::max<int64_t>(1, 16384 / (g.flat * g.kh * g.kw));
  at::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) {
    if (x.scalar_type() == at::kDouble)
      return forward_f64(x.data_ptr<double>(), weight.data_ptr<double>(),
                         bias.defined() ? bias.data_ptr<double>() : nullptr, y.data_ptr<double>(), C, g, p0, p1);
    forward_f32(x.data_ptr<float>(), weight.data_ptr<float>(), bias.defined() ? bias.data_ptr<float>() : nullptr,
                y.data_ptr<float>(), C, g, p0, p1);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> depthwise_backward(const at::Tensor& grad_in, const at::Tensor& x,
                                                                  const at::Tensor& weight_in, at::IntArrayRef padding,
                                                                  std::array<bool, 3> mask) {
  const char* op = "_depthwise_conv2d_backward";
  const Geometry gx = checked(x, weight_in, c10::nullopt, padding);
  TORCH_CHECK_VALUE(grad_in.scalar_type() == x.scalar_type() && grad_in.device().is_cpu(), op,
                    ": grad must be a CPU tensor of x's dtype ", x.scalar_type());
  const int64_t N = x.size(0), C = x.size(1), kh = gx.kh, kw = gx.kw;
  TORCH_CHECK_VALUE(grad_in.sizes() == at::IntArrayRef({N, C, gx.Ho, gx.Wo}), op, ": grad must be (", N, ", ", C, ", ",
                    gx.Ho, ", ", gx.Wo, "), the output's shape, got ", grad_in.sizes());
  const bool nhwc = channels_last(x);
  const at::Tensor grad = nhwc ? grad_in.contiguous(at::MemoryFormat::ChannelsLast) : grad_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  // dY bordered by k - 1 - p: its correlation with the flipped kernel has x's H x W.
  const Geometry gd(gx.Ho, gx.Wo, kh - 1 - gx.ph, kw - 1 - gx.pw, kh, kw, lanes(x));
  at::Tensor dx = mask[0] ? at::empty_like(x) : at::Tensor();
  at::Tensor dw = mask[1] ? at::empty({C, 1, kh, kw}, x.options()) : at::Tensor();
  at::Tensor db = mask[2] ? at::empty({C}, x.options()) : at::Tensor();
  if (!mask[0] && !mask[1] && !mask[2]) return {dx, dw, db};
  if (N == 0 || C == 0) {
    if (dw.defined()) dw.zero_();
    if (db.defined()) db.zero_();
    return {dx, dw, db};
  }
  if (nhwc) {
    const int64_t CB = block_channels(x), Cp = (C + CB - 1) / CB * CB;
    const at::Tensor wf = taps_by_channel(weight, Cp, true);
    at::parallel_for(0, Cp / CB, 1, [&](int64_t b0, int64_t b1) {
      if (x.scalar_type() == at::kDouble)
        return nhwc_backward_f64(x.data_ptr<double>(), wf.data_ptr<double>(), grad.data_ptr<double>(),
                                 dx.defined() ? dx.data_ptr<double>() : nullptr,
                                 dw.defined() ? dw.data_ptr<double>() : nullptr,
                                 db.defined() ? db.data_ptr<double>() : nullptr, N, C, Cp, gx, gd, b0, b1);
      nhwc_backward_f32(x.data_ptr<float>(), wf.data_ptr<float>(), grad.data_ptr<float>(),
                        dx.defined() ? dx.data_ptr<float>() : nullptr, dw.defined() ? dw.data_ptr<float>() : nullptr,
                        db.defined() ? db.data_ptr<float>() : nullptr, N, C, Cp, gx, gd, b0, b1);
    });
    return {dx, dw, db};
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / (N * gx.flat * kh * kw));
  at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
    if (x.scalar_type() == at::kDouble)
      return backward_f64(x.data_ptr<double>(), weight.data_ptr<double>(), grad.data_ptr<double>(),
                          dx.defined() ? dx.data_ptr<double>() : nullptr,
                          dw.defined() ? dw.data_ptr<double>() : nullptr,
                          db.defined() ? db.data_ptr<double>() : nullptr, N, C, gx, gd, c0, c1);
    backward_f32(x.data_ptr<float>(), weight.data_ptr<float>(), grad.data_ptr<float>(),
                 dx.defined() ? dx.data_ptr<float>() : nullptr, dw.defined() ? dw.data_ptr<float>() : nullptr,
                 db.defined() ? db.data_ptr<float>() : nullptr, N, C, gx, gd, c0, c1);
  });
  return {dx, dw, db};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct DepthwiseConv : public torch::autograd::Function<DepthwiseConv> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias, at::IntArrayRef padding) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = depthwise_forward(x, weight, bias, padding);
    ctx->save_for_backward({x, weight});
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["bias"] = bias.has_value();
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1];
    const std::vector<int64_t> padding = ctx->saved_data["padding"].toIntVector();
    const bool has_bias = ctx->saved_data["bias"].toBool();
    const std::array<bool, 3> mask = {ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                      has_bias && ctx->needs_input_grad(2)};
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    at::Tensor dx, dw, db;
    if (torch::autograd::GradMode::is_enabled()) {
      // create_graph: ATen's backward, whose own derivatives give the second order.
      const std::vector<int64_t> bias_sizes = {x.size(1)};
      std::tie(dx, dw, db) =
          at::convolution_backward(grads[0], x, weight, has_bias ? at::OptionalIntArrayRef(bias_sizes) : c10::nullopt,
                                   {1, 1}, padding, {1, 1}, false, {0, 0}, x.size(1), mask);
    } else {
      std::tie(dx, dw, db) = depthwise_backward(grads[0], x, weight, padding, mask);
    }
    return {dx, dw, db, at::Tensor()};
  }
};

at::Tensor depthwise_autograd(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                              at::IntArrayRef padding) {
  return DepthwiseConv::apply(x, weight, bias, padding);
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  // Private (sparsekern/nn/fast_modules.py): a depthwise conv2d (weight (C, 1, kh, kw), groups = C) at stride 1 and
  // dilation 1 with zero padding of at most kernel - 1, over an NCHW-contiguous float32/float64 x.
  m.def("_depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int[2] padding) -> Tensor");
  // Its backward: (dx, dweight, dbias), those output_mask asks for.
  m.def("_depthwise_conv2d_backward(Tensor grad, Tensor x, Tensor weight, int[2] padding, bool[3] output_mask) -> "
        "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("_depthwise_conv2d", &sparsekern::depthwise_forward);
  m.impl("_depthwise_conv2d_backward", &sparsekern::depthwise_backward);
}
TORCH_LIBRARY_IMPL(sparsekern, Autograd, m) { m.impl("_depthwise_conv2d", &sparsekern::depthwise_autograd); }
