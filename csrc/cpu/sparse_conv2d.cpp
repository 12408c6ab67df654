// CPU kernels of sparse_conv2d (forward, grad input, grad weight values).
//
// Direct sparse convolution. The weight W (Cout, Cin, kh, kw) is CSR over rows Cout and
// columns (ci, r, s). Per image, the source is packed once into a zero-padded buffer
// whose rows are split into `stride_w` phases (packed[ci][q][ih][m] = xpad[ih][m*sw+q]),
// so that for every nonzero (ci, r, s) the inputs of one output row form one contiguous
// run at a fixed shift. Each nonzero is then (offset, value) and every pass is a
// register-tiled gather (see sparse_conv2d_impl.h):
//   forward      y[co] tile  = bias + sum over row co of W   w * xpack[off + pos]
//   grad input   the same gather over W^T (rows ci, split by the stride phase of the
//                input position), from the zero-bordered dY; it is a stride-1
//                correlation within each phase, so strided convs need no scatter
//   grad weight  per nonzero, dot(dY[co] tile, xpack[off + tile]) summed over images
// Threads: over images (each thread packs its own image into a private buffer,
// which stays in L2); a batch smaller than the thread count splits output channels.
// A 1x1 conv without padding goes to its own kernels (conv_pointwise.cpp): tiles along whole planes; a
// conv on small planes to the batch-innermost ones (conv_batched.cpp).
#pragma GCC optimize("fp-contract=fast")  // a*b+c -> FMA in the clones (ISO C++ mode defaults to off)

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/resource.h>
#endif

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/bf16.h"
#include "cpu/common.h"
#include "cpu/conv_batched.h"
#include "cpu/conv_pointwise.h"
#include "cpu/conv_tiles.h"
#include "cpu/csr_engine.h"
#include "cpu/plan_cache.h"
#include "cpu/sparse_conv2d_impl.h"

