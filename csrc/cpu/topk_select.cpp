// topk_select (CPU): indices, in ascending order, of the k best scores among
// the candidates, ties at the threshold going to the lower index.
//
// O(n) radix select, no sort:
//  1. Each float is mapped to an order-preserving unsigned key (radix_select.h;
//     "better" = larger key for both largest=true and false).
//  2. Level 0: the scores are split into nb blocks (one per thread); each block
//     builds a histogram of the top 11-bit digit of its candidates' keys (the
//     NaN check is fused in). The merged histogram gives the bucket holding the
//     k-th best key; the keys in better buckets are counted per block.
//  3. Next levels narrow to the keys whose prefix matches, digit by digit,
//     until the exact threshold key T is known. When the survivors of a level
//     are few (<= 1/4 of what the pass reads), the next pass also copies their
//     keys into a per-block buffer so that later levels read only those.
//  4. Per block: g = #keys > T, e = #keys == T. The first r = k - sum(g) keys
//     equal to T (in index order) are taken, so block j writes g_j + its share
//     of r at its prefix-sum offset: the output comes out in index order
//     without a sort, in parallel.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "cpu/common.h"
#include "cpu/radix_select.h"

namespace sparsekern {
namespace {

using radix::kRadixSize;

constexpr int64_t kSub = 256;                      // keys per vectorized sub-step of a pass
constexpr int64_t kHistCopy = kRadixSize + 16;     // one histogram copy (+ padding)
constexpr int64_t kHistBlock = 2 * kHistCopy;      // two copies per block (store-forwarding stalls)
constexpr int64_t kMinBlock = 1 << 16;             // elements per block at least (small n: one block)
constexpr int64_t kMaxBlock = int64_t(1) << 31;    // elements per block at most (uint32 counts)
constexpr int64_t kOutSub = 32;                    // keys per step of the output pass

template <typename F> struct KeyOf;
template <> struct KeyOf<float> { using type = uint32_t; };
template <> struct KeyOf<double> { using type = uint64_t; };

template <typename F, typename K>
SK_INLINE K load_bits(const F* p) {
  K u;
  std::memcpy(&u, p, sizeof(K));
  return u;
}

// Counts the digit (key >> shift) & dmask of the elements in [lo, hi) that
// are candidates and whose key matches `prefix` under `pmask` into hist (two
// copies); with comp, also appends their keys there in index order. Returns
// whether a NaN candidate was seen.
// How a pass selects the keys it counts: all of them, or those whose `match`
// byte is 1, the matching ones being many (dense) or few (sparse).
enum Mode { kAll = 0, kDense = 1, kSparse = 2 };

// Counts digit (key >> shift) & dmask of the selected keys among keys[0, len)
// into h0/h1; with COMPACT, appends them to comp[w...]. Returns the new w.
template <typename K, int MODE, bool COMPACT>
SK_INLINE int64_t consume(const K* keys, const uint16_t* dig, uint8_t* match, int64_t len, int shift, K dmask,
                          uint32_t* h0, uint32_t* h1, K* comp, int64_t w) {
  if (MODE == kSparse) {
    // Visit only the set match bytes, 8 at a time: cost ~ len / 8 + #matches.
    for (int64_t t = len; t < ((len + 7) & ~int64_t(7)); ++t) match[t] = 0;
    for (int64_t g = 0; g < len; g += 8) {
      uint64_t m;
      std::memcpy(&m, match + g, 8);
      while (m) {
        const K key = keys[g + (__builtin_ctzll(m) >> 3)];
        m &= m - 1;
        h0[(key >> shift) & dmask]++;
        if (COMPACT) comp[w++] = key;
      }
    }
    return w;
  }
  // Non-matching keys are dropped before counting: counting them in a dummy
  // bucket makes a chain of same-address increments at random positions, which
  // defeats the CPU's memory-dependence prediction (several times slower).
  uint16_t packed[MODE == kDense ? kSub : 1];
  const uint16_t* d = dig;
  int64_t m = len;
  if (MODE == kDense) {
    int64_t p = 0;
    for (int64_t t = 0; t < len; ++t) {
      packed[p] = dig[t];
      p += match[t];
    }
    d = packed;
    m = p;
  }
  int64_t t = 0;
  for (; t + 1 < m; t += 2) {
    h0[d[t]]++;
    h1[d[t + 1]]++;
  }
  if (t < m) h0[d[t]]++;
  if (COMPACT) {
    for (int64_t s = 0; s < len; ++s) {  // comp has one slot of slack
      comp[w] = keys[s];
      w += match[s];
    }
  }
  return w;
}

// Counts the digit (key >> shift) & dmask of the elements in [lo, hi) that
// are candidates and whose key matches `prefix` under `pmask` into hist (two
// copies); with COMPACT, also appends their keys to comp in index order.
// Returns whether a NaN candidate was seen.
template <typename F, typename K, bool CAND, int MODE, bool COMPACT>
SK_INLINE bool float_pass_body(const F* x, const bool* cand, int64_t lo, int64_t hi, K flip, K prefix, K pmask,
                               int shift, K dmask, uint32_t* hist, K* comp) {
  constexpr bool kNeedKeys = COMPACT || MODE == kSparse;
  uint16_t dig[MODE == kSparse ? 1 : kSub];
  uint8_t match[kSub + 8];
  K keys[kNeedKeys ? kSub : 1];
  uint32_t* h0 = hist;
  uint32_t* h1 = hist + kHistCopy;
  unsigned bad = 0;
  int64_t w = 0;
  for (int64_t base = lo; base < hi; base += kSub) {
    const int64_t len = std::min(kSub, hi - base);
    const F* xb = x + base;
    const uint8_t* cb = reinterpret_cast<const uint8_t*>(cand) + base;  // bool is one byte, 0 or 1
    for (int64_t t = 0; t < len; ++t) {
      const K u = load_bits<F, K>(xb + t);
      const K c = CAND ? (K)cb[t] : (K)1;
      bad |= (unsigned)((K)radix::bits_is_nan(u) & c);
      const K key = radix::bits_to_key(u, flip);
      if (MODE != kAll) match[t] = (uint8_t)(c & (K)((key & pmask) == prefix));
      if (MODE != kSparse) dig[t] = (uint16_t)((key >> shift) & dmask);
      if (kNeedKeys) keys[t] = key;
    }
    w = consume<K, MODE, COMPACT>(keys, dig, match, len, shift, dmask, h0, h1, comp, w);
  }
  return bad != 0;
}

// Same over a buffer of keys (all candidates).
template <typename K, int MODE, bool COMPACT>
SK_INLINE void key_pass_body(const K* src, int64_t m, K prefix, K pmask, int shift, K dmask, uint32_t* hist, K* comp) {
  uint16_t dig[MODE == kSparse ? 1 : kSub];
  uint8_t match[kSub + 8];
  uint32_t* h0 = hist;
  uint32_t* h1 = hist + kHistCopy;
  int64_t w = 0;
  for (int64_t base = 0; base < m; base += kSub) {
    const int64_t len = std::min(kSub, m - base);
    const K* kb = src + base;
    for (int64_t t = 0; t < len; ++t) {
      const K key = kb[t];
      match[t] = (uint8_t)((key & pmask) == prefix);
      if (MODE != kSparse) dig[t] = (uint16_t)((key >> shift) & dmask);
    }
    w = consume<K, MODE, COMPACT>(kb, dig, match, len, shift, dmask, h0, h1, comp, w);
  }
}

// Writes, in index order, the candidates in [lo, hi) with key > T and the
// first eq_take with key == T; exactly nout of them (known in advance).
template <typename F, typename K, bool CAND>
SK_INLINE void output_body(const F* x, const bool* cand, int64_t lo, int64_t hi, K flip, K T, int64_t eq_take,
                           int64_t* out, int64_t nout) {
  K kk[kOutSub];
  int64_t pos = 0, eq_seen = 0;
  for (int64_t base = lo; base < hi && pos < nout; base += kOutSub) {
    const int64_t len = std::min(kOutSub, hi - base);
    const F* xb = x + base;
    unsigned any = 0;
    const uint8_t* cb = reinterpret_cast<const uint8_t*>(cand) + base;
    for (int64_t t = 0; t < len; ++t) {
      const K key = radix::bits_to_key(load_bits<F, K>(xb + t), flip);
      const K kc = CAND ? (key & ((K)0 - (K)cb[t])) : key;  // non-candidates -> 0, which no valid key is
      kk[t] = kc;
      any |= (unsigned)(kc >= T);
    }
    if (!any) continue;
    if (nout - pos >= kOutSub) {  // room for a branch-free step
      for (int64_t t = 0; t < len; ++t) {
        const bool gt = kk[t] > T;
        const bool eq = kk[t] == T;
        const bool take = gt | (eq & (eq_seen < eq_take));
        eq_seen += eq;
        out[pos] = base + t;
        pos += take;
      }
    } else {
      for (int64_t t = 0; t < len; ++t) {
        const bool gt = kk[t] > T;
        const bool eq = kk[t] == T;
        const bool take = gt | (eq & (eq_seen < eq_take));
        eq_seen += eq;
        if (take) {
          out[pos++] = base + t;
          if (pos == nout) break;
        }
      }
    }
  }
}

// ---- per-dtype entry points (ISA clones) ---------------------------------
#define SK_FP(C, M, P) \
  return float_pass_body<FT, KT, C, M, P>(x, cand, lo, hi, flip, prefix, pmask, shift, dmask, hist, comp)
#define SK_FLOAT_PASS(ATTR, CS, F, K)                                                                                  \
  ATTR bool float_pass##CS(const F* x, const bool* cand, int64_t lo, int64_t hi, K flip, K prefix, K pmask, int shift, \
                           K dmask, uint32_t* hist, K* comp, bool sparse) {                                            \
    using FT = F;                                                                                                      \
    using KT = K;                                                                                                      \
    if (!cand && !comp && pmask == 0) SK_FP(false, kAll, false);                                                       \
    if (sparse) {                                                                                                      \
      if (cand) {                                                                                                      \
        if (comp) SK_FP(true, kSparse, true);                                                                          \
        SK_FP(true, kSparse, false);                                                                                   \
      }                                                                                                                \
      if (comp) SK_FP(false, kSparse, true);                                                                           \
      SK_FP(false, kSparse, false);                                                                                    \
    }                                                                                                                  \
    if (cand) {                                                                                                        \
      if (comp) SK_FP(true, kDense, true);                                                                             \
      SK_FP(true, kDense, false);                                                                                      \
    }                                                                                                                  \
    if (comp) SK_FP(false, kDense, true);                                                                              \
    SK_FP(false, kDense, false);                                                                                       \
  }
SK_CLONE_BUILDS(SK_FLOAT_PASS, float, uint32_t)
SK_CLONE_BUILDS(SK_FLOAT_PASS, double, uint64_t)
SK_CLONE_DISPATCH(float_pass)
#undef SK_FLOAT_PASS
#undef SK_FP

#define SK_KP(M, P) return key_pass_body<KT, M, P>(src, m, prefix, pmask, shift, dmask, hist, comp)
#define SK_KEY_PASS(ATTR, CS, K)                                                                                  \
  ATTR void key_pass##CS(const K* src, int64_t m, K prefix, K pmask, int shift, K dmask, uint32_t* hist, K* comp, \
                         bool sparse) {                                                                           \
    using KT = K;                                                                                                 \
    if (sparse) {                                                                                                 \
      if (comp) SK_KP(kSparse, true);                                                                             \
      SK_KP(kSparse, false);                                                                                      \
    }                                                                                                             \
    if (comp) SK_KP(kDense, true);                                                                                \
    SK_KP(kDense, false);                                                                                         \
  }
