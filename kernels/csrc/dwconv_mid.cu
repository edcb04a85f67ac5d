// Mid-plane tensor-core formulation for fp32 (3xTF32, common.cuh), the batch as M: forward on
// planes of 17 to 64 columns (RepLKNet-31B's 56x56 and 28x28 stages, its 48x48 and 24x24 stages at
// 384), weight gradient on 17 to 32 columns.
//
// As in the small-plane GEMM, out[n][oy][:] = sum over input rows qy of x[n][qy][:] T_i with
// i = qy - oy + ph and T_i the Toeplitz matrix of kernel row i (input columns x output columns),
// but an image row is cut into C = 3 .. 8 chunks of 8 columns, the k and n of the m16n8k8 TF32
// MMA: a 24-column plane multiplies 24 columns, where 16-wide tiles (the row-Toeplitz GEMM's rows
// and columns) multiply 32 x 32, and the chunk pairs off the kernel's band are skipped (D below).
// A chunk pair (a, b) of T_i depends only on d = a - b, and lane (g, t) holds its taps
// q - p = 8d + t - g and 8d + t - g + 4, so one kernel row's B fragments for every chunk pair are
// 4D + 2 taps per lane, read already split from a table of the kernel in shared memory.
// Forward up to 32 columns (mid_forward_kernel): a block owns one channel, 16 images and up to 16
// output rows (two per warp); it stages the input rows in their reach once, and per input row a
// warp splits its A fragments once for both of its output rows. Wider planes (wide_forward_kernel)
// pair two output rows of 8 images in one M tile instead, which halves the staged rows (see there);
// at 28x28 that ran slower than the mid forward (H100, forward 0.400 against 0.346 ms).
// Weight gradient: G_i[ox][qx] = sum over images and output rows of dy[n][oy][ox] x[n][oy + i - ph]
// [qx] (M = output columns in two m16 tiles, N = input columns in C chunks, K = 8 images), and
// dw[i][j] = the sum of G_i's diagonal j. A block owns one channel and 8 images, stages all their
// rows of dy and x, and warp w computes kernel rows first + w, first + w + 8, ...; each block
// writes one partial dw, reduced over the blocks of a channel in a fixed order (deterministic).
#include "dwconv.h"
#include "common.cuh"

#include <algorithm>