namespace sparsekern {
namespace {

using conv2d_impl::NACC;
using conv2d_impl::Pos;

// ---------------------------------------------------------------------------
// Hot loops: per dtype one clone set of the 32-byte loops and, on AVX-512 builds, the 64-byte ones (`_w64`,
// x86-64-v4 only). A plan's positions are cut for one width (Plan::vb, from conv_tiles::vector_bytes).

// gather_rows<T, O, W> as NAME (a bf16 O: float32 source, weights and accumulators, rounded on store).
#define SK_GATHER_ROWS(ATTR, NAME, T, O, W)                                                                      \
  ATTR void NAME(const T* src, const int32_t* offs, const T* ws, const int64_t* bp, int64_t nb, int64_t r0,      \
                 int64_t r1, const Pos* pos, int64_t t0, int64_t t1, const T* bias, O* out, int64_t out_plane,   \
                 int64_t cstride, T* scratch) {                                                                  \
    conv2d_impl::gather_rows<T, O, W>(src, offs, ws, bp, nb, r0, r1, pos, t0, t1, bias, out, out_plane, cstride, \
                                      scratch);                                                                  \
  }
// wgrad_rows<T, W> as NAME.
#define SK_WGRAD_ROWS(ATTR, NAME, T, W)                                                                        \
  ATTR void NAME(const T* src, const int32_t* offs, const int64_t* bp, int64_t nb, int64_t r0, int64_t r1,     \
                 const Pos* pos, int64_t t0, int64_t t1, const T* dy, int64_t out_plane, T* g, bool grouped) { \
    conv2d_impl::wgrad_rows<T, W>(src, offs, bp, nb, r0, r1, pos, t0, t1, dy, out_plane, g, grouped);          \
  }
#define SK_DIRECT_LOOPS(ATTR, SUFFIX, W)                                  \
  SK_GATHER_ROWS(ATTR, gather_rows_f32##SUFFIX, float, float, W)          \
  SK_GATHER_ROWS(ATTR, gather_rows_f64##SUFFIX, double, double, W)        \
  SK_GATHER_ROWS(ATTR, gather_rows_bf16##SUFFIX, float, c10::BFloat16, W) \
  SK_WGRAD_ROWS(ATTR, wgrad_rows_f32##SUFFIX, float, W)                   \
  SK_WGRAD_ROWS(ATTR, wgrad_rows_f64##SUFFIX, double, W)

SK_CLONE_BUILDS(SK_DIRECT_LOOPS, 32)
SK_CLONE_DISPATCH(gather_rows_f32)
SK_CLONE_DISPATCH(gather_rows_f64)
SK_CLONE_DISPATCH(gather_rows_bf16)
SK_CLONE_DISPATCH(wgrad_rows_f32)
SK_CLONE_DISPATCH(wgrad_rows_f64)
#if SK_HAVE_AVX512
SK_DIRECT_LOOPS(SK_AVX512, _w64, 64)
#define SK_PICK_WIDTH(vb, NAME, ...)            \
  if (vb == 64) return NAME##_w64(__VA_ARGS__); \
  return NAME(__VA_ARGS__)
#else
#define SK_PICK_WIDTH(vb, NAME, ...) return NAME(__VA_ARGS__)
#endif

// The loops at vb-byte vectors (positions cut for that width).
inline void gather_rows(int vb, const float* src, const int32_t* offs, const float* ws, const int64_t* bp, int64_t nb,
                        int64_t r0, int64_t r1, const Pos* pos, int64_t t0, int64_t t1, const float* bias, float* out,
                        int64_t out_plane, int64_t cstride, float* scratch) {
  SK_PICK_WIDTH(vb, gather_rows_f32, src, offs, ws, bp, nb, r0, r1, pos, t0, t1, bias, out, out_plane, cstride,
                scratch);
}
inline void gather_rows(int vb, const double* src, const int32_t* offs, const double* ws, const int64_t* bp, int64_t nb,
                        int64_t r0, int64_t r1, const Pos* pos, int64_t t0, int64_t t1, const double* bias, double* out,
                        int64_t out_plane, int64_t cstride, double* scratch) {
  SK_PICK_WIDTH(vb, gather_rows_f64, src, offs, ws, bp, nb, r0, r1, pos, t0, t1, bias, out, out_plane, cstride,
                scratch);
}
inline void gather_rows(int vb, const float* src, const int32_t* offs, const float* ws, const int64_t* bp, int64_t nb,
                        int64_t r0, int64_t r1, const Pos* pos, int64_t t0, int64_t t1, const float* bias,
                        c10::BFloat16* out, int64_t out_plane, int64_t cstride, float* scratch) {
  SK_PICK_WIDTH(vb, gather_rows_bf16, src, offs, ws, bp, nb, r0, r1, pos, t0, t1, bias, out, out_plane, cstride,
                scratch);
}
inline void wgrad_rows(int vb, const float* src, const int32_t* offs, const int64_t* bp, int64_t nb, int64_t r0,
                       int64_t r1, const Pos* pos, int64_t t0, int64_t t1, const float* dy, int64_t out_plane, float* g,
                       bool grouped) {
  SK_PICK_WIDTH(vb, wgrad_rows_f32, src, offs, bp, nb, r0, r1, pos, t0, t1, dy, out_plane, g, grouped);
}
inline void wgrad_rows(int vb, const double* src, const int32_t* offs, const int64_t* bp, int64_t nb, int64_t r0,
                       int64_t r1, const Pos* pos, int64_t t0, int64_t t1, const double* dy, int64_t out_plane,
                       double* g, bool grouped) {
  SK_PICK_WIDTH(vb, wgrad_rows_f64, src, offs, bp, nb, r0, r1, pos, t0, t1, dy, out_plane, g, grouped);
}
#undef SK_PICK_WIDTH

// ---------------------------------------------------------------------------
// Geometry, checks, packing.

constexpr int64_t kSlack = 64;  // zeroed elements after a packed image: partial vectors read past rows

struct Geom {
  int64_t N, Cin, H, W, Cout, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW;
  // The pass's tensors lie channels_last (x for the forward, dY for the gradients): the batch-innermost kernel reads
  // and writes them so, the direct one through NCHW copies, so the measured choice between them is kept per layout.
  bool cl = false;
  // forward / grad-weight packing of x: [Cin][sw][Hp][Wq]
  int64_t Hp, Wq;
  int64_t xpack_size() const { return Cin * sw * Hp * Wq + kSlack; }
};

int64_t pair_at(at::IntArrayRef v, int i, const char* op, const char* name) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must have 2 entries, got ", v.size());
  return v[i];
}

// Checks the weight pattern and the geometry; N, Cin, H, W come from the caller.
Geom make_geom(const char* op, int64_t N, int64_t Cin, int64_t H, int64_t W, const at::Tensor& row_ptr,
               const at::Tensor& col_idx, at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
               at::IntArrayRef dilation) {
  check_csr(row_ptr, col_idx, op);
  Geom g;
  g.N = N;
  g.Cin = Cin;
  g.H = H;
  g.W = W;
  g.Cout = row_ptr.numel() - 1;
  g.kh = pair_at(kernel_size, 0, op, "kernel_size");
  g.kw = pair_at(kernel_size, 1, op, "kernel_size");
  g.sh = pair_at(stride, 0, op, "stride");
  g.sw = pair_at(stride, 1, op, "stride");
  g.ph = pair_at(padding, 0, op, "padding");
  g.pw = pair_at(padding, 1, op, "padding");
  g.dh = pair_at(dilation, 0, op, "dilation");
  g.dw = pair_at(dilation, 1, op, "dilation");
  TORCH_CHECK(g.kh >= 1 && g.kw >= 1, op, ": kernel_size must be >= 1, got ", kernel_size);
  TORCH_CHECK(g.sh >= 1 && g.sw >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(g.ph >= 0 && g.pw >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(g.dh >= 1 && g.dw >= 1, op, ": dilation must be >= 1, got ", dilation);
  // Every extent below must fit the kernels' int32 offsets; checked in 128 bits, so that no product or
  // sum of the caller's numbers can wrap before it is compared.
  const __int128 ext_h = static_cast<__int128>(g.dh) * (g.kh - 1) + 1;
  const __int128 ext_w = static_cast<__int128>(g.dw) * (g.kw - 1) + 1;
  const __int128 padded_h = static_cast<__int128>(H) + 2 * static_cast<__int128>(g.ph);
  const __int128 padded_w = static_cast<__int128>(W) + 2 * static_cast<__int128>(g.pw) + g.sw;
  const __int128 taps = static_cast<__int128>(Cin) * g.kh * g.kw;
  TORCH_CHECK(ext_h < INT32_MAX && ext_w < INT32_MAX, op, ": kernel_size ", kernel_size, " with dilation ", dilation,
              " spans more than 2^31 - 1 input positions");
  TORCH_CHECK(padded_h < INT32_MAX && padded_w < INT32_MAX && g.sh < INT32_MAX && g.sw < INT32_MAX, op,
              ": input size (", H, ", ", W, ") with padding ", padding, " and stride ", stride,
              " exceeds 2^31 - 1 positions per dimension");
  TORCH_CHECK(taps < INT32_MAX, op, ": Cin * kh * kw = ", Cin, " * ", g.kh, " * ", g.kw,
              " exceeds 2^31 - 1 weight columns");
  // W has Cin*kh*kw columns; col_idx is checked against that when the offsets are built.
  g.OH = (H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.OW = (W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(H + 2 * g.ph - g.dh * (g.kh - 1) - 1 >= 0 && W + 2 * g.pw - g.dw * (g.kw - 1) - 1 >= 0, op,
              ": input of size (", H, ", ", W, ") is too small for kernel (", g.kh, ", ", g.kw, ") with padding (",
              g.ph, ", ", g.pw, ") and dilation (", g.dh, ", ", g.dw, ")");
  g.Hp = H + 2 * g.ph;
  g.Wq = (W + 2 * g.pw + g.sw - 1) / g.sw;
  TORCH_CHECK(static_cast<__int128>(Cin) * g.sw * g.Hp * g.Wq + kSlack < INT32_MAX, op,
              ": one image is too large for this kernel (", Cin, " x ", H, " x ", W, ")");
  // row_ptr: 0 = rp[0] <= ... <= rp[Cout] = nnz.
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[g.Cout] == col_idx.numel(), op,
              ": row_ptr must start at 0 and end at nnz = ", col_idx.numel(), ", got ", rp[0], " and ", rp[g.Cout]);
  for (int64_t r = 0; r < g.Cout; ++r)
    TORCH_CHECK(rp[r] <= rp[r + 1], op, ": row_ptr must be non-decreasing (row ", r, ")");
  return g;
}

// The output of a pass whose two kernels write different layouts: for channels_last operands the batch-innermost
// kernel writes channels_last (its copies from and to (C, H, W, N) read and write any layout), the direct kernel NCHW.
// Each allocated on first use; the pass returns what its last run (run_chosen's chosen kernel) wrote.
class LayoutOutput {
 public:
  LayoutOutput(std::vector<int64_t> sizes, at::TensorOptions options) : sizes_(std::move(sizes)), options_(options) {}
  at::Tensor& take(bool cl) {
    last_cl_ = cl;
    at::Tensor& t = cl ? cl_ : nchw_;
    if (!t.defined())
      t = at::empty(sizes_, options_.memory_format(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
    return t;
  }
  at::Tensor last() { return take(last_cl_); }

 private:
  std::vector<int64_t> sizes_;
  at::TensorOptions options_;
  at::Tensor nchw_, cl_;
  bool last_cl_ = false;
};

// SPARSEKERN_CONV_KERNEL=direct|batched pins the CPU conv kernel wherever the pinned one applies (tests,
// A/B measurements: read per call); unset or "auto": chosen by geometry below.
enum class ConvPin { Auto, Direct, Batched };
ConvPin conv_pin() {
  const char* e = std::getenv("SPARSEKERN_CONV_KERNEL");
  if (e == nullptr || *e == 0 || std::strcmp(e, "auto") == 0) return ConvPin::Auto;
  if (std::strcmp(e, "direct") == 0) return ConvPin::Direct;
  if (std::strcmp(e, "batched") == 0) return ConvPin::Batched;
  TORCH_CHECK(false, "SPARSEKERN_CONV_KERNEL must be auto, direct or batched, got '", e, "'");
}

bool pointwise_for(const Geom& g, ConvPin pin) {
  return pin != ConvPin::Direct && pointwise::applies(g.kh, g.kw, g.ph, g.pw);
}

bool batched_applies(const Geom& g) {
  return batched::applies(g.N, g.Cin, g.Cout, g.H, g.W, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw);
}

// What a conv too small to measure runs (see run_chosen): the batch-innermost kernels (conv_batched.cpp) by a
// geometry rule (fwd+bwd, 2 threads, Zen 4): on planes of at most 64 outputs whose rows fill the direct
// kernel's vectors partly. Rows of at most half a vector
// (4x4 and smaller): 1.9-2.4x the direct kernel at any density. Otherwise (7x7: 7 of 8 lanes) only when
// the multiply-adds outweigh the copies to and from the (C, H, W, N) layout: at 7x7 1.1-1.3x from
// nnz*P >= 16 (Cin+Cout) Hp Wp (density 0.043 of 256 channels), 0.8x at a fifth of that. Full rows (8x8)
// and planes from 14x14 on stay with the direct kernel, whose weight blocks and rows suit them (8x8 at
// batch 64: 1.35-2.5x faster than batch-innermost). Strided convs by the same rule: ResNet-50's stride-2
// 3x3 at 7x7 -> 4x4 2.2x the direct kernel (d 0.1; 1.65x at 0.02), at 14x14 -> 7x7 even.
bool batched_by_rule(const Geom& g, int64_t nnz) {
  const int64_t lanes = 8, used = g.OW % lanes;
  if (g.OH * g.OW > 64 || used == 0) return false;
  if (g.OW * 2 <= lanes) return true;
  const double work = static_cast<double>(nnz) * g.OH * g.OW;
  return work >= 16.0 * static_cast<double>(g.Cin + g.Cout) * (g.H + 2 * g.ph) * (g.W + 2 * g.pw);
}

// Which of the direct and batch-innermost kernels a pass runs. Both apply to most convs larger than 1x1,
// and which is faster depends on channels, plane size, stride, density, batch and the pass: measured on Zen 4
// (2 threads, ResNet-50's 3x3 layers at batch 8 and 16, densities 0.04-0.2), batched takes 0.26-0.5x the
// direct kernel's time at 4x4 and 7x7 with 512 channels, 0.6-0.9x at 14x14 with 128-256 channels and at
// 28x28 -> 14x14 stride 2 with 256, but 1.2-2.2x at 56x56 with 64 channels and on the 7x7 stem, and the
// weight gradient prefers it more than the forward (0.45-0.65x where the forward is even). No rule on the
// geometry ranks all of these, so a pass large enough to matter times both kernels on its first call of a
// (pass, geometry, nnz, dtype, thread count) and keeps the faster for the process; smaller ones follow the
// rule above, and so does every pass under torch.use_deterministic_algorithms(True): a measured choice can
// differ between processes, and the two kernels' sums differ in the last bits. SPARSEKERN_CONV_KERNEL=
// direct|batched pins one kernel instead.
enum class Pass : int64_t { Forward, GradInput, GradWeight };
constexpr double kMeasureMacs = 4e6;  // a pass of fewer multiply-adds takes well under a millisecond

struct Choices {
  std::mutex mutex;
  std::map<std::vector<int64_t>, bool> batched;
};
Choices& choices() {
  static Choices* c = new Choices();  // never destroyed: ops may run during interpreter shutdown
  return *c;
}

std::vector<int64_t> choice_key(Pass pass, const Geom& g, int64_t nnz, at::ScalarType dtype) {
  return {static_cast<int64_t>(pass),
          g.N,
          g.Cin,
          g.H,
          g.W,
          g.Cout,
          g.kh,
          g.kw,
          g.sh,
          g.sw,
          g.ph,
          g.pw,
          g.dh,
          g.dw,
          nnz,
          static_cast<int64_t>(dtype),
          static_cast<int64_t>(at::get_num_threads()),
          static_cast<int64_t>(csr::isa()),
          static_cast<int64_t>(g.cl)};  // the batched kernel's vector width (conv_tiles::vector_bytes)
}

// The kernel measured for this pass and geometry, if any.
c10::optional<bool> measured_choice(Pass pass, const Geom& g, int64_t nnz, at::ScalarType dtype) {
  Choices& c = choices();
  std::lock_guard<std::mutex> lock(c.mutex);
  auto it = c.batched.find(choice_key(pass, g, nnz, dtype));
  if (it == c.batched.end()) return c10::nullopt;
  return it->second;
}

// Minor page faults of the process so far: a timed run that faulted paid for fresh pages (glibc hands a kernel's
// buffers new memory on its first calls, and interleaving two kernels' buffers of other sizes moves them again).
int64_t minor_faults() {
#if defined(__unix__) || defined(__APPLE__)
  struct rusage u;
  if (getrusage(RUSAGE_SELF, &u) == 0) return static_cast<int64_t>(u.ru_minflt);
#endif
  return 0;
}

// Runs the pass with the chosen kernel: run(batched) computes the pass's output (after reset(), which clears
// an accumulated output). A first call that measures runs both, alternating, after a warm-up round (which builds
// their plans): the minimum per kernel over runs that took no page faults, over at least kMinRounds rounds and up
// to kMaxRounds while either kernel lacks two clean runs or the two are within kClose. Timed with faults counted
// in, ResNet-50's 128 -> 128 3x3 stride-2 layer (28x28, batch 16, density 0.087, Zen 5) kept the direct kernel in
// two processes of three: the batch-innermost kernel's 7 MB buffer faulted in 1,800 pages on its second run
// (2.1-2.7 ms against 1.1 ms warm; direct 1.3), though it is 1.6x faster in every pass. (The direct kernel's
// per-thread buffers faulted on every call then too: ThreadScratch, common.h.)
constexpr int kMinRounds = 3, kMaxRounds = 6;
constexpr double kClose = 1.1;
constexpr int64_t kFaultPages = 16;  // a few pages fault in any run that allocates: only more counts
// Bytes written over the threads before each timed run, more than their L2 caches hold, as kernel_choice.py times
// a layer's candidates: in a training step the other layers run between two calls of a pass, so its operands come
// from L3 or memory, not from the L2 the previous run left them in.
constexpr int64_t kEvictBytes = 8 << 20;

void evict_caches(at::Tensor& buf, int round) {
  char* p = static_cast<char*>(buf.data_ptr());
  const int64_t n = buf.numel();
  at::parallel_for(0, n, n / std::max<int64_t>(1, at::get_num_threads()),
                   [&](int64_t b, int64_t e) { std::memset(p + b, round, e - b); });
}

// Whether the pass runs the batch-innermost kernel, where that is known without measuring (pinned, by the rule, or
// measured before); nullopt where run_chosen would measure.
c10::optional<bool> decided(Pass pass, const Geom& g, int64_t nnz, at::ScalarType dtype, ConvPin pin) {
  if (pin == ConvPin::Direct || !batched_applies(g)) return false;
  if (pin == ConvPin::Batched) return true;
  if (static_cast<double>(nnz) * g.OH * g.OW * g.N < kMeasureMacs || at::globalContext().deterministicAlgorithms())
    return batched_by_rule(g, nnz);
  return measured_choice(pass, g, nnz, dtype);
}

template <class Run, class Reset>
void run_chosen(Pass pass, const Geom& g, int64_t nnz, at::ScalarType dtype, ConvPin pin, Run&& run, Reset&& reset) {
  if (const c10::optional<bool> known = decided(pass, g, nnz, dtype, pin)) return run(*known);
  double clean[2] = {1e300, 1e300}, any[2] = {1e300, 1e300};
  int n_clean[2] = {0, 0};
  at::Tensor evict = at::empty({kEvictBytes}, at::TensorOptions().dtype(at::kByte));
  for (int round = 0; round <= kMaxRounds; ++round) {
    for (int b = 0; b < 2; ++b) {
      reset();
      evict_caches(evict, round);
      const int64_t f0 = minor_faults();
      const auto t0 = std::chrono::steady_clock::now();
      run(b == 1);
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (round == 0) continue;  // builds the plans
      any[b] = std::min(any[b], t);
      if (minor_faults() - f0 <= kFaultPages) {
        clean[b] = std::min(clean[b], t);
        ++n_clean[b];
      }
    }
    if (round >= kMinRounds && n_clean[0] >= 2 && n_clean[1] >= 2 &&
        std::max(clean[0], clean[1]) > kClose * std::min(clean[0], clean[1]))
      break;
  }
  const bool use_clean = n_clean[0] > 0 && n_clean[1] > 0;
  const bool batched = use_clean ? clean[1] < clean[0] : any[1] < any[0];
  {
    Choices& c = choices();
    std::lock_guard<std::mutex> lock(c.mutex);
    c.batched[choice_key(pass, g, nnz, dtype)] = batched;
  }
  reset();
  run(batched);
}

// dst[c][q][i][m] = x[c][i - ph][m*sw + q - pw], 0 outside x; then kSlack zeros. A bf16 source (I)
// is widened to the float32 buffer here.
template <class T, class I = T>
void pack_padded(const I* x, int64_t sC, int64_t sH, int64_t sW, int64_t C, int64_t H, int64_t W, int64_t ph,
                 int64_t pw, int64_t sw, int64_t Hp, int64_t Wq, T* dst) {
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t q = 0; q < sw; ++q) {
      for (int64_t i = 0; i < Hp; ++i) {
        T* d = dst + ((c * sw + q) * Hp + i) * Wq;
        const int64_t h = i - ph;
        if (h < 0 || h >= H) {
          std::memset(d, 0, sizeof(T) * Wq);
          continue;
        }
        const I* s = x + c * sC + h * sH;
        if (sw == 1) {
          const int64_t lo = std::min(pw, Wq), hi = std::min(pw + W, Wq);
          std::memset(d, 0, sizeof(T) * lo);
          if (sW == 1 && std::is_same<I, T>::value) {
            std::memcpy(d + lo, s, sizeof(T) * (hi - lo));
          } else {
            for (int64_t m = lo; m < hi; ++m) d[m] = bf16::widen(s[(m - pw) * sW]);
          }
          std::memset(d + hi, 0, sizeof(T) * (Wq - hi));
        } else {
          for (int64_t m = 0; m < Wq; ++m) {
            const int64_t w = m * sw + q - pw;
            d[m] = (w >= 0 && w < W) ? bf16::widen(s[w * sW]) : T(0);
          }
        }
      }
    }
  }
  std::memset(dst + C * sw * Hp * Wq, 0, sizeof(T) * kSlack);
}

// Vector positions covering rows [0, M) x columns [0, Nc) of a grid, in row-major order,
// padded to whole tiles. Source offset of (m, n): in_base + m*in_row + n; destination
// offset: out_base + m*out_row + n*out_col.
template <class T>
std::vector<Pos> build_positions(int vb, int64_t M, int64_t Nc, int64_t in_base, int64_t in_row, int64_t out_base,
                                 int64_t out_row, int64_t out_col) {
  const int64_t VW = vb / int64_t(sizeof(T));
  std::vector<Pos> pos;
  if (M <= 0 || Nc <= 0) return pos;
  const int64_t nv = (Nc + VW - 1) / VW;
  pos.reserve(M * nv + NACC);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t n = v * VW;
      int64_t start, lo, hi;
      if (Nc < VW) {
        start = 0;
        lo = 0;
        hi = Nc;
      } else if (n + VW > Nc) {
        start = Nc - VW;
        lo = n - start;
        hi = VW;
      } else {
        start = n;
        lo = 0;
        hi = VW;
      }
      Pos p;
      p.in_off = static_cast<int32_t>(in_base + m * in_row + start);
      p.lo = static_cast<int32_t>(lo);
      p.hi = static_cast<int32_t>(hi);
      p.pad_ = 0;
      p.out_off = out_base + m * out_row + start * out_col;
      pos.push_back(p);
    }
  }
  Pos dummy = pos[0];
  dummy.lo = dummy.hi = 0;
  dummy.out_off = pos[0].out_off;
  while (pos.size() % NACC) pos.push_back(dummy);
  return pos;
}

// col_idx[j] = col must name a column (c, r, s) of W: clear error otherwise.
inline void check_col(const char* op, const Geom& g, int64_t j, int64_t col) {
  const int64_t K = g.kh * g.kw, ncols = g.Cin * K;
  TORCH_CHECK(col >= 0 && col < ncols, op, ": col_idx[", j, "] = ", col, " is out of range: the input has ", g.Cin,
              " channels, so W must have Cin*kh*kw = ", g.Cin, "*", g.kh, "*", g.kw, " = ", ncols, " columns (col_idx ",
              col, " is input channel ", col / K, ")");
}

// Packed-x offset and input channel of every nonzero (forward and grad weight); checks col_idx.
void forward_offsets(const char* op, const Geom& g, const at::Tensor& col_idx, std::vector<int32_t>& offs,
                     std::vector<int32_t>& plane_of) {
  const int64_t nnz = col_idx.numel();
  const int32_t* ci = col_idx.data_ptr<int32_t>();
  const int64_t K = g.kh * g.kw, ncols = g.Cin * K, plane = g.Hp * g.Wq;
  // A table over the columns (c, r, s), not divisions per nonzero: those cost as much as a small layer's FMAs.
  std::vector<int32_t> col_off(ncols), col_chan(ncols);
  for (int64_t c = 0, col = 0; c < g.Cin; ++c) {
    for (int64_t r = 0; r < g.kh; ++r) {
      for (int64_t s = 0; s < g.kw; ++s, ++col) {
        const int64_t sd = s * g.dw;
        col_off[col] = static_cast<int32_t>(c * g.sw * plane + (sd % g.sw) * plane + r * g.dh * g.Wq + sd / g.sw);
        col_chan[col] = static_cast<int32_t>(c);
      }
    }
  }
  offs.resize(nnz);
  plane_of.resize(nnz);
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t col = ci[j];
    check_col(op, g, j, col);
    offs[j] = col_off[col];
    plane_of[j] = col_chan[col];
  }
}

// L1 budget for the source planes of one block (bytes): half of a 32 KB L1d, the rest
// holds the weight lists and the output tile (measured: 8 KB and 32 KB are slower).
constexpr int64_t l1_budget() { return 16384; }

// Output rows covered by one tile of an OW-wide grid of vb-byte vectors.
template <class T>
int64_t tile_rows(int64_t ow, int vb) {
  const int64_t VW = vb / int64_t(sizeof(T));
  return std::max<int64_t>(1, NACC / ((ow + VW - 1) / VW));
}

// Planes per block so that a tile's source window in a block of planes fits l1_budget():
// per plane `rows` rows of `cols` elements.
template <class T>
int64_t planes_per_block(int64_t rows, int64_t cols) {
  return std::max<int64_t>(1, l1_budget() / std::max<int64_t>(1, rows * cols * int64_t(sizeof(T))));
}

// A block costs a reload and a store of the output tile: measured best near 24 entries
// of a row per block (12 and 48 are slower at density 0.1 and 0.01).
constexpr int64_t min_per_block() { return 24; }

// bp[r*(nb+1) + k]: first entry of row r whose plane is >= k*bsize (planes ascend within rows).
// Blocks cost a reload and a store of the output tile, so a row averages at least
// min_per_block() entries per block.
std::vector<int64_t> block_ptr(int64_t R, const int64_t* rp, const int32_t* plane_of, int64_t nplanes, int64_t bsize,
                               int64_t& nb) {
  const int64_t max_nb = std::max<int64_t>(1, rp[R] / std::max<int64_t>(1, R * min_per_block()));
  nb = std::max<int64_t>(1, (nplanes + bsize - 1) / bsize);
  if (nb > max_nb) {
    nb = max_nb;
    bsize = (nplanes + nb - 1) / nb;
    nb = std::max<int64_t>(1, (nplanes + bsize - 1) / bsize);
  }
  std::vector<int64_t> bp(R * (nb + 1));
  for (int64_t r = 0; r < R; ++r) {
    int64_t j = rp[r];
    const int64_t e = rp[r + 1];
    int64_t* row = bp.data() + r * (nb + 1);
    for (int64_t k = 0; k < nb; ++k) {
      row[k] = j;
      while (j < e && plane_of[j] < (k + 1) * bsize) ++j;
    }
    row[nb] = e;
  }
  return bp;
}

// Partial output tiles between weight blocks: NACC vectors per row (none for one block).
template <class T>
int64_t scratch_size(int64_t rows, int64_t nb, int vb) {
  return nb > 1 ? rows * NACC * (vb / int64_t(sizeof(T))) : 0;
}

int64_t num_threads() { return std::max<int64_t>(1, at::get_num_threads()); }

void check_values(const char* op, const at::Tensor& values, const at::Tensor& col_idx) {
  TORCH_CHECK(values.dim() == 1 && values.numel() == col_idx.numel(), op,
              ": values must be a 1-D tensor with nnz = ", col_idx.numel(), " entries, got shape ", values.sizes());
}

// The forward's and weight gradient's plan (cached, plan_cache.h; the same for every batch size): per
// nonzero its packed-x offset, the output grid's vector positions and the rows' blocks of input channels.
struct TapPlan {
  int vb = 32;  // the vector width the positions are cut for
  std::vector<int32_t> offs;
  std::vector<Pos> pos;
  std::vector<int64_t> bp;
  int64_t nb = 1;
  size_t bytes() const { return plan_cache::vec_bytes(offs) + plan_cache::vec_bytes(pos) + plan_cache::vec_bytes(bp); }
};

// ---------------------------------------------------------------------------
// Forward.

// Input channels per block for the forward and grad-weight tiles.
template <class T>
int64_t fwd_planes_per_block(const Geom& g, int vb) {
  const int64_t VW = vb / int64_t(sizeof(T));
  const int64_t rows = (tile_rows<T>(g.OW, vb) - 1) * g.sh + (g.kh - 1) * g.dh + 1;
  const int64_t cols = std::min(g.Wq, NACC * VW + ((g.kw - 1) * g.dw) / g.sw + 1) * g.sw;
  return planes_per_block<T>(rows, cols);
}

// I: the element type of x and y; T: the compute type of values, bias and the packed image
// (float32 for a bf16 I).
// T: the compute type (its vector width shapes the positions); checks col_idx when it builds.
// The width of the forward's loops (weight_grad false) or the weight gradient's: 64-byte vectors where every
// output row holds one (conv_tiles::vector_bytes), but for the weight gradient only on rows of whole vectors: a
// row that ends in an overlapped vector masks every source vector of its tiles (src_lanes), and at 64 bytes that
// cost more than the width saved (7x7 stem, OW = 56: 0.86x; 3x3 at OW = 56: 0.81x; interleaved A/B, Intel).
template <class T>
int tap_width(const Geom& g, bool weight_grad) {
  const int vb = conv_tiles::vector_bytes(g.OW, sizeof(T));
  return weight_grad && (g.OW * int64_t(sizeof(T))) % vb != 0 ? 32 : vb;
}

template <class T>
std::shared_ptr<const TapPlan> tap_plan(const char* op, const Geom& g, const at::Tensor& row_ptr,
                                        const at::Tensor& col_idx, bool weight_grad) {
  const int vb = tap_width<T>(g, weight_grad);
  const plan_cache::Key key{plan_cache::kDirectTaps, g.Cin, g.H, g.W, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
                            int64_t(sizeof(T)),      vb};
  return plan_cache::get<TapPlan>(row_ptr, col_idx, key, [&] {
    TapPlan p;
    p.vb = vb;
    std::vector<int32_t> plane_of;
    forward_offsets(op, g, col_idx, p.offs, plane_of);
    p.pos = build_positions<T>(vb, g.OH, g.OW, 0, g.sh * g.Wq, 0, g.OW, 1);
    p.bp = block_ptr(g.Cout, row_ptr.data_ptr<int64_t>(), plane_of.data(), g.Cin, fwd_planes_per_block<T>(g, vb), p.nb);
    return p;
  });
}

std::shared_ptr<const TapPlan> tap_plan_for(const char* op, const Geom& g, const at::Tensor& x,
                                            const at::Tensor& row_ptr, const at::Tensor& col_idx, bool weight_grad) {
  return x.scalar_type() == at::kDouble ? tap_plan<double>(op, g, row_ptr, col_idx, weight_grad)
                                        : tap_plan<float>(op, g, row_ptr, col_idx, weight_grad);
}

template <class I, class T = typename bf16::Acc<I>::type>
void forward_impl(const Geom& g, const at::Tensor& x, const at::Tensor& values, const TapPlan& plan, const T* bias,
                  at::Tensor& y) {
  const I* xp = x.data_ptr<I>();
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const T* ws = values.data_ptr<T>();
  I* yp = y.data_ptr<I>();
  const int64_t oplane = g.OH * g.OW, yimg = g.Cout * oplane;
  const std::vector<int32_t>& offs = plan.offs;
  const std::vector<Pos>& pos = plan.pos;
  const std::vector<int64_t>& bp = plan.bp;
  const int64_t nb = plan.nb;
  const int64_t ntiles = static_cast<int64_t>(pos.size()) / NACC;
  const int64_t psize = g.xpack_size();
  const int64_t nth = num_threads();
  if (g.N >= nth) {
    at::parallel_for(0, g.N, 1, [&](int64_t b0, int64_t b1) {
      ThreadScratch<T, kScratchPack> buf(psize);
      ThreadScratch<T, kScratchRows> scratch(scratch_size<T>(g.Cout, nb, plan.vb));
      for (int64_t b = b0; b < b1; ++b) {
        pack_padded<T>(xp + b * sN, sC, sH, sW, g.Cin, g.H, g.W, g.ph, g.pw, g.sw, g.Hp, g.Wq, buf.data());
        gather_rows(plan.vb, buf.data(), offs.data(), ws, bp.data(), nb, 0, g.Cout, pos.data(), 0, ntiles, bias,
                    yp + b * yimg, oplane, 1, scratch.data());
      }
    });
  } else {
    ThreadScratch<T, kScratchPack> buf(psize);
    const int64_t nnz = offs.size();
    const int64_t grain = std::max<int64_t>(1, g.Cout * 16384 / std::max<int64_t>(1, nnz * oplane));
    for (int64_t b = 0; b < g.N; ++b) {
      pack_padded<T>(xp + b * sN, sC, sH, sW, g.Cin, g.H, g.W, g.ph, g.pw, g.sw, g.Hp, g.Wq, buf.data());
      at::parallel_for(0, g.Cout, grain, [&](int64_t r0, int64_t r1) {
        ThreadScratch<T, kScratchRows> scratch(scratch_size<T>(r1 - r0, nb, plan.vb));
        gather_rows(plan.vb, buf.data(), offs.data(), ws, bp.data(), nb, r0, r1, pos.data(), 0, ntiles, bias,
                    yp + b * yimg, oplane, 1, scratch.data());
      });
    }
  }
}

// The forward; x_packed (where given): the batch-innermost kernel's copy of x in its phases, where that kernel ran on
// a strided conv and the weight gradient will run it too (the conv node keeps it for its backward), else undefined.
at::Tensor conv_forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr_,
                        const at::Tensor& col_idx_, at::IntArrayRef kernel_size, const c10::optional<at::Tensor>& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                        at::Tensor* x_packed) {
  const at::Tensor row_ptr = row_ptr_.contiguous(), col_idx = col_idx_.contiguous();
  const char* op = "sparse_conv2d";
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, Cin, H, W), got shape ", x.sizes());
  check_float_or_bf16(x, "x", op);
  check_float_or_bf16(values, "values", op);
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), op, ": values must have the dtype of x (", x.scalar_type(),
              "), got ", values.scalar_type());
  check_csr(row_ptr, col_idx, op);
  check_values(op, values, col_idx);
  const Geom g = make_geom(op, x.size(0), x.size(1), x.size(2), x.size(3), row_ptr, col_idx, kernel_size, stride,
                           padding, dilation);
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == g.Cout, op, ": bias must have shape (", g.Cout, ") (W has ", g.Cout,
                " output channels), got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), op, ": bias must have the dtype of x (", x.scalar_type(), "), got ",
                b.scalar_type());
    b = b.contiguous();
  }
  const ConvPin pin = conv_pin();
  if (pointwise_for(g, pin)) {
    at::Tensor y = at::empty({g.N, g.Cout, g.OH, g.OW}, x.options());
    pointwise::forward(x, values, row_ptr, col_idx, b, g.sh, g.sw, y);
    return y;
  }
  Geom gl = g;
  gl.cl = channels_last(x);
  LayoutOutput out({g.N, g.Cout, g.OH, g.OW}, x.options());
  // Strided convs only: there x is 4x dY and packing it again cost a fifth or more of the fwd+bwd (128 -> 128 3x3
  // stride 2 at 28x28: 5.0-5.5 -> 3.6-4.5 ms kept); at stride 1 the gain was within noise, and keeping every 3x3
  // layer's copy put ResNet-18's ERK step at 224x224 over its dense twin's peak memory (477 MB against 452).
  const bool keep = x_packed && g.sh * g.sw > 1 &&
                    decided(Pass::GradWeight, gl, col_idx.numel(), x.scalar_type(), pin).value_or(false);
  auto run = [&](bool batched) {
    if (x_packed) *x_packed = at::Tensor();  // a measuring run's copy is not the chosen kernel's
    at::Tensor& y = out.take(batched && gl.cl);
    if (batched) {
      batched::forward(x, values, row_ptr, col_idx, b, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, y,
                       keep ? x_packed : nullptr);
      return;
    }
    const std::shared_ptr<const TapPlan> plan = tap_plan_for(op, g, x, row_ptr, col_idx, false);  // checks col_idx
    if (y.numel() == 0) return;
    if (x.scalar_type() == at::kBFloat16) {  // values and bias once in float32
      const at::Tensor v32 = values.to(at::kFloat).contiguous();
      const at::Tensor b32 = b.defined() ? b.to(at::kFloat) : b;
      forward_impl<c10::BFloat16>(g, x, v32, *plan, b32.defined() ? b32.data_ptr<float>() : nullptr, y);
      return;
    }
    const at::Tensor vc = values.contiguous();
    if (x.scalar_type() == at::kFloat)
      forward_impl<float>(g, x, vc, *plan, b.defined() ? b.data_ptr<float>() : nullptr, y);
    else forward_impl<double>(g, x, vc, *plan, b.defined() ? b.data_ptr<double>() : nullptr, y);
  };
  run_chosen(Pass::Forward, gl, col_idx.numel(), x.scalar_type(), pin, run, [] {});
  return out.last();
}

