// Batch-innermost sparse_conv2d on the CPU, for stride-1 convs larger than 1x1.
//
// The direct kernel's tiles are rows of one image: at 7x7 a row fills 7 of 8 lanes, at 4x4 half of them,
// and its vectors sit at offsets read from a table. Laid out (C, H, W, N), a row of outputs of all N images
// is one run of OW*N elements, and the tap (r, s) of input channel c reads the run of the zero-bordered
// input shifted by c*plane + (r*dh*Wp + s*dw)*N, the same for every element: the flat tiles of
// conv_tiles.h apply, with every lane busy. The price is the layout change: x (and dY) are copied to
// (C, Hp, Wp, N) with their borders, and the results are computed (C, OH, OW, N) and copied back to NCHW.
//   forward      Y[co] = bias + sum over row co of W: w * Xp[c] shifted by the tap
//   grad input   dX[ci] = sum over column ci of W: w * dYp[co] shifted by the flipped tap, dYp bordered by
//                (kh-1)*dh - ph rows and (kw-1)*dw - pw columns: a stride-1 correlation
//   grad weight  g[j] = sum over the output rows' tiles of dY[co] . Xp[c] shifted by the tap
#include "cpu/conv_batched.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <vector>

#include "cpu/bf16.h"
#include "cpu/common.h"
#include "cpu/conv_tiles.h"

namespace sparsekern {
namespace batched {
namespace {

using conv_tiles::Tile;

int64_t num_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// A scratch buffer of n elements of T (uninitialised).
template <class T>
at::Tensor scratch(int64_t n) {
  return at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

// dst (C, Hp, Wp, N) = t (N, C, H, W) placed at row pt, column pl; zero around it. bf16 is widened.
template <class I, class T>
void pack(const at::Tensor& t, int64_t pt, int64_t pl, int64_t Hp, int64_t Wp, T* dst) {
  const I* tp = t.data_ptr<I>();
  const int64_t N = t.size(0), C = t.size(1), H = t.size(2), W = t.size(3);
  const int64_t sN = t.stride(0), sC = t.stride(1), sH = t.stride(2), sW = t.stride(3);
  const int64_t row = Wp * N, plane = Hp * row;
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* d = dst + c * plane;
      std::memset(d, 0, sizeof(T) * pt * row);
      std::memset(d + (pt + H) * row, 0, sizeof(T) * (Hp - pt - H) * row);
      for (int64_t h = 0; h < H; ++h) {
        T* drow = d + (h + pt) * row;
        std::memset(drow, 0, sizeof(T) * pl * N);
        std::memset(drow + (pl + W) * N, 0, sizeof(T) * (Wp - pl - W) * N);
        drow += pl * N;
        for (int64_t n = 0; n < N; ++n) {
          const I* s = tp + n * sN + c * sC + h * sH;
          for (int64_t w = 0; w < W; ++w) drow[w * N + n] = bf16::widen(s[w * sW]);
        }
      }
    }
  });
}

// out (N, C, H, W), contiguous, = src (C, H, W, N).
template <class I, class T>
void unpack(const T* src, at::Tensor& out) {
  I* op = out.data_ptr<I>();
  const int64_t N = out.size(0), C = out.size(1), P = out.size(2) * out.size(3);
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t n = 0; n < N; ++n) {
        const T* s = src + c * P * N + n;
        I* d = op + (n * C + c) * P;
        for (int64_t p = 0; p < P; ++p) d[p] = static_cast<I>(s[p * N]);
      }
    }
  });
}

// The tiles of a grid of `rows` runs of `run` elements: run i reads the source at i*src_row and writes
// the destination at i*out_row.
std::vector<Tile> grid_tiles(int64_t rows, int64_t run, int64_t src_row, int64_t out_row, int64_t elem) {
  const std::vector<Tile> one = conv_tiles::make_tiles(run, elem);
  std::vector<Tile> tiles;
  tiles.reserve(rows * one.size());
  for (int64_t i = 0; i < rows; ++i) {
    for (Tile t : one) {
      t.sbase += i * src_row;
      t.obase += i * out_row;
      tiles.push_back(t);
    }
  }
  return tiles;
}

