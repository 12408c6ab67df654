// Batch-innermost sparse_conv2d on the CPU, for convs larger than 1x1 on small planes.
//
// The direct kernel's tiles are rows of one image: at 7x7 a row fills 7 of 8 lanes, at 4x4 half of them,
// and its vectors sit at offsets read from a table. Laid out (C, H, W, N), a row of outputs of all N images
// is one run of OW*N elements, and the tap (r, s) of input channel c reads the run of the zero-bordered
// input shifted by c*plane + (r*dh*Wp + s*dw)*N, the same for every element: the flat tiles of
// conv_tiles.h apply, with every lane busy. The price is the layout change: x (and dY) are copied to
// (C, Hp, Wp, N) with their borders, and the results are computed (C, OH, OW, N) and copied back to NCHW.
// A stride (sh, sw) splits the bordered input into sh*sw phases, rows a mod sh and columns b mod sw, each
// its own plane: a tap then reads one phase at a uniform shift, (r*dh / sh, s*dw / sw), and the conv is a
// stride-1 one over Cin*sh*sw planes.
//   forward      Y[co] = bias + sum over row co of W: w * Xp[phase of the tap] shifted by the tap
//   grad input   each phase (a, b) of the bordered dX gathers the taps that land in it: dX[ci](a, b) = sum
//                over column ci of W, taps of that phase: w * dYb[co] shifted back by the tap, dYb bordered
//                so that no shift leaves it (a stride-1 correlation per phase); only the rows and columns
//                of each phase inside x are computed
//   grad weight  g[j] = sum over the output rows' tiles of dY[co] . Xp[phase] shifted by the tap
#include "cpu/conv_batched.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/bf16.h"
#include "cpu/common.h"
#include "cpu/conv_tiles.h"
#include "cpu/plan_cache.h"
#include "cpu/simd.h"

