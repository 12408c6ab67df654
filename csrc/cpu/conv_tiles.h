// Register-tiled gathers along flat runs of columns, shared by the pointwise and batch-innermost conv
// kernels (conv_pointwise.cpp, conv_batched.cpp). A tile is up to NMAX consecutive vectors of one run (or of
// 2-4 short runs a fixed stride apart): the source at sbase (+ a per-nonzero offset), the destination at obase,
// both advancing together. For every nonzero of a CSR row, broadcast its value and FMA the tile's vectors of the
// source at that offset into accumulators that stay in registers for the whole row; the vectors' offsets are
// compile-time constants (a tile of NV vectors is its own instance), which measured ~2x faster than
// offsets read from a table. Tiles outside, rows inside: the tile's window of every source plane is
// reused by all rows while it is in cache. The loops come at two widths: 32-byte vectors (every x86-64 clone)
// and 64-byte ones (AVX-512 hosts; see vector_bytes), each on tiles cut for it.
#pragma once
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

namespace sparsekern {
namespace conv_tiles {

// Vectors per tile at either width: 8 accumulators (of 16 ymm or 32 zmm registers). On 64-byte vectors 8 also
// measured fastest: 1.10x the 32-byte loops over ResNet-50's conv layers, against 1.04-1.05x with 4 or 6 and
// 0.85x with 16 (interleaved A/B, fwd+bwd, batch 16, density 0.1, 2 threads, Zen 4).
constexpr int NMAX = 8;

// The vector width, in bytes, that tiles are cut for and the loops run at: 64 where the CSR engine's loops
// are 64-byte ones (csr::isa(): AVX-512 hosts unless SPARSEKERN_ISA=avx2) and every run of the call has at
// least one such vector (min_run elements of elem_size bytes), else 32. A plan holding tiles or blocks is
// keyed by it.
int vector_bytes(int64_t min_run, int64_t elem_size);

// A tile: `rows` runs, srow/orow elements apart in the source and the output (a run shorter than half a tile
// shares its tile with the runs below it: a batch-innermost conv's 4x4 plane at batch 16 is four runs of 4
// vectors), each of nv vectors at sbase/obase + i*srow/orow + k*VW (k < nv - 1), its last at + last; lanes below
// `skip` of a run's last vector repeat columns of the vector before it (the run's overlapped end).
struct Tile {
  int64_t sbase, obase, last;
  int32_t nv, skip;
  int32_t rows = 1;
  int64_t srow = 0, orow = 0;
};
// The most runs one tile holds (rows * nv <= NMAX).
constexpr int MAX_ROWS = 4;

// The entries of each CSR row cut into blocks of source planes (input channels for the forward), so that
// a tile's window of one block of planes stays in L1 while every row uses it: row r's entries in block k are
// [bp[r*(nb+1) + k], bp[r*(nb+1) + k + 1]). Blocks are merged until a row averages enough entries per block
// to pay for parking its partial sums between blocks; nb == 1 is the plain CSR.
struct Blocks {
  std::vector<int64_t> bp;
  int64_t nb = 1;
};
// plane_of[j]: the source plane of entry j, ascending within each row; window_bytes: what one plane
// contributes to a tile's window.
Blocks make_blocks(int64_t R, const int64_t* rp, const int32_t* plane_of, int64_t nplanes, int64_t window_bytes);

// Tiles over a run of `cols` columns of vb-byte vectors (cols >= VW = vb / elem_size when not a whole number
// of vectors): at most NMAX vectors each, balanced, the last vector ending at cols; bases 0.
std::vector<Tile> make_tiles(int64_t cols, int64_t elem_size, int vb);

// out[r*ostride + obase + c] = init_r + sum over row r of ws[j] * src[offs[j] + sbase + c] for the columns c
// of every tile (cut for vb-byte vectors), rows [r0, r1); init_r = bias[r] or 0.
void gather(const float* src, const int32_t* offs, const float* ws, const Blocks& blk, int64_t r0, int64_t r1,
            const std::vector<Tile>& tiles, int vb, const float* bias, float* out, int64_t ostride);
void gather(const double* src, const int32_t* offs, const double* ws, const Blocks& blk, int64_t r0, int64_t r1,
            const std::vector<Tile>& tiles, int vb, const double* bias, double* out, int64_t ostride);

// g[j] += sum over the columns c of every tile of dy[r*dstride + obase + c] * src[offs[j] + sbase + c], rows
// [r0, r1) (j in row r); overlapped lanes count once.
void wgrad(const float* src, const int32_t* offs, const Blocks& blk, int64_t r0, int64_t r1,
           const std::vector<Tile>& tiles, int vb, const float* dy, int64_t dstride, float* g);
void wgrad(const double* src, const int32_t* offs, const Blocks& blk, int64_t r0, int64_t r1,
           const std::vector<Tile>& tiles, int vb, const double* dy, int64_t dstride, double* g);

// out[j] = sum over t < nth of parts[t * nnz + j]: the weight gradients' per-thread partial sums added up (in thread
// order, so the result does not depend on how the entries are split).
template <class T>
void sum_thread_parts(const T* parts, int64_t nth, int64_t nnz, T* out) {
  at::parallel_for(0, nnz, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      T s = 0;
      for (int64_t t = 0; t < nth; ++t) s += parts[t * nnz + j];
      out[j] = s;
    }
  });
}

}  // namespace conv_tiles
}  // namespace sparsekern
