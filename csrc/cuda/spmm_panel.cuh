// The panel SpMM kernel, included by spmm.cu (dense B modes) and sparse_conv2d.cu (conv modes):
// each instantiates launch_panel_modes for its own modes only, so neither file compiles the other's
// staging code and the two compile in parallel.
//
// A block of 8 warps owns rows [i0, i0 + R) and columns [c0, c0 + 128) of out (tiling.h has the
// constants). Each warp owns R / 8 rows (4 columns per lane: 64 fp32 accumulators for 16 rows). B is
// staged in chunks of 32 of its rows through shared memory, double-buffered through registers: the
// global loads of chunk c+1 are issued before the compute of chunk c and stored after it, so one
// barrier per chunk separates the two buffers. A nonzero of the chunk costs its warp one uniform
// 8-byte load of (col, val), two integer ops, one conflict-free 16-byte shared read of the staged B
// row (lane l: columns 4l..4l+3) and 4 FMAs; the nonzeros of a row that fall in the chunk are found
// by a binary search (columns are sorted) done by one lane per row. The rows of the panel are
// ranked by length and dealt to the warps in snake order (load balance), and the output goes
// through a shared-memory tile so that it is stored coalesced in either orientation.
#pragma once
#include "cuda/spmm_engine.cuh"

namespace sparsekern {
namespace cuda {

enum PanelModes : int { kPanelDense = 0, kPanelConv = 1 };

constexpr int kPanelThreads = kPanelWarps * kWarp;              // 256
constexpr int kPanelChunkElems = kPanelChunk * kPanelCols;      // 4096 staged elements per chunk
constexpr int kStageElems = kPanelChunkElems / kPanelThreads;   // 16 per thread
constexpr int kConvRowStep = kPanelThreads / kPanelCols;        // conv modes: a thread stages every 2nd row

// Elements per vector access of a dense B: 16 bytes (4 fp32, 2 fp64, 8 fp16/bf16).
template <class S>
SK_HOST_DEVICE constexpr int vec_elems() {
  return (int)(16 / sizeof(S));
}
// The panel kernel is compiled once per accumulation type A (float for fp32/fp16/bf16, double):
// B is converted to A when staged and out from A when stored, so the hot loop does not depend on
// the storage type, which is a runtime argument of the (short) load and store code.
// Rows per warp: 16 (64 fp32 accumulators per lane); 8 for fp64 (the same register bytes).
// The conv modes' staging holds more live state (index maps), and their row counts (channels) are
// smaller: half as many rows per warp.
template <int MODES, class A>
SK_HOST_DEVICE constexpr int panel_rows_per_warp() {
  return (sizeof(A) == 8 ? kPanelRowsPerWarp / 2 : kPanelRowsPerWarp) / (MODES == kPanelConv ? 2 : 1);
}
template <int MODES, class A>
SK_HOST_DEVICE constexpr int panel_rows() {
  return kPanelWarps * panel_rows_per_warp<MODES, A>();
}
template <class A>
SK_HOST_DEVICE constexpr int panel_colx_shift() {  // log2 of a staged row's bytes (128 elements)
  return sizeof(A) == 8 ? 10 : 9;
}
template <int MODES, class A>
inline size_t panel_smem_bytes() {  // staging (2 chunks), then the output tile [T][R + 1]
  const size_t stage = 2 * (size_t)kPanelChunkElems * sizeof(A);
  const size_t tile = (size_t)kPanelCols * (panel_rows<MODES, A>() + 1) * sizeof(A);
  return tile > stage ? tile : stage;
}

// ---- B staging -------------------------------------------------------------------------------
// The staged chunk is B[k0 : k0+KC, c0 : c0+T] in A, row kk at kk*T, columns permuted by
// panel_swizzle; fetch loads this thread's 16 elements (0 outside B) into registers, store writes
// them.
struct PanelCol {
  int64_t base;
  int a, b;
  bool ok;
};

SK_DEVICE PanelCol panel_col(const PanelB& B, int64_t c, int64_t n) {
  PanelCol pc{0, 0, 0, c < n};
  if (pc.ok && B.mode == kBIm2col) {
    const Im2colCol x = im2col_col(B.g, c);
    pc.base = x.base;
    pc.a = x.ih0;
    pc.b = x.iw0;
  } else if (pc.ok && B.mode == kBCol2im) {
    const Col2imCol x = col2im_col(B.g, c);
    pc.base = x.base;
    pc.a = x.th0;
    pc.b = x.tw0;
  }
  return pc;
}

// Dense modes: lanes along B's contiguous dimension, one 16-byte vector per q when allowed.
template <class S, class A>
SK_DEVICE void fetch_dense(const PanelB& B, A (&r)[kStageElems], int64_t k0, int64_t c0, int64_t k, int64_t n,
                           Cvt<S> cvt) {
  constexpr int V = vec_elems<S>(), T = kPanelCols, KC = kPanelChunk;
  const S* src = static_cast<const S*>(B.data);
  const int tid = threadIdx.x;
  if (B.mode == kBRowMajor) {
#pragma unroll
    for (int q = 0; q < kStageElems / V; ++q) {
      const int idx = tid + kPanelThreads * q;
      const int64_t j = k0 + idx / (T / V), c = c0 + (idx % (T / V)) * V;
      const S* p = src + j * B.s0 + c;
      if (j < k && c + V <= n && B.vec) {
        const Pack<S, V> v = load_pack<S, V>(p);
#pragma unroll
        for (int e = 0; e < V; ++e) r[q * V + e] = cvt(v.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) r[q * V + e] = (j < k && c + e < n) ? cvt(p[e]) : A(0);
      }
    }
  } else if (B.mode == kBColMajor) {
#pragma unroll
    for (int q = 0; q < kStageElems / V; ++q) {
      const int idx = tid + kPanelThreads * q;
      const int64_t j = k0 + (idx % (KC / V)) * V, c = c0 + idx / (KC / V);
      const S* p = src + c * B.s1 + j;
      if (c < n && j + V <= k && B.vec) {
        const Pack<S, V> v = load_pack<S, V>(p);
#pragma unroll
        for (int e = 0; e < V; ++e) r[q * V + e] = cvt(v.v[e]);
      } else {
#pragma unroll
        for (int e = 0; e < V; ++e) r[q * V + e] = (c < n && j + e < k) ? cvt(p[e]) : A(0);
      }
    }
  }
}

// Conv modes: the thread's column (tid % T) is fixed and decoded once per column tile (PanelCol);
// its rows, every 2nd of the chunk, take their part of the index map from the precomputed table.
template <class S, class A>
SK_DEVICE void fetch_conv(const PanelB& B, const PanelCol& pc, A (&r)[kStageElems], int64_t k0, int64_t k, Cvt<S> cvt) {
  constexpr int T = kPanelCols;
  const S* src = static_cast<const S*>(B.data);
  const int tid = threadIdx.x;
  if (B.mode == kBIm2col) {
    const ConvGeom& g = B.g;
    const int64_t j0 = k0 + tid / T;
    const int H = (int)g.H, W = (int)g.W;
#pragma unroll
    for (int e = 0; e < kStageElems; ++e) {
      const int64_t j = j0 + kConvRowStep * e;
      A v = A(0);
      if (pc.ok && j < k) {
        const Im2colRow rw = B.rowtab[j];  // a broadcast: 2 distinct rows per warp
        const int ih = pc.a + rw.dh, iw = pc.b + rw.dw;
        if ((unsigned)ih < (unsigned)H && (unsigned)iw < (unsigned)W)
          v = cvt(src[pc.base + rw.off + (int64_t)ih * W + iw]);
      }
      r[e] = v;
    }
  } else {  // kBCol2im
    const ConvGeom& g = B.g;
    const int64_t j0 = k0 + tid / T;
    const int sh = (int)g.SH, sw = (int)g.SW, OH = (int)g.OH, OW = (int)g.OW;
#pragma unroll
    for (int e = 0; e < kStageElems; ++e) {
      const int64_t j = j0 + kConvRowStep * e;
      A v = A(0);
      if (pc.ok && j < k) {
        const Im2colRow rw = B.rowtab[j];
        const int th = pc.a - rw.dh, tw = pc.b - rw.dw;
        if (th >= 0 && tw >= 0) {
          const int oh = th / sh, ow = tw / sw;
          if (oh * sh == th && ow * sw == tw && oh < OH && ow < OW)
            v = cvt(src[pc.base + rw.off + (int64_t)oh * OW + ow]);
        }
      }
      r[e] = v;
    }
  }
}

template <int MODES, class S, class A>
SK_DEVICE void fetch_typed(const PanelB& B, const PanelCol& pc, A (&r)[kStageElems], int64_t k0, int64_t c0, int64_t k,
                           int64_t n, Cvt<S> cvt) {
  if constexpr (MODES == kPanelDense) {
    (void)pc;
    fetch_dense<S, A>(B, r, k0, c0, k, n, cvt);
  } else {
    (void)c0;
    (void)n;
    fetch_conv<S, A>(B, pc, r, k0, k, cvt);
  }
}

// V: the vector width fetch used for the dense modes (it fixes which thread holds which element).
template <int V, class A>
SK_DEVICE void store_stage(int mode, A* buf, const A (&r)[kStageElems]) {
  constexpr int T = kPanelCols, KC = kPanelChunk, G = V < 4 ? V : 4;
  const int tid = threadIdx.x;
  if (mode == kBRowMajor) {
#pragma unroll
    for (int q = 0; q < kStageElems / V; ++q) {
      const int idx = tid + kPanelThreads * q;
      const int kk = idx / (T / V), c = (idx % (T / V)) * V;
#pragma unroll
      for (int g = 0; g < V; g += G) {  // groups of 4 columns stay contiguous under the swizzle
        Pack<A, G> part;
#pragma unroll
        for (int e = 0; e < G; ++e) part.v[e] = r[q * V + g + e];
        store_pack<A, G>(buf + kk * T + panel_swizzle(kk, c + g), part);
      }
    }
  } else if (mode == kBColMajor) {
#pragma unroll
    for (int q = 0; q < kStageElems / V; ++q) {
      const int idx = tid + kPanelThreads * q;
      const int kk0 = (idx % (KC / V)) * V, c = idx / (KC / V);
#pragma unroll
      for (int e = 0; e < V; ++e) buf[(kk0 + e) * T + panel_swizzle(kk0 + e, c)] = r[q * V + e];
    }
  } else {
    const int c = tid % T, kk0 = tid / T;
#pragma unroll
    for (int e = 0; e < kStageElems; ++e) {
      const int kk = kk0 + kConvRowStep * e;
      buf[kk * T + panel_swizzle(kk, c)] = r[e];
    }
  }
}

template <int MODES, class A>
SK_DEVICE void panel_fetch(DType dt, const PanelB& B, const PanelCol& pc, A (&r)[kStageElems], int64_t k0, int64_t c0,
                           int64_t k, int64_t n) {
  if constexpr (sizeof(A) == 8) {
    fetch_typed<MODES, double, A>(B, pc, r, k0, c0, k, n, Cvt<double>{false});
  } else {
    if (dt == DType::kF32) fetch_typed<MODES, float, A>(B, pc, r, k0, c0, k, n, Cvt<float>{false});
    else fetch_typed<MODES, Bits16, A>(B, pc, r, k0, c0, k, n, Cvt<Bits16>{dt == DType::kBF16});
  }
}
template <class A>
SK_DEVICE void panel_store(DType dt, int mode, A* buf, const A (&r)[kStageElems]) {
  if constexpr (sizeof(A) == 8) {
    store_stage<vec_elems<double>(), A>(mode, buf, r);
  } else {
    if (dt == DType::kF32) store_stage<vec_elems<float>(), A>(mode, buf, r);
    else store_stage<vec_elems<__half>(), A>(mode, buf, r);
  }
}

// ---- epilogue: the tile [T][R + 1] in shared memory to out --------------------------------------
template <class S, class A, int R>
SK_DEVICE void store_tile(const PanelOut& O, const A* tile, int64_t i0, int64_t c0, int64_t m, int64_t n) {
  constexpr int T = kPanelCols;
  S* out = static_cast<S*>(O.data);
  const S* bias = static_cast<const S*>(O.bias);
  const int64_t rows_here = m - i0 < R ? m - i0 : R;
  if (O.mode == kOutDense && O.s0 == 1 && O.s1 != 1) {
    // Column-major out (sparse_linear's y^T): consecutive threads take consecutive rows.
    for (int idx = threadIdx.x; idx < T * R; idx += kPanelThreads) {
      const int c = idx / R, r = idx % R;
      if (r < rows_here && c0 + c < n) {
        const A add = bias != nullptr ? Elem<S>::to_acc(bias[(i0 + r) * O.bias_stride]) : A(0);
        out[(i0 + r) + (c0 + c) * O.s1] = Elem<S>::from_acc(tile[c * (R + 1) + r] + add);
      }
    }
    return;
  }
  // Row-major / NCHW out: consecutive threads take consecutive columns (tile stride R + 1 is odd:
  // no bank conflicts).
  for (int idx = threadIdx.x; idx < T * R; idx += kPanelThreads) {
    const int r = idx / T, c = idx % T;
    if (r < rows_here && c0 + c < n) {
      const int64_t i = i0 + r, cc = c0 + c;
      const A add = bias != nullptr ? Elem<S>::to_acc(bias[i * O.bias_stride]) : A(0);
      const S v = Elem<S>::from_acc(tile[c * (R + 1) + r] + add);
      if (O.mode == kOutDense) {
        out[i * O.s0 + cc * O.s1] = v;
      } else {
        const int64_t img = cc / O.plane;
        out[(img * O.rows + i) * O.plane + (cc - img * O.plane)] = v;
      }
    }
  }
}

// ---- panel kernel ------------------------------------------------------------------------------
template <int MODES, class A>
__global__ void __launch_bounds__(kPanelThreads, 2)
    spmm_panel_kernel(DType dt, const Nz<A>* __restrict__ nz, const int32_t* __restrict__ col,
                      const int64_t* __restrict__ rp, int64_t m, int64_t k, int64_t n, PanelB B, PanelOut O) {
  constexpr int RPW = panel_rows_per_warp<MODES, A>(), R = kPanelWarps * RPW, T = kPanelCols, KC = kPanelChunk;
  SK_DYNAMIC_SMEM(A, smem);  // two staging chunks of KC x T; the output tile [T][R + 1] after the loop
  __shared__ int64_t s_len[R];
  __shared__ int s_row[kPanelWarps][RPW];  // panel-local row of each warp slot, -1 for none
  __shared__ int64_t s_lo[kPanelWarps][RPW], s_hi[kPanelWarps][RPW];

  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t i0 = (int64_t)blockIdx.x * R;

  // Deal the panel's rows to the warps, longest first (tiling.h: panel_deal).
  if (tid < R) s_len[tid] = i0 + tid < m ? rp[i0 + tid + 1] - rp[i0 + tid] : -1;
  __syncthreads();
  if (tid < R) {
    const int64_t mine = s_len[tid];
    int rank = 0;
    for (int u = 0; u < R; ++u) {
      const int64_t other = s_len[u];
      rank += (other > mine) || (other == mine && u < tid);
    }
    int w, s;
    panel_deal(rank, &w, &s);
    s_row[w][s] = mine >= 0 ? tid : -1;
  }
  __syncthreads();

  // Lane s < RPW tracks row slot s of this warp.
  int64_t row_begin = 0, row_end = 0;
  if (lane < RPW) {
    const int r = s_row[warp][lane];
    if (r >= 0) {
      row_begin = rp[i0 + r];
      row_end = rp[i0 + r + 1];
    }
  }
  const int nchunks = (int)ceil_div(k, KC);
  const int cl = 4 * lane;
  const uint32_t lanex = (uint32_t)lane << (panel_colx_shift<A>() - 5);

  for (int64_t c0 = (int64_t)blockIdx.y * T; c0 < n; c0 += (int64_t)gridDim.y * T) {
    const PanelCol pc = panel_col(B, c0 + tid % T, n);
    A regs[kStageElems];
    if (nchunks > 0) panel_fetch<MODES, A>(dt, B, pc, regs, 0, c0, k, n);
    A acc[RPW][4];
#pragma unroll
    for (int s = 0; s < RPW; ++s)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[s][j] = A(0);
    int64_t cur = row_begin;

    for (int ch = 0; ch < nchunks; ++ch) {
      const int64_t k0 = (int64_t)ch * KC, kend = k0 + KC;
      A* buf = smem + (ch & 1) * kPanelChunkElems;
      // This buffer was last read in iteration ch - 2, which every warp finished before the barrier
      // of iteration ch - 1.
      panel_store<A>(dt, B.mode, buf, regs);
      __syncthreads();
      if (ch + 1 < nchunks) panel_fetch<MODES, A>(dt, B, pc, regs, kend, c0, k, n);  // in flight during the FMAs
      if (lane < RPW) {
        // The row's nonzeros in this chunk: [cur, first column >= kend). Columns are distinct and
        // sorted, so at most KC of them fall in the chunk.
        int64_t lo = cur, hi = row_end - cur < KC ? row_end : cur + KC;
        while (lo < hi) {
          const int64_t mid = (lo + hi) >> 1;
          if (col[mid] < kend) lo = mid + 1;
          else hi = mid;
        }
        s_lo[warp][lane] = cur;
        s_hi[warp][lane] = lo;
        cur = lo;
      }
      __syncwarp();
      // Lane l's 4 elements of staged row q: see tiling.h panel_colx.
      const uint32_t kofs = (uint32_t)k0 * (uint32_t)(T * sizeof(A));
      const char* bbuf = reinterpret_cast<const char*>(buf);
#pragma unroll
      for (int s = 0; s < RPW; ++s) {
        const int64_t e = s_hi[warp][s];
        int64_t p = s_lo[warp][s];
        for (; p + 2 <= e; p += 2) {  // two nonzeros per step: independent loads in flight
          const Nz<A> z0 = nz[p], z1 = nz[p + 1];
          const Pack<A, 4> b0 = load_vec<Pack<A, 4>>(bbuf + (((uint32_t)z0.col ^ lanex) - kofs));
          const Pack<A, 4> b1 = load_vec<Pack<A, 4>>(bbuf + (((uint32_t)z1.col ^ lanex) - kofs));
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[s][j] = fma_acc(z0.val, b0.v[j], acc[s][j]);
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[s][j] = fma_acc(z1.val, b1.v[j], acc[s][j]);
        }
        if (p < e) {
          const Nz<A> z = nz[p];
          const Pack<A, 4> b = load_vec<Pack<A, 4>>(bbuf + (((uint32_t)z.col ^ lanex) - kofs));
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[s][j] = fma_acc(z.val, b.v[j], acc[s][j]);
        }
      }
    }
    __syncthreads();  // all warps are done with the staging buffers, which the tile aliases

    // Epilogue through shared memory: [column][row] tile, then coalesced stores in either order.
    A* tile = smem;
#pragma unroll
    for (int s = 0; s < RPW; ++s) {
      const int r = s_row[warp][s];
      if (r >= 0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) tile[(cl + j) * (R + 1) + r] = acc[s][j];
      }
    }
    __syncthreads();
    if constexpr (sizeof(A) == 8) {
      store_tile<double, A, R>(O, tile, i0, c0, m, n);
    } else {
      if (dt == DType::kF32) store_tile<float, A, R>(O, tile, i0, c0, m, n);
      else if (dt == DType::kF16) store_tile<__half, A, R>(O, tile, i0, c0, m, n);
      else store_tile<__nv_bfloat16, A, R>(O, tile, i0, c0, m, n);
    }
    __syncthreads();  // the tile aliases the staging buffers of the next column tile
  }
}

template <int MODES>
cudaError_t launch_panel_modes(DType dt, const void* nz, const int32_t* col, const int64_t* rp, int64_t m, int64_t k,
                               int64_t n, const PanelB& b, const PanelOut& out, cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  const int64_t tiles = ceil_div(n, kPanelCols);
  const unsigned gy = (unsigned)(tiles < 65535 ? tiles : 65535);
  if (dt == DType::kF64) {
    auto* kern = &spmm_panel_kernel<MODES, double>;
    const size_t smem = panel_smem_bytes<MODES, double>();
    cudaError_t err = allow_dynamic_smem(kern, smem);
    if (err != cudaSuccess) return err;
    SK_LAUNCH(kern, dim3((unsigned)ceil_div(m, panel_rows<MODES, double>()), gy), dim3(kPanelThreads), smem, stream, dt,
              static_cast<const Nz<double>*>(nz), col, rp, m, k, n, b, out);
  } else {
    auto* kern = &spmm_panel_kernel<MODES, float>;
    const size_t smem = panel_smem_bytes<MODES, float>();
    cudaError_t err = allow_dynamic_smem(kern, smem);
    if (err != cudaSuccess) return err;
    SK_LAUNCH(kern, dim3((unsigned)ceil_div(m, panel_rows<MODES, float>()), gy), dim3(kPanelThreads), smem, stream, dt,
              static_cast<const Nz<float>*>(nz), col, rp, m, k, n, b, out);
  }
  return last_error();
}

}  // namespace cuda
}  // namespace sparsekern
