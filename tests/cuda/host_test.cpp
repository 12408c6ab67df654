// Host unit tests of the tiling arithmetic the CUDA kernels share with host code (csrc/cuda/tiling.h,
// csrc/cpu/radix_select.h): plain C++, no CUDA and no torch, compiled and run by
// tests/cuda/test_host_logic.py. Prints "ok <check>" / "FAIL <check>: ..." and "N passed, M failed".
#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "cpu/radix_select.h"
#include "cuda/tiling.h"

using namespace sparsekern::cuda;

namespace {

int g_pass = 0, g_fail = 0;
void report(const char* name, const std::string& err) {
  if (err.empty()) {
    ++g_pass;
    std::printf("ok %s\n", name);
  } else {
    ++g_fail;
    std::printf("FAIL %s: %s\n", name, err.c_str());
  }
}
std::string S(long long v) { return std::to_string(v); }

void swizzle() {
  std::string err;
  int prev = kSwizzleBuckets;
  for (int64_t len = 0; len < 200000 && err.empty(); ++len) {
    const int b = swizzle_bucket(len);
    if (b < 0 || b >= kSwizzleBuckets) err = "bucket out of range at len " + S(len);
    else if (b > prev) err = "longer row in a later bucket at len " + S(len);
    prev = b;
  }
  if (err.empty() && swizzle_bucket(0) != kSwizzleBuckets - 1) err = "empty rows must go last";
  if (err.empty() && swizzle_bucket(INT64_MAX) < 0) err = "huge length";
  // Lengths that share a bucket differ by less than 25% (4 classes per power of two).
  for (int64_t len = 4; len < 100000 && err.empty(); ++len) {
    int64_t hi = len;
    while (swizzle_bucket(hi + 1) == swizzle_bucket(len)) ++hi;
    if ((double)hi / (double)len >= 1.25) err = "bucket of " + S(len) + " spans up to " + S(hi);
    len = hi;
  }
  // The kernel's counting sort over buckets lists rows by non-increasing length class.
  std::mt19937_64 rng(1);
  std::vector<int64_t> lens(5000);
  for (auto& l : lens) l = (int64_t)(rng() % 3000) * (rng() % 4 == 0);
  std::vector<int> cnt(kSwizzleBuckets, 0), start(kSwizzleBuckets, 0), order(lens.size());
  for (int64_t l : lens) cnt[swizzle_bucket(l)]++;
  std::partial_sum(cnt.begin(), cnt.end() - 1, start.begin() + 1);
  for (size_t i = 0; i < lens.size(); ++i) order[start[swizzle_bucket(lens[i])]++] = (int)i;
  std::vector<int> seen(lens.size(), 0);
  for (size_t q = 0; q < order.size() && err.empty(); ++q) {
    if (seen[order[q]]++) err = "row listed twice";
    if (q && swizzle_bucket(lens[order[q]]) < swizzle_bucket(lens[order[q - 1]])) err = "order not by class";
  }
  report("swizzle_bucket", err);
}

void panel_layout() {
  std::string err;
  // Dealing: a bijection from ranks to (warp, slot), snake order balances sorted lengths.
  std::set<std::pair<int, int>> got;
  for (int r = 0; r < kPanelRows; ++r) {
    int w, s;
    panel_deal(r, &w, &s);
    if (w < 0 || w >= kPanelWarps || s < 0 || s >= kPanelRowsPerWarp) err = "deal out of range";
    got.insert({w, s});
  }
  if (err.empty() && (int)got.size() != kPanelRows) err = "deal is not a bijection";
  std::mt19937_64 rng(2);
  for (int t = 0; t < 200 && err.empty(); ++t) {
    std::vector<int64_t> len(kPanelRows);
    for (auto& l : len) l = (int64_t)(rng() % 1000);
    std::sort(len.rbegin(), len.rend());
    std::vector<int64_t> sum(kPanelWarps, 0);
    for (int r = 0; r < kPanelRows; ++r) {
      int w, s;
      panel_deal(r, &w, &s);
      sum[w] += len[r];
    }
    const auto mm = std::minmax_element(sum.begin(), sum.end());
    if (*mm.second - *mm.first > len[0]) err = "snake deal unbalanced by more than the longest row";
  }
  report("panel_deal", err);

  err.clear();
  for (int kk = 0; kk < kPanelChunk && err.empty(); ++kk) {
    std::vector<int> hit(kPanelCols, 0);
    for (int c = 0; c < kPanelCols; ++c) {
      const int p = panel_swizzle(kk, c);
      if (p < 0 || p >= kPanelCols || p % 4 != c % 4) err = "swizzle leaves the row or splits a group of 4";
      else hit[p]++;
    }
    for (int h : hit)
      if (h != 1) err = "swizzle is not a permutation";
    // Compute read: lane l reads its 4 columns as one 16-byte access; each quarter warp (8 lanes per
    // shared-memory wavefront) must hit 8 distinct 16-byte bank groups.
    for (int qw = 0; qw < 4 && err.empty(); ++qw) {
      std::set<int> groups;
      for (int l = 8 * qw; l < 8 * qw + 8; ++l) groups.insert(((kk * kPanelCols + panel_swizzle(kk, 4 * l)) / 4) % 8);
      if (groups.size() != 8) err = "bank conflict in the compute read at kk " + S(kk);
    }
  }
  // Transposing store of a column-major fp32 B: a warp writes element e of 32 lanes' 4-vectors
  // (8 lanes along the chunk rows, 4 columns): 32 distinct banks.
  for (int warp = 0; warp < kPanelWarps && err.empty(); ++warp)
    for (int q = 0; q < 4 && err.empty(); ++q)
      for (int e = 0; e < 4 && err.empty(); ++e) {
        std::set<int> banks;
        for (int lane = 0; lane < 32; ++lane) {
          const int idx = warp * 32 + lane + 256 * q, kk = (idx % 8) * 4 + e, c = idx / 8;
          banks.insert((kk * kPanelCols + panel_swizzle(kk, c)) % 32);
        }
        if (banks.size() != 32) err = "bank conflict in the transposing store";
      }
  // The packed column form finds the same element as the swizzle.
  for (int shift : {9, 10})
    for (uint32_t col = 0; col < 5000 && err.empty(); col += 7)
      for (uint32_t lane = 0; lane < 32; ++lane) {
        const uint32_t k0 = col / kPanelChunk * kPanelChunk, q = col - k0, esz = 1u << (shift - 7);
        const uint32_t got = (panel_colx(col, shift) ^ (lane << (shift - 5))) - k0 * (1u << shift);
        const uint32_t want = (q * kPanelCols + (uint32_t)panel_swizzle((int)q, 4 * (int)lane)) * esz;
        if (got != want) err = "panel_colx disagrees with panel_swizzle at col " + S(col);
      }
  report("panel_swizzle", err);

  err.clear();
  if (choose_spmm_path(4, 100, 100, 400, false) != kPathRows) err = "tiny m must use rows";
  if (choose_spmm_path(4096, 4096, 8192, 1677722, true) != kPathPanel) err = "the benchmark shape must use the panel";
  if (choose_spmm_path(4096, 4096, 8192, 1677722, false) != kPathPanel) err = "dense-ish row-major must use the panel";
  if (choose_spmm_path(4096, 4096, 8192, 16777, false) != kPathRows) err = "very sparse row-major must use rows";
  if (choose_spmm_path(4096, kPanelMaxK + 1, 8192, (int64_t)1 << 26, false) != kPathRows) err = "k beyond colx";
  if (choose_spmm_path(4096, 4096, 16, 1677722, true) != kPathRows) err = "narrow output must use rows";
  for (int64_t n = 1; n < 300 && err.empty(); ++n)
    for (int v : {1, 2, 4, 8}) {
      const int lc = rows_column_lanes(n, v);
      if (lc != 1 && lc != 4 && lc != 32) err = "rows_column_lanes";
      if (n <= 4 * v && (int64_t)lc * v < n) err = "narrow output not covered by one tile";
    }
  report("spmm_path", err);
}

void sddmm_tiles() {
  std::string err;
  std::mt19937_64 rng(3);
  for (int t = 0; t < 2000 && err.empty(); ++t) {
    const int n = 1 + (int)(rng() % 130);
    std::vector<int> cnt(n), pre(n + 1, 0);
    for (auto& c : cnt) c = (rng() % 3 == 0) ? 0 : (int)(rng() % 5);
    for (int r = 0; r < n; ++r) pre[r + 1] = pre[r] + cnt[r];
    for (int q = 0; q < pre[n]; ++q) {
      int want = 0;
      for (int r = 0; r < n; ++r)
        if (pre[r] <= q) want = r;
      if (prefix_find(pre.data(), n, q) != want) err = "prefix_find";
      if (cnt[want] == 0 || q - pre[want] >= cnt[want]) err = "prefix_find lands on a row without that nonzero";
    }
  }
  for (int64_t rows = 1; rows < 30 && err.empty(); ++rows)
    for (int64_t cols = 1; cols < 12; ++cols) {
      std::set<std::pair<int64_t, int64_t>> seen;
      for (int64_t pid = 0; pid < rows * cols; ++pid) {
        int64_t rt, ct;
        sddmm_tile_of(pid, rows, cols, &rt, &ct);
        if (rt < 0 || rt >= rows || ct < 0 || ct >= cols) err = "tile out of range";
        seen.insert({rt, ct});
      }
      if ((int64_t)seen.size() != rows * cols) err = "tile order is not a bijection";
    }
  report("sddmm_tiles", err);
}

void conv_maps() {
  std::string err;
  std::mt19937_64 rng(4);
  for (int t = 0; t < 300 && err.empty(); ++t) {
    ConvGeom g{};
    g.N = 1 + rng() % 2;
    g.C = 1 + rng() % 3;
    g.Co = 1 + rng() % 3;
    g.H = 1 + rng() % 9;
    g.W = 1 + rng() % 9;
    g.KH = 1 + rng() % 4;
    g.KW = 1 + rng() % 4;
    g.SH = 1 + rng() % 3;
    g.SW = 1 + rng() % 3;
    g.PH = rng() % 3;
    g.PW = rng() % 3;
    g.DH = 1 + rng() % 2;
    g.DW = 1 + rng() % 2;
    g.OH = conv_out_size(g.H, g.KH, g.SH, g.PH, g.DH);
    g.OW = conv_out_size(g.W, g.KW, g.SW, g.PW, g.DW);
    if (g.OH <= 0 || g.OW <= 0) continue;
    const int64_t K = g.C * g.KH * g.KW;
    // Forward map against the definition; collect the (x, y) pairs it connects.
    std::set<std::pair<int64_t, int64_t>> fwd;  // (x offset, y offset without channel) per weight (co fixed)
    for (int64_t j = 0; j < K && err.empty(); ++j)
      for (int64_t c = 0; c < g.N * g.OH * g.OW; ++c) {
        const int64_t s = j % g.KW, r = (j / g.KW) % g.KH, ci = j / (g.KW * g.KH);
        const int64_t ow = c % g.OW, oh = (c / g.OW) % g.OH, n = c / (g.OW * g.OH);
        const int64_t ih = oh * g.SH - g.PH + r * g.DH, iw = ow * g.SW - g.PW + s * g.DW;
        const int64_t want = (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) ? -1 : ((n * g.C + ci) * g.H + ih) * g.W + iw;
        if (im2col_offset(g, im2col_col(g, c), im2col_row(g, j)) != want) err = "im2col map";
        if (want >= 0) fwd.insert({want, ((n * g.OH + oh) * g.OW + ow) * K + j});
      }
    // Grad-input map: B'[(r*KW + s)*Co + co, (n, ih, iw)] reads dy[n, co, oh, ow] exactly for the
    // pairs the forward connects.
    for (int64_t jp = 0; jp < g.KH * g.KW * g.Co && err.empty(); ++jp)
      for (int64_t c = 0; c < g.N * g.H * g.W; ++c) {
        const int64_t off = col2im_offset(g, col2im_col(g, c), col2im_row(g, jp));
        const int64_t co = jp % g.Co, rs = jp / g.Co;
        const int64_t iw = c % g.W, ih = (c / g.W) % g.H, n = c / (g.W * g.H);
        if (off < 0) continue;
        const int64_t ow = off % g.OW, oh = (off / g.OW) % g.OH, n2 = off / (g.OW * g.OH * g.Co);
        const int64_t co2 = (off / (g.OW * g.OH)) % g.Co;
        if (n2 != n || co2 != co) err = "col2im map: wrong image or channel";
        // the same (x, y, weight) link in the forward direction (channel 0 stands for any ci)
        const int64_t j = rs;  // ci = 0
        const int64_t x0 = ((n * g.C + 0) * g.H + ih) * g.W + iw;
        if (!fwd.count({x0, ((n * g.OH + oh) * g.OW + ow) * K + j})) err = "col2im links a pair the forward does not";
      }
    // ... and every forward pair (ci = 0) is found by the grad-input map.
    for (const auto& pr : fwd) {
      const int64_t j = pr.second % K;
      if (j >= g.KH * g.KW) continue;  // ci > 0
      const int64_t yc = pr.second / K, x = pr.first;
      const int64_t iw = x % g.W, ih = (x / g.W) % g.H, n = x / (g.W * g.H * g.C);
      const int64_t c = (n * g.H + ih) * g.W + iw;
      const int64_t off = col2im_offset(g, col2im_col(g, c), col2im_row(g, j * g.Co));
      const int64_t ow = yc % g.OW, oh = (yc / g.OW) % g.OH;
      if (off != ((n * g.Co + 0) * g.OH + oh) * g.OW + ow) err = "col2im misses a forward pair";
    }
  }
  report("conv_maps", err);
}

void topk_logic() {
  std::string err;
  std::mt19937_64 rng(5);
  // The select kernel's scan, two buckets per thread from the best down, finds radix::find_bucket's bucket.
  for (int t = 0; t < 3000 && err.empty(); ++t) {
    const uint32_t nbk = (t % 2) ? 2048 : 1024;
    std::vector<uint64_t> hist(nbk);
    for (auto& h : hist) h = (rng() % 4 == 0) ? rng() % 50 : 0;
    const uint64_t total = std::accumulate(hist.begin(), hist.end(), (uint64_t)0);
    if (total == 0) continue;
    uint64_t kk = 1 + rng() % total, kk_ref = kk, above = 0;
    const uint32_t b_ref = sparsekern::radix::find_bucket(hist.data(), nbk, &kk_ref, &above);
    int found = 0;
    uint64_t before = 0;
    for (uint32_t tid = 0; 2 * tid < 2048; ++tid) {
      const uint32_t q0 = 2 * tid, q1 = q0 + 1;
      const uint64_t c0 = q0 < nbk ? hist[nbk - 1 - q0] : 0, c1 = q1 < nbk ? hist[nbk - 1 - q1] : 0;
      if (before < kk && kk <= before + c0) {
        ++found;
        if (nbk - 1 - q0 != b_ref || kk - before != kk_ref) err = "select kernel picks another bucket";
      } else if (before + c0 < kk && kk <= before + c0 + c1) {
        ++found;
        if (nbk - 1 - q1 != b_ref || kk - before - c0 != kk_ref) err = "select kernel picks another bucket";
      }
      before += c0 + c1;
    }
    if (found != 1) err = "select kernel: " + S(found) + " threads claim the bucket";
  }
  // Tile plan: offsets are the scan of (gt + taken eq), exactly kk equal keys taken, first ones first.
  for (int t = 0; t < 3000 && err.empty(); ++t) {
    const int tiles = 1 + (int)(rng() % 20);
    std::vector<uint64_t> gt(tiles), eq(tiles);
    for (int i = 0; i < tiles; ++i) {
      gt[i] = rng() % 5;
      eq[i] = rng() % 4;
    }
    const uint64_t eq_total = std::accumulate(eq.begin(), eq.end(), (uint64_t)0);
    const uint64_t kk = eq_total ? rng() % (eq_total + 1) : 0;
    uint64_t gb = 0, eb = 0, expect_off = 0, taken = 0;
    for (int i = 0; i < tiles; ++i) {
      uint64_t off, take;
      topk_tile_plan(kk, gb, eb, eq[i], &off, &take);
      const uint64_t want_take = eb >= kk ? 0 : std::min(eq[i], kk - eb);
      if (off != expect_off || take != want_take) err = "topk_tile_plan";
      expect_off += gt[i] + take;
      taken += take;
      gb += gt[i];
      eb += eq[i];
    }
    if (taken != kk) err = "topk_tile_plan takes " + S(taken) + " equal keys, want " + S(kk);
  }
  // Keys: order-preserving, -0.0 ties +0.0, never 0 for a valid float.
  std::vector<float> vals = {-INFINITY, -3.5f, -1e-30f, -0.0f, 0.0f, 1e-30f, 2.0f, INFINITY};
  for (bool largest : {true, false}) {
    const uint32_t flip = sparsekern::radix::key_flip32(largest);
    for (size_t i = 0; i + 1 < vals.size(); ++i) {
      uint32_t a, b;
      std::memcpy(&a, &vals[i], 4);
      std::memcpy(&b, &vals[i + 1], 4);
      const uint32_t ka = sparsekern::radix::bits_to_key(a, flip), kb = sparsekern::radix::bits_to_key(b, flip);
      if (ka == 0 || kb == 0) err = "a valid float maps to key 0";
      const bool tie = vals[i] == vals[i + 1];
      if (tie ? ka != kb : (largest ? !(ka < kb) : !(ka > kb))) err = "key order";
    }
  }
  report("topk_logic", err);
}

}  // namespace

int main() {
  swizzle();
  panel_layout();
  sddmm_tiles();
  conv_maps();
  topk_logic();
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
