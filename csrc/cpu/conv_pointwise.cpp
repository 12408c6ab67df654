// Pointwise sparse_conv2d on the CPU: a 1x1 conv without padding is, per image, the CSR GEMM
// Y (Cout, P) = W X (Cin, P) over its P = OH*OW output pixels, so its tiles (conv_tiles.h) run along the
// whole plane, flat, instead of along one output row as the direct kernel's do (a 14x14 row fills 14 of 16
// lanes, a 4x4 one 4 of 8). Measured on Zen 4: 2-3x the direct kernel on ResNet-50's 1x1 layers.
//
// How a batch is read and written:
//  flat    P >= one vector and one image at a time: the tiles cover the plane, and a plane whose size is not
//          a whole number of vectors ends in a vector that overlaps the one before it (it computes the same
//          sums in the same order, so its stores rewrite equal values; the weight gradient masks the
//          overlapped lanes of dY). float32/64 planes that are contiguous are read (and outputs written)
//          in place; anything else (a stride, bfloat16, other layouts) goes through a packed copy.
//  grouped small planes (P < a tile of vectors, e.g. 7x7, 4x4, 2x2): G images' planes are copied side by side
//          into a (C, L) buffer, L a whole number of vectors with zero pad lanes, so that the tiles stay
//          full; the result goes to a buffer of the same layout and is copied out.
#pragma GCC optimize("fp-contract=fast")  // a*b+c -> FMA in the clones (ISO C++ mode defaults to off)

#include "cpu/conv_pointwise.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/bf16.h"
#include "cpu/common.h"
#include "cpu/conv_tiles.h"
#include "cpu/csr_engine.h"
#include "cpu/plan_cache.h"

