// Runs the CUDA kernels of csrc/cuda through the SIMT emulator (tests/cuda/simt/simt.h) on the host
// and checks them against naive double-precision references. Built and run by
// tests/cuda/test_host_logic.py:  sim_test <group> [forward|reverse|shuffle]
// with group one of spmm, sddmm, conv, topk, gather, or trap_col / trap_gather (which must abort).
// Prints "ok <case>" / "FAIL <case>: ..." per case and a closing "N passed, M failed".
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cuda/kernels.h"

using namespace sparsekern::cuda;

namespace {

int g_pass = 0, g_fail = 0;

void report(const std::string& name, const std::string& err) {
  if (err.empty()) {
    ++g_pass;
    std::printf("ok %s\n", name.c_str());
  } else {
    ++g_fail;
    std::printf("FAIL %s: %s\n", name.c_str(), err.c_str());
  }
  std::fflush(stdout);
}

// ---- element types ---------------------------------------------------------------------------
template <class S> S from_d(double v);
template <> float from_d<float>(double v) { return (float)v; }
template <> double from_d<double>(double v) { return v; }
template <> __half from_d<__half>(double v) { return __float2half_rn((float)v); }
template <> __nv_bfloat16 from_d<__nv_bfloat16>(double v) { return __float2bfloat16_rn((float)v); }
double to_d(float v) { return v; }
double to_d(double v) { return v; }
double to_d(__half v) { return __half2float(v); }
double to_d(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class S> DType dtype();
template <> DType dtype<float>() { return DType::kF32; }
template <> DType dtype<double>() { return DType::kF64; }
template <> DType dtype<__half>() { return DType::kF16; }
template <> DType dtype<__nv_bfloat16>() { return DType::kBF16; }
template <class S> const char* dname();
template <> const char* dname<float>() { return "f32"; }
template <> const char* dname<double>() { return "f64"; }
template <> const char* dname<__half>() { return "f16"; }
template <> const char* dname<__nv_bfloat16>() { return "bf16"; }
// Relative tolerance against the sum of |terms| (accumulation) plus the rounding of the result.
template <class S> double rtol();
template <> double rtol<float>() { return 2e-6; }
template <> double rtol<double>() { return 1e-13; }
template <> double rtol<__half>() { return 2e-3; }
template <> double rtol<__nv_bfloat16>() { return 1.6e-2; }

struct Rng {
  std::mt19937_64 g;
  explicit Rng(uint64_t seed) : g(seed) {}
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(g); }
  double uni() { return std::uniform_real_distribution<double>(0.0, 1.0)(g); }
  int64_t below(int64_t n) { return n <= 0 ? 0 : (int64_t)(g() % (uint64_t)n); }
};

struct Aligned {  // 256-byte aligned scratch, filled with garbage
  void* p = nullptr;
  explicit Aligned(size_t bytes) {
    p = std::aligned_alloc(256, (bytes + 255) / 256 * 256 + 256);
    std::memset(p, 0xA5, (bytes + 255) / 256 * 256 + 256);
  }
  ~Aligned() { std::free(p); }
};

struct HostCsr {
  int64_t m = 0, k = 0;
  std::vector<int64_t> rp;
  std::vector<int32_t> ci;
  std::vector<double> v;
  int64_t nnz() const { return (int64_t)ci.size(); }
};

HostCsr random_csr(int64_t m, int64_t k, double density, bool empty_rows, Rng& rng) {
  HostCsr A;
  A.m = m;
  A.k = k;
  A.rp.push_back(0);
  for (int64_t i = 0; i < m; ++i) {
    const bool empty = empty_rows && (i % 3 == 1 || (m > 2 && i == m - 1));
    for (int64_t j = 0; j < k; ++j) {
      if (!empty && rng.uni() < density) {
        A.ci.push_back((int32_t)j);
        A.v.push_back(rng.normal());
      }
    }
    A.rp.push_back((int64_t)A.ci.size());
  }
  return A;
}

// A dense (rows, cols) matrix of S in one of three layouts.
template <class S>
struct HostDense {
  int64_t rows, cols, s0, s1;
  std::vector<S> buf;
  double at(int64_t r, int64_t c) const { return to_d(buf[r * s0 + c * s1]); }
};
template <class S>
HostDense<S> random_dense(int64_t rows, int64_t cols, const std::string& layout, Rng& rng) {
  HostDense<S> d{rows, cols, 0, 0, {}};
  size_t size;
  if (layout == "row") {
    d.s0 = cols;
    d.s1 = 1;
    size = rows * cols;
  } else if (layout == "col") {
    d.s0 = 1;
    d.s1 = rows;
    size = rows * cols;
  } else {  // "strided": every other column of a wider row-major buffer
    d.s0 = 2 * cols + 1;
    d.s1 = 2;
    size = rows * (2 * cols + 1);
  }
  d.buf.resize(std::max<size_t>(size, 1));
  for (auto& x : d.buf) x = from_d<S>(rng.normal());
  return d;
}

std::string close(double got, double want, double scale, double rt, const char* what, int64_t a, int64_t b) {
  if (std::isnan(got) || std::fabs(got - want) > rt * (scale + std::fabs(want)) + 1e-30) {
    char buf[256];
    std::snprintf(buf, sizeof buf, "%s[%lld,%lld] = %.9g, want %.9g (scale %.3g)", what, (long long)a, (long long)b,
                  got, want, scale);
    return buf;
  }
  return "";
}

// ---- spmm ----------------------------------------------------------------------------------------
template <class S>
void test_spmm(Rng& rng, int64_t m, int64_t k, int64_t n, double density, bool empty_rows, const std::string& blay,
               const std::string& olay, bool bias, int path) {
  char name[200];
  std::snprintf(name, sizeof name, "spmm/%s/m%lld-k%lld-n%lld-d%g%s/B-%s/out-%s%s/%s", dname<S>(), (long long)m,
                (long long)k, (long long)n, density, empty_rows ? "-empty" : "", blay.c_str(), olay.c_str(),
                bias ? "/bias" : "", path == kPathPanel ? "panel" : "rows");
  HostCsr A = random_csr(m, k, density, empty_rows, rng);
  std::vector<S> vals(A.nnz() ? A.nnz() : 1);
  for (int64_t p = 0; p < A.nnz(); ++p) vals[p] = from_d<S>(A.v[p]);
  HostDense<S> B = random_dense<S>(k, n, blay, rng);
  std::vector<S> bv(m ? 2 * m : 1);
  for (auto& x : bv) x = from_d<S>(rng.normal());
  HostDense<S> O{m, n, olay == "row" ? n : 1, olay == "row" ? 1 : m, std::vector<S>(std::max<int64_t>(m * n, 1))};
  for (auto& x : O.buf) x = from_d<S>(12345.0);  // every element must be overwritten
  Csr csr{vals.data(), 1, nullptr, A.rp.data(), A.ci.data(), m, k, A.nnz()};
  Dense db{B.buf.data(), k, n, B.s0, B.s1};
  DenseOut dout{O.buf.data(), m, n, O.s0, O.s1};
  Aligned ws(spmm_workspace_bytes(dtype<S>(), csr, db));
  set_spmm_path_override(path);
  const cudaError_t err = spmm(dtype<S>(), csr, db, dout, bias ? bv.data() : nullptr, 2, ws.p, nullptr);
  set_spmm_path_override(-1);
  std::string fail = err == cudaSuccess ? "" : std::string("launch error ") + cudaGetErrorString(err);
  for (int64_t i = 0; i < m && fail.empty(); ++i)
    for (int64_t c = 0; c < n && fail.empty(); ++c) {
      double want = bias ? to_d(bv[2 * i]) : 0.0, scale = std::fabs(want);
      for (int64_t p = A.rp[i]; p < A.rp[i + 1]; ++p) {
        const double t = to_d(vals[p]) * B.at(A.ci[p], c);
        want += t;
        scale += std::fabs(t);
      }
      fail = close(O.at(i, c), want, scale, rtol<S>(), "out", i, c);
    }
  report(name, fail);
}

void run_spmm() {
  Rng rng(1);
  struct Shape {
    int64_t m, k, n;
  };
  const Shape shapes[] = {{1, 7, 3}, {5, 13, 1}, {9, 24, 0}, {16, 33, 5}, {12, 16, 17}, {0, 6, 4}, {5, 0, 3},
                          {70, 45, 130}, {130, 70, 37}, {200, 300, 9}};
  const double dens[] = {0.0, 0.5, 0.9, 1.0};
  for (const Shape& s : shapes)
    for (double d : dens)
      for (int path : {kPathRows, kPathPanel}) {
        const bool big = s.m * s.k * std::max<int64_t>(s.n, 1) > 20000;
        if (big && d != 0.5) continue;
        test_spmm<float>(rng, s.m, s.k, s.n, d, false, "row", "row", false, path);
        test_spmm<float>(rng, s.m, s.k, s.n, d, true, "col", "col", true, path);
      }
  // Layouts, bias, dtypes, residues on the two kernels.
  for (int path : {kPathRows, kPathPanel}) {
    for (const char* bl : {"row", "col", "strided"})
      for (const char* ol : {"row", "col"}) test_spmm<float>(rng, 67, 41, 75, 0.3, true, bl, ol, true, path);
    test_spmm<double>(rng, 67, 41, 75, 0.3, true, "row", "col", true, path);
    test_spmm<double>(rng, 33, 50, 130, 0.2, false, "col", "row", false, path);
    test_spmm<__half>(rng, 67, 41, 75, 0.3, true, "row", "row", true, path);
    test_spmm<__half>(rng, 40, 64, 136, 0.3, false, "col", "col", true, path);
    test_spmm<__nv_bfloat16>(rng, 67, 41, 75, 0.3, true, "col", "col", true, path);
    test_spmm<__nv_bfloat16>(rng, 40, 64, 136, 0.3, false, "row", "row", false, path);
    test_spmm<float>(rng, 129, 97, 257, 0.05, false, "row", "row", false, path);  // > 1 panel and column tile
  }
  // Many rows (the one-block row swizzle loops), many chunks and column tiles.
  test_spmm<float>(rng, 2100, 40, 3, 0.1, true, "row", "row", false, kPathRows);
  test_spmm<float>(rng, 100, 300, 300, 0.2, false, "col", "col", true, kPathPanel);
  test_spmm<__half>(rng, 100, 300, 260, 0.2, false, "row", "col", true, kPathPanel);
  // The automatic choice.
  test_spmm<float>(rng, 150, 70, 100, 0.3, false, "row", "row", true, -1);
  test_spmm<float>(rng, 150, 70, 100, 0.3, false, "col", "col", true, -1);
  test_spmm<float>(rng, 150, 300, 40, 0.01, true, "row", "row", false, -1);
}

// ---- sddmm ---------------------------------------------------------------------------------------
template <class S>
void test_sddmm(Rng& rng, int64_t m, int64_t k, int64_t d, double density, bool empty_rows, const std::string& xl,
                const std::string& yl) {
  char name[200];
  std::snprintf(name, sizeof name, "sddmm/%s/m%lld-k%lld-d%lld-p%g%s/X-%s/Y-%s", dname<S>(), (long long)m,
                (long long)k, (long long)d, density, empty_rows ? "-empty" : "", xl.c_str(), yl.c_str());
  HostCsr P = random_csr(m, k, density, empty_rows, rng);
  HostDense<S> X = random_dense<S>(m, d, xl, rng), Y = random_dense<S>(k, d, yl, rng);
  std::vector<S> out(P.nnz() ? P.nnz() : 1, from_d<S>(12345.0));
  const cudaError_t err = sddmm(dtype<S>(), P.rp.data(), P.ci.data(), m, k, P.nnz(), Dense{X.buf.data(), m, d, X.s0, X.s1},
                                Dense{Y.buf.data(), k, d, Y.s0, Y.s1}, out.data(), nullptr);
  std::string fail = err == cudaSuccess ? "" : "launch error";
  for (int64_t i = 0; i < m && fail.empty(); ++i)
    for (int64_t p = P.rp[i]; p < P.rp[i + 1] && fail.empty(); ++p) {
      double want = 0, scale = 0;
      for (int64_t t = 0; t < d; ++t) {
        const double v = X.at(i, t) * Y.at(P.ci[p], t);
        want += v;
        scale += std::fabs(v);
      }
      fail = close(to_d(out[p]), want, scale, rtol<S>(), "vals", i, P.ci[p]);
    }
  report(name, fail);
}

void run_sddmm() {
  Rng rng(2);
  const int64_t shapes[][3] = {{1, 7, 3}, {5, 13, 1}, {9, 24, 0}, {16, 33, 5}, {0, 6, 4}, {5, 0, 3}, {130, 140, 20}, {40, 300, 37}};
  for (auto& s : shapes)
    for (double d : {0.0, 0.5, 1.0}) {
      test_sddmm<float>(rng, s[0], s[1], s[2], d, false, "row", "row");
      test_sddmm<float>(rng, s[0], s[1], s[2], d, true, "col", "col");
    }
  test_sddmm<float>(rng, 70, 90, 45, 0.3, true, "strided", "row");
  test_sddmm<float>(rng, 70, 90, 45, 0.3, true, "col", "strided");
  test_sddmm<double>(rng, 70, 90, 45, 0.3, true, "col", "row");
  test_sddmm<__half>(rng, 70, 90, 45, 0.3, true, "row", "col");
  test_sddmm<__nv_bfloat16>(rng, 70, 90, 45, 0.3, true, "col", "col");
  test_sddmm<float>(rng, 40, 40, 20, 1.0, false, "row", "row");  // 1600 nonzeros in one tile: one pass
  test_sddmm<float>(rng, 128, 128, 5, 0.3, false, "row", "row");   // a full tile
}

// ---- conv ----------------------------------------------------------------------------------------
struct ConvCase {
  int64_t N, C, Co, H, W, KH, KW, SH, SW, PH, PW, DH, DW;
  bool bias;
};

ConvGeom geom(const ConvCase& c) {
  ConvGeom g{c.N, c.C, c.H, c.W, c.Co, c.KH, c.KW, c.SH, c.SW, c.PH, c.PW, c.DH, c.DW, 0, 0};
  g.OH = conv_out_size(c.H, c.KH, c.SH, c.PH, c.DH);
  g.OW = conv_out_size(c.W, c.KW, c.SW, c.PW, c.DW);
  return g;
}

template <class S>
void test_conv(Rng& rng, const ConvCase& cc, double density) {
  const ConvGeom g = geom(cc);
  char name[200];
  std::snprintf(name, sizeof name, "conv/%s/N%lld-%lldto%lld-%lldx%lld-k%lldx%lld-s%lld%lld-p%lld%lld-d%lld%lld-w%g",
                dname<S>(), (long long)cc.N, (long long)cc.C, (long long)cc.Co, (long long)cc.H, (long long)cc.W,
                (long long)cc.KH, (long long)cc.KW, (long long)cc.SH, (long long)cc.SW, (long long)cc.PH,
                (long long)cc.PW, (long long)cc.DH, (long long)cc.DW, density);
  const int64_t KK = g.KH * g.KW, K = g.C * KK;
  HostCsr Wc = random_csr(g.Co, K, density, false, rng);
  std::vector<S> vals(Wc.nnz() ? Wc.nnz() : 1);
  for (int64_t p = 0; p < Wc.nnz(); ++p) vals[p] = from_d<S>(Wc.v[p]);
  std::vector<S> x(std::max<int64_t>(g.N * g.C * g.H * g.W, 1)), bias(std::max<int64_t>(g.Co, 1));
  std::vector<S> dy(std::max<int64_t>(g.N * g.Co * g.OH * g.OW, 1));
  for (auto& e : x) e = from_d<S>(rng.normal());
  for (auto& e : bias) e = from_d<S>(rng.normal());
  for (auto& e : dy) e = from_d<S>(rng.normal());
  const int64_t ysz = g.N * g.Co * g.OH * g.OW, xsz = g.N * g.C * g.H * g.W;
  std::vector<double> y_ref(ysz, 0.0), y_scale(ysz, 0.0), dx_ref(xsz, 0.0), dx_scale(xsz, 0.0);
  std::vector<double> dw_ref(Wc.nnz(), 0.0), dw_scale(Wc.nnz(), 0.0);
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t co = 0; co < g.Co; ++co)
      for (int64_t oh = 0; oh < g.OH; ++oh)
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t yi = ((n * g.Co + co) * g.OH + oh) * g.OW + ow;
          if (cc.bias) {
            y_ref[yi] += to_d(bias[co]);
            y_scale[yi] += std::fabs(to_d(bias[co]));
          }
          for (int64_t p = Wc.rp[co]; p < Wc.rp[co + 1]; ++p) {
            const int64_t j = Wc.ci[p], ci = j / KK, r = (j % KK) / g.KW, s = j % g.KW;
            const int64_t ih = oh * g.SH - g.PH + r * g.DH, iw = ow * g.SW - g.PW + s * g.DW;
            if (ih < 0 || ih >= g.H || iw < 0 || iw >= g.W) continue;
            const int64_t xi = ((n * g.C + ci) * g.H + ih) * g.W + iw;
            const double w = to_d(vals[p]), xv = to_d(x[xi]), d = to_d(dy[yi]);
            y_ref[yi] += w * xv;
            y_scale[yi] += std::fabs(w * xv);
            dx_ref[xi] += w * d;
            dx_scale[xi] += std::fabs(w * d);
            dw_ref[p] += d * xv;
            dw_scale[p] += std::fabs(d * xv);
          }
        }
  Aligned ws(conv2d_workspace_bytes(dtype<S>(), Wc.nnz(), g));
  // forward
  std::vector<S> y(std::max<int64_t>(ysz, 1), from_d<S>(12345.0));
  Csr W{vals.data(), 1, nullptr, Wc.rp.data(), Wc.ci.data(), g.Co, K, Wc.nnz()};
  cudaError_t err = conv2d_forward(dtype<S>(), W, x.data(), cc.bias ? bias.data() : nullptr, 1, y.data(), g, ws.p, nullptr);
  std::string fail = err == cudaSuccess ? "" : "launch error";
  for (int64_t i = 0; i < ysz && fail.empty(); ++i) fail = close(to_d(y[i]), y_ref[i], y_scale[i], rtol<S>(), "y", i, 0);
  report(std::string(name) + "/forward", fail);
  // grad input: W's transpose regrouped by input channel, columns (r*KW + s)*Co + co.
  std::vector<std::vector<std::pair<int32_t, int64_t>>> rows(g.C);
  for (int64_t co = 0; co < g.Co; ++co)
    for (int64_t p = Wc.rp[co]; p < Wc.rp[co + 1]; ++p) {
      const int64_t j = Wc.ci[p];
      rows[j / KK].push_back({(int32_t)((j % KK) * g.Co + co), p});
    }
  std::vector<int64_t> trp(1, 0), tperm;
  std::vector<int32_t> tci;
  for (auto& r : rows) {
    std::sort(r.begin(), r.end());
    for (auto& e : r) {
      tci.push_back(e.first);
      tperm.push_back(e.second);
    }
    trp.push_back((int64_t)tci.size());
  }
  std::vector<S> dx(std::max<int64_t>(xsz, 1), from_d<S>(12345.0));
  Csr Wt{vals.data(), 1, tperm.data(), trp.data(), tci.data(), g.C, KK * g.Co, Wc.nnz()};
  err = conv2d_backward_input(dtype<S>(), Wt, dy.data(), dx.data(), g, ws.p, nullptr);
  fail = err == cudaSuccess ? "" : "launch error";
  for (int64_t i = 0; i < xsz && fail.empty(); ++i) fail = close(to_d(dx[i]), dx_ref[i], dx_scale[i], rtol<S>(), "dx", i, 0);
  report(std::string(name) + "/grad_input", fail);
  // grad weight
  std::vector<S> dw(std::max<int64_t>(Wc.nnz(), 1), from_d<S>(12345.0));
  err = conv2d_backward_weight(dtype<S>(), Wc.rp.data(), Wc.ci.data(), Wc.nnz(), dy.data(), x.data(), dw.data(), g, nullptr);
  fail = err == cudaSuccess ? "" : "launch error";
  for (int64_t p = 0; p < Wc.nnz() && fail.empty(); ++p) fail = close(to_d(dw[p]), dw_ref[p], dw_scale[p], rtol<S>(), "dw", p, 0);
  report(std::string(name) + "/grad_weight", fail);
}

