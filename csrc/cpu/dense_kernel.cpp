// The dense kernel of a sparse layer (sparsekern/nn/kernel_choice.py): the dense op on the weight scattered from
// the layer's values, as one C++ autograd node. Run as separate torch calls under a Python autograd.Function
// (scatter_, the op, narrow + sum + item for the NaN/Inf check, index_select; `_DenseKernel`, still the path on
// other devices) it cost 0.15-0.45 ms more than the dense twin per fwd+bwd at ResNet-50 and ConvNeXt shapes: the
// Python ran with cold caches between layers, torch's 1-D scatter_ runs serially (65 us in a training step for 19K
// values), and each check read its feature from cold lines (25-50 us). Here the scatter and the gather walk the
// CSR rows (split over the threads above ~16K entries), and the checks read one feature with prefetch.
//
// Private ops (not part of the op contract): the layer calls them only eagerly, on CPU tensors, outside autocast.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/Functions.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/accumulate.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/common.h"
#include "cpu/csr_engine.h"
#include "cpu/narrow_linear.h"
#include "cpu/plan_cache.h"
#include "cpu/product_choice.h"

#if SK_HAVE_AVX512
#include <immintrin.h>
#endif

namespace sparsekern {
namespace {

// The CSR (row_ptr int64 rows+1, col_idx int32 nnz) of a (rows, cols) weight, checked (once per pattern:
// csr::check_pattern_once) so that the loops below run unchecked. Reading 4-byte columns, not 8-byte flat
// positions, cuts a scatter's or a gather's traffic by a third.
struct Csr {
  const int64_t* row_ptr;
  const int32_t* col_idx;
  int64_t rows, cols, nnz;
  at::Tensor row_ptr_t, col_idx_t;  // the tensors (the row masks' cache key)
};

Csr checked_csr(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t rows, int64_t cols, const char* op) {
  check_csr(row_ptr, col_idx, op);
  TORCH_CHECK_VALUE(row_ptr.is_contiguous() && col_idx.is_contiguous(), op, ": row_ptr and col_idx must be contiguous");
  TORCH_CHECK_VALUE(row_ptr.numel() == rows + 1, op, ": row_ptr has ", row_ptr.numel(), " entries for a weight of ",
                    rows, " rows");
  csr::check_pattern_once(row_ptr, col_idx, cols, "the weight has " + std::to_string(cols) + " columns", op);
  return {row_ptr.data_ptr<int64_t>(), col_idx.data_ptr<int32_t>(), rows, cols, col_idx.numel(), row_ptr, col_idx};
}

// Rows split over the threads in chunks of about 16K entries (fewer: one thread, no wake-up).
template <typename F>
void for_rows(const Csr& w, F f) {
  at::parallel_for(0, w.rows, std::max<int64_t>(1, w.rows * (1 << 14) / std::max<int64_t>(w.nnz, 1)), f);
}

// Each row's pattern as 16-column bit masks (bit c % 16 of word c / 16; columns ascend within a row, checked), for
// the AVX-512 loops below: built once per pattern (plan_cache.h).
struct RowMasks {
  std::vector<uint16_t> m;
  int64_t words = 0;
  size_t bytes() const { return plan_cache::vec_bytes(m); }
};

std::shared_ptr<const RowMasks> row_masks(const Csr& w) {
  return plan_cache::get<RowMasks>(w.row_ptr_t, w.col_idx_t, {plan_cache::kDenseMasks, w.rows, w.cols}, [&] {
    RowMasks rm;
    rm.words = (w.cols + 15) / 16;
    rm.m.assign(w.rows * rm.words, 0);
    for (int64_t r = 0; r < w.rows; ++r)
      for (int64_t p = w.row_ptr[r]; p < w.row_ptr[r + 1]; ++p)
        rm.m[r * rm.words + w.col_idx[p] / 16] |= uint16_t(1u << (w.col_idx[p] % 16));
    return rm;
  });
}

// Where the float32 scatter and gather take the AVX-512 loops: a 64 -> 256 1x1 conv at density 0.96 (16K stored
// entries) scattered in 5-7 us element by element, a store a cycle, against a fwd+bwd of 0.75 ms (ResNet-50's
// layer1 at 64x64, batch 8): the dense kernel's scatter and gather were a quarter of its cost over the dense
// twin's. Each 16 columns of a row now take one expanding load (or compress) and one store.
bool masked_loops(const at::Tensor& t) {
  return SK_HAVE_AVX512 && t.scalar_type() == at::kFloat && csr::isa() == csr::Isa::avx512;
}

#if SK_HAVE_AVX512
// The next 16 values (fewer at the end of the list), for an expand in a register: the expanding load from memory is
// microcoded on AMD Zen 4 and 5 (3x slower here).
SK_AVX512 SK_INLINE __m512 next16(const float* v, const float* vend) {
  return v + 16 <= vend ? _mm512_loadu_ps(v) : _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (vend - v)) - 1), v);
}

