// Direct depthwise convolution kernels (stride 1, dilation 1, any kernel size) for sm_80 / sm_90.
//
// All three directions are one correlation, out[a] += sum_b B[b] * X[a + b] over 2-D index ranges:
//   forward / input grad: a = output pixel, b = kernel tap, B = weights (flipped for the input grad),
//                         X = a tile of the (zero-padded) input;
//   weight grad:          a = kernel tap, b = output pixel, B = grad_out tile, X = the input tile.
// B is the same for every thread of a block, so its shared-memory reads are broadcasts; each thread
// keeps kR x kS outputs in registers and slides a kS + kJ - 1 wide window of X along b, giving
// kR * kS * kJ FMAs per window load. X rows or window steps that lie wholly in the zero padding
// are skipped, which is where the large kernels on small maps save most of their work.
// Tiles are stored in shared memory as fp32, so fp16/bf16 only change the global loads and stores;
// accumulation is always fp32.
#include "dwconv.h"
#include "common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

namespace lknets {
namespace {

constexpr int kR = 8;        // a-rows per thread
constexpr int kS = 4;        // a-columns per thread
constexpr int kJ = 8;        // b-columns per window step (B is zero-padded to a multiple of kJ)
constexpr int kWindow = 12;  // kS + kJ - 1 = 11 X values, read as three float4
constexpr int kMaxThreads = 256;
constexpr int kSmemLimit = 160 * 1024;




// acc[r][s] += sum_{br < b_rows, bc < b_cols} B[br][bc] * X[a_r0 + r + br][a_c0 + s + bc].
// X row t holds image row x_row0 + t and X column v image column x_col0 + v; rows and window
// steps outside [0, img_h) x [0, img_w) hold zeros and are skipped.
__device__ __forceinline__ void correlate(float (&acc)[kR][kS], const float* __restrict__ xs,
                                          int x_stride, const float* __restrict__ bs, int b_stride,
                                          int b_rows, int b_cols, int a_r0, int a_c0, int x_row0,
                                          int x_col0, int img_h, int img_w) {
  const int u_begin = max(0, -x_row0 - a_r0);
  const int u_end = min(kR + b_rows - 1, img_h - x_row0 - a_r0);
  const int first_col = x_col0 + a_c0;
  const int bc_begin = round_up(max(0, -first_col - (kWindow - 2)), kJ);
  const int bc_end = min(b_cols, img_w - first_col);
  for (int u = u_begin; u < u_end; ++u) {
    const float* xrow = xs + (a_r0 + u) * x_stride + a_c0;
    for (int bc = bc_begin; bc < bc_end; bc += kJ) {
      const float4* xv = reinterpret_cast<const float4*>(xrow + bc);
      const float4 x0 = xv[0], x1 = xv[1], x2 = xv[2];
      const float win[kWindow] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y,
                                  x1.z, x1.w, x2.x, x2.y, x2.z, x2.w};
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        const int br = u - r;
        if (br >= 0 && br < b_rows) {
          const float4* bv = reinterpret_cast<const float4*>(bs + br * b_stride + bc);
          const float4 b0 = bv[0], b1 = bv[1];
          const float b[kJ] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
          for (int j = 0; j < kJ; ++j) {
#pragma unroll
            for (int s = 0; s < kS; ++s) acc[r][s] = fmaf(b[j], win[s + j], acc[r][s]);
          }
        }
      }
    }
  }
}

// Fills a rows x cols fp32 tile with src[n][c][row0 + t][col0 + v] (zero outside the image).
// Each thread owns one column and walks the rows, so the index arithmetic stays out of the loop.
template <typename T>
__device__ __forceinline__ void load_tile(float* dst, int rows, int cols, const T* __restrict__ src,
                                          const int64_t* stride, int n, int c, int row0, int col0,
                                          int img_h, int img_w, bool valid_plane) {
  const T* plane = src + n * stride[0] + c * stride[1];
  const int threads = blockDim.x;
  const int row_step = max(1, threads / cols);
  for (int v0 = 0; v0 < cols; v0 += threads) {
    const int v = v0 + threadIdx.x % min(cols, threads);
    const int t_first = threads >= cols ? threadIdx.x / cols : 0;
    if (v >= cols || t_first >= row_step) continue;
    const int gx = col0 + v;
    const bool col_ok = valid_plane && gx >= 0 && gx < img_w;
    const T* col_src = plane + gx * stride[3];
    for (int t = t_first; t < rows; t += row_step) {
      const int gy = row0 + t;
      float value = 0.f;
      if (col_ok && gy >= 0 && gy < img_h) value = to_float(col_src[gy * stride[2]]);
      dst[t * cols + v] = value;
    }
  }
}

