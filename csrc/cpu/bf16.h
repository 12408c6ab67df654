// bfloat16 <-> float32 for the CPU kernels' bf16 paths: they convert where activations are
// packed or loaded, accumulate in float32 and round once on store. Portable: GCC vectors
// (AVX2 in the x86-64-v3 clone), no AVX-512-BF16 instructions.
#pragma once
// As in simd.h: these 32-byte vectors appear in always_inline helpers that the baseline clone inlines too, so
// their ABI note does not apply (a file including this header before simd.h would otherwise print it).
#pragma GCC diagnostic ignored "-Wpsabi"

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "cpu/common.h"

namespace sparsekern {
namespace bf16 {

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));

// The float32 compute type of a stored element type (float and double compute as themselves).
template <typename I> struct Acc { using type = I; };
template <> struct Acc<c10::BFloat16> { using type = float; };

SK_INLINE float to_f32(c10::BFloat16 v) {
  const uint32_t u = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN to the quiet NaN 0x7FC0: bit-identical to c10::BFloat16(float).
SK_INLINE c10::BFloat16 from_f32(float f) { return c10::BFloat16(f); }

SK_INLINE f32x8 load8(const c10::BFloat16* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x8 u = __builtin_convertvector(h, u32x8) << 16;
  return (f32x8)u;
}

SK_INLINE void store8(c10::BFloat16* p, f32x8 x) {
  const u32x8 u = (u32x8)x;
  u32x8 r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const i32x8 nan = x != x;
  r = nan ? u32x8{} + 0x7FC0u : r;
  const u16x8 h = __builtin_convertvector(r, u16x8);
  std::memcpy(p, &h, sizeof(h));
}

// A scalar element as its compute type (identity for float and double); static_cast<c10::BFloat16>
// rounds back.
SK_INLINE float widen(c10::BFloat16 v) { return to_f32(v); }
SK_INLINE float widen(float v) { return v; }
SK_INLINE double widen(double v) { return v; }

}  // namespace bf16
}  // namespace sparsekern