// dst[c] = the row's values in its pattern's columns, 0 elsewhere, for rows r0..r1 (cols columns each).
SK_AVX512 void scatter_rows_f32(float* wp, const float* vp, const RowMasks& rm, const Csr& w, int64_t r0, int64_t r1) {
  const int64_t cols = w.cols, full = cols / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols % 16)) - 1);
  const float* vend = vp + w.nnz;
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* m = rm.m.data() + r * rm.words;
    const float* v = vp + w.row_ptr[r];
    float* dst = wp + r * cols;
    int64_t k = 0;
    for (; k < full; ++k) {
      _mm512_storeu_ps(dst + k * 16, _mm512_maskz_expand_ps(m[k], next16(v, vend)));
      v += __builtin_popcount(m[k]);
    }
    if (tail) _mm512_mask_storeu_ps(dst + k * 16, tail, _mm512_maskz_expand_ps(m[k], next16(v, vend)));
  }
}

// out[p] = g[r, c] for the stored entries of rows r0..r1 (g's rows contiguous, s0 apart).
SK_AVX512 void gather_rows_f32(float* op, const float* gp, int64_t s0, const RowMasks& rm, const Csr& w, int64_t r0,
                               int64_t r1) {
  const int64_t cols = w.cols, full = cols / 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (cols % 16)) - 1);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* m = rm.m.data() + r * rm.words;
    const float* src = gp + r * s0;
    float* o = op + w.row_ptr[r];
    for (int64_t k = 0; k < rm.words; ++k) {  // word `full` (where cols % 16 != 0) holds the last columns
      const __mmask16 mk = m[k];
      const __m512 g = k < full ? _mm512_loadu_ps(src + k * 16) : _mm512_maskz_loadu_ps(tail, src + k * 16);
      // Compressed in a register, then a masked store of the low lanes (a compressing store to memory is
      // microcoded and slow on AMD Zen 4 and 5).
      const int n = __builtin_popcount(mk);
      _mm512_mask_storeu_ps(o, static_cast<__mmask16>((1u << n) - 1), _mm512_maskz_compress_ps(mk, g));
      o += n;
    }
  }
}
#endif

// weight[r, c] = values[p] for every stored entry p = (r, c); the other entries stay as they are (zeros: the caller
// wrote them once), or are written zero (the AVX-512 loops).
void scatter_values(const at::Tensor& weight, const at::Tensor& values, const Csr& w, const char* op) {
  TORCH_CHECK_VALUE(weight.is_contiguous(), op, ": weight must be contiguous");
  TORCH_CHECK_VALUE(values.dim() == 1 && values.numel() == w.nnz, op, ": values must be 1-D with nnz = ", w.nnz,
                    " entries, got shape ", values.sizes());
  TORCH_CHECK_VALUE(values.scalar_type() == weight.scalar_type(), op, ": values (", values.scalar_type(),
                    ") and weight (", weight.scalar_type(), ") must have one dtype");
  check_float_or_bf16(weight, "weight", op);
  const at::Tensor v = values.contiguous();
#if SK_HAVE_AVX512
  if (masked_loops(weight)) {
    const std::shared_ptr<const RowMasks> rm = row_masks(w);
    for_rows(w, [&](int64_t r0, int64_t r1) {
      scatter_rows_f32(weight.data_ptr<float>(), v.data_ptr<float>(), *rm, w, r0, r1);
    });
    return;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, weight.scalar_type(), "dense_kernel scatter", [&] {
    const scalar_t* __restrict vp = v.data_ptr<scalar_t>();
    scalar_t* __restrict wp = weight.data_ptr<scalar_t>();
    const int64_t* rp = w.row_ptr;
    const int32_t* __restrict ci = w.col_idx;
    const int64_t cols = w.cols;
    for_rows(w, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* __restrict dst = wp + r * cols;
        for (int64_t p = rp[r], e = rp[r + 1]; p < e; ++p) dst[ci[p]] = vp[p];
      }
    });
  });
}

bool is_conv(const at::Tensor& weight, at::IntArrayRef stride) { return weight.dim() == 4 && stride.size() == 2; }

using product_choice::alternative_is_faster;
using product_choice::Key;
using product_choice::kTimedForwardBelow;
using Product = product_choice::Product;

// y = x W^T + b for a linear with few outputs, x of any rank (..., in): the narrow linear (its loops or MKL's GEMMs,
// measured) for a head of up to 16 outputs, else MKL's GEMMs either way round.
at::Tensor head_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& b) {
  const int64_t out = weight.size(0), in = weight.size(1);
  const at::Tensor x2 = x.reshape({-1, in});
  at::Tensor y = narrow::takes(x2, weight, b) ? narrow::forward(x2, weight, b)
                                              : product_choice::few_outputs_forward(x2, weight, b);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return y.view(shape);
}