void run_conv() {
  Rng rng(3);
  // (N, C, Co, H, W, KH, KW, SH, SW, PH, PW, DH, DW, bias): the CPU suite's geometries and a larger one.
  const ConvCase cases[] = {
      {2, 3, 4, 6, 5, 1, 1, 1, 1, 0, 0, 1, 1, true},  {1, 2, 3, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1, false},
      {2, 3, 5, 8, 6, 3, 3, 2, 2, 0, 0, 1, 1, true},  {2, 2, 3, 9, 9, 5, 5, 1, 1, 2, 2, 1, 1, true},
      {1, 3, 2, 9, 8, 3, 3, 1, 1, 2, 2, 2, 2, false}, {2, 2, 3, 7, 10, 3, 5, 2, 1, 1, 2, 1, 2, true},
      {2, 3, 4, 5, 6, 1, 3, 1, 2, 0, 1, 1, 1, false}, {0, 3, 2, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, true},
      {2, 3, 0, 5, 5, 3, 3, 1, 1, 0, 0, 1, 1, false}, {1, 17, 3, 4, 4, 3, 3, 1, 1, 1, 1, 1, 1, true},
      {2, 20, 70, 9, 11, 3, 3, 2, 1, 1, 1, 1, 1, true}};
  for (const ConvCase& c : cases)
    for (double d : {0.0, 0.5, 1.0}) test_conv<float>(rng, c, d);
  test_conv<double>(rng, cases[5], 0.5);
  test_conv<__half>(rng, cases[2], 0.5);
  test_conv<__nv_bfloat16>(rng, cases[4], 0.5);
}