namespace sparsekern {
namespace batched {
namespace {

using conv_tiles::Tile;

int64_t num_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// A scratch buffer of n elements of T (uninitialised; NaN, and NaN past its end, under SPARSEKERN_POISON_SCRATCH).
template <class T>
at::Tensor scratch(int64_t n) {
  const int64_t alloc = scratch_alloc(n);
  at::Tensor t = at::empty({alloc}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  poison(t.data_ptr<T>(), alloc);
  return alloc == n ? t : t.narrow(0, 0, n);
}

int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

// One row of a phase plane from unit-stride rows: drow[j*N + n] = s[n*sN + j*sw] for j in [j0, j1), n in [0, N),
// sw 1 or 2. Blocks of 8 images x 8 columns go through a register transpose (sw = 2: each image's 16 elements
// deinterleaved first; only blocks that start at or before jv, whose 16 reads stay in the row); the rest one by one.
// The element-by-element copy (a 4-byte store per element, 16 lines apart) ran at about one element a cycle and
// took 30-37 % of a forward: ResNet-50's 128 -> 128 3x3 stride-2 layer at 28x28, batch 16, density 0.1 (Zen 5,
// 2 threads) packed its input in 0.25-0.36 ms of 0.8-0.96.
template <class I>
SK_INLINE void pack_row_impl(float* drow, const I* s, int64_t sN, int64_t N, int64_t sw, int64_t j0, int64_t j1,
                             int64_t jv) {
  using simd::vf;
  int64_t n0 = 0;
  for (; n0 + 8 <= N; n0 += 8) {
    const I* b = s + n0 * sN;
    int64_t j = j0;
    if (sw == 1) {
      for (; j + 8 <= j1; j += 8) simd::transpose_block(b + j, sN, drow + j * N + n0, N);
    } else if constexpr (std::is_same<I, float>::value) {
      const simd::vi32 even = {0, 2, 4, 6, 8, 10, 12, 14};
      vf r[8];
      for (; j + 8 <= j1 && j <= jv; j += 8) {
        for (int k = 0; k < 8; ++k) {
          const float* p = b + k * sN + 2 * j;
          r[k] = __builtin_shuffle(simd::vload(p), simd::vload(p + 8), even);
        }
        simd::transpose_rows(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], drow + j * N + n0, N);
      }
    }
    for (; j < j1; ++j)
      for (int64_t k = 0; k < 8; ++k) drow[j * N + n0 + k] = bf16::widen(b[k * sN + j * sw]);
  }
  for (; n0 < N; ++n0)
    for (int64_t j = j0; j < j1; ++j) drow[j * N + n0] = bf16::widen(s[n0 * sN + j * sw]);
}

SK_CLONED(void, pack_row_f32,
          (float* drow, const float* s, int64_t sN, int64_t N, int64_t sw, int64_t j0, int64_t j1, int64_t jv),
          { pack_row_impl(drow, s, sN, N, sw, j0, j1, jv); })
SK_CLONED(void, pack_row_bf16,
          (float* drow, const c10::BFloat16* s, int64_t sN, int64_t N, int64_t sw, int64_t j0, int64_t j1, int64_t jv),
          { pack_row_impl(drow, s, sN, N, sw, j0, j1, jv); })
SK_CLONE_DISPATCH(pack_row_f32)
SK_CLONE_DISPATCH(pack_row_bf16)

// Eight channels of a run of nj positions of channels_last rows into their planes: d[m*dch + j*N + n] =
// s[n*sN + j*sj + m] for m < 8, j < nj, n < N, blocks of 8 images x 8 channels through register transposes. Read
// element by element (a channel at a time, every read on its own cache line) the channels_last input of a 64 -> 64 3x3
// conv at 28x28, batch 16, took longer than the layer's NCHW fwd+bwd (Zen 5, 2 threads).
template <class I>
SK_INLINE void pack_cl_run_impl(float* d, int64_t dch, const I* s, int64_t sN, int64_t sj, int64_t N, int64_t nj) {
  for (int64_t j = 0; j < nj; ++j) {
    int64_t n0 = 0;
    for (; n0 + 8 <= N; n0 += 8) simd::transpose_block(s + j * sj + n0 * sN, sN, d + j * N + n0, dch);
    for (; n0 < N; ++n0)
      for (int64_t m = 0; m < 8; ++m) d[m * dch + j * N + n0] = bf16::widen(s[n0 * sN + j * sj + m]);
  }
}
SK_CLONED(void, pack_cl_run_f32, (float* d, int64_t dch, const float* s, int64_t sN, int64_t sj, int64_t N, int64_t nj),
          { pack_cl_run_impl(d, dch, s, sN, sj, N, nj); })
SK_CLONED(void, pack_cl_run_bf16,
          (float* d, int64_t dch, const c10::BFloat16* s, int64_t sN, int64_t sj, int64_t N, int64_t nj),
          { pack_cl_run_impl(d, dch, s, sN, sj, N, nj); })
SK_CLONE_DISPATCH(pack_cl_run_f32)
SK_CLONE_DISPATCH(pack_cl_run_bf16)

// pack (below) for a channels_last t (float32 or bf16 into float32): threads over blocks of 8 channels and phases.
template <class I>
void pack_cl(const at::Tensor& t, int64_t pt, int64_t pl, int64_t sh, int64_t sw, int64_t Hq, int64_t Wq, float* dst) {
  const I* tp = t.data_ptr<I>();
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  const int64_t sN = t.stride(0), sH = t.stride(2), sW = t.stride(3);
  const int64_t row = Wq * N, plane = Hq * row, dch = sh * sw * plane;  // dch: channel to channel in dst
  const int64_t blocks = (C + 7) / 8;
  at::parallel_for(0, blocks * sh * sw, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t c0 = q / (sh * sw) * 8, nc = std::min<int64_t>(8, C - c0), a = (q / sw) % sh, b = q % sw;
      const int64_t j0 = std::min(Wq, std::max<int64_t>(0, ceil_div(pl - b, sw)));
      const int64_t j1 = std::min(Wq, std::max(j0, ceil_div(W + pl - b, sw)));
      float* d0 = dst + (c0 * sh * sw + a * sw + b) * plane;
      for (int64_t i = 0; i < Hq; ++i) {
        const int64_t h = i * sh + a - pt;
        for (int64_t m = 0; m < nc; ++m) {
          float* drow = d0 + m * dch + i * row;
          if (h < 0 || h >= H) {
            std::memset(drow, 0, sizeof(float) * row);
          } else {
            std::memset(drow, 0, sizeof(float) * j0 * N);
            std::memset(drow + j1 * N, 0, sizeof(float) * (Wq - j1) * N);
          }
        }
        if (h < 0 || h >= H || j1 <= j0) continue;
        const I* s = tp + h * sH + (j0 * sw + b - pl) * sW + c0;
        float* d = d0 + i * row + j0 * N;
        if (nc == 8) {
          if constexpr (std::is_same<I, float>::value) pack_cl_run_f32(d, dch, s, sN, sw * sW, N, j1 - j0);
          else pack_cl_run_bf16(d, dch, s, sN, sw * sW, N, j1 - j0);
          continue;
        }
        for (int64_t m = 0; m < nc; ++m)
          for (int64_t j = 0; j < j1 - j0; ++j)
            for (int64_t n = 0; n < N; ++n) d[m * dch + j * N + n] = bf16::widen(s[n * sN + j * sw * sW + m]);
      }
    }
  });
}

// dst (C, sh, sw, Hq, Wq, N): the phases of t (N, C, H, W) placed at row pt, column pl of a zero canvas,
// dst[c][a][b][i][j][n] = t[n][c][i*sh + a - pt][j*sw + b - pl] (0 outside t). bf16 is widened.
template <class I, class T>
void pack(const at::Tensor& t, int64_t pt, int64_t pl, int64_t sh, int64_t sw, int64_t Hq, int64_t Wq, T* dst) {
  if constexpr (std::is_same<T, float>::value) {
    if (channels_last(t) && t.size(1) >= 8) return pack_cl<I>(t, pt, pl, sh, sw, Hq, Wq, dst);
  }
  const I* tp = t.data_ptr<I>();
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  const int64_t sN = t.stride(0), sC = t.stride(1), sH = t.stride(2), sW = t.stride(3);
  const int64_t row = Wq * N, plane = Hq * row;
  at::parallel_for(0, C * sh * sw, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p / (sh * sw), a = (p / sw) % sh, b = p % sw;
      // The columns j of this phase inside t: [j0, j1).
      const int64_t j0 = std::min(Wq, std::max<int64_t>(0, ceil_div(pl - b, sw)));
      const int64_t j1 = std::min(Wq, std::max(j0, ceil_div(W + pl - b, sw)));
      for (int64_t i = 0; i < Hq; ++i) {
        T* drow = dst + p * plane + i * row;
        const int64_t h = i * sh + a - pt;
        if (h < 0 || h >= H) {
          std::memset(drow, 0, sizeof(T) * row);
          continue;
        }
        std::memset(drow, 0, sizeof(T) * j0 * N);
        std::memset(drow + j1 * N, 0, sizeof(T) * (Wq - j1) * N);
        const I* s = tp + c * sC + h * sH + (b - pl) * sW;
        if constexpr (std::is_same<T, float>::value) {
          if (sW == 1 && sw <= 2) {
            // The last block start whose 16 reads (sw = 2) stay in the row: 2 jv + b - pl + 16 <= W.
            const int64_t room = W - (b - pl) - 16;
            const int64_t jv = room >= 0 ? room / 2 : -1;
            if constexpr (std::is_same<I, float>::value) pack_row_f32(drow, s, sN, N, sw, j0, j1, jv);
            else pack_row_bf16(drow, s, sN, N, sw, j0, j1, jv);
            continue;
          }
        }
        for (int64_t n = 0; n < N; ++n)
          for (int64_t j = j0; j < j1; ++j) drow[j * N + n] = bf16::widen(s[n * sN + j * sw * sW]);
      }
    }
  });
}

// The reverse for a run of `count` positions: d[n*ldd + q] = s[q*N + n], 8 x 8 blocks through register transposes.
SK_CLONED(void, unpack_run_f32, (float* d, int64_t ldd, const float* s, int64_t N, int64_t count), {
  int64_t n0 = 0;
  for (; n0 + 8 <= N; n0 += 8) {
    int64_t q = 0;
    for (; q + 8 <= count; q += 8) simd::transpose_block(s + q * N + n0, N, d + n0 * ldd + q, ldd);
    for (; q < count; ++q)
      for (int64_t k = 0; k < 8; ++k) d[(n0 + k) * ldd + q] = s[q * N + n0 + k];
  }
  for (; n0 < N; ++n0)
    for (int64_t q = 0; q < count; ++q) d[n0 * ldd + q] = s[q * N + n0];
})
SK_CLONE_DISPATCH(unpack_run_f32)