// A 1x1 conv with stride 1 and no padding is a GEMM over the channels: per image W (Cout, Cin) x (Cin, H*W) in NCHW,
// one (N*H*W, Cin) x W^T in channels_last, each a view of the tensors as they lie. oneDNN's convolution and MKL's
// GEMMs win on different shapes, so each product is timed both ways once per shape (alternative_is_faster). Zen 4,
// 2 threads, fwd / input grad / weight grad in ms, oneDNN against the GEMMs: ResNet-50's 64 -> 64 at 16x16, batch 8
// (NCHW) 0.27 / 0.20 / 0.19 against 0.11 / 0.12 / 0.15, 256 -> 64 0.50 / 0.50 / 0.46 against 0.39 / 0.40 / 0.44, but
// 2048 -> 512 at 2x2 0.89 / 0.68 against 5.0 / 13.3 (the batched GEMMs are tiny), and in channels_last
// 1024 -> 256 at 4x4 a weight gradient of 0.93 against 0.40.
enum class Pointwise : int64_t { kNo = 0, kNchw = 1, kNhwc = 2 };

// How a 1x1 conv's products can run as GEMMs on x (and g, where given: its layout must match x's), kNo where they
// cannot (another geometry, dtype or layout: the convolution runs, and raises what is wrong).
Pointwise pointwise(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                    const at::Tensor& g = at::Tensor()) {
  if (!is_conv(weight, stride) || weight.size(2) != 1 || weight.size(3) != 1 || x.dim() != 4 ||
      x.size(1) != weight.size(1) || x.scalar_type() != weight.scalar_type() || x.numel() == 0 || weight.numel() == 0)
    return Pointwise::kNo;
  for (size_t d = 0; d < 2; ++d)
    if (stride[d] != 1 || padding[d] != 0) return Pointwise::kNo;
  if (g.defined() && (g.dim() != 4 || g.scalar_type() != x.scalar_type())) return Pointwise::kNo;
  if (x.is_contiguous() && (!g.defined() || g.is_contiguous())) return Pointwise::kNchw;
  const auto cl = at::MemoryFormat::ChannelsLast;
  if (x.is_contiguous(cl) && (!g.defined() || g.is_contiguous(cl))) return Pointwise::kNhwc;
  return Pointwise::kNo;
}

// A 1x1 conv's product p, shape, dtype, layout and thread count.
Key conv_key(Product p, const at::Tensor& x, const at::Tensor& weight, Pointwise layout) {
  return {p,
          x.size(0),
          x.size(1),
          weight.size(0),
          x.size(2) * x.size(3),
          static_cast<int64_t>(x.scalar_type()),
          static_cast<int64_t>(layout),
          at::get_num_threads()};
}

// x (N, C, H, W) as the GEMMs read it: (N, C, H*W) in NCHW, (N*H*W, C) in channels_last (views).
at::Tensor gemm_view(const at::Tensor& x, Pointwise layout) {
  return layout == Pointwise::kNchw ? x.view({x.size(0), x.size(1), -1})
                                    : x.permute({0, 2, 3, 1}).reshape({-1, x.size(1)});
}

// The (N, C, H, W) tensor (contiguous, or channels_last) of a GEMM's result r in gemm_view's layout.
at::Tensor from_gemm(const at::Tensor& r, Pointwise layout, at::IntArrayRef like, int64_t channels) {
  return layout == Pointwise::kNchw ? r.view({like[0], channels, like[2], like[3]})
                                    : r.view({like[0], like[2], like[3], channels}).permute({0, 3, 1, 2});
}

// y = conv2d(x, weight, b) for a 1x1 conv (layout != kNo), as oneDNN's convolution or as GEMMs.
at::Tensor pointwise_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& b, Pointwise layout) {
  const int64_t out = weight.size(0);
  const at::Tensor w2 = weight.view({out, weight.size(1)});
  auto as_is = [&] { return at::conv2d(x, weight, b.defined() ? std::optional<at::Tensor>(b) : std::nullopt); };
  auto gemm = [&] {
    const at::Tensor xv = gemm_view(x, layout);
    at::Tensor r;
    if (layout == Pointwise::kNchw) {
      r = at::matmul(w2, xv);  // (N, Cout, H*W)
      if (b.defined()) r.add_(b.view({1, out, 1}));
    } else {
      r = b.defined() ? at::addmm(b, xv, w2.t()) : at::mm(xv, w2.t());
    }
    return from_gemm(r, layout, x.sizes(), out);
  };
  return alternative_is_faster(conv_key(Product::kConvForward, x, weight, layout), as_is, gemm) ? gemm() : as_is();
}

// A 1x1 conv's input gradient as a GEMM: W^T g per image (NCHW), g W (channels_last).
at::Tensor pointwise_input_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& weight, Pointwise layout) {
  const at::Tensor w2 = weight.view({weight.size(0), weight.size(1)}), gv = gemm_view(g, layout);
  const at::Tensor r = layout == Pointwise::kNchw ? at::matmul(w2.t(), gv) : at::mm(gv, w2);
  return from_gemm(r, layout, x.sizes(), x.size(1));
}