// ---- topk ----------------------------------------------------------------------------------------
template <class S>
void test_topk(Rng& rng, int64_t n, int64_t k_kind, bool largest, bool use_cand, int value_kind) {
  char name[200];
  std::snprintf(name, sizeof name, "topk/%s/n%lld/k%lld/%s%s/v%d", dname<S>(), (long long)n, (long long)k_kind,
                largest ? "largest" : "smallest", use_cand ? "/cand" : "", value_kind);
  std::vector<S> scores(std::max<int64_t>(n, 1));
  std::vector<uint8_t> cand(std::max<int64_t>(n, 1), 1);
  for (int64_t i = 0; i < n; ++i) {
    double v = value_kind == 0 ? rng.normal() : (double)rng.below(7) - 3.0;  // 1: many ties
    if (value_kind == 1 && v == 0.0 && rng.below(2)) v = -0.0;               // -0.0 ties +0.0
    scores[i] = from_d<S>(v);
    if (use_cand) cand[i] = rng.uni() < 0.6;
  }
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < n; ++i)
    if (cand[i]) idx.push_back(i);
  const int64_t ncand = (int64_t)idx.size();
  const int64_t k = k_kind == 0 ? std::min<int64_t>(1, ncand) : k_kind == 1 ? ncand / 2 : ncand;
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) {
    const double va = to_d(scores[a]) + 0.0, vb = to_d(scores[b]) + 0.0;
    return largest ? va > vb : va < vb;
  });
  idx.resize(k);
  std::sort(idx.begin(), idx.end());
  std::vector<int64_t> out(std::max<int64_t>(k, 1), -1);
  TopkStatus status{0, 0};
  Aligned ws(topk_workspace_bytes(dtype<S>(), n));
  const cudaError_t err = topk_select(dtype<S>(), scores.data(), 1, use_cand ? reinterpret_cast<const bool*>(cand.data()) : nullptr,
                                     1, n, k, largest, out.data(), &status, ws.p, nullptr);
  std::string fail = err == cudaSuccess ? "" : "launch error";
  if (fail.empty() && status.nan_index != INT64_MAX) fail = "spurious NaN report";
  if (fail.empty() && n > 0 && status.n_candidates != ncand) fail = "candidate count " + std::to_string(status.n_candidates);
  for (int64_t i = 0; i < k && fail.empty(); ++i)
    if (out[i] != idx[i])
      fail = "out[" + std::to_string(i) + "] = " + std::to_string(out[i]) + ", want " + std::to_string(idx[i]);
  report(name, fail);
}