struct ForwardParams {
  ConvShape s;
  int row_groups, col_groups, planes;  // per block: planes x (row_groups * kR) x (col_groups * kS)
  int lanes;                           // threads per row group: planes * col_groups rounded to 32
  int tiles_w;
  int b_cols;  // kw rounded up to kJ
  int x_rows, x_cols;
};

// grid (C, tiles_h * tiles_w, ceil(N / planes)); blocks of row_groups * lanes threads. The threads of
// one row group fill whole warps, so the row range a warp walks is the same for all its lanes.
template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const Filter filter, T* __restrict__ y,
                               ForwardParams p) {
  extern __shared__ float4 smem4[];
  float* ws = reinterpret_cast<float*>(smem4);
  float* xs = ws + p.s.kh * p.b_cols;
  const ConvShape& s = p.s;
  const int c = blockIdx.x;
  const int tile_r = blockIdx.y / p.tiles_w;
  const int tile_c = blockIdx.y - tile_r * p.tiles_w;
  const int oy0 = tile_r * p.row_groups * kR;
  const int ox0 = tile_c * p.col_groups * kS;
  const int n0 = blockIdx.z * p.planes;

  for (int i = threadIdx.x; i < s.kh * p.b_cols; i += blockDim.x) {
    const int r = i / p.b_cols;
    const int col = i - r * p.b_cols;
    ws[i] = col < s.kw ? filter_tap<T>(filter, c, r, col) : 0.f;
  }
  const int plane_floats = p.x_rows * p.x_cols;
  for (int q = 0; q < p.planes; ++q)
    load_tile(xs + q * plane_floats, p.x_rows, p.x_cols, x, s.in_stride, min(n0 + q, s.N - 1), c,
              oy0 - s.pad_h, ox0 - s.pad_w, s.H, s.W, n0 + q < s.N);
  __syncthreads();

  const int rg = threadIdx.x / p.lanes;
  const int rem = threadIdx.x - rg * p.lanes;
  const int q = rem / p.col_groups;
  const int cg = rem - q * p.col_groups;
  const int n = n0 + q;
  if (q >= p.planes || n >= s.N) return;

  float acc[kR][kS] = {};
  correlate(acc, xs + q * plane_floats, p.x_cols, ws, p.b_cols, s.kh, p.b_cols, rg * kR, cg * kS,
            oy0 - s.pad_h, ox0 - s.pad_w, s.H, s.W);

  const float b = filter_bias<T>(filter, c);
  T* out = y + n * s.out_stride[0] + c * s.out_stride[1];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    const int oy = oy0 + rg * kR + r;
#pragma unroll
    for (int j = 0; j < kS; ++j) {
      const int ox = ox0 + cg * kS + j;
      if (oy < s.Ho && ox < s.Wo)
        out[oy * s.out_stride[2] + ox * s.out_stride[3]] = from_float<T>(acc[r][j] + b);
    }
  }
}

struct WeightGradParams {
  ConvShape s;
  int row_groups, col_groups;     // taps per block: (row_groups * kR) x (col_groups * kS) >= kh x kw
  int row_splits, rows_per_split; // the dy tile's rows are split among row_splits thread groups
  int planes;                     // planes loaded and reduced in parallel
  int planes_per_block;           // planes reduced by one block (a multiple of planes)
  int tile_h, tile_w, tiles_w;    // dy tile (tile_w a multiple of kJ)
  int x_rows, x_cols;
};

