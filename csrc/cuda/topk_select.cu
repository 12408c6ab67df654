// topk_select: indices (ascending) of the k best candidate scores, exact, ties to the lower index.
//
// Radix select on the order-preserving keys of csrc/cpu/radix_select.h (the CPU kernel's digit
// logic, shared), entirely on the device with no host round trip between passes:
//   per digit level (3 for 32-bit keys, 6 for 64-bit; fp16/bf16 use their exact fp32 value):
//     hist    every block histograms the current digit of the candidate keys that match the
//             prefix found so far (shared-memory atomics, one global atomic per non-empty bucket);
//     select  one block scans the histogram from the best bucket down and appends the bucket that
//             holds the k-th best key to the prefix (state in device memory).
//   The full key is then the threshold T: the answer is every candidate with key > T plus the first
//   kk (in index order) with key == T.
//   count   per tile of 4096 scores: keys > T and == T;
//   scan    one block turns the tile counts into each tile's output offset and its share of the
//           keys == T (tiling.h: topk_tile_plan);
//   write   each tile ranks its selected keys with block scans and writes their indices: the output
//           comes out in index order without a sort.
// NaN candidates and k > #candidates are recorded in a TopkStatus the caller reads afterwards (the
// CPU kernel raises on both); the output never leaves out[0, k).
#include "cuda/common.cuh"
// after common.cuh: SK_HOST_DEVICE is __host__ __device__, so the radix helpers run on the device
#include "cpu/radix_select.h"
#include "cuda/kernels.h"