namespace lknets {
namespace {

constexpr int kMaxWarps = 8;
// Mid forward: planes of up to 32 columns, blocks of 16 images; wide forward: up to 64 columns,
// blocks of 8 images (two output rows per M tile); weight gradient: up to 32 columns, blocks of 8
// images (one k8 step).
constexpr int kMaxCols = 32;
constexpr int kForwardImages = 16;
constexpr int kWideCols = 64;
constexpr int kWideImages = 8;
constexpr int kGradImages = 8;
// Staged row pitches (floats): the forwards' A loads are ldmatrix on fp32 rows (16 bytes past a
// multiple of 128: conflict-free), the weight gradient's fragments scalar loads of rows (t, t + 4)
// and columns g (8 mod 32 words apart: conflict-free), as are its scratch tile's 8-byte stores.
constexpr int kForwardPitch = 36;
constexpr int kWidePitch = 68;
constexpr int kGradPitch = 40;
constexpr int kScratchPitch = 40;
// Kernel table: per kernel row, column q - p + kTapZero holds the split tap K[i][q - p + pw] (zero
// outside the kernel), q - p in [-31, 31].
constexpr int kTapCols = 64;
constexpr int kTapZero = 32;
// Output rows per fp32 part in the weight gradient (common.cuh: Parts): each part sums this many
// rows' products before it reaches the accumulators.
constexpr int kRowsPerPart = 4;
constexpr int64_t kSmemLimit = 160 * 1024;

struct MidParams {
  ConvShape s;
  int warps;      // forward: warp w computes output rows oy0 + w and oy0 + w + warps
  bool in_vec;    // input rows read with 16-byte copies
  bool dy_vec;    // weight gradient: dy rows read with 16-byte copies
  bool pair_out;  // forward: two outputs per store
};

// rows x Images rows of dst (pitch Pitch) hold rows q0 .. q0 + rows - 1 of images n0 ..
// n0 + Images - 1, columns 0 .. Cols - 1 (zero at rows outside [0, h), columns >= w and images
// >= N), after cp_async_wait_all. `vec`: 16-byte copies (rows contiguous and 16-byte aligned,
// w % 4 == 0). The small-plane GEMM's fp32 staging (stage_planes) is this loop with q0 = 0 and
// vec false, but sharing it made the small-plane weight gradient slower (H100, fp32, r31b224_s3:
// 0.091 -> 0.094 ms; fewer instructions, less unrolled staging).
template <int Images, int Pitch, int Cols>
__device__ __forceinline__ void stage_rows(float* dst, const float* __restrict__ src,
                                           const int64_t* stride, int c, int n0, int N, int q0,
                                           int rows, int h, int w, bool vec) {
  const float* channel = src + c * stride[1];
  if (vec) {
    constexpr int kChunks = Cols / 4;
    for (int e = threadIdx.x; e < rows * Images * kChunks; e += blockDim.x) {
      const int v = e % kChunks, g = (e / kChunks) % Images, q = q0 + e / (kChunks * Images);
      const bool ok = 4 * v < w && n0 + g < N && q >= 0 && q < h;
      const float* from = ok ? channel + (n0 + g) * stride[0] + q * stride[2] + 4 * v : channel;
      cp_async_16(dst + ((q - q0) * Images + g) * Pitch + 4 * v, from, ok);
    }
    return;
  }
  for (int e = threadIdx.x; e < rows * Images * Cols; e += blockDim.x) {
    const int col = e % Cols, g = (e / Cols) % Images, q = q0 + e / (Cols * Images);
    const bool ok = col < w && n0 + g < N && q >= 0 && q < h;
    const float* from =
        ok ? channel + (n0 + g) * stride[0] + q * stride[2] + col * stride[3] : channel;
    cp_async_4(dst + ((q - q0) * Images + g) * Pitch + col, from, ok);
  }
}

// The kernel table of channel c (kTapCols columns per kernel row, split).
__device__ __forceinline__ void stage_taps(float2* taps, const Filter& filter, int c,
                                           const ConvShape& s) {
  for (int e = threadIdx.x; e < s.kh * kTapCols; e += blockDim.x) {
    const int i = e / kTapCols, j = e % kTapCols - kTapZero + s.pad_w;
    unsigned hi, lo;
    split_tf32(j >= 0 && j < s.kw ? filter_tap<float>(filter, c, i, j) : 0.f, hi, lo);
    taps[e] = make_float2(__uint_as_float(hi), __uint_as_float(lo));
  }
}

// Lane (g, t)'s taps of kernel row i: tap[m] is q - p = t - g + 4 (m - 2D); chunk pair d = a - b
// (|d| <= D) uses m = 2 (d + D) and 2 (d + D) + 1.
template <int D>
__device__ __forceinline__ void load_taps(float2 (&tap)[4 * D + 2], const float2* taps, int i,
                                          int lane) {
  const float2* row = taps + i * kTapCols + kTapZero + lane % 4 - lane / 4;
#pragma unroll
  for (int m = 0; m < 4 * D + 2; ++m) tap[m] = row[4 * (m - 2 * D)];
}

// part[b] (+)= A chunk a times chunk pair (a, b) of T_i for every b within the band, 3xTF32; a
// part starts anew at its first chunk, so chunks must come in increasing order of a.
template <int C, int D>
__device__ __forceinline__ void multiply_chunk(float (&part)[C][4], const unsigned (&a_hi)[4],
                                               const unsigned (&a_lo)[4], int a,
                                               const float2 (&tap)[4 * D + 2]) {
#pragma unroll
  for (int b = 0; b < C; ++b) {
    const int d = a - b;
    if (d > D || -d > D) continue;
    const float2 t0 = tap[2 * (d + D)], t1 = tap[2 * (d + D) + 1];
    const unsigned b_hi[2] = {__float_as_uint(t0.x), __float_as_uint(t1.x)};
    const unsigned b_lo[2] = {__float_as_uint(t0.y), __float_as_uint(t1.y)};
    if (a == max(0, b - D)) {
      mma_tf32_first(part[b], a_lo, b_hi);
    } else {
      mma_tf32(part[b], a_lo, b_hi);
    }
    mma_tf32(part[b], a_hi, b_lo);
    mma_tf32(part[b], a_hi, b_hi);
  }
}

// Outputs (n, oy, ox) and (n, oy, ox + 1) of channel plane `out`, where they exist.
__device__ __forceinline__ void store_outputs(float* out, const ConvShape& s, int n, int oy, int ox,
                                              float v0, float v1, bool pair) {
  if (n >= s.N || oy >= s.Ho || ox >= s.Wo) return;
  float* dst = out + n * s.out_stride[0] + oy * s.out_stride[2] + ox * s.out_stride[3];
  if (pair) {
    store_pair(dst, v0, v1);
  } else {
    dst[0] = v0;
    if (ox + 1 < s.Wo) dst[s.out_stride[3]] = v1;
  }
}

// grid (C, ceil(N / 16), row blocks of 2 * warps output rows), 32 * warps threads. C chunks per
// row; chunk pairs with |a - b| > D multiply only zero taps and are skipped.
template <int C, int D>
__global__ void __launch_bounds__(kMaxWarps * 32, 2) mid_forward_kernel(const float* __restrict__ x,
                                                                       const Filter filter,
                                                                       float* __restrict__ y,
                                                                       const MidParams p) {
  extern __shared__ float4 smem4[];
  const ConvShape& s = p.s;
  const int c = blockIdx.x, n0 = blockIdx.y * kForwardImages;
  const int oy0 = blockIdx.z * 2 * p.warps, oy_end = min(s.Ho, oy0 + 2 * p.warps);
  const int q0 = max(0, oy0 - s.pad_h), q1 = min(s.H, oy_end - 1 - s.pad_h + s.kh);
  float2* taps = reinterpret_cast<float2*>(smem4);
  float* xs = reinterpret_cast<float*>(taps + s.kh * kTapCols);
  if (q1 > q0)
    stage_rows<kForwardImages, kForwardPitch, kMaxCols>(xs, x, s.in_stride, c, n0, s.N, q0,
                                                        q1 - q0, s.H, s.W, p.in_vec);
  stage_taps(taps, filter, c, s);
  cp_async_wait_all();
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float acc[2][C][4] = {};
  for (int qy = q0; qy < q1; ++qy) {
    int row[2];
    bool reach[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int oy = oy0 + warp + r * p.warps;
      row[r] = qy - oy + s.pad_h;
      reach[r] = oy < oy_end && row[r] >= 0 && row[r] < s.kh;
    }
    if (!reach[0] && !reach[1]) continue;
    // A chunk a: 16 images x columns 8a .. 8a + 7 of input row qy.
    unsigned a_hi[C][4], a_lo[C][4];
    const float* arow =
        xs + ((qy - q0) * kForwardImages + lane % 16) * kForwardPitch + (lane / 16) * 4;
#pragma unroll
    for (int a = 0; a < C; ++a) load_a_k8(a_hi[a], a_lo[a], arow + 8 * a);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (!reach[r]) continue;
      float2 tap[4 * D + 2];
      load_taps<D>(tap, taps, row[r], lane);
      float part[C][4];
#pragma unroll
      for (int a = 0; a < C; ++a) multiply_chunk<C, D>(part, a_hi[a], a_lo[a], a, tap);
#pragma unroll
      for (int b = 0; b < C; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][b][e] += part[b][e];
    }
  }