// grid (C, tiles_h * tiles_w, n_splits); partial sums go to
// workspace[(blockIdx.z * tiles + blockIdx.y) * C + c][kh][kw].
template <typename T>
__global__ void weight_grad_kernel(const T* __restrict__ x, const T* __restrict__ dy,
                                   float* __restrict__ workspace, WeightGradParams p) {
  extern __shared__ float4 smem4[];
  float* smem = reinterpret_cast<float*>(smem4);
  const ConvShape& s = p.s;
  const int c = blockIdx.x;
  const int tile_r = blockIdx.y / p.tiles_w;
  const int tile_c = blockIdx.y - tile_r * p.tiles_w;
  const int oy0 = tile_r * p.tile_h;
  const int ox0 = tile_c * p.tile_w;
  const int rows_here = min(p.tile_h, s.Ho - oy0);
  const int n_begin = blockIdx.z * p.planes_per_block;
  const int n_end = min(s.N, n_begin + p.planes_per_block);

  const int taps = p.row_groups * p.col_groups;
  const int tg = threadIdx.x % taps;
  const int group = threadIdx.x / taps;
  const int split = group % p.row_splits;
  const int q = group / p.row_splits;
  const int rg = tg / p.col_groups;
  const int cg = tg - rg * p.col_groups;
  const int split_row0 = split * p.rows_per_split;
  const int split_rows = min(p.rows_per_split, rows_here - split_row0);

  const int x_floats = p.x_rows * p.x_cols;
  const int slot_floats = x_floats + p.tile_h * p.tile_w;
  float acc[kR][kS] = {};
  for (int nb = n_begin; nb < n_end; nb += p.planes) {
    __syncthreads();
    for (int k = 0; k < p.planes; ++k) {
      const int n = min(nb + k, s.N - 1);
      const bool valid = nb + k < n_end;
      float* slot = smem + k * slot_floats;
      load_tile(slot, p.x_rows, p.x_cols, x, s.in_stride, n, c, oy0 - s.pad_h, ox0 - s.pad_w, s.H,
                s.W, valid);
      load_tile(slot + x_floats, p.tile_h, p.tile_w, dy, s.out_stride, n, c, oy0, ox0, s.Ho, s.Wo,
                valid);
    }
    __syncthreads();
    if (nb + q < n_end && split_rows > 0) {
      const float* slot = smem + q * slot_floats;
      correlate(acc, slot + split_row0 * p.x_cols, p.x_cols,
                slot + x_floats + split_row0 * p.tile_w, p.tile_w, split_rows, p.tile_w, rg * kR,
                cg * kS, oy0 - s.pad_h + split_row0, ox0 - s.pad_w, s.H, s.W);
    }
  }

  // Fixed-order reduction over the thread groups: red[k][thread], k = r * kS + j.
  __syncthreads();
  const int threads = blockDim.x;
#pragma unroll
  for (int r = 0; r < kR; ++r) {
#pragma unroll
    for (int j = 0; j < kS; ++j) smem[(r * kS + j) * threads + threadIdx.x] = acc[r][j];
  }
  __syncthreads();
  const int groups = threads / taps;
  const int64_t kernel_area = static_cast<int64_t>(s.kh) * s.kw;
  float* out = workspace +
               ((static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * s.C + c) * kernel_area;
  for (int idx = threadIdx.x; idx < taps * kR * kS; idx += threads) {
    const int k = idx / taps;
    const int t = idx - k * taps;
    const int i = (t / p.col_groups) * kR + k / kS;
    const int j = (t % p.col_groups) * kS + k % kS;
    if (i >= s.kh || j >= s.kw) continue;
    float sum = 0.f;
    for (int g = 0; g < groups; ++g) sum += smem[k * threads + g * taps + t];
    out[i * s.kw + j] = sum;
  }
}

template <typename T>
__global__ void reduce_partials_kernel(const float* __restrict__ partials, int num_partials,
                                       int64_t count, T* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= count) return;
  float sum = 0.f;
  for (int k = 0; k < num_partials; ++k) sum += partials[k * count + idx];
  out[idx] = from_float<T>(sum);
}

ForwardParams plan_forward(const ConvShape& s, int num_sms) {
  ForwardParams p{};
  p.s = s;
  p.b_cols = round_up(s.kw, kJ);
  p.tiles_w = ceil_div(s.Wo, 64);
  p.col_groups = ceil_div(ceil_div(s.Wo, p.tiles_w), kS);
  p.x_cols = p.col_groups * kS + p.b_cols;
  double best = -1.0;
  for (int planes = 1; planes <= std::min(s.N, 8); ++planes) {
    for (int rg = 1; rg <= std::min(ceil_div(s.Ho, kR), 16); ++rg) {
      const int lanes = round_up(planes * p.col_groups, 32);
      const int threads = rg * lanes;
      if (threads > kMaxThreads && !(planes == 1 && rg == 1)) continue;
      const int x_rows = rg * kR + s.kh - 1;
      const int64_t smem = 4LL * (s.kh * p.b_cols + planes * x_rows * p.x_cols);
      if (smem > kSmemLimit && !(planes == 1 && rg == 1)) continue;
      const int tiles_h = ceil_div(s.Ho, rg * kR);
      const double rows_used = double(s.Ho) / (tiles_h * rg * kR);
      const double planes_used = double(s.N) / (ceil_div(s.N, planes) * planes);
      const double lanes_used = double(planes * p.col_groups) / lanes;
      const double size = std::min(1.0, threads / 128.0);
      const double halo = double(rg * kR) / (rg * kR + s.kh - 1);
      const double blocks = double(s.C) * tiles_h * p.tiles_w * ceil_div(s.N, planes);
      const double waves = std::min(1.0, blocks / (2.0 * num_sms));
      // Resident warps per SM (shared memory bounds the blocks); 16 keep the FMA pipes busy.
      const int64_t blocks_per_sm = std::min<int64_t>(228 * 1024 / (smem + 1024), 2048 / threads);
      const double occupancy = std::min(1.0, blocks_per_sm * threads / 32 / 16.0);
      const double score = rows_used * planes_used * lanes_used * std::sqrt(size) *
                           std::pow(halo, 0.2) * std::sqrt(waves) * occupancy;
      if (score > best) {
        best = score;
        p.planes = planes;
        p.row_groups = rg;
        p.lanes = lanes;
        p.x_rows = x_rows;
      }
    }
  }
  return p;
}