namespace sparsekern {
namespace pointwise {
namespace {

using conv_tiles::Tile;

// ---------------------------------------------------------------------------
// Batch layout.

int64_t num_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Columns of a packed row of G images' planes of P pixels: whole vw-element vectors.
int64_t row_length(int64_t G, int64_t P, int64_t vw, int64_t elem_size) {
  int64_t L = (G * P + vw - 1) / vw * vw;
  if (L * elem_size % 4096 == 0) L += vw;  // rows 4 KB apart would share L1 sets
  return L;
}

// Images per group for planes smaller than a tile (P < full = NMAX vectors): the G in [1, 2 * G0] (G0, the fewest
// images that fill a tile) whose groups cost the busiest thread least. A group costs every nonzero its row's vectors
// plus 1.5 per tile (the entry's offset, value and loop); groups split over the threads, or, fewer groups than
// threads, each group's rows, at 1.25 times the cost (its pack runs on one thread and the one-pass backward does not
// apply). Ties: fewer images. G0 alone (the earlier rule) packed three 7x7 planes into 160 columns, two tiles of 5
// vectors, in 6 groups; G = 4, 208 columns in 4 groups: ResNet-50's 7x7 1x1 convs at batch 16, density 0.24, fwd +
// both gradients 2.14 -> 1.86 ms (256 -> 1024) and 2.25 -> 1.99 ms (1024 -> 256); at batch 8 (G = 3 -> 4) 1024 -> 2048
// stride 2 4.98 -> 3.66 ms (AMD Zen 5, AVX-512, 2 threads; BENCHMARKS.md).
int64_t images_per_group(int64_t N, int64_t P, int64_t vw, int64_t elem_size, int64_t nth) {
  const int64_t full = conv_tiles::NMAX * vw;
  const int64_t g0 = std::max<int64_t>(1, std::min<int64_t>(N, (full + P - 1) / P));
  int64_t best = g0;
  double best_cost = INFINITY;
  for (int64_t G = 1; G <= std::min(N, 2 * g0); ++G) {
    const int64_t nvec = G == 1 && P >= vw ? (P + vw - 1) / vw : row_length(G, P, vw, elem_size) / vw;
    const double per_group = double(nvec) + 1.5 * double((nvec + conv_tiles::NMAX - 1) / conv_tiles::NMAX);
    const int64_t groups = (N + G - 1) / G;
    const double cost =
        groups >= nth ? double((groups + nth - 1) / nth) * per_group : 1.25 * double(groups) * per_group / double(nth);
    if (cost < best_cost - 1e-9) best = G, best_cost = cost;
  }
  return best;
}

// How the images of one call are read: one at a time (flat tiles over the P pixels) or G at a time,
// side by side in a packed row of L columns.
// Tiles and rows are cut for vb-byte vectors (conv_tiles::vector_bytes: 64 on AVX-512 hosts for planes or
// groups of at least one such vector).
template <class T>
struct Layout {
  int64_t N, P, G, L, groups;
  int vb;
  bool flat;
  std::vector<Tile> tiles;
  Layout(int64_t N_, int64_t P_, int vb_) : N(N_), P(P_), vb(vb_) {
    const int64_t vw = vb / int64_t(sizeof(T));
    G = P >= conv_tiles::NMAX * vw ? 1 : images_per_group(N, P, vw, sizeof(T), num_threads());
    flat = G == 1 && P >= vw;
    L = row_length(G, P, vw, sizeof(T));
    groups = (N + G - 1) / G;
    tiles = conv_tiles::make_tiles(flat ? P : L, sizeof(T), vb);
  }
  int64_t images(int64_t grp) const { return std::min(G, N - grp * G); }
};

// The packed (C, L) buffers are addressed with int32 offsets.
void check_extent(const char* op, int64_t C, int64_t L) {
  TORCH_CHECK(static_cast<__int128>(C) * L < INT32_MAX, op, ": one image is too large for this kernel (", C,
              " channels of ", L, " pixels)");
}

// Whether t's planes (and images) start on vb-byte boundaries. Where they do not (14x14 planes, 784 bytes apart),
// three of four vector loads in the tile loops straddle two cache lines, and a source is read once per nonzero: such
// sources (x, and dY for the input gradient) go through the packed (C, L) copy, whose rows are whole vectors, while
// outputs, stored once per row and tile, are still written in place (packing them too cost more than it saved at
// density 0.1). ResNet-50's 1x1 convs at 14x14, batch 16, fwd+bwd against the dense twin: 128 -> 512 at density
// 0.48 1.00-1.03x -> 1.25-1.27x, 512 -> 128 0.96-0.99x -> 1.13-1.14x; at 0.1 2.93x -> 3.2x and 1.40 -> 1.31 ms
// (AMD Zen 5, AVX-512, 2 threads).
template <class I>
bool planes_aligned(const at::Tensor& t, int vb) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % vb == 0 && (t.stride(1) * int64_t(sizeof(I))) % vb == 0 &&
         (t.stride(0) * int64_t(sizeof(I))) % vb == 0;
}

// A (C, OH, OW) grid of 4-D tensor t (element type I) at stride (sh, sw) as a plane of P contiguous
// elements, read in place: contiguous, vb-aligned planes of the compute type, stride 1.
template <class I, class T>
bool in_place(const at::Tensor& t, int64_t sh, int64_t sw, int vb) {
  return std::is_same<I, T>::value && sh == 1 && sw == 1 && t.stride(3) == 1 && t.stride(2) == t.size(3) &&
         static_cast<__int128>(t.size(1)) * t.stride(1) < INT32_MAX && planes_aligned<I>(t, vb);
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
      if (std::is_same<I, T>::value && sh == 1 && sw == 1 && sW == 1 && sH == OW) {  // a whole plane
        std::memcpy(d, s, sizeof(T) * P);
        continue;
      }
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

// out[b0 + g, r, oh*sh, ow*sw] = buf[r*L + g*P + p] for the group's images and rows r0..r1 of R (out contiguous,
// planes H x W). With a stride, the pixels between get zero (a strided conv's input gradient), row by row in the
// same pass: a separate zero fill of the whole gradient first cost another write of it (0.4-2 ms a step at
// ResNet-50's two stride-2 1x1 layers on this kernel).
template <class I, class T>
void unpack(const T* buf, int64_t b0, int64_t nimg, int64_t R, int64_t r0, int64_t r1, int64_t OH, int64_t OW,
            int64_t sh, int64_t sw, int64_t L, at::Tensor& out) {
  I* op = out.data_ptr<I>();
  const int64_t H = out.size(2), W = out.size(3), P = OH * OW;
  for (int64_t g = 0; g < nimg; ++g) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* s = buf + r * L + g * P;
      I* d = op + ((b0 + g) * R + r) * H * W;
      if (sh == 1 && sw == 1) {
        if constexpr (std::is_same<I, T>::value) std::memcpy(d, s, sizeof(T) * P);
        else
          for (int64_t p = 0; p < P; ++p) d[p] = static_cast<I>(s[p]);
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        I* dr = d + h * W;
        std::fill(dr, dr + W, I(0));
        const int64_t oh = h / sh;
        if (h % sh != 0 || oh >= OH) continue;
        for (int64_t ow = 0; ow < OW; ++ow) dr[ow * sw] = static_cast<I>(s[oh * OW + ow]);
      }
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

// The forward's and weight gradient's plan (cached, plan_cache.h): each nonzero's input channel and the
// rows' blocks of them (sized for tiles of vb-byte vectors).
struct RowsPlan {
  std::vector<int32_t> rows;
  conv_tiles::Blocks blk;
  size_t bytes() const { return plan_cache::vec_bytes(rows) + plan_cache::vec_bytes(blk.bp); }
};

std::shared_ptr<const RowsPlan> rows_plan(const char* op, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                          int64_t Cin, int vb) {
  return plan_cache::get<RowsPlan>(row_ptr, col_idx, {plan_cache::kPointwiseRows, Cin, vb}, [&] {
    RowsPlan p;
    p.rows = row_offsets(op, col_idx, Cin, 1);
    p.blk = conv_tiles::make_blocks(row_ptr.numel() - 1, row_ptr.data_ptr<int64_t>(), p.rows.data(), Cin,
                                    conv_tiles::NMAX * vb);
    return p;
  });
}

// The input gradient's plan (cached): W^T as CSR, rows Cin, entries (co, index of the value in W's lists),
// co ascending, and its rows' blocks of output channels.
struct GradPlan {
  std::vector<int64_t> trp, perm;
  std::vector<int32_t> trows;
  conv_tiles::Blocks blk;
  size_t bytes() const {
    return plan_cache::vec_bytes(trp) + plan_cache::vec_bytes(perm) + plan_cache::vec_bytes(trows) +
           plan_cache::vec_bytes(blk.bp);
  }
};

GradPlan build_grad_plan(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t Cin, int vb) {
  const int64_t Cout = row_ptr.numel() - 1, nnz = col_idx.numel();
  const std::vector<int32_t> cols = row_offsets("sparse_conv2d_backward_input", col_idx, Cin, 1);
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  GradPlan g;
  g.trp.assign(Cin + 1, 0);
  for (int64_t j = 0; j < nnz; ++j) ++g.trp[cols[j] + 1];
  for (int64_t c = 0; c < Cin; ++c) g.trp[c + 1] += g.trp[c];
  g.trows.resize(nnz);
  g.perm.resize(nnz);
  std::vector<int64_t> fill(g.trp.begin(), g.trp.end() - 1);
  for (int64_t co = 0; co < Cout; ++co) {
    for (int64_t j = rp[co]; j < rp[co + 1]; ++j) {
      const int64_t p = fill[cols[j]]++;
      g.trows[p] = static_cast<int32_t>(co);
      g.perm[p] = j;
    }
  }
  g.blk = conv_tiles::make_blocks(Cin, g.trp.data(), g.trows.data(), Cout, conv_tiles::NMAX * vb);
  return g;
}

// offs[j] = rows[j] * stride.
std::vector<int32_t> scaled(const std::vector<int32_t>& rows, int64_t stride) {
  const int64_t nnz = static_cast<int64_t>(rows.size());
  std::vector<int32_t> offs(nnz);
  at::parallel_for(0, nnz, 1 << 15, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) offs[j] = static_cast<int32_t>(rows[j] * stride);
  });
  return offs;
}

// Rows of one thread's share when the batch has fewer groups than threads: about 16K multiply-adds each.
int64_t row_grain(int64_t R, int64_t nnz, int64_t cols) {
  return std::max<int64_t>(1, R * 16384 / std::max<int64_t>(1, nnz * cols));
}

// out (R rows of planes) = CSR (R rows, entries src_rows/ws over the source's rows, blocked by blk) x src, for
// every image: src is `in` read at stride (sh, sw) (Cs rows), out is written at stride (osh, osw) of its planes.
template <class I, class T>
void gather_batch(const at::Tensor& in, int64_t sh, int64_t sw, const conv_tiles::Blocks& blk,
                  const std::vector<int32_t>& src_rows, const T* ws, const T* bias, int64_t OH, int64_t OW, int64_t osh,
                  int64_t osw, int vb, at::Tensor& out) {
  const int64_t N = in.size(0), Cs = in.size(1), R = out.size(1), P = OH * OW;
  const Layout<T> lay(N, P, vb);
  const int64_t nnz = static_cast<int64_t>(src_rows.size());
  const bool src_direct = lay.flat && in_place<I, T>(in, sh, sw, vb);
  const bool dst_direct = lay.flat && std::is_same<I, T>::value && osh == 1 && osw == 1;
  check_extent("sparse_conv2d", Cs, lay.L);
  const std::vector<int32_t> offs = scaled(src_rows, src_direct ? in.stride(1) : lay.L);
  const int64_t o_stride = dst_direct ? P : lay.L;
  const I* ip = in.data_ptr<I>();
  I* op = out.data_ptr<I>();
  const int64_t out_img = R * out.size(2) * out.size(3);
  auto source = [&](int64_t grp, ThreadScratch<T, kScratchPack>& buf) -> const T* {
    if (src_direct) return reinterpret_cast<const T*>(ip + grp * in.stride(0));
    buf.resize(Cs * lay.L);
    pack<I, T>(in, grp * lay.G, lay.images(grp), OH, OW, sh, sw, lay.L, buf.data());
    return buf.data();
  };
  auto dest = [&](int64_t grp, ThreadScratch<T, kScratchOut>& buf) -> T* {
    if (dst_direct) return reinterpret_cast<T*>(op + grp * out_img);
    buf.resize(R * lay.L);
    return buf.data();
  };
  auto finish = [&](int64_t grp, const ThreadScratch<T, kScratchOut>& buf, int64_t r0, int64_t r1) {
    if (!dst_direct) unpack<I, T>(buf.data(), grp * lay.G, lay.images(grp), R, r0, r1, OH, OW, osh, osw, lay.L, out);
  };
  const int64_t nth = num_threads();
  if (lay.groups >= nth) {
    at::parallel_for(0, lay.groups, 1, [&](int64_t g0, int64_t g1) {
      ThreadScratch<T, kScratchPack> sbuf;
      ThreadScratch<T, kScratchOut> obuf;
      for (int64_t grp = g0; grp < g1; ++grp) {
        const T* s = source(grp, sbuf);
        conv_tiles::gather(s, offs.data(), ws, blk, 0, R, lay.tiles, vb, bias, dest(grp, obuf), o_stride);
        finish(grp, obuf, 0, R);
      }
    });
    return;
  }
  ThreadScratch<T, kScratchPack> sbuf;
  ThreadScratch<T, kScratchOut> obuf;
  const int64_t grain = row_grain(R, nnz, lay.flat ? P : lay.L);
  for (int64_t grp = 0; grp < lay.groups; ++grp) {
    const T* s = source(grp, sbuf);
    T* d = dest(grp, obuf);
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
      conv_tiles::gather(s, offs.data(), ws, blk, r0, r1, lay.tiles, vb, bias, d, o_stride);
      finish(grp, obuf, r0, r1);  // after its own rows only: no barrier needed
    });
  }
}