// One row of x's gradient from the two column phases of a stride-2 input gradient: d[n*ldd + w] = r_b[j*N + n]
// for w in [0, W), where b = (w + pw) % 2 and j = (w + pw) / 2 - j0_b. Blocks of 8 images x 16 columns: each
// phase's 8 x 8 block through a register transpose, then the two interleaved into full rows. Element by element
// (a 4-byte store to every other column of 16 planes) this write-back took 12 % of a fwd+bwd of ResNet-50's
// 128 -> 128 3x3 stride-2 layer (28x28, batch 16, density 0.087, Zen 5).
SK_CLONED(void, unpack_row2_f32,
          (float* d, int64_t ldd, const float* r0, int64_t j00, const float* r1, int64_t j01, int64_t N, int64_t W,
           int64_t pw),
          {
            const auto one = [&](int64_t w, int64_t n) {
              const int64_t b = (w + pw) & 1, m = (w + pw) >> 1;
              d[n * ldd + w] = b ? r1[(m - j01) * N + n] : r0[(m - j00) * N + n];
            };
            int64_t n0 = 0;
            for (; n0 + 8 <= N; n0 += 8) {
              int64_t w = 0;
              if (pw & 1)  // column 0 is phase 1's: blocks start where phase 0's column leads
                for (int64_t k = 0; k < 8 && W > 0; ++k) one(0, n0 + k), w = 1;
              alignas(64) float t0[64], t1[64];
              for (; w + 16 <= W; w += 16) {
                const int64_t m = (w + pw) >> 1;
                simd::transpose_block(r0 + (m - j00) * N + n0, N, t0, 8);
                simd::transpose_block(r1 + (m - j01) * N + n0, N, t1, 8);
                const simd::vi32 lo = {0, 8, 1, 9, 2, 10, 3, 11}, hi = {4, 12, 5, 13, 6, 14, 7, 15};
                for (int k = 0; k < 8; ++k) {
                  const simd::vf e = simd::vload(t0 + 8 * k), o = simd::vload(t1 + 8 * k);
                  float* row = d + (n0 + k) * ldd + w;
                  simd::vstore(row, __builtin_shuffle(e, o, lo));
                  simd::vstore(row + 8, __builtin_shuffle(e, o, hi));
                }
              }
              for (; w < W; ++w)
                for (int64_t k = 0; k < 8; ++k) one(w, n0 + k);
            }
            for (; n0 < N; ++n0)
              for (int64_t w = 0; w < W; ++w) one(w, n0);
          })
SK_CLONE_DISPATCH(unpack_row2_f32)

// d[n*ldd + q] = src[q*N + n] for q in [0, count), n in [0, N) (a bf16 d is rounded).
template <class I, class T>
void unpack_run(I* d, int64_t ldd, const T* s, int64_t N, int64_t count) {
  if constexpr (std::is_same<I, float>::value && std::is_same<T, float>::value) {
    unpack_run_f32(d, ldd, s, N, count);
  } else {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t q = 0; q < count; ++q) d[n * ldd + q] = static_cast<I>(s[q * N + n]);
  }
}

// Positions q of a channels_last out from (C, H, W, N): d[n*ldd + q*C + c] = s[c*cs + q*N + n] for q in [q0, q1), every
// channel and image, blocks of 8 channels x 8 images through register transposes.
SK_CLONED(void, unpack_cl_f32,
          (float* d, int64_t ldd, const float* s, int64_t cs, int64_t C, int64_t N, int64_t q0, int64_t q1), {
            for (int64_t q = q0; q < q1; ++q) {
              int64_t c0 = 0;
              for (; c0 + 8 <= C; c0 += 8) {
                int64_t n0 = 0;
                for (; n0 + 8 <= N; n0 += 8)
                  simd::transpose_block(s + c0 * cs + q * N + n0, cs, d + n0 * ldd + q * C + c0, ldd);
                for (; n0 < N; ++n0)
                  for (int64_t c = c0; c < c0 + 8; ++c) d[n0 * ldd + q * C + c] = s[c * cs + q * N + n0];
              }
              for (; c0 < C; ++c0)
                for (int64_t n = 0; n < N; ++n) d[n * ldd + q * C + c0] = s[c0 * cs + q * N + n];
            }
          })
SK_CLONE_DISPATCH(unpack_cl_f32)

// unpack_cl_f32 for any output and compute types (element by element where not both float32; a bf16 d is rounded).
template <class I, class T>
void unpack_cl(I* d, int64_t ldd, const T* s, int64_t cs, int64_t C, int64_t N, int64_t q0, int64_t q1) {
  if constexpr (std::is_same<I, float>::value && std::is_same<T, float>::value) {
    unpack_cl_f32(d, ldd, s, cs, C, N, q0, q1);
  } else {
    for (int64_t q = q0; q < q1; ++q)
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < C; ++c) d[n * ldd + q * C + c] = static_cast<I>(s[c * cs + q * N + n]);
  }
}

// out (N, C, H, W), contiguous or channels_last, = src (C, H, W, N).
template <class I, class T>
void unpack(const T* src, at::Tensor& out) {
  I* op = out.data_ptr<I>();
  const int64_t N = out.size(0), C = out.size(1), P = out.size(2) * out.size(3);
  if (channels_last(out)) {
    at::parallel_for(0, P, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C * N)),
                     [&](int64_t q0, int64_t q1) { unpack_cl<I, T>(op, out.stride(0), src, P * N, C, N, q0, q1); });
    return;
  }
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) unpack_run<I, T>(op + c * P, C * P, src + c * P * N, N, P);
  });
}

// The tiles of a grid of `rows` runs of `run` elements: run i reads the source at i*src_row and writes
// the destination at i*out_row. A run of at most half a tile shares its tile with the runs below it (2 or 4 to a
// tile, up to NMAX vectors): a 4x4 plane at batch 16 is 4 runs of 4 64-byte vectors, at batch 8 of 2, and a tile
// of one such run pays a nonzero's offset, value and loop for 2-4 multiply-adds. Density 0.1, 2 threads, 8 MB written
// between calls, medians of alternating processes (AMD Zen 5): 512 -> 512 3x3 at 7x7, batch 8, forward 1.81 -> 1.65
// ms, input gradient 1.82 -> 1.68, weight gradient 1.65 -> 1.56; at 4x4 batch 16 1.02 -> 0.96, 1.11 -> 1.05, 0.88 ->
// 0.81; 256 -> 256 at 4x4 batch 8 0.18 -> 0.16, 0.20 -> 0.18, 0.18 -> 0.15.
std::vector<Tile> grid_tiles(int64_t rows, int64_t run, int64_t src_row, int64_t out_row, int64_t elem, int vb) {
  const std::vector<Tile> one = conv_tiles::make_tiles(run, elem, vb);
  const int64_t nv = one.size() == 1 ? one[0].nv : conv_tiles::NMAX;
  std::vector<Tile> tiles;
  tiles.reserve(rows * one.size());
  for (int64_t i = 0; i < rows;) {
    int64_t rr = 1;  // runs in this tile: 4, 2 or 1 (the instances conv_tiles has)
    for (const int64_t k : {int64_t(4), int64_t(2)}) {
      if (k <= conv_tiles::MAX_ROWS && k * nv <= conv_tiles::NMAX && i + k <= rows) {
        rr = k;
        break;
      }
    }
    for (Tile t : one) {
      t.sbase += i * src_row;
      t.obase += i * out_row;
      t.rows = static_cast<int32_t>(rr);
      t.srow = src_row;
      t.orow = out_row;
      tiles.push_back(t);
    }
    i += rr;
  }
  return tiles;
}