SK_CLONE_BUILDS(SK_KEY_PASS, uint32_t)
SK_CLONE_BUILDS(SK_KEY_PASS, uint64_t)
SK_CLONE_DISPATCH(key_pass)
#undef SK_KEY_PASS
#undef SK_KP

#define SK_OUTPUT_PASS(ATTR, CS, F, K)                                                                          \
  ATTR void output_pass##CS(const F* x, const bool* cand, int64_t lo, int64_t hi, K flip, K T, int64_t eq_take, \
                            int64_t* out, int64_t nout) {                                                       \
    if (cand) output_body<F, K, true>(x, cand, lo, hi, flip, T, eq_take, out, nout);                            \
    else output_body<F, K, false>(x, cand, lo, hi, flip, T, eq_take, out, nout);                                \
  }
SK_CLONE_BUILDS(SK_OUTPUT_PASS, float, uint32_t)
SK_CLONE_BUILDS(SK_OUTPUT_PASS, double, uint64_t)
SK_CLONE_DISPATCH(output_pass)
#undef SK_OUTPUT_PASS

// ---- driver ---------------------------------------------------------------
template <typename F>
int64_t first_nan(const F* x, const bool* cand, int64_t n) {
  using K = typename KeyOf<F>::type;
  for (int64_t i = 0; i < n; ++i)
    if ((!cand || cand[i]) && radix::bits_is_nan(load_bits<F, K>(x + i))) return i;
  return -1;
}