// A 1x1 conv's weight gradient (Cout, Cin) as GEMMs: a linear's in channels_last; in NCHW the images' g x^T summed
// from H*W = kBatchedFrom on, else one GEMM over g and x made (C, N*H*W) (a copy each, small there): Zen 4, 2
// threads, 2048 -> 512 at 2x2, batch 8, 4.3 ms batched against 0.77 (oneDNN: 2.3), 1024 -> 256 at 4x4 0.65 against
// 0.50; 256 -> 64 at 16x16 0.43 against 0.47, at 28x28 2.8 against 4.3 (batch 16).
constexpr int64_t kBatchedFrom = 64;
at::Tensor pointwise_weight_grad(const at::Tensor& g, const at::Tensor& x, Pointwise layout) {
  if (layout == Pointwise::kNhwc) return product_choice::linear_weight_grad(gemm_view(g, layout), gemm_view(x, layout));
  const int64_t n = x.size(0), hw = x.size(2) * x.size(3);
  if (hw >= kBatchedFrom) {
    // The images' products (Cout, Cin) each, summed: at most as many entries at once as x holds (a chunk of
    // images at a time where Cout > H*W), so that the weight gradient takes no more memory than an activation.
    const at::Tensor gv = gemm_view(g, layout), xt = gemm_view(x, layout).transpose(1, 2);
    const int64_t chunk = std::clamp<int64_t>(n * hw / g.size(1), 1, n);
    at::Tensor sum = at::bmm(gv.narrow(0, 0, chunk), xt.narrow(0, 0, chunk)).sum(0);
    for (int64_t i = chunk; i < n; i += chunk) {
      const int64_t c = std::min(chunk, n - i);
      sum.add_(at::bmm(gv.narrow(0, i, c), xt.narrow(0, i, c)).sum(0));
    }
    return sum;
  }
  return at::mm(g.transpose(0, 1).reshape({g.size(1), -1}), x.transpose(0, 1).reshape({x.size(1), -1}).t());
}

// values[p] = g[r, c] for every stored entry p = (r, c); g (rows, cols), any strides (a linear's weight gradient
// may come transposed, see weight_grad: reading it so here costs less than the copy that would make it (out, in)).
at::Tensor gather_values(const at::Tensor& g, const Csr& w, const char* op) {
  TORCH_CHECK_VALUE(g.dim() == 2 && g.size(0) == w.rows && g.size(1) == w.cols, op, ": the weight gradient is ",
                    g.sizes(), ", not ", w.rows, " x ", w.cols);
  at::Tensor out = at::empty({w.nnz}, g.options());
  const int64_t s0 = g.stride(0), s1 = g.stride(1);
#if SK_HAVE_AVX512
  if (masked_loops(g) && (s1 == 1 || w.cols == 1)) {
    const std::shared_ptr<const RowMasks> rm = row_masks(w);
    for_rows(w, [&](int64_t r0, int64_t r1) {
      gather_rows_f32(out.data_ptr<float>(), g.data_ptr<float>(), s0, *rm, w, r0, r1);
    });
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, g.scalar_type(), "dense_kernel gather", [&] {
    const scalar_t* __restrict gp = g.data_ptr<scalar_t>();
    scalar_t* __restrict op_ = out.data_ptr<scalar_t>();
    const int64_t* rp = w.row_ptr;
    const int32_t* __restrict ci = w.col_idx;
    for_rows(w, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* __restrict src = gp + r * s0;
        if (s1 == 1) {
          for (int64_t p = rp[r], e = rp[r + 1]; p < e; ++p) op_[p] = src[ci[p]];
        } else {
          for (int64_t p = rp[r], e = rp[r + 1]; p < e; ++p) op_[p] = src[ci[p] * s1];
        }
      }
    });
  });
  return out;
}

constexpr int64_t kAhead = 16;  // rows prefetched ahead in the check: a linear's feature is a strided column

// Whether p[0..n) holds no NaN or Inf: float32 by its exponent bits (integer operations the compiler vectorizes: an
// element-wise std::isfinite loop ran 0.17 ms over the 50K entries of a ResNet stem's channel, 5 % of its forward);
// the other types through std::isfinite.
template <typename T>
bool run_finite(const T* p, int64_t n) {
  if constexpr (std::is_same<T, float>::value) {
    typedef uint32_t bits_t __attribute__((__may_alias__));
    const bits_t* u = reinterpret_cast<const bits_t*>(p);
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad |= uint32_t((u[i] & 0x7f800000u) == 0x7f800000u);
    return bad == 0;
  } else {
    bool ok = true;
    for (int64_t i = 0; i < n; ++i) ok &= std::isfinite(static_cast<float>(p[i]));
    return ok;
  }
}

// Whether p[0], p[st], ..., p[(n - 1) st] hold no NaN or Inf: a channel of a channels_last tensor, one entry per cache
// line, read with prefetches far enough ahead to keep several lines in flight (the element-by-element odometer below
// took them one miss at a time). With the weight-gradient proof of dense_backward, a channels_last 64 -> 256 1x1 conv
// at 56x56, batch 8, density 0.96, on its dense kernel: 0.93-0.95x its twin -> 0.94-0.98x (Zen 5, 2 threads).
constexpr int64_t kStridedAhead = 32;
template <typename T>
bool strided_finite(const T* p, int64_t n, int64_t st) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    if (i + kStridedAhead < n) __builtin_prefetch(p + (i + kStridedAhead) * st);
    if constexpr (std::is_same<T, float>::value) {
      uint32_t u;
      std::memcpy(&u, p + i * st, sizeof(u));
      ok &= (u & 0x7f800000u) != 0x7f800000u;
    } else {
      ok &= std::isfinite(static_cast<float>(p[i * st]));
    }
  }
  return ok;
}

