// Tensor-core depthwise convolution on tiny planes (at most 64 pixels: 7x7, 8x8): each channel's
// convolution as one GEMM, the batch as M. fp16 / bf16 run m16n8k16 MMAs; fp32 the same 16x16
// tiles as 3xTF32 m16n8k8 MMAs (common.cuh), its operands split as they are loaded.
//
// Per channel, with the planes flattened (q = qy * W + qx over the input, p = py * Wo + px over the
// output), out[n][p] = sum_q x[n][q] T[q][p], where T[q][p] = K[qy - py + ph][qx - px + pw] (zero
// outside the kernel) is the plane's Toeplitz-of-Toeplitz matrix, at most 64 x 64. A channel is so
// little arithmetic (64 images: 4 x 4 x 8 MMAs) that fixed per-block costs decide the time, so:
// - each lane builds its own B fragments of T in registers while the planes are still being copied
//   in (no T in shared memory, no barrier for it), one shared-memory load per element: the kernel
//   is staged zero-padded to every offset (qy - py, qx - px) the plane can have, so that tap's
//   index is a difference of per-pixel codes, with no bounds checks;
// - planes stored contiguously whose image stride is a multiple of 16 bytes all start `shift`
//   elements past a 16-byte boundary, the same for every image of a channel: they are staged with
//   16-byte cp.async copies from that boundary and the GEMM's k index runs over q + shift (the B
//   fragments absorb it). The copies bring neighbouring planes' elements along; the forward zeroes
//   them (0 * inf would be NaN), the weight gradient never reads the products they feed. Outputs
//   are written two at a time by the same trick on the GEMM's n index.
// The weight gradient is the transposed product G[p][q] = sum_n dy[n][p] x[n][q] (images as K),
// then dw[i][j] = the sum of G over p of G[p][q] with q - p the shift of tap (i, j), one tap per
// thread in a fixed order: deterministic, no atomics, no workspace. Accumulation is fp32; fp32
// tile products go through fresh accumulators as everywhere (common.cuh: Parts).
#include "dwconv.h"
#include "common.cuh"

#include <algorithm>