namespace sparsekern {
namespace cuda {
namespace {

using ull = unsigned long long;
using radix::kRadixSize;

constexpr int kHistThreads = 256;
constexpr int kSelectThreads = 1024;
constexpr int kTileThreads = 256;
constexpr int kItems = 16;
constexpr int kTile = kTileThreads * kItems;
static_assert(2 * kSelectThreads >= (int)kRadixSize, "select: two buckets per thread");

template <class K>
struct State {
  K prefix;  // the digits found so far (the threshold key once done)
  ull kk;    // rank still sought among the keys matching the prefix (1-based)
  int done;
};

// The raw bits whose key orders the scores: fp32 bits for fp32/fp16/bf16 (the conversion is exact
// and order-preserving), fp64 bits for fp64.
template <class F>
struct Bits {
  using K = uint32_t;
  static SK_DEVICE uint32_t of(F x) { return __float_as_uint(Elem<F>::to_acc(x)); }
};
template <>
struct Bits<double> {
  using K = uint64_t;
  static SK_DEVICE uint64_t of(double x) { return (uint64_t)__double_as_longlong(x); }
};

SK_DEVICE bool is_candidate(const bool* cand, int64_t cstride, int64_t i) {
  return cand == nullptr || cand[i * cstride];
}

template <class K>
__global__ void topk_init_kernel(State<K>* st, ull* hist, TopkStatus* status, int64_t k) {
  for (int b = threadIdx.x; b < (int)kRadixSize; b += blockDim.x) hist[b] = 0;
  if (threadIdx.x == 0) {
    st->prefix = 0;
    st->kk = (ull)k;
    st->done = 0;
    status->nan_index = INT64_MAX;
    status->n_candidates = 0;
  }
}

template <class F>
__global__ void __launch_bounds__(kHistThreads)
    topk_hist_kernel(const F* __restrict__ scores, int64_t stride, const bool* __restrict__ cand, int64_t cstride,
                     int64_t n, typename Bits<F>::K flip, int level, const State<typename Bits<F>::K>* st, ull* hist,
                     TopkStatus* status) {
  using K = typename Bits<F>::K;
  __shared__ unsigned h[kRadixSize];
  if (st->done) return;  // uniform
  const K prefix = st->prefix, pmask = radix::prefix_mask<K>(level);
  const int shift = radix::level_shift<K>(level);
  const int nbk = 1 << radix::level_width<K>(level);
  const K dmask = (K)(nbk - 1);
  for (int b = threadIdx.x; b < nbk; b += kHistThreads) h[b] = 0;
  __syncthreads();
  int64_t first_nan = INT64_MAX;
  for (int64_t i = (int64_t)blockIdx.x * kHistThreads + threadIdx.x; i < n; i += (int64_t)gridDim.x * kHistThreads) {
    if (!is_candidate(cand, cstride, i)) continue;
    const K u = Bits<F>::of(scores[i * stride]);
    if (radix::bits_is_nan(u)) {
      first_nan = i < first_nan ? i : first_nan;
      continue;
    }
    const K key = radix::bits_to_key(u, flip);
    if ((key & pmask) == prefix) atomicAdd(&h[(unsigned)((key >> shift) & dmask)], 1u);
  }
  if (level == 0 && first_nan != INT64_MAX) atomicMin(reinterpret_cast<ull*>(&status->nan_index), (ull)first_nan);
  __syncthreads();
  for (int b = threadIdx.x; b < nbk; b += kHistThreads)
    if (h[b]) atomicAdd(&hist[b], (ull)h[b]);
}

// One block: find the bucket holding the kk-th best key (buckets scanned from the best down, two per
// thread), extend the prefix, and clear the histogram for the next level.
template <class K>
__global__ void __launch_bounds__(kSelectThreads)
    topk_select_kernel(State<K>* st, ull* hist, TopkStatus* status, int level, int64_t k) {
  __shared__ ull warp_tot[kSelectThreads / kWarp];
  if (st->done) return;  // uniform
  const int nbk = 1 << radix::level_width<K>(level), shift = radix::level_shift<K>(level);
  const ull kk = st->kk;
  const K prefix = st->prefix;
  const int q0 = 2 * threadIdx.x, q1 = q0 + 1;  // ranks from the best bucket (nbk - 1) down
  const ull c0 = q0 < nbk ? hist[nbk - 1 - q0] : 0, c1 = q1 < nbk ? hist[nbk - 1 - q1] : 0;
  ull total;
  const ull before = block_exclusive_scan<kSelectThreads>(c0 + c1, warp_tot, &total);
  for (int b = threadIdx.x; b < (int)kRadixSize; b += kSelectThreads) hist[b] = 0;  // all read before the scan
  if (level == 0) {
    if (threadIdx.x == 0) status->n_candidates = (int64_t)total;
    if ((ull)k >= total) {
      // All candidates (or too few: the caller reports it): threshold key 0, which no valid key
      // reaches, so every candidate counts as "greater".
      if (threadIdx.x == 0) {
        st->prefix = 0;
        st->kk = 0;
        st->done = 1;
      }
      return;
    }
  }
  if (before < kk && kk <= before + c0) {
    st->prefix = prefix | ((K)(nbk - 1 - q0) << shift);
    st->kk = kk - before;
  } else if (before + c0 < kk && kk <= before + c0 + c1) {
    st->prefix = prefix | ((K)(nbk - 1 - q1) << shift);
    st->kk = kk - before - c0;
  }
  if (level == radix::num_levels<K>() - 1 && threadIdx.x == 0) st->done = 1;
}

// Per tile: candidates with key > T and == T.
template <class F>
__global__ void __launch_bounds__(kTileThreads)
    topk_count_kernel(const F* __restrict__ scores, int64_t stride, const bool* __restrict__ cand, int64_t cstride,
                      int64_t n, typename Bits<F>::K flip, const State<typename Bits<F>::K>* st, ull* tile_gt,
                      ull* tile_eq) {
  using K = typename Bits<F>::K;
  __shared__ ull warp_tot[kTileThreads / kWarp];
  const K T = st->prefix;
  const int64_t base = (int64_t)blockIdx.x * kTile;
  ull gt = 0, eq = 0;
#pragma unroll 4
  for (int e = 0; e < kItems; ++e) {
    const int64_t i = base + (int64_t)e * kTileThreads + threadIdx.x;  // coalesced
    if (i < n && is_candidate(cand, cstride, i)) {
      const K key = radix::bits_to_key(Bits<F>::of(scores[i * stride]), flip);
      gt += key > T;
      eq += key == T;
    }
  }
  ull tg, te;
  block_exclusive_scan<kTileThreads>(gt, warp_tot, &tg);
  block_exclusive_scan<kTileThreads>(eq, warp_tot, &te);
  if (threadIdx.x == 0) {
    tile_gt[blockIdx.x] = tg;
    tile_eq[blockIdx.x] = te;
  }
}

// One block: tile counts -> each tile's output offset (into tile_gt) and its number of keys == T to
// take (into tile_eq).
template <class K>
__global__ void __launch_bounds__(kSelectThreads)
    topk_scan_kernel(const State<K>* st, int64_t ntiles, ull* tile_gt, ull* tile_eq) {
  __shared__ ull warp_tot[kSelectThreads / kWarp];
  const ull kk = st->kk;
  ull gt_carry = 0, eq_carry = 0;
  for (int64_t base = 0; base < ntiles; base += kSelectThreads) {
    const int64_t t = base + threadIdx.x;
    const ull g = t < ntiles ? tile_gt[t] : 0, e = t < ntiles ? tile_eq[t] : 0;
    ull gtot, etot;
    const ull gb = block_exclusive_scan<kSelectThreads>(g, warp_tot, &gtot);
    const ull eb = block_exclusive_scan<kSelectThreads>(e, warp_tot, &etot);
    if (t < ntiles) {
      uint64_t off, take;
      topk_tile_plan(kk, gt_carry + gb, eq_carry + eb, e, &off, &take);
      tile_gt[t] = off;
      tile_eq[t] = take;
    }
    gt_carry += gtot;
    eq_carry += etot;
  }
}

// Per tile: each thread owns 16 consecutive scores, so block scans give index-order ranks.
template <class F>
__global__ void __launch_bounds__(kTileThreads)
    topk_write_kernel(const F* __restrict__ scores, int64_t stride, const bool* __restrict__ cand, int64_t cstride,
                      int64_t n, typename Bits<F>::K flip, const State<typename Bits<F>::K>* st,
                      const ull* __restrict__ out_off, const ull* __restrict__ eq_take, int64_t k,
                      int64_t* __restrict__ out) {
  using K = typename Bits<F>::K;
  __shared__ ull warp_tot[kTileThreads / kWarp];
  const K T = st->prefix;
  const int64_t base = (int64_t)blockIdx.x * kTile + (int64_t)threadIdx.x * kItems;
  unsigned flags = 0;  // bit 2e: key > T, bit 2e+1: key == T
  ull neq = 0;
#pragma unroll
  for (int e = 0; e < kItems; ++e) {
    const int64_t i = base + e;
    if (i < n && is_candidate(cand, cstride, i)) {
      const K key = radix::bits_to_key(Bits<F>::of(scores[i * stride]), flip);
      flags |= (unsigned)(key > T) << (2 * e);
      flags |= (unsigned)(key == T) << (2 * e + 1);
      neq += key == T;
    }
  }
  ull eq_total, take_total;
  const ull eq_rank = block_exclusive_scan<kTileThreads>(neq, warp_tot, &eq_total);
  const ull take_eq = eq_take[blockIdx.x];
  ull ntake = 0, r = eq_rank;
#pragma unroll
  for (int e = 0; e < kItems; ++e) {
    const bool gt = (flags >> (2 * e)) & 1u, eq = (flags >> (2 * e + 1)) & 1u;
    ntake += gt || (eq && r < take_eq);
    r += eq;
  }
  ull pos = out_off[blockIdx.x] + block_exclusive_scan<kTileThreads>(ntake, warp_tot, &take_total);
  r = eq_rank;
#pragma unroll
  for (int e = 0; e < kItems; ++e) {
    const bool gt = (flags >> (2 * e)) & 1u, eq = (flags >> (2 * e + 1)) & 1u;
    if (gt || (eq && r < take_eq)) {
      if (pos < (ull)k) out[pos] = base + e;
      ++pos;
    }
    r += eq;
  }
}

constexpr size_t kAlign = 256;
size_t round_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

template <class F>
cudaError_t topk_typed(const F* scores, int64_t stride, const bool* cand, int64_t cstride, int64_t n, int64_t k,
                       bool largest, int64_t* out, TopkStatus* status, void* ws, cudaStream_t stream) {
  using K = typename Bits<F>::K;
  char* w = static_cast<char*>(ws);
  State<K>* st = reinterpret_cast<State<K>*>(w);
  ull* hist = reinterpret_cast<ull*>(w + round_up(sizeof(State<K>)));
  ull* tile_gt = hist + kRadixSize;
  const int64_t ntiles = ceil_div(n, kTile);
  ull* tile_eq = tile_gt + ntiles;
  const K flip = largest ? (K)0 : ~(K)0;
  cudaError_t err;
  auto* init = &topk_init_kernel<K>;
  SK_LAUNCH(init, dim3(1), dim3(256), 0, stream, st, hist, status, k);
  if ((err = last_error()) != cudaSuccess) return err;
  if (n == 0) return cudaSuccess;
  const int64_t hb = ceil_div(n, (int64_t)kHistThreads * 16) < 1024 ? ceil_div(n, (int64_t)kHistThreads * 16) : 1024;
  auto* hk = &topk_hist_kernel<F>;
  auto* sk = &topk_select_kernel<K>;
  for (int level = 0; level < radix::num_levels<K>(); ++level) {
    SK_LAUNCH(hk, dim3((unsigned)hb), dim3(kHistThreads), 0, stream, scores, stride, cand, cstride, n, flip, level, st,
              hist, status);
    SK_LAUNCH(sk, dim3(1), dim3(kSelectThreads), 0, stream, st, hist, status, level, k);
    if ((err = last_error()) != cudaSuccess) return err;
  }
  auto* ck = &topk_count_kernel<F>;
  SK_LAUNCH(ck, dim3((unsigned)ntiles), dim3(kTileThreads), 0, stream, scores, stride, cand, cstride, n, flip, st,
            tile_gt, tile_eq);
  auto* sc = &topk_scan_kernel<K>;
  SK_LAUNCH(sc, dim3(1), dim3(kSelectThreads), 0, stream, st, ntiles, tile_gt, tile_eq);
  auto* wk = &topk_write_kernel<F>;
  SK_LAUNCH(wk, dim3((unsigned)ntiles), dim3(kTileThreads), 0, stream, scores, stride, cand, cstride, n, flip, st,
            tile_gt, tile_eq, k, out);
  return last_error();
}

}  // namespace

size_t topk_workspace_bytes(DType, int64_t n) {
  return round_up(sizeof(State<uint64_t>)) + (kRadixSize + 2 * (size_t)ceil_div(n, kTile)) * sizeof(ull);
}

cudaError_t topk_select(DType dt, const void* scores, int64_t stride, const bool* candidates, int64_t cand_stride,
                        int64_t n, int64_t k, bool largest, int64_t* out, TopkStatus* status, void* workspace,
                        cudaStream_t stream) {
  switch (dt) {
    case DType::kF32:
      return topk_typed(static_cast<const float*>(scores), stride, candidates, cand_stride, n, k, largest, out, status,
                        workspace, stream);
    case DType::kF64:
      return topk_typed(static_cast<const double*>(scores), stride, candidates, cand_stride, n, k, largest, out, status,
                        workspace, stream);
    case DType::kF16:
      return topk_typed(static_cast<const __half*>(scores), stride, candidates, cand_stride, n, k, largest, out, status,
                        workspace, stream);
    case DType::kBF16:
      return topk_typed(static_cast<const __nv_bfloat16*>(scores), stride, candidates, cand_stride, n, k, largest, out,
                        status, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace sparsekern