WeightGradParams plan_weight_grad(const ConvShape& s, int num_sms) {
  WeightGradParams p{};
  p.s = s;
  p.row_groups = ceil_div(s.kh, kR);
  p.col_groups = ceil_div(s.kw, kS);
  const int taps = p.row_groups * p.col_groups;
  p.tiles_w = ceil_div(s.Wo, 64);
  p.tile_w = round_up(ceil_div(s.Wo, p.tiles_w), kJ);
  const int tiles_h = ceil_div(s.Ho, 64);
  p.tile_h = ceil_div(s.Ho, tiles_h);
  p.row_splits = std::max(1, std::min(128 / taps, p.tile_h));
  p.rows_per_split = ceil_div(p.tile_h, p.row_splits);
  p.row_splits = ceil_div(p.tile_h, p.rows_per_split);
  p.x_rows = p.row_groups * kR + p.tile_h - 1;
  p.x_cols = p.col_groups * kS + p.tile_w;
  const int slot_floats = p.x_rows * p.x_cols + p.tile_h * p.tile_w;
  const int threads1 = taps * p.row_splits;
  p.planes = std::max(1, std::min({128 / threads1, s.N, 8}));
  while (p.planes > 1 && 4LL * p.planes * slot_floats > 96 * 1024) --p.planes;
  const int tiles = tiles_h * p.tiles_w;
  const int base_blocks = s.C * tiles;
  int n_splits = std::max(1, std::min(ceil_div(8 * num_sms, base_blocks), ceil_div(s.N, p.planes)));
  p.planes_per_block = round_up(ceil_div(s.N, n_splits), p.planes);
  return p;
}

int weight_grad_threads(const WeightGradParams& p) {
  return p.row_groups * p.col_groups * p.row_splits * p.planes;
}

int64_t weight_grad_smem(const WeightGradParams& p) {
  const int64_t tiles = int64_t(p.planes) * (p.x_rows * p.x_cols + p.tile_h * p.tile_w);
  const int64_t red = int64_t(weight_grad_threads(p)) * kR * kS;
  return 4 * std::max(tiles, red);
}

int num_partials(const WeightGradParams& p) {
  const int tiles = ceil_div(p.s.Ho, p.tile_h) * p.tiles_w;
  return ceil_div(p.s.N, p.planes_per_block) * tiles;
}

int device_sms() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? sms : 80;
}