// conv_tiles::gather over every tile and rows [0, R), threads over tiles (which share no output) when
// there are enough of them, else over rows.
template <class T>
void gather_grid(const T* src, const std::vector<int32_t>& offs, const T* ws, const conv_tiles::Blocks& blk, int64_t R,
                 const std::vector<Tile>& tiles, const T* bias, T* out, int64_t ostride) {
  const int64_t nt = static_cast<int64_t>(tiles.size()), nth = num_threads();
  if (nt >= 2 * nth || R < 2 * nth) {
    at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      const std::vector<Tile> part(tiles.begin() + t0, tiles.begin() + t1);
      conv_tiles::gather(src, offs.data(), ws, blk, 0, R, part, bias, out, ostride);
    });
    return;
  }
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    conv_tiles::gather(src, offs.data(), ws, blk, r0, r1, tiles, bias, out, ostride);
  });
}

[[noreturn]] void bad_col(const char* op, int64_t j, int64_t col, int64_t Cin, int64_t kh, int64_t kw) {
  const int64_t K = kh * kw;
  TORCH_CHECK(false, op, ": col_idx[", j, "] = ", col, " is out of range: the input has ", Cin,
              " channels, so W must have Cin*kh*kw = ", Cin, "*", kh, "*", kw, " = ", Cin * K, " columns (col_idx ",
              col, " is input channel ", col / K, ")");
}

// Per weight column (c, r, s): its input channel and its tap's offset in a packed source whose rows are
// Wrow*N apart (flip: the input gradient's flipped taps). A table over the Cin*kh*kw columns makes the
// per-nonzero work a lookup: the divisions cost as much as the forward's multiply-adds at 4x4 planes.
struct Columns { std::vector<int32_t> chan, tap; };
Columns columns(int64_t Cin, int64_t kh, int64_t kw, int64_t dh, int64_t dw, int64_t Wrow, int64_t N, bool flip) {
  Columns t;
  t.chan.resize(Cin * kh * kw);
  t.tap.resize(Cin * kh * kw);
  for (int64_t c = 0, col = 0; c < Cin; ++c) {
    for (int64_t r = 0; r < kh; ++r) {
      for (int64_t s = 0; s < kw; ++s, ++col) {
        const int64_t rr = flip ? kh - 1 - r : r, ss = flip ? kw - 1 - s : s;
        t.chan[col] = static_cast<int32_t>(c);
        t.tap[col] = static_cast<int32_t>((rr * dh * Wrow + ss * dw) * N);
      }
    }
  }
  return t;
}

// What one plane adds to a tile's window: kernel-height rows of a tile's run plus the kernel's reach.
template <class T>
int64_t window_bytes(int64_t kh, int64_t kw, int64_t dh, int64_t dw, int64_t N) {
  return ((kh - 1) * dh + 1) * (conv_tiles::NMAX * (32 / int64_t(sizeof(T))) + (kw - 1) * dw * N) * int64_t(sizeof(T));
}

// Packed-input offset and input channel of every nonzero (forward and grad weight); checks col_idx.
std::vector<int32_t> tap_offsets(const char* op, const at::Tensor& col_idx, int64_t Cin, int64_t kh, int64_t kw,
                                 int64_t dh, int64_t dw, int64_t Wp, int64_t N, int64_t plane,
                                 std::vector<int32_t>& plane_of) {
  const int64_t nnz = col_idx.numel(), ncols = Cin * kh * kw;
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const Columns t = columns(Cin, kh, kw, dh, dw, Wp, N, false);
  std::vector<int32_t> offs(nnz);
  plane_of.resize(nnz);
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t col = ci[j];
    if (__builtin_expect(col < 0 || col >= ncols, 0)) bad_col(op, j, col, Cin, kh, kw);
    plane_of[j] = t.chan[col];
    offs[j] = static_cast<int32_t>(t.chan[col] * plane + t.tap[col]);
  }
  return offs;
}