namespace lknets {
namespace {

constexpr int kThreads = 128;          // 4 warps
constexpr int kImages = 64;            // images per block (forward) or per step (weight grad)
constexpr int kMaxCols = 64;           // staged columns: plane + shift, 4 k16 tiles
constexpr int kGPitch = kMaxCols + 4;  // weight grad: G in fp32
constexpr int kMaxWindow = 1024;       // forward: offsets (qy - py, qx - px), fp32 taps
static_assert(kThreads / 32 * 16 == kMaxCols, "a warp per 16 GEMM columns (rows of G)");

template <typename T>
constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte copy
// Staged row pitches (elements), chosen so that the fragment loads hit distinct banks: ldmatrix
// rows 16 bytes past a multiple of 128 (16-bit: 144 bytes; fp32 forward, whose A loads are
// ldmatrix on fp32 rows: 272), the fp32 weight gradient's scalar loads a pitch of 8 mod 32 words.
template <typename T>
constexpr int kForwardPitch = sizeof(T) == 4 ? 68 : 72;
constexpr int kGradPitch = 72;
// fp32 holds its split fragments in about twice the registers: half the resident blocks.
template <typename T>
constexpr int kMinBlocks = sizeof(T) == 4 ? 4 : 8;

struct TinyParams {
  ConvShape s;
  int P, Q;              // output / input pixels per plane
  int wrows, wcols;      // forward: offsets qy - py + Ho - 1 < wrows, qx - px + Wo - 1 < wcols
  bool in_vec, out_vec;  // planes contiguous, image stride a multiple of 16 bytes
};

// Shift (0 .. kVec - 1) of plane (0, c) past a 16-byte boundary, or -1 when the planes cannot be
// staged with 16-byte copies (or the shifted plane would not fit the staged columns).
template <typename T>
__device__ __forceinline__ int staging_shift(const T* data, int64_t channel_offset, bool vec,
                                             int plane) {
  if (!vec) return -1;
  const int shift = static_cast<int>(
      (reinterpret_cast<uintptr_t>(data) / sizeof(T) + channel_offset) & (kVec<T> - 1));
  return shift + plane <= kMaxCols ? shift : -1;
}

// Rows g < 64 of dst (pitch Pitch) hold image n0 + g of the channel's planes (zero for images
// >= N), columns [0, cols). shift >= 0: 16-byte cp.async copies from the boundary before each
// plane, column k = element k - shift, complete after cp_async_wait_all(); shift < 0: element by
// element through the strides, column k = element k, zero past the plane.
template <int Pitch, typename T>
__device__ __forceinline__ void stage_planes(T* dst, const T* __restrict__ channel,
                                            const int64_t* stride, int n0, int N, int plane,
                                            int w, int shift, int cols) {
  if (shift >= 0) {
    const int chunks = cols / kVec<T>;
    for (int e = threadIdx.x; e < kImages * chunks; e += kThreads) {
      const int g = e / chunks, k = (e - g * chunks) * kVec<T>;
      const bool ok = n0 + g < N && k < shift + plane;
      const T* from = ok ? channel - shift + (n0 + g) * stride[0] + k : channel;
      cp_async_16(dst + g * Pitch + k, from, ok);
    }
    return;
  }
  for (int e = threadIdx.x; e < kImages * cols; e += kThreads) {
    const int g = e / cols, q = e - g * cols, n = n0 + g;
    T v = from_float<T>(0.f);
    if (n < N && q < plane) {
      const int qy = q / w;
      v = channel[n * stride[0] + qy * stride[2] + (q - qy * w) * stride[3]];
    }
    dst[g * Pitch + q] = v;
  }
}

// After cp_async_wait_all(): zeroes what this thread's copies of stage_planes brought in from
// outside the planes (same work split as there).
template <int Pitch, typename T>
__device__ __forceinline__ void clear_neighbours(T* dst, int n0, int N, int plane, int shift,
                                                 int cols) {
  constexpr int kV = kVec<T>;
  const int chunks = cols / kV;
  const T zero = from_float<T>(0.f);
  for (int e = threadIdx.x; e < kImages * chunks; e += kThreads) {
    const int g = e / chunks, k = (e - g * chunks) * kV;
    if (n0 + g >= N || k >= shift + plane || (k >= shift && k + kV <= shift + plane)) continue;
#pragma unroll
    for (int u = 0; u < kV; ++u)
      if (k + u < shift || k + u >= shift + plane) dst[g * Pitch + k + u] = zero;
  }
}

// grid (C, ceil(N / 64)), 128 threads; dynamic shared memory: the padded kernel (fp32). Warp w
// computes GEMM columns 16 w .. 16 w + 15 (two n8 tiles) for all 64 images.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) tiny_forward_kernel(
    const T* __restrict__ x, const Filter filter, T* __restrict__ y, TinyParams p) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  constexpr int kPitch = kForwardPitch<T>;
  __shared__ __align__(16) T xs[kImages * kPitch];
  // Window index of tap (qy - py, qx - px) = in_code[q] - out_code[p]; out_yx: (py, px) of p.
  __shared__ int in_code[kMaxCols], out_code[kMaxCols];
  __shared__ int2 out_yx[kMaxCols];
  extern __shared__ float window[];
  const ConvShape& s = p.s;
  const int c = blockIdx.x, n0 = blockIdx.y * kImages;
  const int64_t in_offset = c * s.in_stride[1], out_offset = c * s.out_stride[1];
  const int shift = staging_shift(x, in_offset, p.in_vec, p.Q);
  const int kx = max(shift, 0);
  const int cols = round_up(kx + p.Q, 16);
  stage_planes<kPitch>(xs, x + in_offset, s.in_stride, n0, s.N, p.Q, s.W, shift, cols);

  // Output column n of the GEMM is pixel n - ey; with ey = the plane's parity, even columns are
  // aligned to two elements and two outputs go out in one store.
  const int out_shift = staging_shift(y, out_offset, p.out_vec, p.P);
  const bool pairs = out_shift >= 0 && (out_shift & 1) + p.P <= kMaxCols;
  const int ey = pairs ? out_shift & 1 : 0;

  for (int e = threadIdx.x; e < p.wrows * p.wcols; e += kThreads) {
    const int r = e / p.wcols;
    const int i = r - (s.Ho - 1) + s.pad_h, j = e - r * p.wcols - (s.Wo - 1) + s.pad_w;
    window[e] = i >= 0 && i < s.kh && j >= 0 && j < s.kw ? filter_tap<T>(filter, c, i, j) : 0.f;
  }
  for (int e = threadIdx.x; e < kMaxCols; e += kThreads) {
    const int qy = e / s.W, py = e / s.Wo;
    in_code[e] = qy * p.wcols + e - qy * s.W;
    out_yx[e] = make_int2(py, e - py * s.Wo);
    out_code[e] = (py - s.Ho + 1) * p.wcols + e - py * s.Wo - s.Wo + 1;
  }
  __syncthreads();