// No NaN or Inf in feature 0 of t along dim (the channel of a conv's (N, C, H, W), the last dim of a linear's
// output): every entry of the view, any strides, one thread (a feature is a few thousand entries).
bool feature_finite(const at::Tensor& t, int64_t dim) {
  if (t.numel() == 0) return true;
  const at::Tensor v = t.narrow(dim, 0, 1);
  const int64_t nd = v.dim();
  const auto sizes = v.sizes();
  const auto strides = v.strides();
  // Dims 1.. of the view one run of a single stride (a conv's channel within an image: contiguous in NCHW, every
  // C-th entry in channels_last; a linear's single feature)?
  int64_t step = 0;  // the run's stride (0: no dim larger than 1 yet)
  bool one_run = true;
  for (int64_t d = nd - 1, run = 1; d >= 1; --d) {
    if (sizes[d] == 1) continue;
    if (step == 0) step = strides[d];
    if (strides[d] != step * run) one_run = false;
    run *= sizes[d];
  }
  if (step == 0) step = 1;
  bool ok = true;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "dense_kernel check", [&] {
    const scalar_t* base = v.data_ptr<scalar_t>();
    const int64_t inner = v.numel() / sizes[0];
    std::vector<int64_t> idx(nd, 0);
    for (int64_t o = 0; o < sizes[0] && ok; ++o) {
      const scalar_t* row = base + o * strides[0];
      if (o + kAhead < sizes[0]) __builtin_prefetch(row + kAhead * strides[0]);
      if (one_run) {
        ok &= step == 1 ? run_finite(row, inner) : strided_finite(row, inner, step);
        continue;
      }
      std::fill(idx.begin(), idx.end(), 0);
      int64_t off = 0;
      for (int64_t e = 0; e < inner; ++e) {  // an odometer over dims 1.. of the view
        ok &= std::isfinite(static_cast<float>(row[off]));
        for (int64_t d = nd - 1; d >= 1; --d) {
          if (++idx[d] < sizes[d]) {
            off += strides[d];
            break;
          }
          off -= (sizes[d] - 1) * strides[d];
          idx[d] = 0;
        }
      }
    }
  });
  return ok;
}

// No NaN or Inf in columns [0, k) of g (rows, cols), any strides: a weight gradient's entries for input feature 0
// (k = the kernel's taps).
bool leading_columns_finite(const at::Tensor& g, int64_t k) {
  if (g.numel() == 0) return true;
  bool ok = true;
  const int64_t s0 = g.stride(0), s1 = g.stride(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "dense_kernel check", [&] {
    const scalar_t* base = g.data_ptr<scalar_t>();
    for (int64_t c = 0; c < std::min(k, g.size(1)) && ok; ++c) ok &= strided_finite(base + c * s1, g.size(0), s0);
  });
  return ok;
}

void check_geometry(const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                    const char* op) {
  TORCH_CHECK_VALUE(weight.dim() == 2 || weight.dim() == 4, op, ": weight must be 2-D (linear) or 4-D (conv2d), got ",
                    weight.dim(), "-D");
  const size_t n = weight.dim() == 4 ? 2 : 0;
  TORCH_CHECK_VALUE(stride.size() == n && padding.size() == n && dilation.size() == n, op, ": a ", weight.dim(),
                    "-D weight takes ", n, " stride, padding and dilation entries");
}

bool all_finite(const at::Tensor& t) {
  bool ok = true;
  const at::Tensor c = t.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "dense_kernel check",
                                  [&] { ok = run_finite(c.data_ptr<scalar_t>(), c.numel()); });
  return ok;
}

// The weight (out, ...) as the CSR's (rows, cols) matrix.
Csr weight_csr(const at::Tensor& weight, const at::Tensor& row_ptr, const at::Tensor& col_idx, const char* op) {
  const int64_t rows = weight.size(0);
  return checked_csr(row_ptr, col_idx, rows, rows ? weight.numel() / rows : 0, op);
}

// y = op(x, weight, bias) with the stored entries of weight set from values first (the others stay as they are:
// zeros the caller wrote once); ok = false when `check` and feature 0 of y holds a NaN or Inf.
std::tuple<at::Tensor, bool> dense_forward(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bias,
                                           const Csr& w, const at::Tensor& weight, at::IntArrayRef stride,
                                           at::IntArrayRef padding, at::IntArrayRef dilation, bool check,
                                           const char* op) {
  scatter_values(weight, values, w, op);
  const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  const Pointwise layout = pointwise(x, weight, stride, padding);
  at::Tensor y = layout != Pointwise::kNo  ? pointwise_forward(x, weight, bias, layout)
                 : is_conv(weight, stride) ? at::conv2d(x, weight, b, stride, padding, dilation)
                 : weight.size(0) < kTimedForwardBelow && weight.size(1) > 0 ? head_linear(x, weight, bias)
                                                                             : at::linear(x, weight, b);
  const bool ok = !check || feature_finite(y, weight.dim() == 4 ? -3 : -1);
  return {y, ok};
}