// conv_tiles::gather over every tile and rows [0, R). Fewer tiles than two a thread: threads over rows (one tile a
// thread, all its rows, measured 2-4 % slower at ResNet-50's 4x4 planes, 2 tiles). Else each thread takes an equal
// share of the work (a tile's: its vectors, runs x vectors, for each of the R rows) as a run of whole tiles in order,
// with part of a tile's rows at either end: threads share no output and at most the tiles at their runs' ends. Threads
// over whole tiles alone (the earlier split) left a 7x7 plane at batch 16, 7 tiles, at 4 and 3 on 2 threads:
// ResNet-50's 256 -> 256 3x3 at 7x7, density 0.1, forward 0.51-0.58 -> 0.46-0.54 ms (6-10 %) and both gradients 4-7 %
// faster; 14x14 -> 7x7 stride 2 forward 3-8 %; 28x28 planes even (AMD Zen 5, 2 threads, interleaved in one process, 16
// MB written before each call).
template <class T>
void gather_grid(const T* src, const std::vector<int32_t>& offs, const T* ws, const conv_tiles::Blocks& blk, int64_t R,
                 const std::vector<Tile>& tiles, int vb, const T* bias, T* out, int64_t ostride) {
  const int64_t nt = static_cast<int64_t>(tiles.size()), nth = num_threads();
  if (nt < 2 * nth && R >= 2 * nth) {
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      conv_tiles::gather(src, offs.data(), ws, blk, r0, r1, tiles, vb, bias, out, ostride);
    });
    return;
  }
  std::vector<int64_t> pre(nt + 1, 0);  // work before each tile, per row
  for (int64_t t = 0; t < nt; ++t) pre[t + 1] = pre[t] + int64_t(tiles[t].rows) * tiles[t].nv;
  const int64_t total = pre[nt];
  // The point `p` of the work, per row, as (tile, first row of that tile at or after it).
  auto locate = [&](int64_t p, int64_t& t, int64_t& r) {
    t = std::upper_bound(pre.begin(), pre.end(), p) - pre.begin() - 1;
    if (t >= nt) t = nt, r = 0;
    else r = R * (p - pre[t]) / (pre[t + 1] - pre[t]);
  };
  auto run = [&](int64_t t0, int64_t t1, int64_t r0, int64_t r1) {
    if (t0 >= t1 || r0 >= r1) return;
    const std::vector<Tile> part(tiles.begin() + t0, tiles.begin() + t1);
    conv_tiles::gather(src, offs.data(), ws, blk, r0, r1, part, vb, bias, out, ostride);
  };
  at::parallel_for(0, nth, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      int64_t ta, ra, tb, rb;
      locate(total * q / nth, ta, ra);
      locate(total * (q + 1) / nth, tb, rb);
      if (ta == tb) {
        run(ta, ta + 1, ra, rb);
        continue;
      }
      if (ra > 0) run(ta, ta + 1, ra, R), ++ta;
      run(ta, tb, 0, R);
      if (tb < nt) run(tb, tb + 1, 0, rb);
    }
  });
}

[[noreturn]] void bad_col(const char* op, int64_t j, int64_t col, int64_t Cin, int64_t kh, int64_t kw) {
  const int64_t K = kh * kw;
  TORCH_CHECK(false, op, ": col_idx[", j, "] = ", col, " is out of range: the input has ", Cin,
              " channels, so W must have Cin*kh*kw = ", Cin, "*", kh, "*", kw, " = ", Cin * K, " columns (col_idx ",
              col, " is input channel ", col / K, ")");
}

// Where the taps read a phase-split source (pack above: phases of Hq x Wq, rows Wq*N apart): per weight
// column (c, r, s), the phase plane c*sh*sw + (r*dh mod sh)*sw + (s*dw mod sw) and the tap's shift
// (r*dh / sh, s*dw / sw) as an offset in it. A table over the Cin*kh*kw columns makes the per-nonzero work a
// lookup: the divisions cost as much as the forward's multiply-adds at 4x4 planes.
struct Taps { std::vector<int32_t> plane, shift; };
Taps taps(int64_t Cin, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t Wq, int64_t N) {
  Taps t;
  t.plane.resize(Cin * kh * kw);
  t.shift.resize(Cin * kh * kw);
  for (int64_t c = 0, col = 0; c < Cin; ++c) {
    for (int64_t r = 0; r < kh; ++r) {
      for (int64_t s = 0; s < kw; ++s, ++col) {
        t.plane[col] = static_cast<int32_t>((c * sh + (r * dh) % sh) * sw + (s * dw) % sw);
        t.shift[col] = static_cast<int32_t>(((r * dh / sh) * Wq + s * dw / sw) * N);
      }
    }
  }
  return t;
}

// What one plane adds to a tile's window: the rows a tap's shifts span times a tile's run plus their reach.
template <class T>
int64_t window_bytes(int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t N, int vb) {
  return ((kh - 1) * dh / sh + 1) * (conv_tiles::NMAX * (vb / int64_t(sizeof(T))) + (kw - 1) * dw / sw * N) *
         int64_t(sizeof(T));
}