// The public ops' result lies as their input does (x, grad_out): channels_last for a channels_last one, else NCHW, as
// their fake kernels say (torch.compile checks it). The kernels write the layout of the kernel measured fastest, so
// the result is copied where the two differ; the layer's own node (sparse_conv2d_keep_cpu) takes either.
at::Tensor laid_out_as(const at::Tensor& input, const at::Tensor& result) {
  return result.contiguous(channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

at::Tensor sparse_conv2d_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, at::IntArrayRef kernel_size,
                             const c10::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  return laid_out_as(x,
                     conv_forward(x, values, row_ptr, col_idx, kernel_size, bias, stride, padding, dilation, nullptr));
}

// The conv node's forward: y, and the batch-innermost kernel's copy of x in its phases where its backward can reuse
// it (an empty tensor elsewhere; strided convs only, see conv_forward).
std::tuple<at::Tensor, at::Tensor> sparse_conv2d_keep_cpu(const at::Tensor& x, const at::Tensor& values,
                                                          const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                                          at::IntArrayRef kernel_size,
                                                          const c10::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  at::Tensor x_packed;
  at::Tensor y = conv_forward(x, values, row_ptr, col_idx, kernel_size, bias, stride, padding, dilation, &x_packed);
  return {y, x_packed.defined() ? x_packed : at::empty({0}, x.options())};
}

// ---------------------------------------------------------------------------
// Grad input: for the input position ih = a + sh*m - ph (a in [0, sh)), only taps with
// r*dh = a (mod sh) contribute, from output row m - (r*dh)/sh; likewise along W. So
// per phase (a, c) it is a stride-1 correlation of dY (zero bordered) with those taps.

// The shortest row of the input gradient's phases (columns n0..n1 of phase column c), which its vector width
// must fit: about W / sw.
int64_t grad_input_run(const Geom& g) {
  int64_t run = INT64_MAX;
  for (int64_t c = 0; c < g.sw; ++c) {
    const int64_t n0 = (g.pw - c) <= 0 ? 0 : (g.pw - c + g.sw - 1) / g.sw;
    const int64_t n1 = (g.W - 1 + g.pw - c) >= 0 ? (g.W - 1 + g.pw - c) / g.sw : -1;
    if (n1 >= n0) run = std::min(run, n1 - n0 + 1);
  }
  return run == INT64_MAX ? 0 : run;
}

// The input gradient's plan (cached; the same for every batch size): W^T as lists over rows (phase, ci),
// entries (dY offset, index of the value in W's lists), co ascending; per phase its vector positions; the
// rows' blocks of output channels.
struct GradPlan {
  int vb = 32;  // the vector width the positions are cut for
  int64_t Ptop, Pleft, Hd, Wd;
  std::vector<int64_t> trp, perm;
  std::vector<int32_t> toffs;
  std::vector<std::vector<Pos>> pos;  // per phase
  std::vector<int64_t> bp;
  int64_t nb = 1;
  size_t bytes() const {
    size_t b = plan_cache::vec_bytes(trp) + plan_cache::vec_bytes(perm) + plan_cache::vec_bytes(toffs) +
               plan_cache::vec_bytes(bp);
    for (const auto& p : pos) b += plan_cache::vec_bytes(p);
    return b;
  }
};

// Checks col_idx when it builds.
template <class T>
GradPlan build_grad_plan(const char* op, const Geom& g, const at::Tensor& row_ptr, const at::Tensor& col_idx, int vb) {
  GradPlan gp;
  gp.vb = vb;
  const int64_t nph = g.sh * g.sw, K = g.kh * g.kw, ncols = g.Cin * K;
  gp.Ptop = ((g.kh - 1) * g.dh) / g.sh;
  gp.Pleft = ((g.kw - 1) * g.dw) / g.sw;
  const int64_t Ptop = gp.Ptop, Pleft = gp.Pleft;
  const int64_t Mmax = (g.H - 1 + g.ph) / g.sh + 1, Nmax = (g.W - 1 + g.pw) / g.sw + 1;
  gp.Hd = Ptop + std::max(g.OH, Mmax);
  gp.Wd = Pleft + std::max(g.OW, Nmax);
  const int64_t Hd = gp.Hd, Wd = gp.Wd;
  TORCH_CHECK(static_cast<__int128>(g.Cout) * Hd * Wd + kSlack < INT32_MAX, op,
              ": one grad_out image is too large for this kernel");
  const int64_t dplane = Hd * Wd;
  const int64_t nnz = col_idx.numel();
  const int64_t* rp = row_ptr.data_ptr<int64_t>();
  const int32_t* cidx = col_idx.data_ptr<int32_t>();
  const int64_t nrows = nph * g.Cin;
  gp.trp.assign(nrows + 1, 0);
  std::vector<int32_t> key(nnz);
  // Per column (c, r, s), tabled (not divided out per nonzero): its row (phase, c) of W^T and its dY shift.
  std::vector<int32_t> col_key(ncols), col_shift(ncols);
  for (int64_t c = 0, col = 0; c < g.Cin; ++c) {
    for (int64_t r = 0; r < g.kh; ++r) {
      for (int64_t s = 0; s < g.kw; ++s, ++col) {
        col_key[col] = static_cast<int32_t>((((r * g.dh) % g.sh) * g.sw + (s * g.dw) % g.sw) * g.Cin + c);
        col_shift[col] = static_cast<int32_t>(-((r * g.dh) / g.sh) * Wd - (s * g.dw) / g.sw);
      }
    }
  }
  for (int64_t j = 0; j < nnz; ++j) {
    const int64_t col = cidx[j];
    check_col(op, g, j, col);
    const int32_t k = col_key[col];
    key[j] = k;
    ++gp.trp[k + 1];
  }
  for (int64_t k = 0; k < nrows; ++k) gp.trp[k + 1] += gp.trp[k];
  gp.toffs.resize(nnz);
  gp.perm.resize(nnz);
  std::vector<int32_t> tplane(nnz);
  {
    std::vector<int64_t> fill(gp.trp.begin(), gp.trp.end() - 1);
    for (int64_t co = 0; co < g.Cout; ++co) {
      for (int64_t j = rp[co]; j < rp[co + 1]; ++j) {
        const int64_t p = fill[key[j]]++;
        gp.toffs[p] = static_cast<int32_t>(co * dplane + col_shift[cidx[j]]);
        gp.perm[p] = j;
        tplane[p] = static_cast<int32_t>(co);
      }
    }
  }
  // Positions per phase.
  gp.pos.resize(nph);
  for (int64_t a = 0; a < g.sh; ++a) {
    // Rows m with ih = a + sh*m - ph in [0, H): m in [m0c, m1].
    const int64_t m0c = (g.ph - a) <= 0 ? 0 : (g.ph - a + g.sh - 1) / g.sh;
    const int64_t m1 = (g.H - 1 + g.ph - a) >= 0 ? (g.H - 1 + g.ph - a) / g.sh : -1;
    for (int64_t c = 0; c < g.sw; ++c) {
      const int64_t n0 = (g.pw - c) <= 0 ? 0 : (g.pw - c + g.sw - 1) / g.sw;
      const int64_t n1 = (g.W - 1 + g.pw - c) >= 0 ? (g.W - 1 + g.pw - c) / g.sw : -1;
      gp.pos[a * g.sw + c] =
          build_positions<T>(vb, m1 - m0c + 1, n1 - n0 + 1, (m0c + Ptop) * Wd + n0 + Pleft, Wd,
                             (a + g.sh * m0c - g.ph) * g.W + (c + g.sw * n0 - g.pw), g.sh * g.W, g.sw);
    }
  }
  // Blocks of output channels: a tile reads tile_rows + Ptop rows of each dY plane.
  const int64_t bsize = planes_per_block<T>(tile_rows<T>((g.W + g.sw - 1) / g.sw, vb) + Ptop,
                                            std::min<int64_t>(Wd, NACC * (vb / int64_t(sizeof(T))) + Pleft));
  gp.bp = block_ptr(nrows, gp.trp.data(), tplane.data(), g.Cout, bsize, gp.nb);
  return gp;
}

template <class T>
std::shared_ptr<const GradPlan> grad_plan(const char* op, const Geom& g, const at::Tensor& row_ptr,
                                          const at::Tensor& col_idx) {
  const int vb = conv_tiles::vector_bytes(grad_input_run(g), sizeof(T));
  const plan_cache::Key key{plan_cache::kDirectGrad, g.Cin, g.H, g.W, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw,
                            int64_t(sizeof(T)),      vb};
  return plan_cache::get<GradPlan>(row_ptr, col_idx, key,
                                   [&] { return build_grad_plan<T>(op, g, row_ptr, col_idx, vb); });
}

template <class I, class T = typename bf16::Acc<I>::type>
void backward_input_impl(const Geom& g, const at::Tensor& dy, const at::Tensor& values, const GradPlan& gp,
                         at::Tensor& dx) {
  const int64_t nph = g.sh * g.sw;
  const int64_t Ptop = gp.Ptop, Pleft = gp.Pleft, Hd = gp.Hd, Wd = gp.Wd;
  const int64_t psize = g.Cout * Hd * Wd + kSlack;
  const int64_t nnz = static_cast<int64_t>(gp.perm.size());
  const std::vector<int32_t>& toffs = gp.toffs;
  const std::vector<std::vector<Pos>>& pos = gp.pos;
  const std::vector<int64_t>& bp = gp.bp;
  const int64_t nb = gp.nb;
  const std::vector<T> tws = plan_cache::permuted<T>(values.data_ptr<I>(), gp.perm);
  const I* dyp = dy.data_ptr<I>();
  const int64_t sN = dy.stride(0), sC = dy.stride(1), sH = dy.stride(2), sW = dy.stride(3);
  I* dxp = dx.data_ptr<I>();
  const int64_t xplane = g.H * g.W, ximg = g.Cin * xplane;
  auto image = [&](const T* src, int64_t b, int64_t r0, int64_t r1, T* scratch) {
    for (int64_t ph = 0; ph < nph; ++ph) {
      const std::vector<Pos>& pp = pos[ph];
      if (pp.empty()) continue;
      gather_rows(gp.vb, src, toffs.data(), tws.data(), bp.data() + ph * g.Cin * (nb + 1), nb, r0, r1, pp.data(), 0,
                  static_cast<int64_t>(pp.size()) / NACC, static_cast<const T*>(nullptr), dxp + b * ximg, xplane, g.sw,
                  scratch);
    }
  };
  const int64_t nth = num_threads();
  if (g.N >= nth) {
    at::parallel_for(0, g.N, 1, [&](int64_t b0, int64_t b1) {
      ThreadScratch<T, kScratchPack> buf(psize);
      ThreadScratch<T, kScratchRows> scratch(scratch_size<T>(g.Cin, nb, gp.vb));
      for (int64_t b = b0; b < b1; ++b) {
        pack_padded<T>(dyp + b * sN, sC, sH, sW, g.Cout, g.OH, g.OW, Ptop, Pleft, 1, Hd, Wd, buf.data());
        image(buf.data(), b, 0, g.Cin, scratch.data());
      }
    });
  } else {
    ThreadScratch<T, kScratchPack> buf(psize);
    const int64_t grain = std::max<int64_t>(1, g.Cin * 16384 / std::max<int64_t>(1, nnz * g.OH * g.OW));
    for (int64_t b = 0; b < g.N; ++b) {
      pack_padded<T>(dyp + b * sN, sC, sH, sW, g.Cout, g.OH, g.OW, Ptop, Pleft, 1, Hd, Wd, buf.data());
      at::parallel_for(0, g.Cin, grain, [&](int64_t r0, int64_t r1) {
        ThreadScratch<T, kScratchRows> scratch(scratch_size<T>(r1 - r0, nb, gp.vb));
        image(buf.data(), b, r0, r1, scratch.data());
      });
    }
  }
}

// The input gradient in the layout its kernel wrote (the public op: sparse_conv2d_backward_input_cpu).
at::Tensor conv_backward_input(const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& row_ptr_,
                               const at::Tensor& col_idx_, at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const at::Tensor row_ptr = row_ptr_.contiguous(), col_idx = col_idx_.contiguous();
  const char* op = "sparse_conv2d_backward_input";
  TORCH_CHECK(input_size.size() == 4, op, ": input_size must have 4 entries (N, Cin, H, W), got ", input_size);
  TORCH_CHECK(grad_out.dim() == 4, op, ": grad_out must be 4-D (N, Cout, OH, OW), got shape ", grad_out.sizes());
  check_float_or_bf16(grad_out, "grad_out", op);
  check_float_or_bf16(values, "values", op);
  TORCH_CHECK(values.scalar_type() == grad_out.scalar_type(), op, ": values must have the dtype of grad_out (",
              grad_out.scalar_type(), "), got ", values.scalar_type());
  check_csr(row_ptr, col_idx, op);
  check_values(op, values, col_idx);
  for (int i = 0; i < 4; ++i) TORCH_CHECK(input_size[i] >= 0, op, ": input_size must be >= 0, got ", input_size);
  const Geom g = make_geom(op, input_size[0], input_size[1], input_size[2], input_size[3], row_ptr, col_idx,
                           kernel_size, stride, padding, dilation);
  TORCH_CHECK(grad_out.size(0) == g.N && grad_out.size(1) == g.Cout && grad_out.size(2) == g.OH &&
                  grad_out.size(3) == g.OW,
              op, ": grad_out must have shape (", g.N, ", ", g.Cout, ", ", g.OH, ", ", g.OW, "), got ",
              grad_out.sizes());
  const ConvPin pin = conv_pin();
  if (pointwise_for(g, pin)) {
    at::Tensor dx = at::empty({g.N, g.Cin, g.H, g.W}, grad_out.options());
    pointwise::backward_input(grad_out, values, row_ptr, col_idx, g.sh, g.sw, dx);
    return dx;
  }
  Geom gl = g;
  gl.cl = channels_last(grad_out);
  LayoutOutput out({g.N, g.Cin, g.H, g.W}, grad_out.options());
  auto run = [&](bool batched) {
    at::Tensor& dx = out.take(batched && gl.cl);
    if (batched) {
      batched::backward_input(grad_out, values, row_ptr, col_idx, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, dx);
      return;
    }
    const std::shared_ptr<const GradPlan> plan = grad_out.scalar_type() == at::kDouble
                                                     ? grad_plan<double>(op, g, row_ptr, col_idx)
                                                     : grad_plan<float>(op, g, row_ptr, col_idx);  // checks col_idx
    if (dx.numel() == 0) return;
    const at::Tensor vc = values.contiguous();
    if (grad_out.scalar_type() == at::kFloat) backward_input_impl<float>(g, grad_out, vc, *plan, dx);
    else if (grad_out.scalar_type() == at::kBFloat16) backward_input_impl<c10::BFloat16>(g, grad_out, vc, *plan, dx);
    else backward_input_impl<double>(g, grad_out, vc, *plan, dx);
  };
  run_chosen(Pass::GradInput, gl, col_idx.numel(), grad_out.scalar_type(), pin, run, [] {});
  return out.last();
}

at::Tensor sparse_conv2d_backward_input_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                            const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                            at::IntArrayRef input_size, at::IntArrayRef kernel_size,
                                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  return laid_out_as(grad_out, conv_backward_input(grad_out, values, row_ptr, col_idx, input_size, kernel_size, stride,
                                                   padding, dilation));
}