template <typename T>
cudaError_t forward_typed(const void* x, const Filter& filter, void* y, const ConvShape& s,
                          cudaStream_t stream) {
  const ForwardParams p = plan_forward(s, device_sms());
  const int threads = p.row_groups * p.lanes;
  const int64_t smem = 4LL * (s.kh * p.b_cols + p.planes * p.x_rows * p.x_cols);
  cudaError_t err = allow_smem(forward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(s.C, ceil_div(s.Ho, p.row_groups * kR) * p.tiles_w, ceil_div(s.N, p.planes));
  forward_kernel<T><<<grid, threads, smem, stream>>>(static_cast<const T*>(x), filter,
                                                     static_cast<T*>(y), p);
  return cudaGetLastError();
}

template <typename T>
constexpr DType dtype_of();
template <>
constexpr DType dtype_of<float>() { return DType::kFloat32; }
template <>
constexpr DType dtype_of<__half>() { return DType::kFloat16; }
template <>
constexpr DType dtype_of<__nv_bfloat16>() { return DType::kBFloat16; }

template <typename T>
cudaError_t weight_grad_typed(const void* x, const void* dy, float* workspace, void* dw,
                              const ConvShape& s, cudaStream_t stream) {
  const WeightGradParams p = plan_weight_grad(s, device_sms());
  const int64_t smem = weight_grad_smem(p);
  cudaError_t err = allow_smem(weight_grad_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(s.C, ceil_div(s.Ho, p.tile_h) * p.tiles_w, ceil_div(s.N, p.planes_per_block));
  weight_grad_kernel<T><<<grid, weight_grad_threads(p), smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(dy), workspace, p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_reduce_partials(dtype_of<T>(), workspace, num_partials(p),
                                int64_t(s.C) * s.kh * s.kw, dw, stream);
}

}  // namespace

bool supports(Formulation f, bool weight_grad, DType dtype, const ConvShape& s) {
  switch (f) {
    case Formulation::kDirect:
    case Formulation::kRows: return true;
    case Formulation::kPlane:
      return weight_grad ? gemm_weight_grad_supported(s) : gemm_forward_supported(s);
    case Formulation::kSmall: return small_supported(s);
    case Formulation::kMid:
      return dtype == DType::kFloat32 &&
             (weight_grad ? mid_weight_grad_supported(s) : mid_forward_supported(s));
  }
  return false;
}

cudaError_t launch_forward(Formulation f, DType dtype, const void* x, const Filter& filter,
                           void* y, const ConvShape& shape, cudaStream_t stream) {
  switch (f) {
    case Formulation::kPlane: return launch_forward_gemm(dtype, x, filter, y, shape, stream);
    case Formulation::kRows: return launch_forward_rows(dtype, x, filter, y, shape, stream);
    case Formulation::kSmall: return launch_forward_small(dtype, x, filter, y, shape, stream);
    case Formulation::kMid: return launch_forward_mid(x, filter, y, shape, stream);
    case Formulation::kDirect: break;
  }
  switch (dtype) {
    case DType::kFloat32: return forward_typed<float>(x, filter, y, shape, stream);
    case DType::kFloat16: return forward_typed<__half>(x, filter, y, shape, stream);
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(x, filter, y, shape, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t weight_grad_workspace_floats(Formulation f, DType dtype, const ConvShape& shape) {
  switch (f) {
    case Formulation::kPlane:
    case Formulation::kSmall: return 0;
    case Formulation::kMid: return mid_weight_grad_workspace_floats(shape);
    case Formulation::kRows: return rows_weight_grad_workspace_floats(dtype, shape, device_sms());
    case Formulation::kDirect: break;
  }
  const WeightGradParams p = plan_weight_grad(shape, device_sms());
  return int64_t(num_partials(p)) * shape.C * shape.kh * shape.kw;
}

cudaError_t launch_weight_grad(Formulation f, DType dtype, const void* x, const void* grad_out,
                               float* workspace, void* grad_weight, const ConvShape& shape,
                               cudaStream_t stream) {
  switch (f) {
    case Formulation::kPlane:
      return launch_weight_grad_gemm(dtype, x, grad_out, grad_weight, shape, stream);
    case Formulation::kRows:
      return launch_weight_grad_rows(dtype, x, grad_out, workspace, grad_weight, shape,
                                     device_sms(), stream);
    case Formulation::kSmall:
      return launch_weight_grad_small(dtype, x, grad_out, grad_weight, shape, stream);
    case Formulation::kMid:
      return launch_weight_grad_mid(x, grad_out, workspace, grad_weight, shape, stream);
    case Formulation::kDirect: break;
  }
  switch (dtype) {
    case DType::kFloat32:
      return weight_grad_typed<float>(x, grad_out, workspace, grad_weight, shape, stream);
    case DType::kFloat16:
      return weight_grad_typed<__half>(x, grad_out, workspace, grad_weight, shape, stream);
    case DType::kBFloat16:
      return weight_grad_typed<__nv_bfloat16>(x, grad_out, workspace, grad_weight, shape, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_reduce_partials(DType dtype, const float* partials, int num_partials,
                                   int64_t count, void* out, cudaStream_t stream) {
  const int block = 256;
  const unsigned grid = static_cast<unsigned>((count + block - 1) / block);
  switch (dtype) {
    case DType::kFloat32:
      reduce_partials_kernel<float><<<grid, block, 0, stream>>>(partials, num_partials, count,
                                                                static_cast<float*>(out));
      break;
    case DType::kFloat16:
      reduce_partials_kernel<__half><<<grid, block, 0, stream>>>(partials, num_partials, count,
                                                                 static_cast<__half*>(out));
      break;
    case DType::kBFloat16:
      reduce_partials_kernel<__nv_bfloat16><<<grid, block, 0, stream>>>(
          partials, num_partials, count, static_cast<__nv_bfloat16*>(out));
      break;
  }
  return cudaGetLastError();
}

}  // namespace lknets