// Packed-input offset and phase plane of every nonzero (forward and grad weight); checks col_idx.
std::vector<int32_t> tap_offsets(const char* op, const at::Tensor& col_idx, int64_t Cin, int64_t kh, int64_t kw,
                                 int64_t sh, int64_t sw, int64_t dh, int64_t dw, int64_t Wq, int64_t N, int64_t plane,
                                 std::vector<int32_t>& plane_of) {
  const int64_t nnz = col_idx.numel(), ncols = Cin * kh * kw;
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const Taps t = taps(Cin, kh, kw, sh, sw, dh, dw, Wq, N);
  std::vector<int32_t> offs(nnz);
  plane_of.resize(nnz);
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t col = ci[j];
    if (__builtin_expect(col < 0 || col >= ncols, 0)) bad_col(op, j, col, Cin, kh, kw);
    plane_of[j] = t.plane[col];
    offs[j] = static_cast<int32_t>(t.plane[col] * plane + t.shift[col]);
  }
  return offs;
}

// The forward's and weight gradient's source: x split into its phases, bordered.
struct Source { int64_t Hq, Wq, plane; };
Source source(int64_t N, int64_t H, int64_t W, int64_t sh, int64_t sw, int64_t ph, int64_t pw) {
  const int64_t Hq = ceil_div(H + 2 * ph, sh), Wq = ceil_div(W + 2 * pw, sw);
  return {Hq, Wq, Hq * Wq * N};
}

// The input gradient's geometry: per phase (a, b) of the bordered dX, its rows [i0, i0 + ni) and columns
// [j0, j0 + nj) that fall inside x; dY bordered by Bt rows and Bl columns (Hd x Wd in all) so that every
// tap's backward shift (i - r*dh / sh, j - s*dw / sw) of those rows and columns stays inside it, and dY whole.
struct Span { int64_t i0, ni, j0, nj; };
struct Grad {
  std::vector<Span> span;  // per phase a*sw + b
  int64_t Bt, Bl, Hd, Wd;
};
Grad grad_geometry(int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                   int64_t dh, int64_t dw) {
  // One axis: the phases' first index and count, then the border and extent of dY along it.
  auto axis = [](int64_t size, int64_t k, int64_t s, int64_t p, int64_t d, std::vector<int64_t>& first,
                 std::vector<int64_t>& count, int64_t& border, int64_t& extent) {
    first.resize(s);
    count.resize(s);
    for (int64_t a = 0; a < s; ++a) {
      first[a] = std::max<int64_t>(0, ceil_div(p - a, s));
      count[a] = std::max<int64_t>(0, ceil_div(p + size - a, s) - first[a]);
    }
    border = 0;
    int64_t last = -1;
    for (int64_t r = 0; r < k; ++r) {
      const int64_t a = r * d % s, q = r * d / s;
      if (count[a] == 0) continue;
      border = std::max(border, q - first[a]);
      last = std::max(last, first[a] + count[a] - 1 - q);
    }
    // All of dY fits too (the weight gradient reads this copy in place): where the padding exceeds the kernel's
    // reach, its last rows feed only the padding and the input gradient alone would crop them.
    const int64_t out = (size + 2 * p - (k - 1) * d - 1) / s + 1;
    extent = std::max({int64_t(1), last + border + 1, border + out});
  };
  Grad g;
  std::vector<int64_t> i0, ni, j0, nj;
  axis(H, kh, sh, ph, dh, i0, ni, g.Bt, g.Hd);
  axis(W, kw, sw, pw, dw, j0, nj, g.Bl, g.Wd);
  g.span.resize(sh * sw);
  for (int64_t a = 0; a < sh; ++a)
    for (int64_t b = 0; b < sw; ++b) g.span[a * sw + b] = {i0[a], ni[a], j0[b], nj[b]};
  return g;
}

// The forward's and weight gradient's plan (cached, plan_cache.h): per nonzero its packed-input offset, the
// rows' blocks of source planes and the tiles of the output grid, cut for vb-byte vectors.
struct TapPlan {
  std::vector<int32_t> offs;
  conv_tiles::Blocks blk;
  std::vector<Tile> tiles;
  size_t bytes() const {
    return plan_cache::vec_bytes(offs) + plan_cache::vec_bytes(blk.bp) + plan_cache::vec_bytes(tiles);
  }
};

template <class T>
std::shared_ptr<const TapPlan> tap_plan(const char* op, const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t N,
                                        int64_t Cin, int64_t H, int64_t W, int64_t OH, int64_t OW, int64_t kh,
                                        int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                                        int64_t dw, int vb) {
  const plan_cache::Key key{plan_cache::kBatchedTaps, N, Cin, H, W, kh, kw, sh, sw, ph, pw, dh, dw,
                            int64_t(sizeof(T)),       vb};
  return plan_cache::get<TapPlan>(row_ptr, col_idx, key, [&] {
    const Source sg = source(N, H, W, sh, sw, ph, pw);
    TapPlan p;
    std::vector<int32_t> plane_of;
    p.offs = tap_offsets(op, col_idx, Cin, kh, kw, sh, sw, dh, dw, sg.Wq, N, sg.plane, plane_of);
    p.blk = conv_tiles::make_blocks(row_ptr.numel() - 1, row_ptr.data_ptr<int64_t>(), plane_of.data(), Cin * sh * sw,
                                    window_bytes<T>(kh, kw, sh, sw, dh, dw, N, vb));
    p.tiles = grid_tiles(OH, OW * N, sg.Wq * N, OW * N, sizeof(T), vb);
    return p;
  });
}

template <class I, class T = typename bf16::Acc<I>::type>
void forward_impl(const at::Tensor& x, const T* ws, const at::Tensor& row_ptr, const at::Tensor& col_idx, const T* bias,
                  int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                  at::Tensor& y, at::Tensor* x_packed) {
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = y.size(1), OH = y.size(2), OW = y.size(3);
  const Source sg = source(N, H, W, sh, sw, ph, pw);
  const int vb = conv_tiles::vector_bytes(OW * N, sizeof(T));
  const std::shared_ptr<const TapPlan> plan =
      tap_plan<T>("sparse_conv2d", row_ptr, col_idx, N, Cin, H, W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw, vb);
  at::Tensor xp = scratch<T>(Cin * sh * sw * sg.plane), yb = scratch<T>(Cout * OH * OW * N);
  pack<I, T>(x, ph, pw, sh, sw, sg.Hq, sg.Wq, xp.data_ptr<T>());
  gather_grid<T>(xp.data_ptr<T>(), plan->offs, ws, plan->blk, Cout, plan->tiles, vb, bias, yb.data_ptr<T>(),
                 OH * OW * N);
  unpack<I, T>(yb.data_ptr<T>(), y);
  if (x_packed) *x_packed = xp;
}