// ---------------------------------------------------------------------------
// Grad weight (values at the pattern): g[j] = sum_b sum_pos dY[b, co(j), pos] * xpack_b[off_j + pos].

// gv has the compute type T (float32 for a bf16 I; the caller rounds it).
template <class I, class T = typename bf16::Acc<I>::type>
void backward_weight_impl(const Geom& g, const at::Tensor& dy, const at::Tensor& x, const TapPlan& plan,
                          at::Tensor& gv) {
  const I* xp = x.data_ptr<I>();
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const I* dyp = dy.data_ptr<I>();  // contiguous
  T* gp = gv.data_ptr<T>();
  const std::vector<int32_t>& offs = plan.offs;
  const int64_t nnz = offs.size();
  const int64_t oplane = g.OH * g.OW, yimg = g.Cout * oplane;
  // dY of image b in the compute type: a bf16 image is widened once into `tmp` (yimg entries).
  auto dy_image = [&](int64_t b, ThreadScratch<T, kScratchDy>& tmp) -> const T* {
    if constexpr (std::is_same<I, T>::value) {
      return dyp + b * yimg;
    } else {
      tmp.resize(yimg);
      T* t = tmp.data();
      for (int64_t i = 0; i < yimg; ++i) t[i] = bf16::widen(dyp[b * yimg + i]);
      return t;
    }
  };
  const std::vector<Pos>& pos = plan.pos;
  const std::vector<int64_t>& bp = plan.bp;
  const int64_t nb = plan.nb;
  const int64_t ntiles = static_cast<int64_t>(pos.size()) / NACC;
  const int64_t psize = g.xpack_size();
  const bool grouped = g.kh * g.kw > 1;  // see wgrad_rows
  const int64_t nth = num_threads();
  if (g.N >= nth && nth > 1) {
    std::vector<T> parts(nth * nnz, T(0));
    at::parallel_for(0, g.N, 1, [&](int64_t b0, int64_t b1) {
      T* acc = parts.data() + at::get_thread_num() * nnz;
      ThreadScratch<T, kScratchPack> buf(psize);
      ThreadScratch<T, kScratchDy> dyw;
      for (int64_t b = b0; b < b1; ++b) {
        pack_padded<T>(xp + b * sN, sC, sH, sW, g.Cin, g.H, g.W, g.ph, g.pw, g.sw, g.Hp, g.Wq, buf.data());
        wgrad_rows(plan.vb, buf.data(), offs.data(), bp.data(), nb, 0, g.Cout, pos.data(), 0, ntiles, dy_image(b, dyw),
                   oplane, acc, grouped);
      }
    });
    conv_tiles::sum_thread_parts(parts.data(), nth, nnz, gp);
  } else {
    ThreadScratch<T, kScratchPack> buf(psize);
    ThreadScratch<T, kScratchDy> dyw;
    const int64_t grain = std::max<int64_t>(1, g.Cout * 16384 / std::max<int64_t>(1, nnz * oplane));
    for (int64_t b = 0; b < g.N; ++b) {
      pack_padded<T>(xp + b * sN, sC, sH, sW, g.Cin, g.H, g.W, g.ph, g.pw, g.sw, g.Hp, g.Wq, buf.data());
      const T* d = dy_image(b, dyw);
      at::parallel_for(0, g.Cout, grain, [&](int64_t r0, int64_t r1) {
        wgrad_rows(plan.vb, buf.data(), offs.data(), bp.data(), nb, r0, r1, pos.data(), 0, ntiles, d, oplane, gp,
                   grouped);
      });
    }
  }
}