template <class I, class T = typename bf16::Acc<I>::type>
void forward_impl(const at::Tensor& x, const T* ws, const at::Tensor& row_ptr, const at::Tensor& col_idx, const T* bias,
                  int64_t kh, int64_t kw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, at::Tensor& y) {
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = y.size(1), OH = y.size(2), OW = y.size(3);
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, plane = Hp * Wp * N;
  std::vector<int32_t> plane_of;
  const std::vector<int32_t> offs = tap_offsets("sparse_conv2d", col_idx, Cin, kh, kw, dh, dw, Wp, N, plane, plane_of);
  const conv_tiles::Blocks blk = conv_tiles::make_blocks(Cout, row_ptr.data_ptr<int64_t>(), plane_of.data(), Cin,
                                                         window_bytes<T>(kh, kw, dh, dw, N));
  at::Tensor xp = scratch<T>(Cin * plane), yb = scratch<T>(Cout * OH * OW * N);
  pack<I, T>(x, ph, pw, Hp, Wp, xp.data_ptr<T>());
  gather_grid<T>(xp.data_ptr<T>(), offs, ws, blk, Cout, grid_tiles(OH, OW * N, Wp * N, OW * N, sizeof(T)), bias,
                 yb.data_ptr<T>(), OH * OW * N);
  unpack<I, T>(yb.data_ptr<T>(), y);
}

template <class I, class T = typename bf16::Acc<I>::type>
void backward_input_impl(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& row_ptr,
                         const at::Tensor& col_idx, int64_t kh, int64_t kw, int64_t ph, int64_t pw, int64_t dh,
                         int64_t dw, at::Tensor& dx) {
  const int64_t N = dx.size(0), Cin = dx.size(1), H = dx.size(2), W = dx.size(3), Cout = dy.size(1);
  const int64_t K = kh * kw, nnz = col_idx.numel();
  const int64_t PT = (kh - 1) * dh - ph, PL = (kw - 1) * dw - pw;
  const int64_t Hd = H + (kh - 1) * dh, Wd = W + (kw - 1) * dw, plane = Hd * Wd * N;
  // W^T as CSR: rows Cin, entries (flipped tap offset into dYp, value).
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const I* vals = values.data_ptr<I>();
  const Columns t = columns(Cin, kh, kw, dh, dw, Wd, N, true);
  std::vector<int64_t> trp(Cin + 1, 0);
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t col = ci[j];
    if (__builtin_expect(col < 0 || col >= Cin * K, 0)) bad_col("sparse_conv2d_backward_input", j, col, Cin, kh, kw);
    ++trp[t.chan[col] + 1];
  }
  for (int64_t c = 0; c < Cin; ++c) trp[c + 1] += trp[c];
  std::vector<int32_t> toffs(nnz), tplane(nnz);
  std::vector<T> tws(nnz);
  {
    std::vector<int64_t> fill(trp.begin(), trp.end() - 1);
    for (int64_t co = 0; co < Cout; ++co) {
      for (int64_t j = rp[co]; j < rp[co + 1]; ++j) {
        const int64_t col = ci[j];
        const int64_t p = fill[t.chan[col]]++;
        toffs[p] = static_cast<int32_t>(co * plane + t.tap[col]);
        tws[p] = bf16::widen(vals[j]);
        tplane[p] = static_cast<int32_t>(co);
      }
    }
  }
  const conv_tiles::Blocks blk =
      conv_tiles::make_blocks(Cin, trp.data(), tplane.data(), Cout, window_bytes<T>(kh, kw, dh, dw, N));
  at::Tensor dyp = scratch<T>(Cout * plane), dxb = scratch<T>(Cin * H * W * N);
  pack<I, T>(dy, PT, PL, Hd, Wd, dyp.data_ptr<T>());
  gather_grid<T>(dyp.data_ptr<T>(), toffs, tws.data(), blk, Cin, grid_tiles(H, W * N, Wd * N, W * N, sizeof(T)),
                 nullptr, dxb.data_ptr<T>(), H * W * N);
  unpack<I, T>(dxb.data_ptr<T>(), dx);
}