template <class I, class T = typename bf16::Acc<I>::type>
void forward_impl(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                  const T* bias, int64_t sh, int64_t sw, at::Tensor& y) {
  const int vb = conv_tiles::vector_bytes(x.size(0) * y.size(2) * y.size(3), sizeof(T));
  const std::shared_ptr<const RowsPlan> plan = rows_plan("sparse_conv2d", row_ptr, col_idx, x.size(1), vb);
  gather_batch<I, T>(x, sh, sw, plan->blk, plan->rows, values.data_ptr<T>(), bias, y.size(2), y.size(3), 1, 1, vb, y);
}

template <class I, class T = typename bf16::Acc<I>::type>
void backward_input_impl(const at::Tensor& dy, const at::Tensor& values, const at::Tensor& row_ptr,
                         const at::Tensor& col_idx, int64_t sh, int64_t sw, at::Tensor& dx) {
  const int64_t Cin = dx.size(1);
  const int vb = conv_tiles::vector_bytes(dy.size(0) * dy.size(2) * dy.size(3), sizeof(T));
  const std::shared_ptr<const GradPlan> plan =
      plan_cache::get<GradPlan>(row_ptr, col_idx, {plan_cache::kPointwiseGrad, Cin, vb},
                                [&] { return build_grad_plan(row_ptr, col_idx, Cin, vb); });
  const std::vector<T> tws = plan_cache::permuted<T>(values.data_ptr<I>(), plan->perm);
  gather_batch<I, T>(dy, 1, 1, plan->blk, plan->trows, tws.data(), nullptr, dy.size(2), dy.size(3), sh, sw, vb, dx);
}