at::Tensor sparse_conv2d_backward_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                             const at::Tensor& row_ptr_, const at::Tensor& col_idx_,
                                             at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                             at::IntArrayRef padding, at::IntArrayRef dilation) {
  const at::Tensor row_ptr = row_ptr_.contiguous(), col_idx = col_idx_.contiguous();
  const char* op = "sparse_conv2d_backward_weight";
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, Cin, H, W), got shape ", x.sizes());
  TORCH_CHECK(grad_out.dim() == 4, op, ": grad_out must be 4-D (N, Cout, OH, OW), got shape ", grad_out.sizes());
  check_float_or_bf16(x, "x", op);
  check_float_or_bf16(grad_out, "grad_out", op);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must have the dtype of x (", x.scalar_type(),
              "), got ", grad_out.scalar_type());
  const Geom g = make_geom(op, x.size(0), x.size(1), x.size(2), x.size(3), row_ptr, col_idx, kernel_size, stride,
                           padding, dilation);
  TORCH_CHECK(grad_out.size(0) == g.N && grad_out.size(1) == g.Cout && grad_out.size(2) == g.OH &&
                  grad_out.size(3) == g.OW,
              op, ": grad_out must have shape (", g.N, ", ", g.Cout, ", ", g.OH, ", ", g.OW, "), got ",
              grad_out.sizes());
  // dY as the direct and pointwise kernels read it (the batch-innermost one packs it from any layout).
  at::Tensor dyc;
  auto contiguous_dy = [&]() -> const at::Tensor& {
    if (!dyc.defined()) dyc = grad_out.contiguous();
    return dyc;
  };
  const ConvPin pin = conv_pin();
  if (pointwise_for(g, pin)) {
    const bool bf = x.scalar_type() == at::kBFloat16;  // summed over the batch in float32, rounded once
    at::Tensor gv = at::zeros({col_idx.numel()}, bf ? x.options().dtype(at::kFloat) : x.options());
    pointwise::backward_weight(contiguous_dy(), x, row_ptr, col_idx, g.sh, g.sw, gv);
    return bf ? gv.to(at::kBFloat16) : gv;
  }
  // bf16: summed over the batch in float32, rounded once.
  const bool bf = x.scalar_type() == at::kBFloat16;
  at::Tensor gv = at::zeros({col_idx.numel()}, bf ? x.options().dtype(at::kFloat) : x.options());
  Geom gl = g;
  gl.cl = channels_last(grad_out);
  auto run = [&](bool batched) {
    if (batched) {
      batched::backward_weight(grad_out, x, row_ptr, col_idx, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, gv);
      return;
    }
    const std::shared_ptr<const TapPlan> plan = tap_plan_for(op, g, x, row_ptr, col_idx, true);  // checks col_idx
    if (col_idx.numel() == 0 || g.N == 0) return;
    const at::Tensor& dy = contiguous_dy();
    if (bf) backward_weight_impl<c10::BFloat16>(g, dy, x, *plan, gv);
    else if (x.scalar_type() == at::kFloat) backward_weight_impl<float>(g, dy, x, *plan, gv);
    else backward_weight_impl<double>(g, dy, x, *plan, gv);
  };
  run_chosen(Pass::GradWeight, gl, col_idx.numel(), x.scalar_type(), pin, run, [&] { gv.zero_(); });
  return bf ? gv.to(at::kBFloat16) : gv;
}

