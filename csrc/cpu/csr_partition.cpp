// The CSR tile engine's tile width and row partitions (csr_internal.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include <unistd.h>

#include "cpu/csr_internal.h"

namespace sparsekern {
namespace csr {
namespace detail {

namespace {
std::atomic<int64_t> forced_block_rows{0};

// A level of the data caches in bytes, per sysconf (`fallback` where the system does not say).
int64_t cache_bytes(int name, int64_t fallback) {
  const long b = sysconf(name);
  return b >= 8192 && b <= (int64_t(1) << 30) ? int64_t(b) : fallback;
}

// The L1 data cache's bytes (32 KB where the system does not say).
int64_t l1d_bytes() {
#if defined(_SC_LEVEL1_DCACHE_SIZE)
  static const int64_t b = cache_bytes(_SC_LEVEL1_DCACHE_SIZE, 32768), bytes = b <= (1 << 20) ? b : 32768;
  return bytes;
#else
  return 32768;
#endif
}
// Intel's caches take other sizes of blocks and prefetches than AMD's (measured on each: csr_internal.h).
bool intel_cpu() {
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
}
}  // namespace

int64_t l2_bytes() {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  static const int64_t bytes = cache_bytes(_SC_LEVEL2_CACHE_SIZE, 1 << 20);
  return bytes;
#else
  return 1 << 20;
#endif
}

// 128-byte tiles: a k x T tile of a 4096-column weight is 512 KB, the L2 of a Zen 3 core; narrower for
// small batches, so that a short batch is not padded. The 64-byte loops take 256-byte tiles: a nonzero's
// index, broadcast and prefetch, a row's accumulator set-up, store and reduction are then spread over
// twice the FMAs, and the pattern is walked half as often. SparseLinear fwd+bwd at ViT, MLP and BERT
// shapes 1.00-1.09x (interleaved A/B with a control, Zen 4); the 32-byte loops keep 128 (16 registers).
// But not where the pattern picks rows at random from a packed tile that then outgrows half of L2 (no L1 blocks:
// too sparse for them): its rows then come from L3, and the 64-byte loops ran slower than the 32-byte ones. 128-byte
// tiles there, SparseLinear fwd+bwd: 4096^2 at density 0.01, batch 256, 1.10-1.14x (0.98-1.02x in a spell when the
// host ran slow, every row from memory either way), at 0.02 1.0-1.11x; 4096 -> 1024 at 0.02 1.06-1.10x; blocked
// layers and BERT-style FFN shapes unchanged (Zen 4, 1 MB L2, 2 threads, interleaved A/B). A tile of exactly half
// of L2 keeps 256 bytes (2048^2 at 0.01 read 0.96-1.11x either way here). On a 2 MB L2 (Sapphire Rapids class)
// 128-byte tiles past 256 KB ran 4096^2 and 2048^2 at 0.01 1.2-1.3x faster with three calls after each dense one, but
// even with one (6.6-7.2 ms) and in the op benchmark's rounds (6.8-7.2 ms): not taken.
int tile_bytes(int64_t n, int64_t elem_size, bool wide, int64_t random_rows) {
  const int64_t bytes = n * elem_size;
  if (bytes <= 32) return 32;
  if (bytes <= 64) return 64;
  if (wide && bytes > 128 && random_rows * 256 <= l2_bytes() / 2) return 256;
  return 128;
}

int64_t l1_block_rows(int64_t m, int64_t k, int64_t nnz, int tile_bytes) {
  const int64_t forced = forced_block_rows.load();
  if (forced < 0 || m == 0) return 0;
  if (forced > 0) return k > forced ? forced : 0;
  const bool intel = intel_cpu();
  const int64_t rows = std::max<int64_t>(1, (intel ? L1_BLOCK_BYTES_INTEL : l1d_bytes()) / tile_bytes);
  const int64_t min_blocks = intel ? L1_BLOCK_MIN_BLOCKS_INTEL : L1_BLOCK_MIN_BLOCKS;
  if (k < min_blocks * rows || nnz * rows < L1_BLOCK_MIN_ENTRIES * m * k) return 0;
  return rows;
}

int64_t sddmm_l1_block_rows(int64_t m, int64_t k, int64_t nnz, int tile_bytes) {
  const int64_t rows = l1_block_rows(m, k, nnz, tile_bytes);
  return forced_block_rows.load() != 0 || k * tile_bytes >= SDDMM_L1_BLOCK_MIN_TILE_BYTES ? rows : 0;
}

int64_t set_l1_block_rows(int64_t rows) { return forced_block_rows.exchange(rows); }

bool spmm_prefetch(int64_t packed_bytes) { return !intel_cpu() || packed_bytes >= PREFETCH_FROM_TILE_BYTES_INTEL; }

std::vector<int64_t> partition_rows(const int64_t* rp, int64_t m, int64_t parts, int64_t row_cost, int64_t align) {
  std::vector<int64_t> b(parts + 1, 0);
  b[parts] = m;
  const double total = double(rp[m] - rp[0]) + double(row_cost) * m;
  for (int64_t t = 1; t < parts; ++t) {
    const double target = total * t / parts;
    int64_t lo = 0, hi = m;  // first row i with cost(i) >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (double(rp[mid] - rp[0]) + double(row_cost) * mid < target) lo = mid + 1;
      else hi = mid;
    }
    int64_t r = (lo + align / 2) / align * align;
    b[t] = std::min(m, std::max(b[t - 1], r));
  }
  return b;
}

int64_t num_parts(int64_t m, int64_t align) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(threads * PARTS_PER_THREAD, (m + align - 1) / align));
}