  // Accumulator element e of chunk b: image g + 8 * (e / 2), output column 8b + 2t + e % 2.
  const float bias = filter_bias<float>(filter, c);
  float* out = y + c * s.out_stride[1];
#pragma unroll
  for (int r = 0; r < 2; ++r)
#pragma unroll
    for (int b = 0; b < C; ++b)
#pragma unroll
      for (int half = 0; half < 2; ++half)
        store_outputs(out, s, n0 + g + 8 * half, oy0 + warp + r * p.warps, 8 * b + 2 * t,
                      acc[r][b][2 * half] + bias, acc[r][b][2 * half + 1] + bias, p.pair_out);
}

// grid (C, ceil(N / 8), row blocks of 2 * warps output rows), 32 * warps threads; planes of 33 to
// 64 columns (C = 5 .. 8 chunks). Warp w computes output rows oy = oy0 + 2w and oy + 1 of 8
// images as one m16 tile, M row m being image m % 8 at output row oy + m / 8: input rows qy and
// qy + 1 meet the same kernel row qy - oy + ph, so per kernel row one A chunk (ldmatrix from both
// staged rows) serves both output rows, and a block stages half the rows of 16 images. Chunks are
// loaded one at a time (registers: the accumulators and parts are C chunks wide).
template <int C, int D>
__global__ void __launch_bounds__(kMaxWarps * 32, 2)
    wide_forward_kernel(const float* __restrict__ x, const Filter filter, float* __restrict__ y,
                        const MidParams p) {
  extern __shared__ float4 smem4[];
  const ConvShape& s = p.s;
  const int c = blockIdx.x, n0 = blockIdx.y * kWideImages;
  const int oy0 = blockIdx.z * 2 * p.warps, q0 = oy0 - s.pad_h;
  float2* taps = reinterpret_cast<float2*>(smem4);
  float* xs = reinterpret_cast<float*>(taps + s.kh * kTapCols);
  stage_rows<kWideImages, kWidePitch, kWideCols>(xs, x, s.in_stride, c, n0, s.N, q0,
                                                  2 * p.warps + s.kh - 1, s.H, s.W, p.in_vec);
  stage_taps(taps, filter, c, s);
  cp_async_wait_all();
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int oy = oy0 + 2 * warp;
  float acc[C][4] = {};
  if (oy < s.Ho) {
    // Kernel rows for which input row qy = oy + i - ph or qy + 1 lies in the image; staged row
    // qy - q0 = oy - oy0 + i.
    const int i_begin = max(0, s.pad_h - oy - 1), i_end = min(s.kh, s.H + s.pad_h - oy);
    const float* arow = xs + ((oy - oy0 + (lane % 16) / 8) * kWideImages + lane % 8) * kWidePitch +
                        (lane / 16) * 4;
    for (int i = i_begin; i < i_end; ++i) {
      float2 tap[4 * D + 2];
      load_taps<D>(tap, taps, i, lane);
      const float* ai = arow + i * kWideImages * kWidePitch;
      float part[C][4];
#pragma unroll
      for (int a = 0; a < C; ++a) {
        unsigned a_hi[4], a_lo[4];
        load_a_k8(a_hi, a_lo, ai + 8 * a);
        multiply_chunk<C, D>(part, a_hi, a_lo, a, tap);
      }
#pragma unroll
      for (int b = 0; b < C; ++b)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[b][e] += part[b][e];
    }
  }

  // Accumulator element e of chunk b: image g, output row oy + e / 2, column 8b + 2t + e % 2.
  const float bias = filter_bias<float>(filter, c);
  float* out = y + c * s.out_stride[1];
#pragma unroll
  for (int b = 0; b < C; ++b)
#pragma unroll
    for (int half = 0; half < 2; ++half)
      store_outputs(out, s, n0 + g, oy + half, 8 * b + 2 * t, acc[b][2 * half] + bias,
                    acc[b][2 * half + 1] + bias, p.pair_out);
}

// grid (C, ceil(N / 8)), 256 threads; workspace[blockIdx.y][c] is the block's partial (kh, kw).
template <int C>
__global__ void __launch_bounds__(kMaxWarps * 32, 2) mid_weight_grad_kernel(
    const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ workspace,
    const MidParams p) {
  extern __shared__ float4 smem4[];
  const ConvShape& s = p.s;
  const int c = blockIdx.x, n0 = blockIdx.y * kGradImages;
  float* ds = reinterpret_cast<float*>(smem4);
  float* xs = ds + s.Ho * kGradImages * kGradPitch;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  float* mine = xs + s.H * kGradImages * kGradPitch + warp * kMaxCols * kScratchPitch;
  stage_rows<kGradImages, kGradPitch, kMaxCols>(ds, dy, s.out_stride, c, n0, s.N, 0, s.Ho, s.Ho,
                                                s.Wo, p.dy_vec);
  stage_rows<kGradImages, kGradPitch, kMaxCols>(xs, x, s.in_stride, c, n0, s.N, 0, s.H, s.H, s.W,
                                                p.in_vec);

  const ReachedRows rows = reached_rows(s);
  float* out = workspace + (int64_t(blockIdx.y) * s.C + c) * s.kh * s.kw;
  for (int e = threadIdx.x; e < s.kh * s.kw; e += blockDim.x) {
    const int i = e / s.kw;
    if (i < rows.first || i >= rows.first + rows.count) out[e] = 0.f;
  }
  cp_async_wait_all();
  __syncthreads();

  for (int i = rows.first + warp; i < rows.first + rows.count; i += kMaxWarps) {
    const int oy_begin = max(0, s.pad_h - i), oy_end = min(s.Ho, s.H + s.pad_h - i);
    float acc[2][C][4] = {};
    for (int oy0 = oy_begin; oy0 < oy_end; oy0 += kRowsPerPart) {
      float part[2][C][4];
#pragma unroll
      for (int u = 0; u < kRowsPerPart; ++u) {
        const int oy = oy0 + u;
        if (u > 0 && oy >= oy_end) break;
        // A[ox][n] = dy[n][oy][ox] (two m16 tiles of output columns), B[n][qx] = x[n][qy][qx].
        const float* drow = ds + oy * kGradImages * kGradPitch;
        const float* xrow = xs + (oy + i - s.pad_h) * kGradImages * kGradPitch;
        unsigned a_hi[2][4], a_lo[2][4];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
          load_a_trans_k8(a_hi[mt], a_lo[mt], drow + 16 * mt, kGradPitch, lane);
        unsigned b_hi[C][2], b_lo[C][2];
#pragma unroll
        for (int b = 0; b < C; ++b) load_b_k8(b_hi[b], b_lo[b], xrow + 8 * b, kGradPitch, lane);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int b = 0; b < C; ++b) {
            if (u == 0) {
              mma_tf32_first(part[mt][b], a_lo[mt], b_hi[b]);
            } else {
              mma_tf32(part[mt][b], a_lo[mt], b_hi[b]);
            }
            mma_tf32(part[mt][b], a_hi[mt], b_lo[b]);
            mma_tf32(part[mt][b], a_hi[mt], b_hi[b]);
          }
      }
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int b = 0; b < C; ++b)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[mt][b][e] += part[mt][b][e];
    }
    // G_i[ox][qx] adds to tap j = qx - ox + pw; lanes take taps, summing over ox in a fixed order.
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int b = 0; b < C; ++b)
#pragma unroll
        for (int half = 0; half < 2; ++half)
          *reinterpret_cast<float2*>(mine + (16 * mt + g + 8 * half) * kScratchPitch + 8 * b +
                                     2 * t) =
              make_float2(acc[mt][b][2 * half], acc[mt][b][2 * half + 1]);
    __syncwarp();
    for (int j = lane; j < s.kw; j += 32) {
      float sum = 0.f;
      const int ox_begin = max(0, s.pad_w - j), ox_end = min(s.Wo, s.W + s.pad_w - j);
      for (int ox = ox_begin; ox < ox_end; ++ox)
        sum += mine[ox * (kScratchPitch + 1) + j - s.pad_w];
      out[i * s.kw + j] = sum;
    }
    __syncwarp();
  }
}