// The gradients of dense_forward in x, values and bias, those `needs` asks for (undefined otherwise); ok = false
// when `check` and the output's gradient holds a NaN or Inf that the dense op would spread (through weights the
// layer does not store) into the input gradient. What proves grad finite where that matters, cheapest first:
// - a finite bias gradient: it sums every entry of grad, and a NaN or Inf there makes the sum non-finite (a finite
//   sum that overflows only costs a sparse call);
// - a finite weight gradient for input feature 0 (its rows' first taps: Cout x kh x kw entries): a NaN or Inf of
//   grad at output o and position p meets, in gW[o, 0, tap], x at every tap of p that reads the input (0 * Inf is
//   NaN too), so gW[o, 0, :] is non-finite; a p whose taps all read padding reaches no input gradient either;
// - else the input gradient's feature 0 (every position of it: in channels_last one cache line each).
// (A NaN or Inf in x only makes the weight gradient non-finite where the forward's check let it through: a position
// no output reads; such a call, and an overflow, only cost a sparse call.)
std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> dense_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                    const at::Tensor& weight, const Csr& w,
                                                                    std::array<bool, 3> needs, at::IntArrayRef stride,
                                                                    at::IntArrayRef padding, at::IntArrayRef dilation,
                                                                    bool check, const char* op) {
  const bool conv = is_conv(weight, stride);
  at::Tensor grad_x, grad_weight, grad_bias;
  if (conv) {
    const std::vector<int64_t> bias_sizes{weight.size(0)};
    auto convolution_backward = [&](std::array<bool, 3> mask) {
      return at::convolution_backward(grad, x, weight, mask[2] ? at::OptionalIntArrayRef(bias_sizes) : std::nullopt,
                                      stride, padding, dilation, false, {0, 0}, 1, mask);
    };
    // A 1x1 conv's input and weight gradients each as oneDNN's or as GEMMs, whichever measured faster; those left
    // to oneDNN (and the bias's) in one call.
    const Pointwise layout = pointwise(x, weight, stride, padding, grad);
    const bool gemm_x = needs[0] && layout != Pointwise::kNo &&
                        alternative_is_faster(
                            conv_key(Product::kConvInputGrad, x, weight, layout),
                            [&] { return std::get<0>(convolution_backward({true, false, false})); },
                            [&] { return pointwise_input_grad(grad, x, weight, layout); });
    const bool gemm_w = needs[1] && layout != Pointwise::kNo &&
                        alternative_is_faster(
                            conv_key(Product::kConvWeightGrad, x, weight, layout),
                            [&] { return std::get<1>(convolution_backward({false, true, false})); },
                            [&] { return pointwise_weight_grad(grad, x, layout); });
    const std::array<bool, 3> rest{needs[0] && !gemm_x, needs[1] && !gemm_w, needs[2]};
    if (rest[0] || rest[1]) {
      std::tie(grad_x, grad_weight, grad_bias) = convolution_backward(rest);
    } else if (needs[2]) {  // (convolution_backward for the bias alone runs ATen's slow reference convolution)
      grad_bias = grad.sum({0, 2, 3});
    }
    if (gemm_x) grad_x = pointwise_input_grad(grad, x, weight, layout);
    if (gemm_w) grad_weight = pointwise_weight_grad(grad, x, layout);
    if (grad_weight.defined()) grad_weight = grad_weight.reshape({w.rows, w.cols});
  } else {
    const int64_t out = weight.size(0), in = weight.size(1);
    const at::Tensor g2 = grad.reshape({-1, out});
    const at::Tensor x2 = x.reshape({-1, in});
    if ((needs[0] || needs[1]) && narrow::takes(x2, weight, at::Tensor()) && g2.scalar_type() == x2.scalar_type()) {
      std::tie(grad_x, grad_weight, std::ignore) = narrow::backward(g2, x2, weight, {needs[0], needs[1], false});
      if (grad_x.defined()) grad_x = grad_x.view(x.sizes());
    } else {
      if (needs[0]) grad_x = at::matmul(grad, weight);
      if (needs[1]) grad_weight = product_choice::linear_weight_grad(g2, x2);
    }
    if (needs[2]) grad_bias = g2.sum(0);
  }
  const at::Tensor grad_values = grad_weight.defined() ? gather_values(grad_weight, w, op) : at::Tensor();
  const int64_t taps = conv ? weight.size(2) * weight.size(3) : 1;
  const bool ok = !check || !grad_x.defined() ||
                  (grad_bias.defined()     ? all_finite(grad_bias)
                   : grad_weight.defined() ? leading_columns_finite(grad_weight, taps)
                                           : feature_finite(grad_x, conv ? -3 : -1));
  return {grad_x, grad_values, grad_bias, ok};
}