  // This warp's B fragments, T rows 16 kt .. 16 kt + 15 (pixels q = k - kx) of its columns.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int oc[2];
  bool p_ok[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int pp = warp * 16 + h * 8 + lane / 4 - ey;
    p_ok[h] = pp >= 0 && pp < p.P;
    oc[h] = out_code[p_ok[h] ? pp : 0];
  }
  FragB<T> b[4];
#pragma unroll
  for (int kt = 0; kt < 4; ++kt) {
    fill_b(b[kt], lane, [&](int k, int n) {
      const int q = kt * 16 + k - kx;
      const bool ok = p_ok[n / 8] && static_cast<unsigned>(q) < static_cast<unsigned>(p.Q);
      return ok ? window[in_code[q] - oc[n / 8]] : 0.f;
    });
  }

  if (shift >= 0) {
    cp_async_wait_all();
    clear_neighbours<kPitch>(xs, n0, s.N, p.Q, shift, cols);
  }
  __syncthreads();
  if (warp * 16 >= ey + p.P) return;

  const float bias_c = filter_bias<T>(filter, c);
  const int m_tiles = ceil_div(min(kImages, s.N - n0), 16), k_tiles = cols / 16;
  for (int m = 0; m < m_tiles; ++m) {
    float acc[2][4] = {};
    Parts<2> part;
#pragma unroll
    for (int kt = 0; kt < 4; ++kt) {
      if (kt >= k_tiles) continue;
      FragA<T> a;
      load_a(a, xs + m * 16 * kPitch + kt * 16, kPitch, lane);
      if constexpr (kF32) {
        add_tile_product<2>(part, a, b[kt], /*fresh=*/kt == 0);
      } else {
        mma_tile(acc, a, b[kt]);
      }
    }
    if constexpr (kF32) add_parts<2>(acc, part);
    // Accumulator element e of n8 tile h: image row lane / 4 + 8 (e / 2), column
    // 2 (lane % 4) + e % 2.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int pp = warp * 16 + h * 8 + 2 * (lane % 4) - ey;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int n = n0 + m * 16 + lane / 4 + 8 * half;
        if (n >= s.N) continue;
        const float v0 = acc[h][2 * half] + bias_c, v1 = acc[h][2 * half + 1] + bias_c;
        T* plane = y + n * s.out_stride[0] + out_offset;
        if (pairs && pp >= 0 && pp + 1 < p.P) {
          store_pair(plane + pp, v0, v1);
          continue;
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int q = pp + e;
          if (q < 0 || q >= p.P) continue;
          const int2 o = out_yx[q];
          plane[o.x * s.out_stride[2] + o.y * s.out_stride[3]] = from_float<T>(e ? v1 : v0);
        }
      }
    }
  }
}

// grid (C), 128 threads; dw is (C, kh, kw) contiguous. Warp w computes G rows 16 w .. 16 w + 15
// (output pixels, shifted like the staged dy) against every staged x column.
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) tiny_weight_grad_kernel(
    const T* __restrict__ x, const T* __restrict__ dy, T* __restrict__ dw, TinyParams p) {
  constexpr int kStagedBytes = 2 * kImages * kGradPitch * sizeof(T);
  static_assert(kStagedBytes >= kMaxCols * kGPitch * 4, "G reuses the staging buffers");
  __shared__ __align__(16) unsigned char raw[kStagedBytes];
  T* xs = reinterpret_cast<T*>(raw);
  T* ds = xs + kImages * kGradPitch;
  float* gs = reinterpret_cast<float*>(raw);
  const ConvShape& s = p.s;
  const int c = blockIdx.x;
  const int64_t in_offset = c * s.in_stride[1], out_offset = c * s.out_stride[1];
  const int x_shift = staging_shift(x, in_offset, p.in_vec, p.Q);
  const int d_shift = staging_shift(dy, out_offset, p.out_vec, p.P);
  const int kx = max(x_shift, 0), kd = max(d_shift, 0);
  const int x_cols = round_up(kx + p.Q, 16), d_cols = round_up(kd + p.P, 16);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool active = warp * 16 < d_cols;
  float acc[4][2][4] = {};
  for (int n0 = 0; n0 < s.N; n0 += kImages) {
    __syncthreads();  // the previous images' products are done with xs and ds
    stage_planes<kGradPitch>(xs, x + in_offset, s.in_stride, n0, s.N, p.Q, s.W, x_shift, x_cols);
    stage_planes<kGradPitch>(ds, dy + out_offset, s.out_stride, n0, s.N, p.P, s.Wo, d_shift,
                             d_cols);
    cp_async_wait_all();
    __syncthreads();
    if (!active) continue;
    const int k_tiles = ceil_div(min(kImages, s.N - n0), 16);
    for (int kt = 0; kt < k_tiles; ++kt) {
      FragA<T> a;
      load_a_trans(a, ds + kt * 16 * kGradPitch + warp * 16, kGradPitch, lane);
#pragma unroll
      for (int nt = 0; nt < 4; ++nt) {
        if (nt * 16 >= x_cols) continue;
        FragB<T> b;
        load_b(b, xs + kt * 16 * kGradPitch + nt * 16, kGradPitch, lane);
        mma_tile(acc[nt], a, b);
      }
    }
  }
  __syncthreads();
  if (active) {
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float* g = gs + (warp * 16 + lane / 4) * kGPitch + nt * 16 + h * 8 + 2 * (lane % 4);
        *reinterpret_cast<float2*>(g) = make_float2(acc[nt][h][0], acc[nt][h][1]);
        *reinterpret_cast<float2*>(g + 8 * kGPitch) = make_float2(acc[nt][h][2], acc[nt][h][3]);
      }
  }
  __syncthreads();
  T* out = dw + static_cast<int64_t>(c) * s.kh * s.kw;
  for (int tap = threadIdx.x; tap < s.kh * s.kw; tap += kThreads) {
    const int i = tap / s.kw;
    const int di = i - s.pad_h, dj = tap - i * s.kw - s.pad_w;
    const int py_lo = max(0, -di), py_hi = min(s.Ho, s.H - di);
    const int px_lo = max(0, -dj), px_hi = min(s.Wo, s.W - dj);
    float sum = 0.f;
    for (int py = py_lo; py < py_hi; ++py) {
      const float* g = gs + (py * s.Wo + kd) * kGPitch + (py + di) * s.W + dj + kx;
      for (int px = px_lo; px < px_hi; ++px) sum += g[px * (kGPitch + 1)];
    }
    out[tap] = from_float<T>(sum);
  }
}

