// Tensor-core depthwise convolution for fp16 / bf16: each channel's convolution as a GEMM.
//
// Per channel c, with the plane flattened (q = qy * W + qx over the input, p = py * Wo + px over
// the output), out[n][p] = sum_q in[n][q] * T[q][p], where T[q][p] = K[qy - py + ph][qx - px + pw]
// (zero outside the kernel) is the plane's Toeplitz-of-Toeplitz matrix. The batch is the GEMM's M
// dimension, so each T element a block builds in shared memory serves 64 multiply-adds on the
// tensor cores; only the q rows that a block's outputs can reach are built and multiplied.
// The weight gradient is the same structure transposed: G[p][q] = sum_n dy[n][p] * x[n][q] on the
// tensor cores, then dw[i][j] = sum over p of G[p][p + (i - ph, j - pw)], a fixed-order sum of the
// in-image diagonals (deterministic, no atomics). Inputs are 16-bit (exact products), accumulation
// fp32, so the precision is that of the direct kernels.
#include "dwconv.h"
#include "common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>

namespace lknets {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 16;
constexpr int kBatchRows = 64;      // GEMM rows (batch entries) per block: 4 row tiles
constexpr int kMaxCols = 128;       // forward: outputs per block, at most 8 column tiles
constexpr int kChunk = 128;         // forward: q rows of T built per step
constexpr int kMaxBinsPerThread = 16;  // weight grad: 63 x 63 taps over 256 threads
constexpr int kGradRows = 64;       // weight grad: rows of G (outputs p) per reduction step
constexpr int kMaxGradPlane = 256;  // weight grad: H * W and Ho * Wo padded to 16, at most



// Element q of plane (n, c): q = qy * w + qx, read through the strides (any layout).
template <typename T>
__device__ __forceinline__ T load_plane(const T* __restrict__ src, const int64_t* stride, int n,
                                        int c, int q, int w, bool contiguous_plane) {
  const T* plane = src + n * stride[0] + c * stride[1];
  if (contiguous_plane) return plane[q];
  const int qy = q / w;
  return plane[qy * stride[2] + (q - qy * w) * stride[3]];
}

// Copies rows [n0, n0 + rows) x columns [q0, q0 + cols) of channel c's (N x plane) matrix into
// dst (row pitch ld), zero where n >= N or q >= plane.
template <typename T>
__device__ __forceinline__ void load_rows(T* dst, int ld, int rows, int cols, const T* __restrict__ src,
                                          const int64_t* stride, int c, int n0, int N, int q0,
                                          int plane, int w, bool contiguous_plane) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T zero = from_float<T>(0.f);
  for (int r = warp; r < rows; r += kWarps) {
    const int n = n0 + r;
#pragma unroll 4
    for (int k = lane; k < cols; k += 32) {
      const int q = q0 + k;
      dst[r * ld + k] = (n < N && q < plane) ? load_plane(src, stride, n, c, q, w, contiguous_plane)
                                             : zero;
    }
  }
}

struct GemmForwardParams {
  ConvShape s;
  int P, Q;          // Ho * Wo, H * W
  int cols;          // outputs per block (multiple of 16, <= kMaxCols)
  int col_blocks;    // ceil(P / cols)
  bool in_contiguous, out_contiguous;  // planes stored densely (q = offset)
};

