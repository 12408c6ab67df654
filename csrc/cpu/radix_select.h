// Radix-select building blocks for topk_select, free of torch types so that a
// CUDA kernel can share them (define SK_HOST_DEVICE as `__host__ __device__`
// before including this header; it is empty in plain C++).
//
// Keys: every non-NaN float maps to an unsigned integer of the same width whose
// unsigned order is the "better first" order: with largest=true a larger float
// gives a larger key, with largest=false a smaller float does. -0.0 is mapped
// like +0.0, so the two tie (and ties go by index). NaN never reaches a key
// (the caller rejects it); no valid float maps to key 0, which the caller may
// use as "below everything".
//
// Digits: the key is split from the top into digits of kRadixBits bits (the
// last digit takes the remaining bits), level 0 being the most significant.
#pragma once
#include <stdint.h>

#ifndef SK_HOST_DEVICE
#define SK_HOST_DEVICE
#endif

namespace sparsekern {
namespace radix {

constexpr int kRadixBits = 11;
constexpr uint32_t kRadixSize = 1u << kRadixBits;  // buckets per level (2048)

// ---- key mapping ----------------------------------------------------------
// flip = 0 for largest=true, all ones for largest=false.
SK_HOST_DEVICE inline uint32_t key_flip32(bool largest) { return largest ? 0u : ~0u; }
SK_HOST_DEVICE inline uint64_t key_flip64(bool largest) { return largest ? 0ull : ~0ull; }

SK_HOST_DEVICE inline bool bits_is_nan(uint32_t u) { return (u & 0x7fffffffu) > 0x7f800000u; }
SK_HOST_DEVICE inline bool bits_is_nan(uint64_t u) { return (u & 0x7fffffffffffffffull) > 0x7ff0000000000000ull; }

// u: the raw IEEE bits of a non-NaN float32.
SK_HOST_DEVICE inline uint32_t bits_to_key(uint32_t u, uint32_t flip) {
  u = (u == 0x80000000u) ? 0u : u;                                     // -0.0 -> +0.0
  const uint32_t m = (uint32_t)((int32_t)u >> 31) | 0x80000000u;       // neg: all bits, pos: sign bit
  return u ^ m ^ flip;
}
SK_HOST_DEVICE inline uint64_t bits_to_key(uint64_t u, uint64_t flip) {
  u = (u == 0x8000000000000000ull) ? 0ull : u;
  const uint64_t m = (uint64_t)((int64_t)u >> 63) | 0x8000000000000000ull;
  return u ^ m ^ flip;
}

// ---- digits ---------------------------------------------------------------
template <typename K>
SK_HOST_DEVICE constexpr int key_bits() {
  return (int)(sizeof(K) * 8);
}
// Number of digit levels: 3 for 32-bit keys (11, 11, 10), 6 for 64-bit keys.
template <typename K>
SK_HOST_DEVICE constexpr int num_levels() {
  return (key_bits<K>() + kRadixBits - 1) / kRadixBits;
}
template <typename K>
SK_HOST_DEVICE inline int level_shift(int level) {
  const int s = key_bits<K>() - kRadixBits * (level + 1);
  return s > 0 ? s : 0;
}
template <typename K>
SK_HOST_DEVICE inline int level_width(int level) {
  const int w = key_bits<K>() - kRadixBits * level;
  return w < kRadixBits ? w : kRadixBits;
}
// Mask of the key bits fixed once `level` digits (levels 0..level-1) are known.
template <typename K>
SK_HOST_DEVICE inline K prefix_mask(int levels_known) {
  if (levels_known <= 0) return (K)0;
  const int low = level_shift<K>(levels_known - 1);
  return (K)(~(K)0) << low;  // level_shift(last) is 0 -> all bits
}

// Given the merged histogram of one level (nbuckets entries) and the rank
// `kk` (1-based, counted from the best key) sought among the keys counted in
// it, return the bucket holding it and set *kk to its rank inside that bucket
// and *above to the number of keys in better (higher) buckets.
template <typename C>
SK_HOST_DEVICE inline uint32_t find_bucket(const C* hist, uint32_t nbuckets, uint64_t* kk, uint64_t* above) {
  uint64_t cum = 0;
  for (uint32_t b = nbuckets; b-- > 0;) {
    const uint64_t c = (uint64_t)hist[b];
    if (cum + c >= *kk) {
      *kk -= cum;
      *above = cum;
      return b;
    }
    cum += c;
  }
  *above = cum;  // unreachable when kk <= total
  return 0;
}

}  // namespace radix
}  // namespace sparsekern