template <class I, class T = typename bf16::Acc<I>::type>
void backward_weight_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, int64_t kh, int64_t kw, int64_t ph, int64_t pw, int64_t dh,
                          int64_t dw, at::Tensor& gv) {
  const int64_t N = x.size(0), Cin = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = dy.size(1), OH = dy.size(2), OW = dy.size(3);
  const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, plane = Hp * Wp * N;
  std::vector<int32_t> plane_of;
  const std::vector<int32_t> offs =
      tap_offsets("sparse_conv2d_backward_weight", col_idx, Cin, kh, kw, dh, dw, Wp, N, plane, plane_of);
  at::Tensor xp = scratch<T>(Cin * plane), dyc = scratch<T>(Cout * OH * OW * N);
  pack<I, T>(x, ph, pw, Hp, Wp, xp.data_ptr<T>());
  pack<I, T>(dy, 0, 0, OH, OW, dyc.data_ptr<T>());
  const std::vector<Tile> tiles = grid_tiles(OH, OW * N, Wp * N, OW * N, sizeof(T));
  const conv_tiles::Blocks blk = conv_tiles::make_blocks(Cout, row_ptr.data_ptr<int64_t>(), plane_of.data(), Cin,
                                                         window_bytes<T>(kh, kw, dh, dw, N));
  T* g = gv.data_ptr<T>();
  at::parallel_for(0, Cout, 1, [&](int64_t r0, int64_t r1) {  // rows own their nonzeros: no reduction
    conv_tiles::wgrad(xp.data_ptr<T>(), offs.data(), blk, r0, r1, tiles, dyc.data_ptr<T>(), OH * OW * N, g);
  });
}

}  // namespace

bool applies(int64_t N, int64_t C_in, int64_t C_out, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh,
             int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw) {
  if (sh != 1 || sw != 1 || kh * kw == 1 || ph > (kh - 1) * dh || pw > (kw - 1) * dw) return false;
  const int64_t OW = W + 2 * pw - (kw - 1) * dw;
  if (OW * N < 8) return false;
  const __int128 xplane = static_cast<__int128>(H + 2 * ph) * (W + 2 * pw) * N;
  const __int128 dplane = static_cast<__int128>(H + (kh - 1) * dh) * (W + (kw - 1) * dw) * N;
  return C_in * xplane < INT32_MAX && C_out * dplane < INT32_MAX;
}

void forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
             const at::Tensor& bias, int64_t kh, int64_t kw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
             at::Tensor& y) {
  if (x.scalar_type() == at::kBFloat16) {  // values and bias once in float32
    const at::Tensor v32 = values.to(at::kFloat).contiguous();
    const at::Tensor b32 = bias.defined() ? bias.to(at::kFloat).contiguous() : bias;
    forward_impl<c10::BFloat16>(x, v32.data_ptr<float>(), row_ptr, col_idx,
                                b32.defined() ? b32.data_ptr<float>() : nullptr, kh, kw, ph, pw, dh, dw, y);
  } else if (x.scalar_type() == at::kFloat) {
    const at::Tensor vc = values.contiguous();
    forward_impl<float>(x, vc.data_ptr<float>(), row_ptr, col_idx, bias.defined() ? bias.data_ptr<float>() : nullptr,
                        kh, kw, ph, pw, dh, dw, y);
  } else {
    const at::Tensor vc = values.contiguous();
    forward_impl<double>(x, vc.data_ptr<double>(), row_ptr, col_idx, bias.defined() ? bias.data_ptr<double>() : nullptr,
                         kh, kw, ph, pw, dh, dw, y);
  }
}

void backward_input(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& row_ptr,
                    const at::Tensor& col_idx, int64_t kh, int64_t kw, int64_t ph, int64_t pw, int64_t dh, int64_t dw,
                    at::Tensor& dx) {
  const at::Tensor vc = values.contiguous();
  if (dy.scalar_type() == at::kFloat) backward_input_impl<float>(dy, vc, row_ptr, col_idx, kh, kw, ph, pw, dh, dw, dx);
  else if (dy.scalar_type() == at::kBFloat16)
    backward_input_impl<c10::BFloat16>(dy, vc, row_ptr, col_idx, kh, kw, ph, pw, dh, dw, dx);
  else backward_input_impl<double>(dy, vc, row_ptr, col_idx, kh, kw, ph, pw, dh, dw, dx);
}

void backward_weight(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                     int64_t kh, int64_t kw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, at::Tensor& gv) {
  if (x.scalar_type() == at::kFloat) backward_weight_impl<float>(dy, x, row_ptr, col_idx, kh, kw, ph, pw, dh, dw, gv);
  else if (x.scalar_type() == at::kBFloat16)
    backward_weight_impl<c10::BFloat16>(dy, x, row_ptr, col_idx, kh, kw, ph, pw, dh, dw, gv);
  else backward_weight_impl<double>(dy, x, row_ptr, col_idx, kh, kw, ph, pw, dh, dw, gv);
}

}  // namespace batched
}  // namespace sparsekern