// Both gradients (the conv node's backward when x and the values need one): a pointwise conv runs them in one pass
// over the image groups (conv_pointwise.cpp: dY read once), a conv whose two passes both run the batch-innermost
// kernel packs dY once for both (conv_batched.cpp), every other conv, and those where that does not apply, as the two
// ops above.
std::tuple<at::Tensor, at::Tensor> sparse_conv2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& values, const at::Tensor& row_ptr_,
                                                              const at::Tensor& col_idx_, at::IntArrayRef kernel_size,
                                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                                              at::IntArrayRef dilation,
                                                              const c10::optional<at::Tensor>& x_packed) {
  const at::Tensor row_ptr = row_ptr_.contiguous(), col_idx = col_idx_.contiguous();
  const char* op = "_sparse_conv2d_backward";
  auto apart = [&] {
    return std::make_tuple(conv_backward_input(grad_out, values, row_ptr, col_idx, x.sizes(), kernel_size, stride,
                                               padding, dilation),
                           sparse_conv2d_backward_weight_cpu(grad_out, x, row_ptr, col_idx, kernel_size, stride,
                                                             padding, dilation));
  };
  if (x.dim() != 4 || grad_out.dim() != 4 || x.scalar_type() != grad_out.scalar_type() ||
      values.scalar_type() != x.scalar_type() || !values.is_contiguous())
    return apart();  // their checks name what is wrong
  check_float_or_bf16(x, "x", op);
  check_csr(row_ptr, col_idx, op);
  check_values(op, values, col_idx);
  Geom g = make_geom(op, x.size(0), x.size(1), x.size(2), x.size(3), row_ptr, col_idx, kernel_size, stride, padding,
                     dilation);
  if (grad_out.size(0) != g.N || grad_out.size(1) != g.Cout || grad_out.size(2) != g.OH || grad_out.size(3) != g.OW)
    return apart();
  g.cl = channels_last(grad_out);  // as the two ops above measure their passes
  const ConvPin pin = conv_pin();
  const int64_t nnz = col_idx.numel();
  const bool pointwise = pointwise_for(g, pin);
  // Both passes on the batch-innermost kernel (each chosen as it would be apart): dY packed once for the two. A
  // pass not yet measured runs apart first, where its choice is timed.
  const bool batched = !pointwise && nnz > 0 && g.N > 0 && g.Cin > 0 &&
                       decided(Pass::GradInput, g, nnz, x.scalar_type(), pin).value_or(false) &&
                       decided(Pass::GradWeight, g, nnz, x.scalar_type(), pin).value_or(false);
  if (!pointwise && !batched) return apart();
  const bool bf = x.scalar_type() == at::kBFloat16;  // the weight gradient summed in float32, rounded once
  at::Tensor dx = at::empty({g.N, g.Cin, g.H, g.W},
                            grad_out.options().memory_format(batched && g.cl ? at::MemoryFormat::ChannelsLast
                                                                             : at::MemoryFormat::Contiguous));
  at::Tensor gv = at::zeros({nnz}, bf ? x.options().dtype(at::kFloat) : x.options());
  if (batched) {
    batched::backward(grad_out, x, values, row_ptr, col_idx, g.kh, g.kw, g.sh, g.sw, g.ph, g.pw, g.dh, g.dw, dx, gv,
                      x_packed.value_or(at::Tensor()));
    csr::note_fused_backward();
  } else if (!pointwise::backward(grad_out, x, values, row_ptr, col_idx, g.sh, g.sw, dx, gv)) {
    return apart();
  }
  return std::make_tuple(dx, bf ? gv.to(at::kBFloat16) : gv);
}