bool vector_planes(const int64_t* stride, int h, int w, int vec) {
  return stride[3] == 1 && (h == 1 || stride[2] == w) && stride[0] % vec == 0;
}

template <typename T>
TinyParams plan_tiny(const ConvShape& s) {
  TinyParams p{};
  p.s = s;
  p.P = s.Ho * s.Wo;
  p.Q = s.H * s.W;
  p.wrows = s.H + s.Ho - 1;
  p.wcols = s.W + s.Wo - 1;
  p.in_vec = vector_planes(s.in_stride, s.H, s.W, kVec<T>);
  p.out_vec = vector_planes(s.out_stride, s.Ho, s.Wo, kVec<T>);
  return p;
}

bool tiny_planes(const ConvShape& s) {
  return s.H * s.W <= kMaxCols && s.Ho * s.Wo <= kMaxCols;
}

template <typename T>
cudaError_t gemm_forward_typed(const void* x, const Filter& filter, void* y, const ConvShape& s,
                               cudaStream_t stream) {
  const TinyParams p = plan_tiny<T>(s);
  const dim3 grid(s.C, ceil_div(s.N, kImages));
  tiny_forward_kernel<T><<<grid, kThreads, 4 * p.wrows * p.wcols, stream>>>(
      static_cast<const T*>(x), filter, static_cast<T*>(y), p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gemm_weight_grad_typed(const void* x, const void* dy, void* dw, const ConvShape& s,
                                   cudaStream_t stream) {
  tiny_weight_grad_kernel<T><<<s.C, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dw), plan_tiny<T>(s));
  return cudaGetLastError();
}

}  // namespace

bool gemm_forward_supported(const ConvShape& s) {
  return tiny_planes(s) && (s.H + s.Ho - 1) * (s.W + s.Wo - 1) <= kMaxWindow;
}

bool gemm_weight_grad_supported(const ConvShape& s) { return tiny_planes(s); }

cudaError_t launch_forward_gemm(DType dtype, const void* x, const Filter& filter, void* y,
                                const ConvShape& shape, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return gemm_forward_typed<float>(x, filter, y, shape, stream);
    case DType::kFloat16: return gemm_forward_typed<__half>(x, filter, y, shape, stream);
    case DType::kBFloat16:
      return gemm_forward_typed<__nv_bfloat16>(x, filter, y, shape, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_weight_grad_gemm(DType dtype, const void* x, const void* grad_out,
                                    void* grad_weight, const ConvShape& shape, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return gemm_weight_grad_typed<float>(x, grad_out, grad_weight, shape, stream);
    case DType::kFloat16:
      return gemm_weight_grad_typed<__half>(x, grad_out, grad_weight, shape, stream);
    case DType::kBFloat16:
      return gemm_weight_grad_typed<__nv_bfloat16>(x, grad_out, grad_weight, shape, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace lknets