int chunks(const ConvShape& s) { return ceil_div(std::max(s.W, s.Wo), 8); }

// Chunk pairs d = a - b reach taps q - p in [8d - 7, 8d + 7]; the kernel's taps lie in
// [-pw, kw - 1 - pw].
int band(const ConvShape& s) {
  const int reach = std::max(s.pad_w, s.kw - 1 - s.pad_w);
  return std::min(chunks(s) - 1, std::max(1, (reach + 7) / 8));
}

int forward_warps(const ConvShape& s) {
  const int blocks = ceil_div(s.Ho, 2 * kMaxWarps);
  return ceil_div(s.Ho, 2 * blocks);
}

// Up to 4 chunks the mid forward (16 images, the staged input rows in reach), beyond it the wide
// forward (8 images, a window of 2 * warps + kh - 1 rows).
int64_t forward_smem(const ConvShape& s) {
  const int64_t table = 8LL * s.kh * kTapCols;
  if (chunks(s) > 4)
    return table + 4LL * (2 * forward_warps(s) + s.kh - 1) * kWideImages * kWidePitch;
  const int rows = std::min(s.H, 2 * forward_warps(s) + s.kh - 1);
  return table + 4LL * rows * kForwardImages * kForwardPitch;
}

int64_t weight_grad_smem(const ConvShape& s) {
  return 4LL * ((s.Ho + s.H) * kGradImages * kGradPitch + kMaxWarps * kMaxCols * kScratchPitch);
}