// Which kernel a float32 pass above (0: forward, 1: input gradient, 2: weight gradient) runs for this conv (the one
// measured, else the rule's): what the tests check they reach, and what explain() and the model bench report.
std::string conv2d_cpu_kernel(at::IntArrayRef input_size, const at::Tensor& row_ptr, const at::Tensor& col_idx,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation, int64_t pass, bool channels_last) {
  const char* op = "_conv2d_cpu_kernel";
  TORCH_CHECK(input_size.size() == 4, op, ": input_size must have 4 entries, got ", input_size.size());
  TORCH_CHECK_VALUE(pass >= 0 && pass <= 2, op,
                    ": pass_index must be 0 (forward), 1 (input gradient) or 2 (weight gradient), got ", pass);
  Geom g = make_geom(op, input_size[0], input_size[1], input_size[2], input_size[3], row_ptr, col_idx, kernel_size,
                     stride, padding, dilation);
  g.cl = channels_last;
  const ConvPin pin = conv_pin();
  if (pointwise_for(g, pin)) return "pointwise";
  if (pin == ConvPin::Direct || !batched_applies(g)) return "direct";
  if (pin == ConvPin::Batched) return "batched";
  const c10::optional<bool> known = at::globalContext().deterministicAlgorithms()
                                        ? c10::nullopt
                                        : measured_choice(static_cast<Pass>(pass), g, col_idx.numel(), at::kFloat);
  return known.value_or(batched_by_rule(g, col_idx.numel())) ? "batched" : "direct";
}

}  // namespace
}  // namespace sparsekern