// The layer's sparse op (the `csr` kernel) on x, through the dispatcher and so through its autograd formula: how a
// NaN/Inf in the output's gradient is kept from spreading over the entries the weight does not store.
at::Tensor sparse_op(const at::Tensor& x, const at::Tensor& values, const at::Tensor& bias, const at::Tensor& row_ptr,
                     const at::Tensor& col_idx, const std::optional<at::Tensor>& t_row_ptr,
                     const std::optional<at::Tensor>& t_col_idx, const std::optional<at::Tensor>& t_perm,
                     const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                     at::IntArrayRef dilation) {
  const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  if (is_conv(weight, stride)) {
    static const auto conv = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("sparsekern::sparse_conv2d", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, at::IntArrayRef, const std::optional<at::Tensor>&,
                                                   at::IntArrayRef, at::IntArrayRef, at::IntArrayRef)>();
    return conv.call(x, values, row_ptr, col_idx, weight.sizes().slice(2), b, stride, padding, dilation);
  }
  static const auto linear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("sparsekern::sparse_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  // The op takes (rows, in_features): x of other ranks (a linear layer's (..., in_features)) goes as a view.
  if (x.dim() == 2) return linear.call(x, values, row_ptr, col_idx, b, t_row_ptr, t_col_idx, t_perm);
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  const at::Tensor y = linear.call(x.reshape({c10::multiply_integers(lead), x.size(-1)}), values, row_ptr, col_idx, b,
                                   t_row_ptr, t_col_idx, t_perm);
  lead.push_back(y.size(1));
  return y.view(lead);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// y as a tensor of its own: the dense op's result can be a view of a buffer the op made (a linear over 3-D x, a 1x1
// conv's GEMM result in NCHW or channels_last), and autograd forbids in-place ops on a custom node's output that is
// a view (wav2vec2 writes its masked frames into its feature projection's output). The buffer has no other owner.
at::Tensor own(const at::Tensor& y) {
  if (!y.is_view()) return y;
  return at::empty({0}, y.options()).set_(y.storage(), y.storage_offset(), y.sizes(), y.strides());
}

std::vector<int64_t> ints(const at::IValue& v) { return v.toIntVector(); }

// One autograd node in C++: a Python torch.autograd.Function here cost 0.1-0.25 ms per fwd+bwd in a training
// step (its Python code runs with cold caches between layers), 10-25 % of a 1-2 ms ResNet-50 or ConvNeXt layer.
struct DenseKernel : public torch::autograd::Function<DenseKernel> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& values,
                            const std::optional<at::Tensor>& bias_opt, const at::Tensor& row_ptr,
                            const at::Tensor& col_idx, const std::optional<at::Tensor>& t_row_ptr,
                            const std::optional<at::Tensor>& t_col_idx, const std::optional<at::Tensor>& t_perm,
                            const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, bool check, bool* ok) {
    const char* op = "_dense_kernel";
    const at::Tensor bias = bias_opt.value_or(at::Tensor());
    at::Tensor y;
    std::tie(y, *ok) = dense_forward(x, values, bias, weight_csr(weight, row_ptr, col_idx, op), weight, stride, padding,
                                     dilation, check, op);
    y = own(y);
    ctx->save_for_backward({x, values, bias});
    // The buffer, not a saved variable: the next forward rewrites it in place (the values' own version check
    // guards a graph that outlives an optimizer step).
    ctx->saved_data["weight"] = weight;
    ctx->saved_data["row_ptr"] = row_ptr;
    ctx->saved_data["col_idx"] = col_idx;
    ctx->saved_data["t_row_ptr"] = t_row_ptr;
    ctx->saved_data["t_col_idx"] = t_col_idx;
    ctx->saved_data["t_perm"] = t_perm;
    ctx->saved_data["stride"] = stride.vec();
    ctx->saved_data["padding"] = padding.vec();
    ctx->saved_data["dilation"] = dilation.vec();
    ctx->saved_data["check"] = check;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const char* op = "_dense_kernel";
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &values = saved[1], &bias = saved[2], &grad = grads[0];
    const at::Tensor weight = ctx->saved_data["weight"].toTensor();
    const at::Tensor row_ptr = ctx->saved_data["row_ptr"].toTensor(), col_idx = ctx->saved_data["col_idx"].toTensor();
    const auto stride = ints(ctx->saved_data["stride"]), padding = ints(ctx->saved_data["padding"]),
               dilation = ints(ctx->saved_data["dilation"]);
    // needs_input_grad counts the tensor arguments given: bias, when there is one, is the third.
    const std::array<bool, 3> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                    bias.defined() && ctx->needs_input_grad(2)};
    const bool check = ctx->saved_data["check"].toBool() && needs[0];
    const Csr w = weight_csr(weight, row_ptr, col_idx, op);
    variable_list out(14);  // one per forward argument but `ok`
    if (!grad.defined()) return out;
    const bool create = at::GradMode::is_enabled();
    bool ok = true;
    if (create) {  // create_graph: the composite (scatter, dense op) through autograd, differentiable again
      const at::Tensor rows = at::repeat_interleave(at::arange(w.rows, row_ptr.options()), row_ptr.diff());
      const at::Tensor positions = rows.mul(w.cols).add(col_idx.to(at::kLong));
      const at::Tensor dense =
          at::zeros({weight.numel()}, values.options()).index_put({positions}, values).view(weight.sizes());
      const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
      const at::Tensor y =
          is_conv(weight, stride) ? at::conv2d(x, dense, b, stride, padding, dilation) : at::linear(x, dense, b);
      variable_list wanted;
      const at::Tensor* inputs[3] = {&x, &values, &bias};
      for (int i = 0; i < 3; ++i)
        if (needs[i]) wanted.push_back(*inputs[i]);
      const variable_list got = torch::autograd::grad({y}, wanted, {grad}, true, true);
      for (int i = 0, k = 0; i < 3; ++i)
        if (needs[i]) out[i] = got[k++];
      ok = !check || feature_finite(out[0], weight.dim() == 4 ? -3 : -1);
    } else {
      std::tie(out[0], out[1], out[2], ok) =
          dense_backward(grad, x, weight, w, needs, stride, padding, dilation, check, op);
    }
    if (!ok) {
      at::AutoGradMode grad_mode(true);
      const at::Tensor xs = create ? x : x.detach().requires_grad_(true);
      const at::Tensor ys =
          sparse_op(xs, create ? values : values.detach(), create || !bias.defined() ? bias : bias.detach(), row_ptr,
                    col_idx, ctx->saved_data["t_row_ptr"].toOptional<at::Tensor>(),
                    ctx->saved_data["t_col_idx"].toOptional<at::Tensor>(),
                    ctx->saved_data["t_perm"].toOptional<at::Tensor>(), weight, stride, padding, dilation);
      out[0] = torch::autograd::grad({ys}, {xs}, {grad}, create, create)[0];
    }
    return out;
  }
};