template <typename F>
at::Tensor select_impl(const at::Tensor& scores, const bool* cand, int64_t k, bool largest) {
  using K = typename KeyOf<F>::type;
  constexpr int L = radix::num_levels<K>();
  const int64_t n = scores.numel();
  const F* x = scores.data_ptr<F>();
  const K flip = largest ? (K)0 : ~(K)0;

  // Blocks: one per thread, none smaller than kMinBlock, none larger than kMaxBlock.
  int64_t nb = std::min<int64_t>(at::get_num_threads(), (n + kMinBlock - 1) / kMinBlock);
  nb = std::max<int64_t>({nb, (n + kMaxBlock - 1) / kMaxBlock, 1});
  auto block_lo = [&](int64_t j) { return (n / nb) * j + std::min(j, n % nb); };

  std::vector<uint32_t> hist(nb * kHistBlock);
  std::vector<uint8_t> nan_seen(nb, 0);
  std::vector<int64_t> gt(nb, 0);       // keys better than the current prefix, per block
  std::vector<int64_t> surv(nb, 0);     // keys matching the current prefix, per block
  std::unique_ptr<K[]> buf[2];          // compacted keys (per-block regions), not zero-filled
  std::vector<int64_t> reg_off(nb, 0), reg_len(nb, 0), new_off(nb, 0);
  int cur = -1;                         // -1: the passes read the scores
  std::vector<uint64_t> total(kRadixSize);

  K prefix = 0;
  uint64_t kk = (uint64_t)k;  // rank still sought among the survivors (1-based)
  int64_t nsurv = n;          // survivors of the previous level
  int64_t src_size = n;       // elements a pass reads

  for (int level = 0; level < L; ++level) {
    const int shift = radix::level_shift<K>(level);
    const uint32_t nbk = 1u << radix::level_width<K>(level);
    const K dmask = (K)(nbk - 1);
    const K pmask = radix::prefix_mask<K>(level);
    const bool compact = level > 0 && level < L - 1 && nsurv * 4 <= src_size;
    const bool sparse = level > 0 && nsurv * 8 <= src_size;  // few keys match the prefix
    const int nxt = cur == 0 ? 1 : 0;
    if (compact) {
      int64_t off = 0;
      for (int64_t j = 0; j < nb; ++j) {
        new_off[j] = off;
        off += surv[j] + 1;  // one slot of slack for the branch-free append
      }
      buf[nxt].reset(new K[off]);
    }
    at::parallel_for(0, nb, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        uint32_t* h = hist.data() + j * kHistBlock;
        std::fill(h, h + kHistBlock, 0u);
        K* comp = compact ? buf[nxt].get() + new_off[j] : nullptr;
        if (cur < 0) {
          nan_seen[j] =
              float_pass(x, cand, block_lo(j), block_lo(j + 1), flip, prefix, pmask, shift, dmask, h, comp, sparse);
        } else {
          key_pass(buf[cur].get() + reg_off[j], reg_len[j], prefix, pmask, shift, dmask, h, comp, sparse);
        }
      }
    });
    if (compact) {
      for (int64_t j = 0; j < nb; ++j) {
        reg_off[j] = new_off[j];
        reg_len[j] = surv[j];
      }
      if (cur >= 0) buf[cur].reset();
      cur = nxt;
      src_size = nsurv;
    }

    std::fill(total.begin(), total.end(), 0);
    for (int64_t j = 0; j < nb; ++j) {
      const uint32_t* h = hist.data() + j * kHistBlock;
      for (uint32_t b = 0; b < nbk; ++b) total[b] += (uint64_t)h[b] + h[kHistCopy + b];
    }

    if (level == 0) {
      bool any_nan = false;
      for (int64_t j = 0; j < nb; ++j) any_nan |= nan_seen[j] != 0;
      if (any_nan) { TORCH_CHECK_VALUE(false, "topk_select: scores contains NaN at index ", first_nan<F>(x, cand, n)); }
      uint64_t ncand = 0;
      for (uint32_t b = 0; b < nbk; ++b) ncand += total[b];
      TORCH_CHECK((uint64_t)k <= ncand, "topk_select: k (", k, ") is larger than the number of candidates (", ncand,
                  ")");
      if (k == 0) return at::empty({0}, scores.options().dtype(at::kLong));
      if ((uint64_t)k == ncand) {
        // All candidates: every candidate key is > 0 (the "threshold" 0 no valid key reaches).
        for (int64_t j = 0; j < nb; ++j) {
          const uint32_t* h = hist.data() + j * kHistBlock;
          int64_t c = 0;
          for (uint32_t b = 0; b < nbk; ++b) c += (int64_t)h[b] + h[kHistCopy + b];
          gt[j] = c;
          surv[j] = 0;
        }
        prefix = 0;
        kk = 0;
        break;
      }
    }

    uint64_t above = 0;
    const uint32_t bsel = radix::find_bucket(total.data(), nbk, &kk, &above);
    (void)above;
    nsurv = (int64_t)total[bsel];
    for (int64_t j = 0; j < nb; ++j) {
      const uint32_t* h = hist.data() + j * kHistBlock;
      int64_t g = 0;
      for (uint32_t b = bsel + 1; b < nbk; ++b) g += (int64_t)h[b] + h[kHistCopy + b];
      gt[j] += g;
      surv[j] = (int64_t)h[bsel] + h[kHistCopy + bsel];
    }
    prefix |= (K)bsel << shift;
  }

  // prefix is now the threshold key T; surv[j] = #keys == T in block j; take the first kk of them.
  const K T = prefix;
  std::vector<int64_t> eq_take(nb), out_off(nb + 1);
  int64_t eq_left = (int64_t)kk;
  out_off[0] = 0;
  for (int64_t j = 0; j < nb; ++j) {
    eq_take[j] = std::min(eq_left, surv[j]);
    eq_left -= eq_take[j];
    out_off[j + 1] = out_off[j] + gt[j] + eq_take[j];
  }
  TORCH_INTERNAL_ASSERT(out_off[nb] == k && eq_left == 0, "topk_select: internal count mismatch");

  at::Tensor out = at::empty({k}, scores.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, nb, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t nout = out_off[j + 1] - out_off[j];
      if (nout > 0) output_pass(x, cand, block_lo(j), block_lo(j + 1), flip, T, eq_take[j], o + out_off[j], nout);
    }
  });
  return out;
}

