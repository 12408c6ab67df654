// Internals of the CSR tile engine (csr_engine.h has the design and the public entry points),
// shared by its files:
//   csr_spmm.cpp       the SpMM core          csr_sddmm.cpp    the SDDMM core
//   csr_pack.cpp       batch-tile packing     csr_partition.cpp  tile width and row partitions
//   csr_dense.cpp      the dense fallback     csr_isa.cpp      the vector width (SPARSEKERN_ISA)
//   csr_compact.cpp    (weight, mask) -> CSR  csr_checks.cpp   argument and pattern checks
//   csr_trust.cpp      validated patterns the checks skip (sparse modules register theirs)
//   csr_gather.cpp     the gather path: few nonzeros per column, the dense operand read unpacked
//   csr_backward.cpp   both gradients of a product in one pass over the output gradient's tiles
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "cpu/common.h"

namespace sparsekern {
namespace csr {
namespace detail {

// ---------------------------------------------------------------------------
// Tuning constants, each with why it has its value.

// Software prefetch distance (nonzeros) for the packed rows the SpMM loop will read: about the
// L2 -> L1 latency covered by the FMAs of 16 nonzeros.
constexpr int64_t PREFETCH = 16;
// On Intel the prefetches only pay for packed tiles (k x tile width) from this size on: below it the rows come
// from L2 in time and the prefetch's 6 instructions per nonzero are the cost. Sapphire Rapids class Xeon, 2
// threads, forward, density 0.1, interleaved A/B: without them the 64-byte loops run 1.03-1.10x faster at ViT,
// MLP and BERT shapes (tiles of 96-384 KB), as fast at k = 1536-3072, 0.95x at 4096^2 (1 MB); the 32-byte
// loops 1.1-1.2x faster at every shape. AMD CPUs keep them everywhere (Zen 4: none at all loses 15 % at
// 4096^2; smaller tiles unmeasured there).
constexpr int64_t PREFETCH_FROM_TILE_BYTES_INTEL = 1 << 20;
// Rows per SpMM chunk: a chunk's results are buffered (64 rows x 128-256 B = 8-16 KB, in L1), then stored,
// through a register transpose when the output is column-major.
constexpr int64_t CHUNK = 64;
// Rows of the dense operand per packing job: 256 rows x 128 B = 32 KB per job, enough to amortise a
// job's dispatch, while a 4096-row operand still gives 16 jobs per tile to spread over the threads.
constexpr int64_t PACK_ROWS = 256;
// Work parts per thread: a few (nnz-balanced), handed out dynamically, so that a thread slowed down
// by another process on its core (or by uneven rows) does not hold up the op.
constexpr int64_t PARTS_PER_THREAD = 6;
// SpMM and SDDMM run whole batch tiles per thread (each packed by its thread just before use) when the tiles
// spread evenly over the threads: a multiple of the thread count, or at least TILES_PER_THREAD per thread.
constexpr int64_t TILES_PER_THREAD = 4;
// SDDMM on whole tiles keeps one copy of the values per extra thread: at most this many bytes of them (2 threads:
// any pattern up to 16M nonzeros; 64 threads: 256K).
constexpr int64_t MAX_PARTIAL_BYTES = int64_t(64) << 20;
// at::parallel_for grains (elements per task) of the light loops: below these a task's share of
// the parallel region's start-up (a few microseconds) outweighs its work.
constexpr int64_t FILL_GRAIN = 16384;           // output elements written per task (empty A or k = 0)
constexpr int64_t DENSE_ROW_GRAIN = 64;         // rows of a k-wide dense matrix scattered or gathered per task
constexpr int64_t COMPACT_COUNT_GRAIN = 65536;  // mask bytes counted per task (row-major mask)
constexpr int64_t COMPACT_FILL_GRAIN = 32768;   // mask bytes scanned per task while filling (row-major)
// Rows per task of a column-major mask: a task walks all k columns, so its per-row counters
// (4096 x 4 or 8 B, 16-32 KB) must stay L1-sized.
constexpr int64_t COMPACT_COLMAJOR_ROWS = 4096;
constexpr int64_t CHECK_ROW_PTR_GRAIN = 1 << 20;  // row_ptr entries per task of the monotonicity check
constexpr int64_t CHECK_NNZ_GRAIN = 1 << 18;      // nonzeros per task of the column-order check
// The density (nnz / (m k)) from which the dense fallback runs, unless set_dense_above changed it.
// The CSR loops do one L2 load per FMA; the GEMM reads and writes the whole scattered weight. Zen 4,
// 2 threads, fwd+bwd of a linear layer with caches evicted between calls, time of the CSR loops over the
// dense fallback's: 0.58-0.67x at density 0.34-0.35 (1000x512 batch 16-256, 3072x768 and 4096x4096 batch
// 256); at 0.5 0.62x (batch 16), 0.82x (1024x1024, batch 256), 0.95x (4096x4096, batch 256); 0.97-1.04x
// at 0.52 (96 <-> 384, 2048 tokens); at 0.6 0.64-0.94x (batch 16-256); at 0.95 0.82x (batch 16), 0.97x
// (64), 1.31x (256). 0.5 is where the large-batch shapes break even; a layer's kernel choice times its
// own dense kernel against these loops above it. (Zen 3 with the loops of 2026-11 put it at 0.3.)
// With whole tiles (each packed just before use) the loops moved up: fwd+bwd, caches evicted, 15 interleaved
// rounds, CSR loops / fallback in ms: density 0.52-0.55, 96 <-> 384 at 2048 tokens 4.2 / 5.1, 4.6 / 5.2, 1000 x 512
// batch 16 1.8 / 3.1, 1024 x 1024 batch 256 15.5 / 21.8, 3072 x 768 at 784 tokens 98 / 91; at 0.65 5.8 / 6.4,
// 5.2 / 5.1, 1.8 / 3.9, 18.9 / 20.8; at 0.8 6.2 / 5.8, 22.9 / 20.7. Hence 0.6.
constexpr double DEFAULT_DENSE_ABOVE = 0.6;
// The SpMM's L1 blocks (l1_block_rows) need this many entries per row and block on average: each block of a row
// reads and writes its partial sums (a tile row) once. A standalone copy of the whole-tile loop, one thread, 256-byte
// tiles in blocks of 128 rows (32 KB), Zen 4: m x k = 4096 x 4096 at density 0.1 (12.8 entries a block) 1.33x the
// loop over the whole tile, 0.05 (6.4) 1.35x, 0.03 (3.8) 0.83x, 0.02 0.69x; 1536 x 384 at 0.1 1.26x, 4096 x 1024 at
// 0.04 (5.1) 1.03x. In the engine (2 threads, the values copied into block order per call) 4096 x 4096 at 0.05 ran
// 0.80-0.84x and at 0.1 1.20-1.31x, hence 10. And the tile must span this many blocks: with fewer (k = 384-784 at
// 256-byte tiles, a tile of 96-200 KB that L2 holds well) the forward read 0.85-1.02x; from k = 1024 on 1.05-1.29x.
constexpr int64_t L1_BLOCK_MIN_ENTRIES = 10;
constexpr int64_t L1_BLOCK_MIN_BLOCKS = 8;
// On Intel the blocks are 128 KB of packed rows, not L1's size, and the tile must span 2 of them (256 KB). The blocks
// of L1's 48 KB lost there. SparseLinear fwd+bwd, 2 threads, Sapphire Rapids class Xeon (2 MB L2): blocks forced per
// call in one process, 64-byte loops, 4096^2 batch 256 at density 0.1 26.1 ms in blocks of 512 rows against 29.1 in
// blocks of 192 (L1's) and 32.7 in none, at 0.05 15.4 / 19.6 / 16.4; blocks of 384-768 rows within 3 % of 512;
// 32-byte loops (128-byte tiles), 1024 rows against 384: 33.3 / 33.9 / 35.5 and 18.5 / 21.7 / 18.9. The rule against
// L1's blocks (the 8 of them), A/B in alternating processes: 4096^2 1.16x at 0.1, 1.29x at 0.05; at 0.084 800 x
// 1536 -> 384 (ViT fc2) 1.08x, 800 x 384 -> 1536 (fc1; its input gradient in 3 blocks) 1.13x (0.9x with 4 blocks
// needed); 2048 tokens 2048 -> 512 (BERT) 1.24x, 512 -> 2048 0.96-1.02x; 1024 -> 1024 at 0.1 batch 256 1.07x, 4096 ->
// 1024 1.2x, 1024 -> 4096 1.0x. Those A/Bs ran beside a narrower-tile rule since reverted (tile_bytes); again without
// it: 4096^2 at 0.1 1.12-1.14x, ViT fc2 1.00-1.10x, fc1 1.0-1.26x.
constexpr int64_t L1_BLOCK_BYTES_INTEL = int64_t(128) << 10;
constexpr int64_t L1_BLOCK_MIN_BLOCKS_INTEL = 2;
// The SDDMM reads G's and B's packed tiles, each row once per nonzero: blocks of B's rows pay only where B's tile
// alone fills half an L2 or more. Fused backward of a sparse linear layer, 64-byte loops, 2 threads, Zen 4,
// interleaved A/B: 4096 x 4096 at 0.1, batch 256 (a 1 MB tile) 1.06x; 2048 -> 512 at 2048 tokens (512 KB) 1.03x;
// 1024 x 1024 (256 KB) 0.98x; 1536 -> 384 (384 KB) 0.995-0.999x.
constexpr int64_t SDDMM_L1_BLOCK_MIN_TILE_BYTES = int64_t(512) << 10;
// Up to these many nonzeros per column of the dense operand (nnz / k), a product whose dense operand has
// contiguous batch items (B or Y with stride(0) == 1: x's rows, as sparse_linear and its weight gradient
// pass them) runs the gather path (csr_gather.cpp), which reads that operand where it lies instead of packing
// it. Zen 4, 2 threads, m = 2-64, k = 512-1024, batch 16-2048, density 0.02-0.3, the gather path over the
// tiles: SpMM 2-8x faster at 0.04-0.2 nonzeros per column, 1.3-3x at 0.6, 0.6-2x at 1.0 (packing a 1024-wide
// x is slow, a 512-wide one is not); SDDMM (no loop-carried sum) 1.5-4x at 0.2-1.0, even at 1.3.
constexpr double GATHER_SPMM_NNZ_PER_COLUMN = 0.75;
constexpr double GATHER_SDDMM_NNZ_PER_COLUMN = 1.0;

// ---------------------------------------------------------------------------
// Tiles and parallel parts (csr_partition.cpp).

// Tile width in bytes for a batch of n columns of elem_size bytes: 32, 64, 128, or 256 where `wide`
// (the 64-byte loops run: isa() is avx512). A core packs and loops at the width this returns.
// random_rows: the rows of the packed tile that the pattern's column indices pick from, where no L1 blocks
// run over it (0: it fits, or blocks run); a tile of 256-byte rows is kept only while it fits in half of L2.
int tile_bytes(int64_t n, int64_t elem_size, bool wide, int64_t random_rows = 0);
// The L2's bytes per core (1 MB where the system does not say).
int64_t l2_bytes();

// Whether the SpMM loops prefetch, for a packed tile of `packed_bytes` (k rows x tile width).
bool spmm_prefetch(int64_t packed_bytes);

// The SpMM's L1 blocks: rows of the packed tile per block of its k rows, so that a block's rows (rows x tile_bytes)
// fill the L1 data cache (on Intel L1_BLOCK_BYTES_INTEL), and every row of A runs its entries in that block before
// the next block; 0 where the whole-tile loops run the tile as one block (it spans fewer than L1_BLOCK_MIN_BLOCKS
// blocks, on Intel L1_BLOCK_MIN_BLOCKS_INTEL, or the pattern has fewer than L1_BLOCK_MIN_ENTRIES entries per row and
// block on average), as set_l1_block_rows says.
int64_t l1_block_rows(int64_t m, int64_t k, int64_t nnz, int tile_bytes);
// The fused backward's SDDMM in the same blocks (sddmm_blocks): as l1_block_rows, and only where B's packed tile (k
// rows) takes SDDMM_L1_BLOCK_MIN_TILE_BYTES or more, unless forced (set_l1_block_rows).
int64_t sddmm_l1_block_rows(int64_t m, int64_t k, int64_t nnz, int tile_bytes);
// 0: l1_block_rows as measured (default); -1: never; r > 0: blocks of r rows wherever k > r (tests). Returns the
// previous setting.
int64_t set_l1_block_rows(int64_t rows);

// Row boundaries of `parts` ranges of about equal cost (nnz + row_cost per row), aligned to `align` rows.
std::vector<int64_t> partition_rows(const int64_t* rp, int64_t m, int64_t parts, int64_t row_cost, int64_t align);

// Number of work parts for m rows cut at multiples of `align` rows: 1 on one thread.
int64_t num_parts(int64_t m, int64_t align);

// Whether ntiles batch tiles spread evenly over the intra-op threads (a multiple of their count, or at least
// TILES_PER_THREAD each): then each thread runs whole tiles, packing each just before use.
bool tiles_spread_evenly(int64_t ntiles);

// In that mode, the batch columns [first, second) of thread w of nth: equal shares of the n columns in whole
// 64-byte vectors, each cut into tiles of the full width and a narrower last one. Whole tiles per thread left
// one thread a tile more where their number is odd: ViT's 800 tokens are 12.5 tiles of 64 floats, 7 and 6
// per thread (448 and 352 columns, the ragged one as costly as a full one); now 400 each: forward and SDDMM
// 1.04-1.08x faster at 800 x 384 -> 1536 and 1536 -> 384 (Intel, 2 threads, interleaved A/B).
std::pair<int64_t, int64_t> thread_columns(int64_t n, int64_t w, int64_t nth, int64_t elem_size);

// Rows per parallel task for about `target` nonzeros of a pattern of m rows and nnz nonzeros.
int64_t row_grain(int64_t m, int64_t nnz, int64_t target);

// Runs run(part) for every part on the intra-op threads, parts taken from a shared counter.
template <typename F>
void run_parts(int64_t parts, const F& run) {
  if (parts == 1) {
    run(0);
    return;
  }
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), parts);
  at::parallel_for(0, workers, 1, [&](int64_t a, int64_t z) {
    for (int64_t w = a; w < z; ++w)
      for (int64_t part = next++; part < parts; part = next++) run(part);
  });
}

// ---------------------------------------------------------------------------
// Plane operands: a dense operand may also be 3-D, (rows, N, P) with unit stride along P, read as the 2-D
// (rows, N*P), column c = n*P + p at n * stride(1) + p. conv2d_gemm passes NCHW tensors so, viewed (C, N, H*W),
// instead of copying them channels first. Only the packing, the SpMM's store and the SDDMM's row gather see
// planes; the gather path and the dense fallback take the operand reshaped (copied).

// The runs of columns b0 .. b0+nc of a plane operand: `len` columns from tile column `c` on lie contiguous at
// offset `off` of each row. A tile is at most 64 columns: 66 runs at most (a run per column at P = 1).
struct Run {
  int64_t off;
  int32_t c, len;
};
constexpr int MAX_RUNS = 66;
struct Runs {
  Run run[MAX_RUNS];
  int count = 0;
};
// The runs of columns b0 .. b0+nc (nc <= 64) of planes of P columns, plane n at offset n * sN.
Runs plane_runs(int64_t P, int64_t sN, int64_t b0, int64_t nc);
// t itself if 2-D; a 3-D t that is a strided 2-D matrix in disguise (N or P of 1, or planes back to back) as
// that 2-D view; else t (a true plane operand; TORCH_CHECKs unit stride along P).
at::Tensor as_matrix_if_strided(const at::Tensor& t);
// Columns of an operand: N*P for planes.
inline int64_t operand_cols(const at::Tensor& t) { return t.dim() == 3 ? t.size(1) * t.size(2) : t.size(1); }

// ---------------------------------------------------------------------------
// Packing (csr_pack.cpp): the randomly accessed operand src (rows, cols), a strided view, as
// ceil(cols / T) tiles of rows x T elements of the compute type (bf16 widened to float32), tile t
// holding columns t*T .. t*T+T (zero-padded) at offset t * rows * T. Parallel over tiles and row blocks.
// src may be a plane operand (above).
at::Tensor pack_tiles(const at::Tensor& src, int64_t T);
// Columns b0 .. b0+nc of src alone as one tile (rows x T of the compute type at dst, nc <= T, zero-padded), on
// the calling thread.
void pack_tile(float* dst, int64_t T, const at::Tensor& src, int64_t b0, int64_t nc);
void pack_tile(double* dst, int64_t T, const at::Tensor& src, int64_t b0, int64_t nc);

// ---------------------------------------------------------------------------
// The tile loops (csr_spmm.cpp, csr_sddmm.cpp): one packed batch tile, rows r0..r1 of the pattern.

// SpMM core: rows r0..r1 of out[:, b0:b0+nc] from one packed tile Bp (k x T). S is the compute
// type (vals, Bp, bias), O the output's (bf16 output: S = float, rounded on store).
template <typename S, typename O = S> struct SpmmJob {
  const S* vals;
  const int64_t* rp;
  const int32_t* ci;
  const S* Bp;  // packed tile, k x T
  O* out;
  int64_t os0, os1;
  int64_t b0, nc;
  const S* bias;  // per row, or nullptr
  int64_t last;   // nnz - 1 (prefetch clamp)
  bool prefetch;  // spmm_prefetch
  const Runs* oruns;  // out is a plane operand: the runs of columns b0 .. b0+nc (offsets from row starts)
  bool relu = false;  // out = max(result, 0): a ReLU fused into the layer, applied in registers before the store
  // L1 blocks (spmm_blocks): row i's sums so far start from init + i * T (then bias is already in them), and a
  // block before the last writes its sums to partial + i * T (rows T apart) instead of storing to out.
  const S* init = nullptr;
  S* partial = nullptr;
};

// SDDMM core: vals[p] (+)= dot(X[i, b0:b0+nc], Y[j, b0:b0+nc]) for rows r0..r1, Y packed (k x T).
// X is read in its own type XI (bf16: widened as its rows are gathered; vals stay float32).
template <typename S, typename XI = S> struct SddmmJob {
  const int64_t* rp;
  const int32_t* ci;
  const XI* X;
  int64_t xs0, xs1;
  const S* Yp;
  int64_t b0, nc;
  S* vals;
  bool first;         // first tile: store, else accumulate
  const Runs* xruns;  // X is a plane operand: the runs of columns b0 .. b0+nc (offsets from row starts)
};

// The SDDMM on whole tiles (csr_sddmm.cpp, csr_backward.cpp): each of the nth threads runs its batch columns
// (thread_columns of n) tile by tile, tile(buf, w, b0, nc, tb, out, first) on thread w, buf a buffer of buf_elems of its own,
// nc <= T columns from b0 on in a tile of tb bytes, out the thread's copy of the values (thread 0: vals itself;
// first: store, else accumulate); then the copies are added into vals.
template <typename S, typename F>
void sddmm_whole_tiles(S* vals, int64_t nnz, int64_t n, int64_t T, bool wide, int64_t buf_elems,
                       const at::TensorOptions& options, const F& tile) {
  const int64_t nth = at::get_num_threads();
  at::Tensor partial = at::empty({(nth - 1) * nnz}, options);
  S* part = partial.data_ptr<S>();
  at::parallel_for(0, nth, 1, [&](int64_t w0, int64_t w1) {
    at::Tensor buf_t = at::empty({buf_elems}, options);
    S* buf = buf_t.data_ptr<S>();
    for (int64_t w = w0; w < w1; ++w) {
      S* out = w == 0 ? vals : part + (w - 1) * nnz;
      const auto cols = thread_columns(n, w, nth, sizeof(S));
      if (cols.first == cols.second) std::fill(out, out + nnz, S(0));
      for (int64_t b0 = cols.first; b0 < cols.second; b0 += T) {
        const int64_t nc = std::min(T, cols.second - b0);
        tile(buf, w, b0, nc, tile_bytes(nc, sizeof(S), wide), out, b0 == cols.first);
      }
    }
  });
  if (nth > 1)
    at::parallel_for(0, nnz, 1 << 14, [&](int64_t p0, int64_t p1) {
      for (int64_t w = 1; w < nth; ++w)
        for (int64_t p = p0; p < p1; ++p) vals[p] += part[(w - 1) * nnz + p];
    });
}

// The loops at the width of a tile of tb bytes (the 64-byte loops where `wide`).
void spmm_tile_rows(int tb, bool wide, const SpmmJob<float>& J, int64_t r0, int64_t r1);
void spmm_tile_rows(int tb, bool wide, const SpmmJob<double>& J, int64_t r0, int64_t r1);
void spmm_tile_rows(int tb, bool wide, const SpmmJob<float, c10::BFloat16>& J, int64_t r0, int64_t r1);
void sddmm_tile_rows(int tb, bool wide, const SddmmJob<float>& J, int64_t r0, int64_t r1);
void sddmm_tile_rows(int tb, bool wide, const SddmmJob<double>& J, int64_t r0, int64_t r1);

// The SpMM's L1 blocks (l1_block_rows; csr_spmm.cpp). A pattern's entries in blocks of `rows` columns of A (rows of
// the packed tile): block b's entries of every row, row after row, then block b+1's; block b's CSR is
// rp[b*(m+1) .. b*(m+1)+m] over ci. Built once per pattern (plan_cache.h). Entries in block-major order, not ranges
// of the row-major lists: the loop then reads its lists front to back, as the plain loop does (ranges per block and
// row, read in place, ran 2.3x slower at 4096 x 4096 in a standalone copy). The values change on every call:
// block_values copies them into that order.
struct L1Blocks {
  int64_t nb = 0;
  std::vector<int64_t> rp;
  std::vector<int32_t> ci;
  size_t bytes() const { return rp.size() * sizeof(int64_t) + ci.size() * sizeof(int32_t); }
};
std::shared_ptr<const L1Blocks> l1_blocks(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t m, int64_t k,
                                          int64_t rows);
// out = the pattern's values (CSR order, vals[0] the entry at rp[0]) in the blocks' order.
void block_values(const float* vals, const int64_t* rp, int64_t m, const L1Blocks& b, float* out);
void block_values(const double* vals, const int64_t* rp, int64_t m, const L1Blocks& b, double* out);
extern std::atomic<int64_t> t_block_values_runs;  // calls since load, for the tests
// out (nnz, the compute type: float32 for bf16 values) = A^T's values in its blocks' order (blocks: l1_blocks of
// A^T's pattern for `rows`), read straight from A's values through the transpose's permutation (t_perm, contiguous:
// A^T's entry p is A's entry t_perm[p]) put in the blocks' order once per pattern (plan_cache.h). A block's entries
// come from A's rows of the block: a run of A's values that stays in L2, where gathering A^T's values in CSR order
// walks A's columns over all of A's values, a miss an element, and block_values then copies them again (4096^2 at
// density 0.1 in a training loop: 0.75-1.0 ms against 1.4-1.8 ms for the gather alone and 0.9-1.0 for the copy).
// False, writing nothing, past int32 positions or for non-contiguous values.
bool t_block_values(const at::Tensor& values, const at::Tensor& t_perm, const at::Tensor& t_row_ptr,
                    const at::Tensor& t_col_idx, int64_t rows, const std::shared_ptr<const L1Blocks>& blocks,
                    const at::Tensor& out);
// The inverse: values in the blocks' order (bvals) into CSR order (out).
void unblock_values(const float* bvals, const int64_t* rp, int64_t m, const L1Blocks& b, float* out);
void unblock_values(const double* bvals, const int64_t* rp, int64_t m, const L1Blocks& b, double* out);
// The SDDMM of J (X's rows read in place: J.X contiguous rows of the tile width, as the fused backward's packed tile
// of G) over its packed tile of Y block after block, so that the Y rows a block reads stay in L1; J.rp and ci are
// replaced by the blocks', so J.vals takes the values in the blocks' order (unblock_values).
extern std::atomic<int64_t> sddmm_block_runs;  // tiles run so since load, for the tests
void sddmm_blocks(int tb, bool wide, const SddmmJob<float>& J, const L1Blocks& b, int64_t m);
void sddmm_blocks(int tb, bool wide, const SddmmJob<double>& J, const L1Blocks& b, int64_t m);
// J's rows 0..m over its packed tile, block after block (bvals: block_values; sums: m x tile width, the rows' sums
// between blocks); J.vals, rp and ci are the blocks'.
void spmm_blocks(int tb, bool wide, const SpmmJob<float>& J, const L1Blocks& b, const float* bvals, int64_t m,
                 float* sums);
void spmm_blocks(int tb, bool wide, const SpmmJob<double>& J, const L1Blocks& b, const double* bvals, int64_t m,
                 double* sums);
void spmm_blocks(int tb, bool wide, const SpmmJob<float, c10::BFloat16>& J, const L1Blocks& b, const float* bvals,
                 int64_t m, float* sums);

// ---------------------------------------------------------------------------
// Dense fallback (csr_dense.cpp).

// Whether a product with an (m, k) pattern of nnz nonzeros runs as a dense GEMM (density >= dense_above()).
bool use_dense(int64_t nnz, int64_t m, int64_t k);
// Whether every element of t (float32/64 or bf16, any strides) is finite. The dense GEMM multiplies
// the implicit zeros of A by every element of B, so a NaN or Inf in B would reach outputs that the
// sparse loops (and torch.sparse) leave finite: spmm runs the sparse loops when B is not all finite.
bool all_finite(const at::Tensor& t);
// out = A @ B (+ bias[i] on row i) through a GEMM on A scattered into a reused dense workspace.
// vals and bias (undefined: none) in the compute type; B and out in the element type.
void spmm_dense(const at::Tensor& vals, const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& B,
                const at::Tensor& bias, const at::Tensor& out);
// vals (compute type) [p] = (X @ Y^T)[i, j] at the pattern, through a GEMM into the dense workspace.
void sddmm_dense(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& X, const at::Tensor& Y,
                 const at::Tensor& vals);

// ---------------------------------------------------------------------------
// Gather path (csr_gather.cpp), for patterns with few nonzeros per column of the dense operand.

// Whether a product of nnz nonzeros over a dense operand of k rows (B, resp. Y) runs the gather path.
enum class Core { spmm, sddmm };
bool use_gather(Core core, int64_t nnz, int64_t k, const at::Tensor& dense);
// out (m, n) = A @ Bt (+ bias[i]); Bt (k, n) with stride(0) == 1, out any strides. I: element type, S: compute type.
template <typename I, typename S>
void spmm_gather(const S* vals, const int64_t* rp, const int32_t* ci, int64_t m, const at::Tensor& Bt, const S* bias,
                 const at::Tensor& out);
// vals[p] = dot(X[i, :], Y[j, :]) at the pattern's m rows; Y (k, n) with stride(0) == 1, X (m, n) any strides.
template <typename I, typename S>
void sddmm_gather(const int64_t* rp, const int32_t* ci, int64_t m, const at::Tensor& X, const at::Tensor& Y, S* vals);

}  // namespace detail
}  // namespace csr
}  // namespace sparsekern