void test_topk_errors() {
  std::vector<float> s = {1.f, 2.f, std::nanf(""), 4.f, std::nanf(""), 0.5f};
  std::vector<uint8_t> cand = {1, 1, 0, 1, 1, 1};
  std::vector<int64_t> out(6, -1);
  TopkStatus st{0, 0};
  Aligned ws(topk_workspace_bytes(DType::kF32, 6));
  topk_select(DType::kF32, s.data(), 1, reinterpret_cast<const bool*>(cand.data()), 1, 6, 2, true, out.data(), &st,
              ws.p, nullptr);
  report("topk/nan_is_reported", st.nan_index == 4 ? "" : "nan_index " + std::to_string(st.nan_index));
  std::vector<float> t = {3.f, 1.f, 2.f};
  std::vector<uint8_t> c2 = {1, 0, 1};
  std::vector<int64_t> o2(3, -1);
  topk_select(DType::kF32, t.data(), 1, reinterpret_cast<const bool*>(c2.data()), 1, 3, 3, true, o2.data(), &st, ws.p,
              nullptr);
  report("topk/too_few_candidates_reported", st.n_candidates == 2 ? "" : "n_candidates " + std::to_string(st.n_candidates));
}

void run_topk() {
  Rng rng(4);
  for (int64_t n : {0, 1, 5, 1000, 9000, 20000})
    for (int64_t kk : {0, 1, 2})
      for (bool largest : {true, false})
        for (bool cand : {false, true})
          for (int vk : {0, 1}) {
            if (n >= 9000 && (vk == 0) == cand) continue;
            test_topk<float>(rng, n, kk, largest, cand, vk);
          }
  for (bool largest : {true, false}) {
    test_topk<double>(rng, 5000, 1, largest, true, 1);
    test_topk<double>(rng, 5000, 1, largest, false, 0);
    test_topk<__half>(rng, 5000, 1, largest, true, 0);
    test_topk<__nv_bfloat16>(rng, 5000, 1, largest, false, 1);
  }
  test_topk_errors();
}