template <class I, class T = typename bf16::Acc<I>::type>
void backward_weight_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, int64_t sh, int64_t sw, at::Tensor& gv) {
  const int64_t N = x.size(0), Cin = x.size(1), Cout = dy.size(1), OH = dy.size(2), OW = dy.size(3);
  const int64_t P = OH * OW, nnz = col_idx.numel();
  const int vb = conv_tiles::vector_bytes(N * P, sizeof(T));
  const std::shared_ptr<const RowsPlan> plan = rows_plan("sparse_conv2d_backward_weight", row_ptr, col_idx, Cin, vb);
  const Layout<T> lay(N, P, vb);
  const bool x_direct = lay.flat && in_place<I, T>(x, sh, sw, vb);
  const bool dy_direct = lay.flat && in_place<I, T>(dy, 1, 1, vb);
  check_extent("sparse_conv2d_backward_weight", Cin, lay.L);
  const std::vector<int32_t> offs = scaled(plan->rows, x_direct ? x.stride(1) : lay.L);
  const int64_t d_stride = dy_direct ? dy.stride(1) : lay.L;
  const conv_tiles::Blocks& blk = plan->blk;
  const I* xp = x.data_ptr<I>();
  const I* dp = dy.data_ptr<I>();
  auto sources = [&](int64_t grp, ThreadScratch<T, kScratchPack>& xb, ThreadScratch<T, kScratchDy>& db, const T*& xs,
                     const T*& ds) {
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
      ThreadScratch<T, kScratchPack> xb;
      ThreadScratch<T, kScratchDy> db;
      for (int64_t grp = g0; grp < g1; ++grp) {
        const T *xs, *ds;
        sources(grp, xb, db, xs, ds);
        conv_tiles::wgrad(xs, offs.data(), blk, 0, Cout, lay.tiles, vb, ds, d_stride, acc);
      }
    });
    conv_tiles::sum_thread_parts(parts.data(), nth, nnz, gp);
    return;
  }
  ThreadScratch<T, kScratchPack> xb;
  ThreadScratch<T, kScratchDy> db;
  const int64_t grain = row_grain(Cout, nnz, lay.flat ? P : lay.L);
  for (int64_t grp = 0; grp < lay.groups; ++grp) {
    const T *xs, *ds;
    sources(grp, xb, db, xs, ds);
    at::parallel_for(0, Cout, grain, [&](int64_t r0, int64_t r1) {
      conv_tiles::wgrad(xs, offs.data(), blk, r0, r1, lay.tiles, vb, ds, d_stride, gp);
    });
  }
}