// grid (col_blocks, C, ceil(N / 64)), 256 threads. Warp w owns row tile w % 4 and column tiles
// w / 4 + 2t, t < 4.
template <typename T>
__global__ void __launch_bounds__(kThreads) gemm_forward_kernel(const T* __restrict__ x,
                                                                const float* __restrict__ weight,
                                                                const float* __restrict__ bias,
                                                                T* __restrict__ y,
                                                                GemmForwardParams p) {
  extern __shared__ float4 smem4[];
  const ConvShape& s = p.s;
  const int c = blockIdx.y;
  const int p0 = blockIdx.x * p.cols;
  const int n0 = blockIdx.z * kBatchRows;
  const int taps = s.kh * s.kw;
  const int ldt = p.cols + 8;    // T chunk: kChunk x cols, 16 bytes of padding per row (banks)
  const int ldx = kChunk + 8;    // X chunk: 64 x kChunk
  const int ldo = p.cols + 4;    // output staging: 64 x cols, fp32

  float* ks = reinterpret_cast<float*>(smem4);
  int2* pyx = reinterpret_cast<int2*>(ks + round_up(taps, 8));  // keeps ts 32-byte aligned
  T* ts = reinterpret_cast<T*>(pyx + p.cols);
  T* xs = ts + kChunk * ldt;
  float* os = reinterpret_cast<float*>(ts);

  const float* wc = weight + static_cast<int64_t>(c) * taps;
  for (int i = threadIdx.x; i < taps; i += kThreads) ks[i] = wc[i];
  for (int col = threadIdx.x; col < p.cols; col += kThreads) {
    const int pp = p0 + col;
    const int py = pp / s.Wo;
    // Columns past the last output get a row no tap reaches, so their T column is zero.
    pyx[col] = pp < p.P ? make_int2(py, pp - py * s.Wo) : make_int2(-(1 << 20), 0);
  }
  // Input rows the block's outputs reach: qy in [py_first - ph, py_last - ph + kh).
  const int p_last = min(p0 + p.cols, p.P) - 1;
  const int qy_lo = max(0, p0 / s.Wo - s.pad_h);
  const int qy_hi = min(s.H, p_last / s.Wo - s.pad_h + s.kh);
  const int q_begin = (qy_lo * s.W) / kTile * kTile;
  const int q_end = qy_hi > qy_lo ? qy_hi * s.W : q_begin;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_tile = warp % 4;
  const int col_tile0 = warp / 4;
  const int col_tiles = p.cols / kTile;
  wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> acc[4];
#pragma unroll
  for (int t = 0; t < 4; ++t) wmma::fill_fragment(acc[t], 0.f);

  for (int q0 = q_begin; q0 < q_end; q0 += kChunk) {
    const int chunk = min(kChunk, round_up(q_end - q0, kTile));
    __syncthreads();
    for (int k = warp; k < chunk; k += kWarps) {
      const int q = q0 + k;
      const int qy = q / s.W;
      const int qx = q - qy * s.W;
      const bool q_ok = q < q_end;
      for (int col = lane; col < p.cols; col += 32) {
        const int2 o = pyx[col];
        const int i = qy - o.x + s.pad_h;
        const int j = qx - o.y + s.pad_w;
        float v = 0.f;
        if (q_ok && static_cast<unsigned>(i) < static_cast<unsigned>(s.kh) &&
            static_cast<unsigned>(j) < static_cast<unsigned>(s.kw))
          v = ks[i * s.kw + j];
        ts[k * ldt + col] = from_float<T>(v);
      }
    }
    load_rows(xs, ldx, kBatchRows, chunk, x, s.in_stride, c, n0, s.N, q0, p.Q, s.W,
              p.in_contiguous);
    __syncthreads();
    for (int kk = 0; kk < chunk; kk += kTile) {
      wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, xs + row_tile * kTile * ldx + kk, ldx);
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        const int ct = col_tile0 + 2 * t;
        if (ct < col_tiles) {
          wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> b;
          wmma::load_matrix_sync(b, ts + kk * ldt + ct * kTile, ldt);
          wmma::mma_sync(acc[t], a, b, acc[t]);
        }
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    const int ct = col_tile0 + 2 * t;
    if (ct < col_tiles)
      wmma::store_matrix_sync(os + row_tile * kTile * ldo + ct * kTile, acc[t], ldo,
                              wmma::mem_row_major);
  }
  __syncthreads();
  const float b = bias ? bias[c] : 0.f;
  for (int r = warp; r < kBatchRows; r += kWarps) {
    const int n = n0 + r;
    if (n >= s.N) break;
    T* out = y + n * s.out_stride[0] + c * s.out_stride[1];
    for (int col = lane; col < p.cols; col += 32) {
      const int pp = p0 + col;
      if (pp >= p.P) break;
      const T v = from_float<T>(os[r * ldo + col] + b);
      if (p.out_contiguous) {
        out[pp] = v;
      } else {
        const int2 o = pyx[col];
        out[o.x * s.out_stride[2] + o.y * s.out_stride[3]] = v;
      }
    }
  }
}