// ---- gather --------------------------------------------------------------------------------------
template <class S>
void test_gather(Rng& rng, int64_t n_src, int64_t n, int64_t sstride) {
  char name[120];
  std::snprintf(name, sizeof name, "gather/%s/src%lld-n%lld-stride%lld", dname<S>(), (long long)n_src, (long long)n,
                (long long)sstride);
  std::vector<S> src(std::max<int64_t>(n_src * sstride, 1));
  for (auto& x : src) x = from_d<S>(rng.normal());
  std::vector<int64_t> index(std::max<int64_t>(2 * n, 1));
  for (auto& i : index) i = rng.below(n_src);
  std::vector<S> out(std::max<int64_t>(n, 1));
  const cudaError_t err = gather(dtype<S>(), src.data(), sstride, n_src, index.data(), 2, n, out.data(), nullptr);
  std::string fail = err == cudaSuccess ? "" : "launch error";
  for (int64_t i = 0; i < n && fail.empty(); ++i)
    if (std::memcmp(&out[i], &src[index[2 * i] * sstride], sizeof(S)) != 0) fail = "mismatch at " + std::to_string(i);
  report(name, fail);
}

void run_gather() {
  Rng rng(5);
  for (int64_t n : {0, 1, 100, 5000}) {
    test_gather<float>(rng, 300, n, 1);
    test_gather<double>(rng, 300, n, 3);
    test_gather<__half>(rng, 300, n, 2);
  }
}

