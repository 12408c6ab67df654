// Max pooling 3x3, stride 2, padding 1 (a ResNet's stem) on the CPU (sparsekern.nn.FastMaxPool2d): the values and
// the flat indices (ih * W + iw within the plane) that aten::max_pool2d_with_indices returns, the same element chosen
// (its rule, in the window's row-major order: a larger value or a NaN takes the place; ties keep the first), on
// vectors of output columns: each of a window's input rows is first copied out as three rows of its columns 2ow - 1,
// 2ow and 2ow + 1, so that the window's nine candidates for a vector of outputs are nine contiguous vector loads.
// ATen's CPU kernel takes one output at a time: 9.5 ms for 16x64x56x56 against a 0.33 ms copy of it, this one 1.4 ms
// (AMD Zen 5, 2 threads; BENCHMARKS.md). The backward is ATen's, on the indices.
#pragma GCC optimize("fp-contract=fast")

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/max_pool2d_with_indices_backward.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/common.h"
#include "cpu/simd.h"

namespace sparsekern {
namespace {

// Output size of one dimension: floor((n + 2 - 3) / 2) + 1.
int64_t pooled(int64_t n) { return (n - 1) / 2 + 1; }

// Planes [p0, p1) of x (H x W each) into y and idx (OH x OW each), on W-byte vectors of T.
template <class T, int W>
SK_INLINE void planes(const T* x, T* y, int64_t* idx, int64_t H, int64_t Wd, int64_t p0, int64_t p1) {
  using V = typename simd::Vec<T, W>::v;
  using VI = typename simd::Vec<T, W>::vi;  // lanes of T's width: compare masks and indices
  using IE = typename simd::IntOf<sizeof(T)>::type;
  constexpr int64_t L = simd::Vec<T, W>::L;
  const int64_t OH = pooled(H), OW = pooled(Wd);
  const int64_t OWp = (OW + L - 1) / L * L;  // whole vectors; lanes past OW are computed and not stored
  const T ninf = -std::numeric_limits<T>::infinity();
  VI lanes;
  for (int64_t l = 0; l < L; ++l) lanes[l] = IE(l);
  // Per input row of the window: the columns 2ow - 1, 2ow and 2ow + 1 of every output column ow (-inf where the
  // column is padding), and the same for the window's three rows.
  std::vector<T, Aligned64<T>> cols(3 * 3 * OWp);
  T* left = cols.data();
  for (int64_t p = p0; p < p1; ++p) {
    const T* xp = x + p * H * Wd;
    T* yp = y + p * OH * OW;
    int64_t* ip = idx + p * OH * OW;
    for (int64_t oh = 0; oh < OH; ++oh) {
      const int64_t ih0 = 2 * oh - 1;
      for (int r = 0; r < 3; ++r) {
        T* c = left + r * 3 * OWp;
        const int64_t ih = ih0 + r;
        if (ih < 0 || ih >= H) {
          std::fill(c, c + 3 * OWp, ninf);
          continue;
        }
        const T* row = xp + ih * Wd;
        for (int64_t ow = 0; ow < OWp; ++ow) {
          const int64_t iw = 2 * ow;
          c[ow] = ow < OW && iw >= 1 ? row[iw - 1] : ninf;
          c[OWp + ow] = ow < OW && iw < Wd ? row[iw] : ninf;
          c[2 * OWp + ow] = ow < OW && iw + 1 < Wd ? row[iw + 1] : ninf;
        }
      }
      const int64_t first_row = std::max<int64_t>(ih0, 0);
      for (int64_t o = 0; o < OWp; o += L) {
        const VI col = lanes * 2 + IE(2 * o - 1);  // the window's first column, per lane
        V m = simd::vsplat<W>(ninf);
        // The flat index of the window's first element in the plane: ATen's index where nothing beats -inf.
        VI best = (col & ~(col < 0)) + IE(first_row * Wd);
        for (int r = 0; r < 3; ++r) {
          const int64_t ih = ih0 + r;
          for (int j = 0; j < 3; ++j) {
            const V v = simd::vload<W>(left + (r * 3 + j) * OWp + o);
            const VI take = (v > m) | (v != v);  // larger, or NaN: ATen's rule
            m = (V)(((VI)v & take) | ((VI)m & ~take));
            best = ((col + IE(ih * Wd + j)) & take) | (best & ~take);
          }
        }
        alignas(64) T mv[L];
        alignas(64) IE bv[L];
        simd::vstore<W>(mv, m);
        std::memcpy(bv, &best, sizeof(bv));
        const int64_t n = std::min<int64_t>(L, OW - o);
        for (int64_t l = 0; l < n; ++l) {
          yp[oh * OW + o + l] = mv[l];
          ip[oh * OW + o + l] = int64_t(bv[l]);
        }
      }
    }
  }
}

// 32-byte vectors on every host: GCC's 64-byte instance of these loops took lanes apart one by one (12x slower).
SK_CLONED(void, planes_f32, (const float* x, float* y, int64_t* idx, int64_t H, int64_t W, int64_t p0, int64_t p1),
          { planes<float, 32>(x, y, idx, H, W, p0, p1); })
SK_CLONED(void, planes_f64, (const double* x, double* y, int64_t* idx, int64_t H, int64_t W, int64_t p0, int64_t p1),
          { planes<double, 32>(x, y, idx, H, W, p0, p1); })
SK_CLONE_DISPATCH(planes_f32)
SK_CLONE_DISPATCH(planes_f64)
// The CPU kernel: (y, indices), no autograd.
std::tuple<at::Tensor, at::Tensor> max_pool_cpu(const at::Tensor& x) {
  const char* op = "_max_pool2d_3x3s2";
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x must be contiguous (NCHW)");
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                    ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.size(2) > 0 && x.size(3) > 0, op, ": x must have planes of at least 1x1, got ", x.sizes());
  TORCH_CHECK_VALUE(x.size(2) * x.size(3) < (int64_t(1) << 31), op, ": planes of 2^31 elements or more");
  const int64_t H = x.size(2), W = x.size(3), OH = pooled(H), OW = pooled(W), P = x.size(0) * x.size(1);
  at::Tensor y = at::empty({x.size(0), x.size(1), OH, OW}, x.options());
  at::Tensor idx = at::empty({x.size(0), x.size(1), OH, OW}, x.options().dtype(at::kLong));
  if (P == 0) return {y, idx};
  const int64_t grain = std::max<int64_t>(1, 16384 / (H * W));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    int64_t* ip = idx.data_ptr<int64_t>();
    if (x.scalar_type() == at::kDouble) return planes_f64(x.data_ptr<double>(), y.data_ptr<double>(), ip, H, W, p0, p1);
    planes_f32(x.data_ptr<float>(), y.data_ptr<float>(), ip, H, W, p0, p1);
  });
  return {y, idx};
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct MaxPool : public torch::autograd::Function<MaxPool> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, idx] = max_pool_cpu(x);
    ctx->save_for_backward({x, idx});
    ctx->mark_non_differentiable({idx});
    return {y, idx};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    if (!grads[0].defined()) return {at::Tensor()};
    return {at::max_pool2d_with_indices_backward(grads[0], saved[0], {3, 3}, {2, 2}, {1, 1}, {1, 1}, false, saved[1])};
  }
};

std::tuple<at::Tensor, at::Tensor> max_pool_autograd(const at::Tensor& x) {
  const variable_list r = MaxPool::apply(x);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace sparsekern

TORCH_LIBRARY_FRAGMENT(sparsekern, m) {
  // Private (sparsekern/nn/fast_modules.py): max pooling 3x3, stride 2, padding 1 over an NCHW-contiguous
  // float32/float64 x, (values, indices) as aten::max_pool2d_with_indices returns them.
  m.def("_max_pool2d_3x3s2(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("_max_pool2d_3x3s2", &sparsekern::max_pool_cpu); }
TORCH_LIBRARY_IMPL(sparsekern, Autograd, m) { m.impl("_max_pool2d_3x3s2", &sparsekern::max_pool_autograd); }