// Forward: 17 to 64 columns, chunk pairs up to 3 apart (the kernel table's reach). Weight
// gradient: 17 to 32 columns.
bool forward_fits(const ConvShape& s) {
  const int cols = std::max(s.W, s.Wo);
  return cols > 16 && cols <= kWideCols && band(s) <= 3;
}

bool weight_grad_fits(const ConvShape& s) {
  return s.W <= kMaxCols && s.Wo <= kMaxCols && std::max(s.W, s.Wo) > 16;
}

template <typename Kernel>
cudaError_t launch(Kernel kernel, int images, const float* x, const Filter& filter, float* y,
                   const MidParams& p, cudaStream_t stream) {
  const int64_t smem = forward_smem(p.s);
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.s.C, ceil_div(p.s.N, images), ceil_div(p.s.Ho, 2 * p.warps));
  kernel<<<grid, 32 * p.warps, smem, stream>>>(x, filter, y, p);
  return cudaGetLastError();
}

template <int C, int D>
cudaError_t forward_typed(const float* x, const Filter& filter, float* y, const MidParams& p,
                          cudaStream_t stream) {
  if constexpr (C > 4) {
    return launch(wide_forward_kernel<C, D>, kWideImages, x, filter, y, p, stream);
  } else {
    return launch(mid_forward_kernel<C, D>, kForwardImages, x, filter, y, p, stream);
  }
}