// ---------------------------------------------------------------------------
// The instances of a core (spmm, sddmm): per compute type S and element type I, the 32-byte
// loops at 1, 2, 4 vectors per tile row (SK_CLONE_BUILDS), the 64-byte loops at 1, 2, 4 (SK_AVX512),
// and CORE_rows(tile_bytes, wide, job, r0, r1), which picks one. Tiles of 32 bytes always run the
// 32-byte loop; 256-byte tiles only the 64-byte one (tile_bytes gives them only where `wide`). Used inside the core's namespace, after
// CORE_rows_impl<S, NV, I, W>.
#define SK_ROWS_BUILD(ATTR, CS, CORE, JOB, S, I, NAME, NV)                              \
  ATTR void CORE##_rows_##NAME##_##NV##CS(const JOB<S, I>& J, int64_t r0, int64_t r1) { \
    CORE##_rows_impl<S, NV, I>(J, r0, r1);                                              \
  }
#define SK_ROWS_CLONE(CORE, JOB, S, I, NAME, NV)            \
  SK_CLONE_BUILDS(SK_ROWS_BUILD, CORE, JOB, S, I, NAME, NV) \
  SK_CLONE_DISPATCH(CORE##_rows_##NAME##_##NV)
#if SK_HAVE_AVX512
#define SK_ROWS_WIDE(CORE, JOB, S, I, NAME, NV)                                           \
  SK_AVX512 void CORE##_rows_##NAME##_w##NV(const JOB<S, I>& J, int64_t r0, int64_t r1) { \
    CORE##_rows_impl<S, NV, I, 64>(J, r0, r1);                                            \
  }