// The input gradient's plan (cached): W^T as CSR over rows (phase, input channel), entries (offset into
// dYb, index of the value in W's lists), co ascending; per phase its blocks of dY planes and tiles (vb-byte
// vectors).
struct GradPlan {
  Grad gg;
  std::vector<int64_t> trp, perm;
  std::vector<int32_t> toffs;
  std::vector<conv_tiles::Blocks> blk;      // per phase (empty where the phase computes nothing)
  std::vector<std::vector<Tile>> tiles;     // per phase
  std::vector<int64_t> part;                // phase p's results start at part[p] in one buffer
  size_t bytes() const {
    size_t b = plan_cache::vec_bytes(trp) + plan_cache::vec_bytes(perm) + plan_cache::vec_bytes(toffs);
    for (const auto& k : blk) b += plan_cache::vec_bytes(k.bp);
    for (const auto& t : tiles) b += plan_cache::vec_bytes(t);
    return b;
  }
};

template <class T>
GradPlan build_grad_plan(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t N, int64_t Cin, int64_t H,
                         int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                         int64_t dw, int vb) {
  const int64_t Cout = row_ptr.numel() - 1, K = kh * kw, nnz = col_idx.numel(), P = sh * sw;
  GradPlan g;
  g.gg = grad_geometry(H, W, kh, kw, sh, sw, ph, pw, dh, dw);
  const Grad& gg = g.gg;
  const int64_t plane = gg.Hd * gg.Wd * N;
  // Per weight column (c, r, s): the phase its tap lands in and the tap's offset into dYb from the
  // phase's first computed row and column.
  std::vector<int32_t> col_phase(Cin * K), col_off(Cin * K);
  for (int64_t c = 0, col = 0; c < Cin; ++c) {
    for (int64_t r = 0; r < kh; ++r) {
      for (int64_t s = 0; s < kw; ++s, ++col) {
        const int64_t p = (r * dh % sh) * sw + s * dw % sw;
        const Span& sp = gg.span[p];
        col_phase[col] = static_cast<int32_t>(p);
        col_off[col] = static_cast<int32_t>(((sp.i0 - r * dh / sh + gg.Bt) * gg.Wd + sp.j0 - s * dw / sw + gg.Bl) * N);
      }
    }
  }
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  g.trp.assign(P * Cin + 1, 0);
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t col = ci[j];
    if (__builtin_expect(col < 0 || col >= Cin * K, 0)) bad_col("sparse_conv2d_backward_input", j, col, Cin, kh, kw);
    ++g.trp[col_phase[col] * Cin + col / K + 1];
  }
  for (int64_t r = 0; r < P * Cin; ++r) g.trp[r + 1] += g.trp[r];
  g.toffs.resize(nnz);
  g.perm.resize(nnz);
  std::vector<int32_t> tplane(nnz);
  {
    std::vector<int64_t> fill(g.trp.begin(), g.trp.end() - 1);
    for (int64_t co = 0; co < Cout; ++co) {
      for (int64_t j = rp[co]; j < rp[co + 1]; ++j) {
        const int64_t col = ci[j];
        const int64_t q = fill[col_phase[col] * Cin + col / K]++;
        g.toffs[q] = static_cast<int32_t>(co * plane + col_off[col]);
        g.perm[q] = j;
        tplane[q] = static_cast<int32_t>(co);
      }
    }
  }
  g.part.assign(P + 1, 0);
  g.blk.resize(P);
  g.tiles.resize(P);
  for (int64_t p = 0; p < P; ++p) {
    const Span& sp = gg.span[p];
    g.part[p + 1] = g.part[p] + Cin * sp.ni * sp.nj * N;
    if (sp.ni == 0 || sp.nj == 0) continue;
    g.blk[p] = conv_tiles::make_blocks(Cin, g.trp.data() + p * Cin, tplane.data(), Cout,
                                       window_bytes<T>(kh, kw, sh, sw, dh, dw, N, vb));
    g.tiles[p] = grid_tiles(sp.ni, sp.nj * N, gg.Wd * N, sp.nj * N, sizeof(T), vb);
  }
  return g;
}

// The input gradient's plan for dx's geometry, and the vector width its tiles are cut for.
template <class T>
std::shared_ptr<const GradPlan> grad_plan(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t N, int64_t Cin,
                                          int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                          int64_t ph, int64_t pw, int64_t dh, int64_t dw, int& vb) {
  int64_t min_run = INT64_MAX;  // the shortest run of a phase that computes anything
  for (const Span& sp : grad_geometry(H, W, kh, kw, sh, sw, ph, pw, dh, dw).span)
    if (sp.ni > 0 && sp.nj > 0) min_run = std::min(min_run, sp.nj * N);
  vb = conv_tiles::vector_bytes(min_run, sizeof(T));
  const plan_cache::Key key{plan_cache::kBatchedGrad, N, Cin, H, W, kh, kw, sh, sw, ph, pw, dh, dw,
                            int64_t(sizeof(T)),       vb};
  return plan_cache::get<GradPlan>(row_ptr, col_idx, key, [&] {
    return build_grad_plan<T>(row_ptr, col_idx, N, Cin, H, W, kh, kw, sh, sw, ph, pw, dh, dw, vb);
  });
}