// Private op (tests): not part of the op contract.
TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  // Private (csr_nodes.cpp's conv node): both gradients of sparse_conv2d at once.
  m.def(
      "_sparse_conv2d_backward(Tensor grad_out, Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, "
      "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, Tensor? x_packed=None) -> (Tensor, Tensor)");
  // Private (csr_nodes.cpp's conv node): the forward, and x as the batch-innermost kernel packed it where the
  // backward can reuse it (else an empty tensor); _sparse_conv2d_backward takes it back as x_packed.
  m.def("_sparse_conv2d_keep(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, int[2] kernel_size, "
        "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation) -> (Tensor, Tensor)");
  m.def("_conv2d_cpu_kernel(int[4] input_size, Tensor row_ptr, Tensor col_idx, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int pass_index=0, bool channels_last=False) -> str");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("_conv2d_cpu_kernel", &sparsekern::conv2d_cpu_kernel);
  m.impl("sparse_conv2d", &sparsekern::sparse_conv2d_cpu);
  m.impl("sparse_conv2d_backward_input", &sparsekern::sparse_conv2d_backward_input_cpu);
  m.impl("sparse_conv2d_backward_weight", &sparsekern::sparse_conv2d_backward_weight_cpu);
  m.impl("_sparse_conv2d_backward", &sparsekern::sparse_conv2d_backward_cpu);
  m.impl("_sparse_conv2d_keep", &sparsekern::sparse_conv2d_keep_cpu);
}