struct GemmWeightGradParams {
  ConvShape s;
  int P, Q, Pp, Qp;  // plane sizes and their 16-multiples
  bool in_contiguous, out_contiguous;
};

// grid (C), 256 threads. Per batch chunk of 64: x and dy of the channel in shared memory; then,
// kGradRows outputs p at a time, G = dy^T x on the tensor cores into shared memory and the
// diagonal sums into per-thread tap accumulators (tap b = threadIdx.x + 256 r).
template <typename T>
__global__ void __launch_bounds__(kThreads) gemm_weight_grad_kernel(const T* __restrict__ x,
                                                                    const T* __restrict__ dy,
                                                                    T* __restrict__ dw,
                                                                    GemmWeightGradParams p) {
  extern __shared__ float4 smem4[];
  const ConvShape& s = p.s;
  const int c = blockIdx.x;
  const int ldx = p.Qp + 8, ldd = p.Pp + 8, ldg = p.Qp + 4;
  T* xs = reinterpret_cast<T*>(smem4);
  T* ds = xs + kBatchRows * ldx;
  float* gs = reinterpret_cast<float*>(ds + kBatchRows * ldd);
  const int warp = threadIdx.x / 32;
  const int taps = s.kh * s.kw;
  const int col_tiles = p.Qp / kTile;

  float acc[kMaxBinsPerThread] = {};
  for (int n0 = 0; n0 < s.N; n0 += kBatchRows) {
    __syncthreads();
    load_rows(xs, ldx, kBatchRows, p.Qp, x, s.in_stride, c, n0, s.N, 0, p.Q, s.W, p.in_contiguous);
    load_rows(ds, ldd, kBatchRows, p.Pp, dy, s.out_stride, c, n0, s.N, 0, p.P, s.Wo,
              p.out_contiguous);
    const int k_end = round_up(min(kBatchRows, s.N - n0), kTile);
    for (int p0 = 0; p0 < p.Pp; p0 += kGradRows) {
      __syncthreads();
      const int row_tiles = min(kGradRows, p.Pp - p0) / kTile;
      for (int t = warp; t < row_tiles * col_tiles; t += kWarps) {
        const int rt = t % row_tiles, ct = t / row_tiles;
        wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float> g;
        wmma::fill_fragment(g, 0.f);
        for (int kk = 0; kk < k_end; kk += kTile) {
          wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::col_major> a;
          wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major> b;
          wmma::load_matrix_sync(a, ds + kk * ldd + p0 + rt * kTile, ldd);
          wmma::load_matrix_sync(b, xs + kk * ldx + ct * kTile, ldx);
          wmma::mma_sync(g, a, b, g);
        }
        wmma::store_matrix_sync(gs + rt * kTile * ldg + ct * kTile, g, ldg, wmma::mem_row_major);
      }
      __syncthreads();
      const int p_end = min(p0 + kGradRows, p.P);
#pragma unroll
      for (int r = 0; r < kMaxBinsPerThread; ++r) {
        const int tap = threadIdx.x + r * kThreads;
        if (tap >= taps) break;
        const int i = tap / s.kw;
        const int di = i - s.pad_h, dj = tap - i * s.kw - s.pad_w;
        const int py_lo = max(max(0, -di), p0 / s.Wo);
        const int py_hi = min(min(s.Ho, s.H - di), ceil_div(p_end, s.Wo));
        const int px_lo = max(0, -dj), px_hi = min(s.Wo, s.W - dj);
        float sum = 0.f;
        for (int py = py_lo; py < py_hi; ++py) {
          const int row = py * s.Wo - p0;  // G row of (py, 0), may be negative
          const int a = max(px_lo, -row), e = min(px_hi, p_end - p0 - row);
          const float* g = gs + row * ldg + (py + di) * s.W + dj;
          for (int px = a; px < e; ++px) sum += g[px * (ldg + 1)];
        }
        acc[r] += sum;
      }
    }
  }
  T* out = dw + static_cast<int64_t>(c) * taps;
#pragma unroll
  for (int r = 0; r < kMaxBinsPerThread; ++r) {
    const int tap = threadIdx.x + r * kThreads;
    if (tap < taps) out[tap] = from_float<T>(acc[r]);
  }
}

bool dense_plane(const int64_t* stride, int w) { return stride[3] == 1 && stride[2] == w; }