// The CPU kernel: the forward alone (no autograd: inference mode, or below the autograd kernel).
std::tuple<at::Tensor, bool> dense_kernel_cpu(const at::Tensor& x, const at::Tensor& values,
                                              const std::optional<at::Tensor>& bias, const at::Tensor& row_ptr,
                                              const at::Tensor& col_idx, const std::optional<at::Tensor>& t_row_ptr,
                                              const std::optional<at::Tensor>& t_col_idx,
                                              const std::optional<at::Tensor>& t_perm, const at::Tensor& weight,
                                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                              bool check) {
  const char* op = "_dense_kernel";
  check_geometry(weight, stride, padding, dilation, op);
  return dense_forward(x, values, bias.value_or(at::Tensor()), weight_csr(weight, row_ptr, col_idx, op), weight, stride,
                       padding, dilation, check, op);
}

std::tuple<at::Tensor, bool> dense_kernel_autograd(
    const at::Tensor& x, const at::Tensor& values, const std::optional<at::Tensor>& bias, const at::Tensor& row_ptr,
    const at::Tensor& col_idx, const std::optional<at::Tensor>& t_row_ptr, const std::optional<at::Tensor>& t_col_idx,
    const std::optional<at::Tensor>& t_perm, const at::Tensor& weight, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool check) {
  check_geometry(weight, stride, padding, dilation, "_dense_kernel");
  bool ok = true;
  at::Tensor y = DenseKernel::apply(x, values, bias, row_ptr, col_idx, t_row_ptr, t_col_idx, t_perm, weight, stride,
                                    padding, dilation, check, &ok);
  return {y, ok};
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  // Private (sparsekern/nn/kernel_choice.py): a sparse layer's dense kernel, the dense op on `weight` (a buffer of
  // the weight's dense shape, zeros outside the pattern) with the CSR's stored entries set from values; the bool
  // is false when `check` and feature 0 of the output holds a NaN or Inf (the layer then runs its sparse op).
  m.def("_dense_kernel(Tensor x, Tensor values, Tensor? bias, Tensor row_ptr, Tensor col_idx, Tensor? t_row_ptr, "
        "Tensor? t_col_idx, Tensor? t_perm, Tensor(a!) weight, int[] stride, int[] padding, int[] dilation, "
        "bool check) -> (Tensor, bool)");
  // Private (tests): how the dense kernel runs its timed products (a linear's narrow forward and weight gradient, a
  // 1x1 conv's three): 0 as measured, 1 as nn.Linear and nn.Conv2d run them (x W^T, g^T x; oneDNN's convolution),
  // 2 the alternative ((W x^T)^T, (x^T g)^T; GEMMs), 3 as 1 but a linear of at most 16 outputs on the narrow
  // kernels (all three products); returns the previous setting.
  m.def("_set_dense_products(int mode) -> int", [](int64_t mode) {
    TORCH_CHECK_VALUE(mode >= 0 && mode <= 3, "_set_dense_products: mode must be 0, 1, 2 or 3, got ", mode);
    return sparsekern::product_choice::mode().exchange(mode);
  });
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("_dense_kernel", &sparsekern::dense_kernel_cpu); }
TORCH_LIBRARY_IMPL(sparsekern, Autograd, m) { m.impl("_dense_kernel", &sparsekern::dense_kernel_autograd); }