// dx from dYb, dY packed bordered (Cout, Hd, Wd, N) as the plan's geometry says.
template <class I, class T>
void input_grad_from(const T* dyb, const GradPlan& gp, int vb, const at::Tensor& values, int64_t sh, int64_t sw,
                     int64_t ph, int64_t pw, at::Tensor& dx) {
  const int64_t N = dx.size(0), Cin = dx.size(1), H = dx.size(2), W = dx.size(3);
  const int64_t P = sh * sw;
  const Grad& gg = gp.gg;
  const std::vector<T> tws = plan_cache::permuted<T>(values.data_ptr<I>(), gp.perm);
  at::Tensor parts = scratch<T>(gp.part[P]);
  for (int64_t p = 0; p < P; ++p) {
    const Span& sp = gg.span[p];
    if (sp.ni == 0 || sp.nj == 0) continue;
    gather_grid<T>(dyb, gp.toffs, tws.data(), gp.blk[p], Cin, gp.tiles[p], vb, nullptr,
                   parts.data_ptr<T>() + gp.part[p], sp.ni * sp.nj * N);
  }
  // dX from the phases: phase (a, b) row i, column j is x's row (i0 + i)*sh + a - ph, column (j0 + j)*sw + b - pw.
  I* out = dx.data_ptr<I>();
  if (channels_last(dx)) {  // each (row, column) of a phase: one position of dX, all its channels and images
    const int64_t sN = dx.stride(0);
    at::parallel_for(0, P * H, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t p = r / H, i = r % H;
        const Span& sp = gg.span[p];
        if (i >= sp.ni || sp.nj == 0) continue;
        const int64_t a = p / sw, b = p % sw, cs = sp.ni * sp.nj * N;
        const T* src = parts.data_ptr<T>() + gp.part[p] + i * sp.nj * N;
        const int64_t h = (sp.i0 + i) * sh + a - ph;
        for (int64_t j = 0; j < sp.nj; ++j) {
          const int64_t w = (sp.j0 + j) * sw + b - pw;
          unpack_cl<I, T>(out + (h * W + w) * Cin, sN, src + j * N, cs, Cin, N, 0, 1);
        }
      }
    });
    return;
  }
  at::parallel_for(0, Cin, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t p = 0; p < P; ++p) {
        const Span& sp = gg.span[p];
        const int64_t a = p / sw, b = p % sw;
        const T* src = parts.data_ptr<T>() + gp.part[p] + c * sp.ni * sp.nj * N;
        if constexpr (std::is_same<I, float>::value && std::is_same<T, float>::value) {
          if (sw == 2) {  // both column phases of a row at once (a phase without columns is never read)
            if (b == 1 || sp.ni == 0) continue;
            const Span& s1 = gg.span[p + 1];
            const T* src1 = parts.data_ptr<T>() + gp.part[p + 1] + c * s1.ni * s1.nj * N;
            for (int64_t i = 0; i < sp.ni; ++i)
              unpack_row2_f32(out + c * H * W + ((sp.i0 + i) * sh + a - ph) * W, Cin * H * W, src + i * sp.nj * N,
                              sp.j0, src1 + i * s1.nj * N, s1.j0, N, W, pw);
            continue;
          }
        }
        if (sp.ni == 0 || sp.nj == 0) continue;
        if (sw == 1) {  // each phase row is a run of x's row
          I* d = out + c * H * W + ((sp.i0 * sh + a - ph) * W + sp.j0 - pw);
          for (int64_t i = 0; i < sp.ni; ++i)
            unpack_run<I, T>(d + i * sh * W, Cin * H * W, src + i * sp.nj * N, N, sp.nj);
          continue;
        }
        for (int64_t n = 0; n < N; ++n) {
          I* d = out + (n * Cin + c) * H * W + ((sp.i0 * sh + a - ph) * W + sp.j0 * sw + b - pw);
          for (int64_t i = 0; i < sp.ni; ++i)
            for (int64_t j = 0; j < sp.nj; ++j) d[i * sh * W + j * sw] = static_cast<I>(src[(i * sp.nj + j) * N + n]);
        }
      }
    }
  });
}

// dY packed bordered, (Cout, Hd, Wd, N), as the input gradient reads it.
template <class I, class T>
at::Tensor bordered_dy(const at::Tensor& dy, const Grad& gg, int64_t N) {
  at::Tensor dyb = scratch<T>(dy.size(1) * gg.Hd * gg.Wd * N);
  pack<I, T>(dy, gg.Bt, gg.Bl, 1, 1, gg.Hd, gg.Wd, dyb.data_ptr<T>());
  return dyb;
}

template <class I, class T = typename bf16::Acc<I>::type>
void backward_input_impl(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& row_ptr,
                         const at::Tensor& col_idx, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                         int64_t pw, int64_t dh, int64_t dw, at::Tensor& dx) {
  const int64_t N = dx.size(0), Cin = dx.size(1), H = dx.size(2), W = dx.size(3);
  int vb;
  const std::shared_ptr<const GradPlan> plan =
      grad_plan<T>(row_ptr, col_idx, N, Cin, H, W, kh, kw, sh, sw, ph, pw, dh, dw, vb);
  const at::Tensor dyb = bordered_dy<I, T>(dy, plan->gg, N);
  input_grad_from<I, T>(dyb.data_ptr<T>(), *plan, vb, values, sh, sw, ph, pw, dx);
}

// Whether `kept` is x packed into its phases as the forward packs it (what forward() hands back), for this geometry.
template <class T>
bool packed_x_fits(const at::Tensor& kept, int64_t Cin, int64_t sh, int64_t sw, const Source& sg) {
  return kept.defined() && kept.scalar_type() == c10::CppTypeToScalarType<T>::value && kept.dim() == 1 &&
         kept.numel() == Cin * sh * sw * sg.plane;
}

// gv += the weight gradient, x packed into its phases (`kept`, from the forward, else here), dY (C, OH, OW, N) packed
// at `d`, rows `drow` apart and planes `dplane` apart.
template <class I, class T>
void weight_grad_from(const at::Tensor& x, const at::Tensor& kept, const T* d, int64_t drow, int64_t dplane,
                      const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t Cout, int64_t OH, int64_t OW,
                      int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                      at::Tensor& gv) {
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const Source sg = source(N, H, W, sh, sw, ph, pw);
  const int vb = conv_tiles::vector_bytes(OW * N, sizeof(T));
  const std::shared_ptr<const TapPlan> plan = tap_plan<T>("sparse_conv2d_backward_weight", row_ptr, col_idx, N, Cin, H,
                                                          W, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw, vb);
  at::Tensor xp = kept;
  if (!packed_x_fits<T>(kept, Cin, sh, sw, sg)) {
    xp = scratch<T>(Cin * sh * sw * sg.plane);
    pack<I, T>(x, ph, pw, sh, sw, sg.Hq, sg.Wq, xp.data_ptr<T>());
  }
  // The plan's tiles read dY rows OW*N apart; a bordered dY takes its own (a few per output row).
  std::vector<Tile> own;
  if (drow != OW * N) own = grid_tiles(OH, OW * N, sg.Wq * N, drow, sizeof(T), vb);
  const std::vector<Tile>& tiles = drow != OW * N ? own : plan->tiles;
  T* g = gv.data_ptr<T>();
  at::parallel_for(0, Cout, 1, [&](int64_t r0, int64_t r1) {  // rows own their nonzeros: no reduction
    conv_tiles::wgrad(xp.data_ptr<T>(), plan->offs.data(), plan->blk, r0, r1, tiles, vb, d, dplane, g);
  });
}