bool tiles_spread_evenly(int64_t ntiles) {
  const int64_t threads = at::get_num_threads();
  return ntiles >= threads && (ntiles % threads == 0 || ntiles >= TILES_PER_THREAD * threads);
}

std::pair<int64_t, int64_t> thread_columns(int64_t n, int64_t w, int64_t nth, int64_t elem_size) {
  const int64_t vec = 64 / elem_size, vecs = (n + vec - 1) / vec;
  return {std::min(n, w * vecs / nth * vec), std::min(n, (w + 1) * vecs / nth * vec)};
}

int64_t row_grain(int64_t m, int64_t nnz, int64_t target) {
  return std::max<int64_t>(1, nnz > 0 ? int64_t(double(target) * double(m) / double(nnz)) : m);
}

}  // namespace detail
}  // namespace csr
}  // namespace sparsekern

// Private ops (tests, A/B timings): the SpMM's L1 blocks (set_l1_block_rows), the tiles' width (tile_bytes) and the
// L2 it is cut for; not part of the op contract.
TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  m.def("_tile_bytes(int n, int elem_size, bool wide, int random_rows) -> int",
        [](int64_t n, int64_t elem_size, bool wide, int64_t random_rows) {
          TORCH_CHECK_VALUE(n >= 0 && random_rows >= 0, "_tile_bytes: n and random_rows must be >= 0, got ", n, " and ",
                            random_rows);
          TORCH_CHECK_VALUE(elem_size == 2 || elem_size == 4 || elem_size == 8,
                            "_tile_bytes: elem_size must be 2, 4 or 8 bytes, got ", elem_size);
          return int64_t(sparsekern::csr::detail::tile_bytes(n, elem_size, wide, random_rows));
        });
  m.def("_l2_bytes() -> int", [] { return sparsekern::csr::detail::l2_bytes(); });
  m.def("_l1_block_rows(int m, int k, int nnz, int tile_bytes) -> int",
        [](int64_t m, int64_t k, int64_t nnz, int64_t tile_bytes) {
          TORCH_CHECK_VALUE(m >= 0 && k >= 0 && nnz >= 0 && tile_bytes > 0,
                            "_l1_block_rows: m, k and nnz must be >= 0 and tile_bytes > 0, got ", m, ", ", k, ", ", nnz,
                            " and ", tile_bytes);
          return sparsekern::csr::detail::l1_block_rows(m, k, nnz, int(tile_bytes));
        });
  m.def("_set_l1_block_rows(int rows) -> int", [](int64_t rows) {
    TORCH_CHECK_VALUE(rows >= -1, "_set_l1_block_rows: rows must be -1 (never), 0 (as measured) or > 0, got ", rows);
    return sparsekern::csr::detail::set_l1_block_rows(rows);
  });
}