// ---- device-side checks (each must abort the process) ---------------------------------------------
void trap_col() {
  std::vector<int64_t> rp = {0, 2, 3};
  std::vector<int32_t> ci = {1, 5, 0};  // 5 >= k = 4
  std::vector<float> v = {1, 2, 3}, B(4 * 2, 1.f), O(2 * 2);
  Csr A{v.data(), 1, nullptr, rp.data(), ci.data(), 2, 4, 3};
  Aligned ws(spmm_workspace_bytes(DType::kF32, A, Dense{B.data(), 4, 2, 2, 1}));
  spmm(DType::kF32, A, Dense{B.data(), 4, 2, 2, 1}, DenseOut{O.data(), 2, 2, 2, 1}, nullptr, 0, ws.p, nullptr);
}
void trap_gather() {
  std::vector<float> src(4), out(2);
  std::vector<int64_t> idx = {1, 4};
  gather(DType::kF32, src.data(), 1, 4, idx.data(), 1, 2, out.data(), nullptr);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string group = argc > 1 ? argv[1] : "all";
  const std::string order = argc > 2 ? argv[2] : "forward";
  simt::set_order(order == "reverse" ? simt::kReverse : order == "shuffle" ? simt::kShuffle : simt::kForward);
  if (group == "trap_col") trap_col();
  if (group == "trap_gather") trap_gather();
  if (group == "trap_col" || group == "trap_gather") {
    std::printf("no trap\n");
    return 0;
  }
  if (group == "spmm" || group == "all") run_spmm();
  if (group == "sddmm" || group == "all") run_sddmm();
  if (group == "conv" || group == "all") run_conv();
  if (group == "topk" || group == "all") run_topk();
  if (group == "gather" || group == "all") run_gather();
  std::printf("%d passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