at::Tensor topk_select_cpu(const at::Tensor& scores_in, int64_t k, bool largest,
                           const std::optional<at::Tensor>& candidates) {
  TORCH_CHECK(scores_in.dim() == 1, "topk_select: scores must be a 1-D tensor, got dim ", scores_in.dim(), " (shape ",
              scores_in.sizes(), ")");
  check_float(scores_in, "scores", "topk_select");
  const int64_t n = scores_in.size(0);
  TORCH_CHECK(k >= 0, "topk_select: k must be >= 0, got k = ", k);
  at::Tensor cand;
  if (candidates.has_value() && candidates->defined()) {
    cand = *candidates;
    TORCH_CHECK(cand.scalar_type() == at::kBool, "topk_select: candidates must be a bool tensor, got ",
                cand.scalar_type());
    TORCH_CHECK(cand.dim() == 1 && cand.size(0) == n, "topk_select: candidates must be 1-D with the size of scores (",
                n, "), got shape ", cand.sizes());
    TORCH_CHECK(cand.device() == scores_in.device(), "topk_select: candidates is on ", cand.device(),
                " but scores is on ", scores_in.device());
    cand = cand.contiguous();
  } else {
    TORCH_CHECK(k <= n, "topk_select: k (", k, ") is larger than the number of candidates (", n, ")");
  }
  const at::Tensor scores = scores_in.contiguous();
  const bool* c = cand.defined() ? cand.data_ptr<bool>() : nullptr;
  if (scores.scalar_type() == at::kFloat) return select_impl<float>(scores, c, k, largest);
  return select_impl<double>(scores, c, k, largest);
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("topk_select", &topk_select_cpu); }

}  // namespace sparsekern