// Bytes of dY, x and dx a run of tiles of the one-pass backward covers: half a 2 MB L2. ResNet-50 224x224 batch 8
// (56x56 planes), interleaved steps: one pass in runs of 1 MB 2.08x dense, of 512 KB 2.07x, over whole planes 2.05x,
// the two passes apart 2.04x; at 112x112 (28x28 planes) runs and whole planes alike (2.19x against 2.15x apart).
constexpr int64_t L2_CHUNK_BYTES = int64_t(1) << 20;

// Both gradients in one pass over the image groups, where both passes would run per group (groups >= threads): each
// group's dY is read (or packed) once, the input gradient's gather runs over it, then the weight gradient's, while
// it is still in L2. Apart, the two passes each read the whole dY from memory (ResNet-50's layer1 1x1 convs at
// batch 16: 12.8 MB). gv: zeros, the compute type. Returns false, writing nothing, elsewhere.
template <class I, class T = typename bf16::Acc<I>::type>
bool backward_impl(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                   const at::Tensor& col_idx, int64_t sh, int64_t sw, at::Tensor& dx, at::Tensor& gv) {
  const int64_t N = x.size(0), Cin = x.size(1), Cout = dy.size(1), OH = dy.size(2), OW = dy.size(3);
  const int64_t P = OH * OW, nnz = col_idx.numel();
  const int vb = conv_tiles::vector_bytes(N * P, sizeof(T));
  const Layout<T> lay(N, P, vb);
  const int64_t nth = num_threads();
  if (nnz == 0 || N == 0 || P == 0 || lay.groups < nth) return false;
  check_extent("sparse_conv2d_backward", std::max(Cin, Cout), lay.L);
  const std::shared_ptr<const GradPlan> gplan =
      plan_cache::get<GradPlan>(row_ptr, col_idx, {plan_cache::kPointwiseGrad, Cin, vb},
                                [&] { return build_grad_plan(row_ptr, col_idx, Cin, vb); });
  const std::shared_ptr<const RowsPlan> wplan = rows_plan("sparse_conv2d_backward_weight", row_ptr, col_idx, Cin, vb);
  const std::vector<T> tws = plan_cache::permuted<T>(values.data_ptr<I>(), gplan->perm);
  const bool dy_direct = lay.flat && in_place<I, T>(dy, 1, 1, vb);
  const bool x_direct = lay.flat && in_place<I, T>(x, sh, sw, vb);
  const bool dx_direct = lay.flat && std::is_same<I, T>::value && sh == 1 && sw == 1;
  const int64_t d_stride = dy_direct ? dy.stride(1) : lay.L;
  const std::vector<int32_t> in_offs = scaled(gplan->trows, d_stride);
  const std::vector<int32_t> w_offs = scaled(wplan->rows, x_direct ? x.stride(1) : lay.L);
  const I *dp = dy.data_ptr<I>(), *xp = x.data_ptr<I>();
  I* dxp = dx.data_ptr<I>();
  const int64_t dx_img = Cin * dx.size(2) * dx.size(3);
  // The tiles in runs of about L2_CHUNK_BYTES of dY, x and dx together: each run's input gradient and then its
  // weight gradient, so that a plane too large for L2 (56x56 at 256 channels: 3.2 MB of dY) is still read once.
  std::vector<std::vector<conv_tiles::Tile>> chunks(1);
  {
    const int64_t vw = vb / int64_t(sizeof(T));
    const int64_t max_cols = std::max<int64_t>(vw, L2_CHUNK_BYTES / ((Cout + 2 * Cin) * int64_t(sizeof(T))));
    int64_t cols = 0;
    for (const conv_tiles::Tile& t : lay.tiles) {
      if (cols >= max_cols) chunks.emplace_back(), cols = 0;
      chunks.back().push_back(t);
      cols += int64_t(t.nv) * vw;
    }
  }
  std::vector<T> parts(nth * nnz, T(0));
  at::parallel_for(0, lay.groups, 1, [&](int64_t g0, int64_t g1) {
    T* acc = parts.data() + at::get_thread_num() * nnz;
    ThreadScratch<T, kScratchDy> db;
    ThreadScratch<T, kScratchPack> xb;
    ThreadScratch<T, kScratchOut> ob;
    for (int64_t grp = g0; grp < g1; ++grp) {
      const T* ds = reinterpret_cast<const T*>(dp + grp * dy.stride(0));
      if (!dy_direct) {
        db.resize(Cout * lay.L);
        pack<I, T>(dy, grp * lay.G, lay.images(grp), OH, OW, 1, 1, lay.L, db.data());
        ds = db.data();
      }
      T* d = reinterpret_cast<T*>(dxp + grp * dx_img);
      if (!dx_direct) {
        ob.resize(Cin * lay.L);
        d = ob.data();
      }
      const T* xs = reinterpret_cast<const T*>(xp + grp * x.stride(0));
      if (!x_direct) {
        xb.resize(Cin * lay.L);
        pack<I, T>(x, grp * lay.G, lay.images(grp), OH, OW, sh, sw, lay.L, xb.data());
        xs = xb.data();
      }
      for (const std::vector<conv_tiles::Tile>& tiles : chunks) {
        conv_tiles::gather(ds, in_offs.data(), tws.data(), gplan->blk, 0, Cin, tiles, vb, nullptr, d,
                           dx_direct ? P : lay.L);
        conv_tiles::wgrad(xs, w_offs.data(), wplan->blk, 0, Cout, tiles, vb, ds, d_stride, acc);
      }
      if (!dx_direct) unpack<I, T>(ob.data(), grp * lay.G, lay.images(grp), Cin, 0, Cin, OH, OW, sh, sw, lay.L, dx);
    }
  });
  T* gp = gv.data_ptr<T>();
  conv_tiles::sum_thread_parts(parts.data(), nth, nnz, gp);
  csr::note_fused_backward();
  return true;
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

bool backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
              const at::Tensor& col_idx, int64_t sh, int64_t sw, at::Tensor& dx, at::Tensor& gv) {
  if (x.scalar_type() == at::kFloat) return backward_impl<float>(dy, x, values, row_ptr, col_idx, sh, sw, dx, gv);
  if (x.scalar_type() == at::kBFloat16)
    return backward_impl<c10::BFloat16>(dy, x, values, row_ptr, col_idx, sh, sw, dx, gv);
  return backward_impl<double>(dy, x, values, row_ptr, col_idx, sh, sw, dx, gv);
}

}  // namespace pointwise
}  // namespace sparsekern