template <int C>
cudaError_t forward_band(const float* x, const Filter& filter, float* y, const MidParams& p,
                         cudaStream_t stream) {
  const int d = band(p.s);
  if constexpr (C > 3) {
    if (d == 3) return forward_typed<C, 3>(x, filter, y, p, stream);
  }
  return d == 1 ? forward_typed<C, 1>(x, filter, y, p, stream)
                : forward_typed<C, 2>(x, filter, y, p, stream);
}

template <int C>
cudaError_t weight_grad_typed(const float* x, const float* dy, float* workspace,
                              const MidParams& p, cudaStream_t stream) {
  const int64_t smem = weight_grad_smem(p.s);
  cudaError_t err = allow_smem(mid_weight_grad_kernel<C>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.s.C, ceil_div(p.s.N, kGradImages));
  mid_weight_grad_kernel<C><<<grid, kMaxWarps * 32, smem, stream>>>(x, dy, workspace, p);
  return cudaGetLastError();
}

}  // namespace

bool mid_forward_supported(const ConvShape& s) {
  return forward_fits(s) && forward_smem(s) <= kSmemLimit;
}

bool mid_weight_grad_supported(const ConvShape& s) {
  return weight_grad_fits(s) && weight_grad_smem(s) <= kSmemLimit;
}

int64_t mid_weight_grad_workspace_floats(const ConvShape& s) {
  return int64_t(ceil_div(s.N, kGradImages)) * s.C * s.kh * s.kw;
}

cudaError_t launch_forward_mid(const void* x, const Filter& filter, void* y, const ConvShape& s,
                               cudaStream_t stream) {
  const MidParams p{s, forward_warps(s), rows_in_vectors<float>(x, s.in_stride, s.W, 4), false,
                    rows_in_vectors<float>(y, s.out_stride, s.Wo, 2)};
  const float* in = static_cast<const float*>(x);
  float* out = static_cast<float*>(y);
  switch (chunks(s)) {
    case 3: return forward_band<3>(in, filter, out, p, stream);
    case 4: return forward_band<4>(in, filter, out, p, stream);
    case 5: return forward_band<5>(in, filter, out, p, stream);
    case 6: return forward_band<6>(in, filter, out, p, stream);
    case 7: return forward_band<7>(in, filter, out, p, stream);
    default: return forward_band<8>(in, filter, out, p, stream);
  }
}

cudaError_t launch_weight_grad_mid(const void* x, const void* grad_out, float* workspace,
                                   void* grad_weight, const ConvShape& s, cudaStream_t stream) {
  const MidParams p{s, kMaxWarps, rows_in_vectors<float>(x, s.in_stride, s.W, 4),
                    rows_in_vectors<float>(grad_out, s.out_stride, s.Wo, 4), false};
  const float* in = static_cast<const float*>(x);
  const float* dy = static_cast<const float*>(grad_out);
  cudaError_t err = chunks(s) == 3 ? weight_grad_typed<3>(in, dy, workspace, p, stream)
                                   : weight_grad_typed<4>(in, dy, workspace, p, stream);
  if (err != cudaSuccess) return err;
  return launch_reduce_partials(DType::kFloat32, workspace, ceil_div(s.N, kGradImages),
                                int64_t(s.C) * s.kh * s.kw, grad_weight, stream);
}

}  // namespace lknets