#define SK_ROWS_WIDE_TYPE(CORE, JOB, S, I, NAME) \
  SK_ROWS_WIDE(CORE, JOB, S, I, NAME, 1)         \
  SK_ROWS_WIDE(CORE, JOB, S, I, NAME, 2)         \
  SK_ROWS_WIDE(CORE, JOB, S, I, NAME, 4)
#define SK_ROWS_WIDE_PICK(CORE, NAME)                                                                   \
  if (wide && tile_bytes >= 64) {                                                                       \
    if (tile_bytes == 64) return CORE##_rows_##NAME##_w1(J, r0, r1);                                    \
    return tile_bytes == 128 ? CORE##_rows_##NAME##_w2(J, r0, r1) : CORE##_rows_##NAME##_w4(J, r0, r1); \
  }
#else
#define SK_ROWS_WIDE_TYPE(CORE, JOB, S, I, NAME)
#define SK_ROWS_WIDE_PICK(CORE, NAME)
#endif
#define SK_ROWS_TYPE(CORE, JOB, S, I, NAME)                                                        \
  SK_ROWS_CLONE(CORE, JOB, S, I, NAME, 1)                                                          \
  SK_ROWS_CLONE(CORE, JOB, S, I, NAME, 2)                                                          \
  SK_ROWS_CLONE(CORE, JOB, S, I, NAME, 4)                                                          \
  SK_ROWS_WIDE_TYPE(CORE, JOB, S, I, NAME)                                                         \
  inline void CORE##_rows(int tile_bytes, bool wide, const JOB<S, I>& J, int64_t r0, int64_t r1) { \
    SK_ROWS_WIDE_PICK(CORE, NAME)                                                                  \
    switch (tile_bytes) {                                                                          \
      case 32: return CORE##_rows_##NAME##_1(J, r0, r1);                                           \
      case 64: return CORE##_rows_##NAME##_2(J, r0, r1);                                           \
      default: return CORE##_rows_##NAME##_4(J, r0, r1);                                           \
    }                                                                                              \
  }
// CORE_tile_rows (declared above) for one instance, from the csr namespace after the core's anonymous one.
#define SK_ROWS_EXPORT(CORE, JOB, S, I)                                                          \
  void detail::CORE##_tile_rows(int tb, bool wide, const JOB<S, I>& J, int64_t r0, int64_t r1) { \
    CORE##_rows(tb, wide, J, r0, r1);                                                            \
  }
#define SK_ROWS_CLONES(CORE, JOB)              \
  SK_ROWS_TYPE(CORE, JOB, float, float, f32)   \
  SK_ROWS_TYPE(CORE, JOB, double, double, f64) \
  SK_ROWS_TYPE(CORE, JOB, float, c10::BFloat16, bf16)