GemmForwardParams plan_gemm_forward(const ConvShape& s) {
  GemmForwardParams p{};
  p.s = s;
  p.P = s.Ho * s.Wo;
  p.Q = s.H * s.W;
  const int blocks = ceil_div(p.P, kMaxCols);
  p.cols = round_up(ceil_div(p.P, blocks), kTile);
  p.col_blocks = ceil_div(p.P, p.cols);
  p.in_contiguous = dense_plane(s.in_stride, s.W);
  p.out_contiguous = dense_plane(s.out_stride, s.Wo);
  return p;
}

int64_t gemm_forward_smem(const GemmForwardParams& p, int elt) {
  const int64_t head = 4LL * round_up(p.s.kh * p.s.kw, 8) + 8LL * p.cols;
  const int64_t tiles = int64_t(elt) * (kChunk * (p.cols + 8) + kBatchRows * (kChunk + 8));
  const int64_t staging = 4LL * kBatchRows * (p.cols + 4);
  return head + std::max(tiles, staging);
}

GemmWeightGradParams plan_gemm_weight_grad(const ConvShape& s) {
  GemmWeightGradParams p{};
  p.s = s;
  p.P = s.Ho * s.Wo;
  p.Q = s.H * s.W;
  p.Pp = round_up(p.P, kTile);
  p.Qp = round_up(p.Q, kTile);
  p.in_contiguous = dense_plane(s.in_stride, s.W);
  p.out_contiguous = dense_plane(s.out_stride, s.Wo);
  return p;
}

int64_t gemm_weight_grad_smem(const GemmWeightGradParams& p, int elt) {
  return int64_t(elt) * kBatchRows * (p.Qp + 8 + p.Pp + 8) + 4LL * kGradRows * (p.Qp + 4);
}

template <typename T>
cudaError_t gemm_forward_typed(const void* x, const float* weight, const float* bias, void* y,
                               const ConvShape& s, cudaStream_t stream) {
  const GemmForwardParams p = plan_gemm_forward(s);
  const int64_t smem = gemm_forward_smem(p, sizeof(T));
  cudaError_t err = allow_smem(gemm_forward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.col_blocks, s.C, ceil_div(s.N, kBatchRows));
  gemm_forward_kernel<T><<<grid, kThreads, smem, stream>>>(static_cast<const T*>(x), weight, bias,
                                                           static_cast<T*>(y), p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gemm_weight_grad_typed(const void* x, const void* dy, void* dw, const ConvShape& s,
                                   cudaStream_t stream) {
  const GemmWeightGradParams p = plan_gemm_weight_grad(s);
  const int64_t smem = gemm_weight_grad_smem(p, sizeof(T));
  cudaError_t err = allow_smem(gemm_weight_grad_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  gemm_weight_grad_kernel<T><<<s.C, kThreads, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dw), p);
  return cudaGetLastError();
}

}  // namespace

bool gemm_forward_supported(DType dtype, const ConvShape& s) {
  if (dtype == DType::kFloat32) return false;
  return gemm_forward_smem(plan_gemm_forward(s), 2) <= 200 * 1024;
}

bool gemm_weight_grad_supported(DType dtype, const ConvShape& s) {
  if (dtype == DType::kFloat32) return false;
  return round_up(s.H * s.W, kTile) <= kMaxGradPlane &&
         round_up(s.Ho * s.Wo, kTile) <= kMaxGradPlane &&
         s.kh * s.kw <= kMaxBinsPerThread * kThreads;
}

cudaError_t launch_forward_gemm(DType dtype, const void* x, const float* weight, const float* bias,
                                void* y, const ConvShape& shape, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return gemm_forward_typed<__half>(x, weight, bias, y, shape, stream);
    case DType::kBFloat16:
      return gemm_forward_typed<__nv_bfloat16>(x, weight, bias, y, shape, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_weight_grad_gemm(DType dtype, const void* x, const void* grad_out,
                                    void* grad_weight, const ConvShape& shape, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return gemm_weight_grad_typed<__half>(x, grad_out, grad_weight, shape, stream);
    case DType::kBFloat16:
      return gemm_weight_grad_typed<__nv_bfloat16>(x, grad_out, grad_weight, shape, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace lknets