template <class I, class T = typename bf16::Acc<I>::type>
void backward_weight_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                          int64_t pw, int64_t dh, int64_t dw, at::Tensor& gv) {
  const int64_t N = x.size(0), Cout = dy.size(1), OH = dy.size(2), OW = dy.size(3);
  at::Tensor dyc = scratch<T>(Cout * OH * OW * N);
  pack<I, T>(dy, 0, 0, 1, 1, OH, OW, dyc.data_ptr<T>());
  weight_grad_from<I, T>(x, at::Tensor(), dyc.data_ptr<T>(), OW * N, OH * OW * N, row_ptr, col_idx, Cout, OH, OW, kh,
                         kw, sh, sw, ph, pw, dh, dw, gv);
}

// Both gradients: dY packed once, bordered, for the input gradient's gathers, then read where it lies by the
// weight gradient (apart, each pass packed its own copy of dY).
template <class I, class T = typename bf16::Acc<I>::type>
void backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                   const at::Tensor& col_idx, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                   int64_t dh, int64_t dw, at::Tensor& dx, at::Tensor& gv, const at::Tensor& x_packed) {
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = dy.size(1), OH = dy.size(2), OW = dy.size(3);
  int vb;
  const std::shared_ptr<const GradPlan> plan =
      grad_plan<T>(row_ptr, col_idx, N, Cin, H, W, kh, kw, sh, sw, ph, pw, dh, dw, vb);
  const Grad& gg = plan->gg;
  // The weight gradient reads all of dY from this copy (a cropped row would be read past its plane).
  TORCH_INTERNAL_ASSERT(gg.Hd >= gg.Bt + OH && gg.Wd >= gg.Bl + OW, "bordered dY does not hold dY");
  const at::Tensor dyb = bordered_dy<I, T>(dy, gg, N);
  input_grad_from<I, T>(dyb.data_ptr<T>(), *plan, vb, values, sh, sw, ph, pw, dx);
  weight_grad_from<I, T>(x, x_packed, dyb.data_ptr<T>() + (gg.Bt * gg.Wd + gg.Bl) * N, gg.Wd * N, gg.Hd * gg.Wd * N,
                         row_ptr, col_idx, Cout, OH, OW, kh, kw, sh, sw, ph, pw, dh, dw, gv);
}

}  // namespace

bool applies(int64_t N, int64_t C_in, int64_t C_out, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh,
             int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  if (kh * kw == 1 || sh < 1 || sw < 1) return false;
  const int64_t OH = (H + 2 * ph - (kh - 1) * dh - 1) / sh + 1, OW = (W + 2 * pw - (kw - 1) * dw - 1) / sw + 1;
  if (OH < 1 || OW * N < 8) return false;
  const Grad gg = grad_geometry(H, W, kh, kw, sh, sw, ph, pw, dh, dw);
  for (const Span& sp : gg.span)  // the input gradient's runs, one per computed row of a phase
    if (sp.ni > 0 && sp.nj > 0 && sp.nj * N < 8) return false;
  const Source sg = source(N, H, W, sh, sw, ph, pw);
  const __int128 xsize = static_cast<__int128>(C_in) * sh * sw * sg.plane;
  const __int128 dsize = static_cast<__int128>(C_out) * gg.Hd * gg.Wd * N;
  return xsize < INT32_MAX && dsize < INT32_MAX;
}

void forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
             const at::Tensor& bias, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
             int64_t dw, at::Tensor& y, at::Tensor* x_packed) {
  if (x.scalar_type() == at::kBFloat16) {  // values and bias once in float32
    const at::Tensor v32 = values.to(at::kFloat).contiguous();
    const at::Tensor b32 = bias.defined() ? bias.to(at::kFloat).contiguous() : bias;
    forward_impl<c10::BFloat16>(x, v32.data_ptr<float>(), row_ptr, col_idx,
                                b32.defined() ? b32.data_ptr<float>() : nullptr, kh, kw, sh, sw, ph, pw, dh, dw, y,
                                x_packed);
  } else if (x.scalar_type() == at::kFloat) {
    const at::Tensor vc = values.contiguous();
    forward_impl<float>(x, vc.data_ptr<float>(), row_ptr, col_idx, bias.defined() ? bias.data_ptr<float>() : nullptr,
                        kh, kw, sh, sw, ph, pw, dh, dw, y, x_packed);
  } else {
    const at::Tensor vc = values.contiguous();
    forward_impl<double>(x, vc.data_ptr<double>(), row_ptr, col_idx, bias.defined() ? bias.data_ptr<double>() : nullptr,
                         kh, kw, sh, sw, ph, pw, dh, dw, y, x_packed);
  }
}

void backward_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                    int64_t dh, int64_t dw, at::Tensor& dx) {
  const at::Tensor vc = values.contiguous();
  if (dy.scalar_type() == at::kFloat)
    backward_input_impl<float>(dy, vc, row_ptr, col_idx, kh, kw, sh, sw, ph, pw, dh, dw, dx);
  else if (dy.scalar_type() == at::kBFloat16)
    backward_input_impl<c10::BFloat16>(dy, vc, row_ptr, col_idx, kh, kw, sh, sw, ph, pw, dh, dw, dx);
  else backward_input_impl<double>(dy, vc, row_ptr, col_idx, kh, kw, sh, sw, ph, pw, dh, dw, dx);
}

void backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                     at::Tensor& gv) {
  if (x.scalar_type() == at::kFloat)
    backward_weight_impl<float>(dy, x, row_ptr, col_idx, kh, kw, sh, sw, ph, pw, dh, dw, gv);
  else if (x.scalar_type() == at::kBFloat16)
    backward_weight_impl<c10::BFloat16>(dy, x, row_ptr, col_idx, kh, kw, sh, sw, ph, pw, dh, dw, gv);
  else backward_weight_impl<double>(dy, x, row_ptr, col_idx, kh, kw, sh, sw, ph, pw, dh, dw, gv);
}

void backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
              const at::Tensor& col_idx, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
              int64_t dh, int64_t dw, at::Tensor& dx, at::Tensor& gv, const at::Tensor& x_packed) {
  const at::Tensor vc = values.contiguous();
  if (x.scalar_type() == at::kFloat)
    backward_impl<float>(dy, x, vc, row_ptr, col_idx, kh, kw, sh, sw, ph, pw, dh, dw, dx, gv, x_packed);
  else if (x.scalar_type() == at::kBFloat16)
    backward_impl<c10::BFloat16>(dy, x, vc, row_ptr, col_idx, kh, kw, sh, sw, ph, pw, dh, dw, dx, gv, x_packed);
  else backward_impl<double>(dy, x, vc, row_ptr, col_idx, kh, kw, sh, sw, ph, pw, dh, dw, dx, gv, x_packed);
}

}  // namespace batched
}  // namespace sparsekern
