// Small-plane tensor-core formulation (planes of at most 16 x 16): the batch is M. fp16 / bf16 run
// m16n8k16 MMAs; fp32 runs the same tiles as 3xTF32 m16n8k8 MMAs (common.cuh: split operands,
// three products), its input planes staged already split, in fragment order.
//
// With at most 16 columns every image row is one 16-wide tile, so kernel row i is one 16x16
// Toeplitz tile T_i (input columns x output columns, T_i[qx][ox] = K[i][qx - ox + pw]) and
// out[n][oy][:] = sum over input rows qy of x[n][qy][:] T_{qy - oy + ph}. A block owns one channel
// and 32 images: it stages their planes as rows (qy, n) of 16 columns, builds the kh tiles once,
// and warp w computes output rows w and w + 8 of every image, one m16n8k16 pair per 16 images and
// (input row, output row) pair within the kernel's reach; pairs out of reach are skipped.
// Weight gradient: G_i = sum over output rows oy and images of dy[:, oy, :]^T x[:, oy + i - ph, :]
// (output columns x input columns), warp w owning kernel rows first + w, first + w + 8, ... of
// the rows that reach the plane (ReachedRows; the others' gradient is zero); dw[i][j] is the sum
// of G_i's diagonal j. One block per channel goes through all images in a fixed order, so the
// result is deterministic and needs no workspace. Tall kernels run here as they are (not on the
// transposed view, see ops.cpp) when the plane's rows are contiguous.
#include "dwconv.h"
#include "common.cuh"

#include <algorithm>

namespace lknets {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Images per forward block. 32 rather than 64 (H100, bf16 f+b): UniRepLKNet 14x14 0.096 ->
// 0.078 ms, RepLKNet-31B@384 stage 4 0.119 -> 0.093: half the accumulators, twice the blocks.
constexpr int kForwardImages = 32;
constexpr int kForwardTiles = kForwardImages / 16;
// Images per weight-grad step; 32 for batches that small (half the shared memory, more blocks
// per SM: RepLKNet-31B@384's stage 4 at batch 32, 0.048 -> 0.035 ms on the H100).
constexpr int kGradImages = 64;
constexpr int kPlane = 16;           // the largest plane side
// Elements per staged 16-wide row: ldmatrix (16-bit) and the fp32 scalar fragment loads of the
// weight gradient (pitch 24) without bank conflicts.
constexpr int kPitch = 24;
constexpr int kTileElems = 16 * kPitch;
constexpr int kPaddedRow = 32;       // fp32 forward: kernel row taps j = pw - 15 .. pw + 15
constexpr int kScratchPitch = 20;    // weight grad: a warp's 16x16 fp32 scratch tile

// Rows (y, g) of dst (pitch Pitch), y < h, g < Images, hold row y of image n0 + g, columns 0..15
// (zero at columns >= w and images >= N). fp32 elements are copied one by one with cp.async; 16-bit
// ones two at a time with cp.async when `pairs` (rows contiguous, every row starting on an even
// element, w even); these complete after cp_async_wait_all. Otherwise element by element, loads
// batched so that several are in flight.
template <int Images, int Pitch, typename T>
__device__ __forceinline__ void stage_planes(T* dst, const T* __restrict__ src,
                                            const int64_t* stride, int c, int n0, int N, int h,
                                            int w, bool pairs) {
  const T* channel = src + c * stride[1];
  if constexpr (std::is_same<T, float>::value) {
    for (int e = threadIdx.x; e < h * Images * kPlane; e += kThreads) {
      const int col = e % kPlane, g = (e / kPlane) % Images, y = e / (kPlane * Images);
      const bool ok = col < w && n0 + g < N;
      const T* from = ok ? channel + (n0 + g) * stride[0] + y * stride[2] + col * stride[3] : channel;
      cp_async_4(dst + (y * Images + g) * Pitch + col, from, ok);
    }
    return;
  }
  if (pairs) {
    constexpr int kChunks = kPlane / 2;
    for (int e = threadIdx.x; e < h * Images * kChunks; e += kThreads) {
      const int col = 2 * (e % kChunks), g = (e / kChunks) % Images, y = e / (kChunks * Images);
      const bool ok = col < w && n0 + g < N;
      const T* from = ok ? channel + (n0 + g) * stride[0] + y * stride[2] + col : channel;
      cp_async_4(dst + (y * Images + g) * Pitch + col, from, ok);
    }
    return;
  }
  constexpr int kBatch = 8;
  const int total = h * Images * kPlane;
  unsigned short* out = reinterpret_cast<unsigned short*>(dst);
  for (int e0 = threadIdx.x; e0 < total; e0 += kBatch * kThreads) {
    unsigned short v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = e0 + u * kThreads;
      const int col = e % kPlane, g = (e / kPlane) % Images, y = e / (kPlane * Images);
      const int n = n0 + g;
      v[u] = 0;
      if (e < total && col < w && n < N)
        v[u] = bits_of(channel[n * stride[0] + y * stride[2] + col * stride[3]]);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = e0 + u * kThreads;
      if (e < total) out[(e / kPlane) * Pitch + e % kPlane] = v[u];
    }
  }
}

// How a 16x16 tile of staged planes (16 images x 16 columns) serves as an MMA operand.
enum class Operand {
  kA,  // A: images x columns (forward input)
  kB,  // B: images x columns (weight-gradient input)
};

// fp32 planes staged as split fragments: tile (y, m) at dst + (y * Images / 16 + m) *
// kSplitTileFloats holds row y of images n0 + 16 m .. + 15 (columns 0..15, zero at columns >= w
// and images >= N) as `op`, split and in fragment order (common.cuh: store_split_b), so that
// every warp loads it with four 16-byte loads and no conversion: each element is split once
// rather than by every warp that multiplies it. A thread converts one lane's share of a tile at
// a time, Batch tiles' loads in flight (registers allowing).
template <int Images, Operand op, int Batch>
__device__ __forceinline__ void stage_split_tiles(float* dst, const float* __restrict__ src,
                                                  const int64_t* stride, int c, int n0, int N,
                                                  int h, int w) {
  constexpr int kTiles = Images / 16;
  const float* channel = src + c * stride[1];
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int total = h * kTiles * 32;
  for (int f0 = threadIdx.x; f0 < total; f0 += Batch * kThreads) {
    float v[Batch][2][4];
#pragma unroll
    for (int u = 0; u < Batch; ++u) {
      const int tile = (f0 + u * kThreads) / 32, y = tile / kTiles, m = tile % kTiles;
#pragma unroll
      for (int kk = 0; kk < 2; ++kk)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          // (image, column) of register e of k half kk (m16n8k8 TF32 layouts, common.cuh).
          int n, col;
          if constexpr (op == Operand::kA) {
            n = g + 8 * (e % 2), col = 8 * kk + t + 4 * (e / 2);
          } else {
            n = 8 * kk + t + 4 * (e % 2), col = 8 * (e / 2) + g;
          }
          n += n0 + 16 * m;
          v[u][kk][e] = y < h && n < N && col < w
                            ? channel[n * stride[0] + y * stride[2] + col * stride[3]]
                            : 0.f;
        }
    }
#pragma unroll
    for (int u = 0; u < Batch; ++u) {
      const int tile = (f0 + u * kThreads) / 32;
      if (tile >= h * kTiles) break;
      uint4* d = reinterpret_cast<uint4*>(dst + tile * kSplitTileFloats) + lane;
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        unsigned hi[4], lo[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) split_tf32(v[u][kk][e], hi[e], lo[e]);
        d[32 * kk] = make_uint4(hi[0], hi[1], hi[2], hi[3]);
        d[32 * (kk + 2)] = make_uint4(lo[0], lo[1], lo[2], lo[3]);
      }
    }
  }
}

// grid (C, ceil(N / 32)), 256 threads; P = ceil(Ho / 8) output rows per warp (fewer registers,
// more resident blocks, for planes of up to 8 rows). The B operand of kernel row i: 16-bit, the
// Toeplitz tile T_i built once in shared memory; fp32, built in registers from the kernel row
// staged zero-padded (a tile only reaches taps pw - 15 .. pw + 15).
template <typename T, int P>
__global__ void __launch_bounds__(kThreads) small_forward_kernel(const T* __restrict__ x,
                                                                    const Filter filter,
                                                                    T* __restrict__ y, ConvShape s,
                                                                    bool pair_loads,
                                                                    bool pair_stores) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  extern __shared__ float4 smem4[];
  const int c = blockIdx.x, n0 = blockIdx.y * kForwardImages;
  // 16-bit: kh Toeplitz tiles, then H * kForwardImages staged rows. fp32: H * kForwardTiles split
  // A tiles. Then the kernel taps.
  T* ts = reinterpret_cast<T*>(smem4);
  T* xs = ts + (kF32 ? 0 : s.kh * kTileElems);
  float* ks = reinterpret_cast<float*>(
      xs + (kF32 ? s.H * kForwardTiles * kSplitTileFloats : s.H * kForwardImages * kPitch));

  if constexpr (kF32) {
    stage_split_tiles<kForwardImages, Operand::kA, 4>(xs, x, s.in_stride, c, n0, s.N, s.H, s.W);
    for (int e = threadIdx.x; e < s.kh * kPaddedRow; e += kThreads) {
      const int i = e / kPaddedRow, j = e % kPaddedRow - 15 + s.pad_w;
      ks[e] = j >= 0 && j < s.kw ? filter_tap<T>(filter, c, i, j) : 0.f;
    }
  } else {
    stage_planes<kForwardImages, kPitch>(xs, x, s.in_stride, c, n0, s.N, s.H, s.W, pair_loads);
    for (int e = threadIdx.x; e < s.kh * s.kw; e += kThreads)
      ks[e] = filter_tap<T>(filter, c, e / s.kw, e % s.kw);
  }
  cp_async_wait_all();
  __syncthreads();
  if constexpr (!kF32) {
    for (int e = threadIdx.x; e < s.kh * 256; e += kThreads) {
      const int i = e / 256, r = (e / 16) % 16, col = e % 16;
      const int j = r - col + s.pad_w;
      ts[i * kTileElems + r * kPitch + col] =
          from_float<T>(j >= 0 && j < s.kw ? ks[i * s.kw + j] : 0.f);
    }
    __syncthreads();
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int m_tiles = min(kForwardImages, s.N - n0 + 15) / 16;
  float acc[kForwardTiles][P][2][4] = {};
  for (int qy = 0; qy < s.H; ++qy) {
    int row[P];
    bool reach[P];
    bool any = false;
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int oy = warp + kWarps * p;
      row[p] = qy - oy + s.pad_h;
      reach[p] = oy < s.Ho && row[p] >= 0 && row[p] < s.kh;
      any |= reach[p];
    }
    if (!any) continue;
    FragA<T> a[kForwardTiles];
#pragma unroll
    for (int m = 0; m < kForwardTiles; ++m) {
      if constexpr (kF32) {
        load_split_a(a[m], xs + (qy * kForwardTiles + m) * kSplitTileFloats, lane);
      } else {
        load_a(a[m], xs + (qy * kForwardImages + m * 16) * kPitch, kPitch, lane);
      }
    }
    // Both image tiles' products inside one (warp-uniform) branch, so that their chains of
    // dependent MMAs can overlap; a tile past the batch multiplies the zeros staged for it.
#pragma unroll
    for (int p = 0; p < P; ++p) {
      if (!reach[p]) continue;
      FragB<T> b;
      if constexpr (kF32) {
        const float* taps = ks + row[p] * kPaddedRow + 15;
        fill_b(b, lane, [taps](int k, int n) { return taps[k - n]; });
      } else {
        load_b(b, ts + row[p] * kTileElems, kPitch, lane);
      }
#pragma unroll
      for (int m = 0; m < kForwardTiles; ++m) mma_tile<T, 1>(acc[m][p], a[m], b);
    }
  }

  // Accumulator element e of an m16n8 tile: image row lane / 4 + 8 * (e / 2), column
  // 2 * (lane % 4) + e % 2.
  const float b = filter_bias<T>(filter, c);
  T* out = y + c * s.out_stride[1];
#pragma unroll
  for (int m = 0; m < kForwardTiles; ++m) {
#pragma unroll
    for (int p = 0; p < P; ++p) {
      const int oy = warp + kWarps * p;
      if (m >= m_tiles || oy >= s.Ho) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int n = n0 + m * 16 + lane / 4 + 8 * half;
          const int ox = h * 8 + 2 * (lane % 4);
          if (n >= s.N || ox >= s.Wo) continue;
          T* dst = out + n * s.out_stride[0] + oy * s.out_stride[2] + ox * s.out_stride[3];
          const float v0 = acc[m][p][h][2 * half] + b, v1 = acc[m][p][h][2 * half + 1] + b;
          if (pair_stores) {
            store_pair(dst, v0, v1);
          } else {
            dst[0] = from_float<T>(v0);
            if (ox + 1 < s.Wo) dst[s.out_stride[3]] = from_float<T>(v1);
          }
        }
      }
    }
  }
}

// grid (C), 256 threads; dw is (C, kh, kw) contiguous; R >= ceil(reached rows / 8) kernel rows per
// warp (common.cuh: reached_rows; at most H + Ho - 1 <= 31 rows, so R <= 4), Images per step.
template <typename T, int R, int Images>
__global__ void __launch_bounds__(kThreads) small_weight_grad_kernel(const T* __restrict__ x,
                                                                     const T* __restrict__ dy,
                                                                     T* __restrict__ dw,
                                                                     ConvShape s, bool x_pairs,
                                                                     bool dy_pairs) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  extern __shared__ float4 smem4[];
  const int c = blockIdx.x;
  // Ho * Images staged output-gradient rows, then the input: H * Images staged rows (16-bit) or
  // H * Images / 16 split B tiles (fp32: each is multiplied by up to R * 8 warps).
  T* ds = reinterpret_cast<T*>(smem4);
  T* xs = ds + s.Ho * Images * kPitch;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const ReachedRows rows = reached_rows(s);
  float acc[R][2][4] = {};
  for (int n0 = 0; n0 < s.N; n0 += Images) {
    __syncthreads();  // the previous images' products are done with xs and ds
    stage_planes<Images, kPitch>(ds, dy, s.out_stride, c, n0, s.N, s.Ho, s.Wo, dy_pairs);
    if constexpr (kF32) {
      stage_split_tiles<Images, Operand::kB, 1>(xs, x, s.in_stride, c, n0, s.N, s.H, s.W);
    } else {
      stage_planes<Images, kPitch>(xs, x, s.in_stride, c, n0, s.N, s.H, s.W, x_pairs);
    }
    cp_async_wait_all();
    __syncthreads();
    if constexpr (kF32) {
      // Every image tile's product for kernel row i inside one (warp-uniform) branch, summed in
      // one set of parts (common.cuh: add_tile_product) before they reach the accumulators;
      // tiles past the batch multiply the zeros staged for them.
      constexpr int kTiles = Images / 16;
      for (int oy = 0; oy < s.Ho; ++oy) {
        FragA<T> a[kTiles];
#pragma unroll
        for (int m = 0; m < kTiles; ++m)
          load_a_trans(a[m], ds + (oy * Images + m * 16) * kPitch, kPitch, lane);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int i = rows.first + warp + kWarps * r;
          const int qy = oy + i - s.pad_h;
          if (i >= rows.first + rows.count || qy < 0 || qy >= s.H) continue;
          Parts<2> part;
#pragma unroll
          for (int m = 0; m < kTiles; ++m) {
            FragB<T> b;
            load_split_b(b, xs + (qy * kTiles + m) * kSplitTileFloats, lane);
            add_tile_product<2>(part, a[m], b, /*fresh=*/m == 0);
          }
          add_parts<2>(acc[r], part);
        }
      }
    } else {
      // 16-bit MMAs add to the accumulators directly: one image tile per branch keeps
      // consecutive MMAs independent.
      const int m_tiles = min(Images, s.N - n0 + 15) / 16;
      for (int oy = 0; oy < s.Ho; ++oy) {
        for (int m = 0; m < m_tiles; ++m) {
          FragA<T> a;
          load_a_trans(a, ds + (oy * Images + m * 16) * kPitch, kPitch, lane);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            const int i = rows.first + warp + kWarps * r;
            const int qy = oy + i - s.pad_h;
            if (i >= rows.first + rows.count || qy < 0 || qy >= s.H) continue;
            FragB<T> b;
            load_b(b, xs + (qy * Images + m * 16) * kPitch, kPitch, lane);
            mma_tile(acc[r], a, b);
          }
        }
      }
    }
  }
  // G_i[ox][qx] adds to tap j = qx - ox + pw; lanes take taps, summing over ox in a fixed order.
  // The scratch tiles reuse the staging memory once every warp is done with it.
  __syncthreads();
  float* mine = reinterpret_cast<float*>(smem4) + warp * 16 * kScratchPitch;
  T* out = dw + static_cast<int64_t>(c) * s.kh * s.kw;
  for (int e = threadIdx.x; e < s.kh * s.kw; e += kThreads) {
    const int i = e / s.kw;
    if (i < rows.first || i >= rows.first + rows.count) out[e] = from_float<T>(0.f);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = rows.first + warp + kWarps * r;
    if (i >= rows.first + rows.count) break;
    __syncwarp();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float* o = mine + (lane / 4) * kScratchPitch + h * 8 + 2 * (lane % 4);
      *reinterpret_cast<float2*>(o) = make_float2(acc[r][h][0], acc[r][h][1]);
      *reinterpret_cast<float2*>(o + 8 * kScratchPitch) = make_float2(acc[r][h][2], acc[r][h][3]);
    }
    __syncwarp();
    for (int j = lane; j < s.kw; j += 32) {
      float sum = 0.f;
      for (int ox = 0; ox < s.Wo; ++ox) {
        const int qx = ox + j - s.pad_w;
        if (qx >= 0 && qx < s.W) sum += mine[ox * kScratchPitch + qx];
      }
      out[i * s.kw + j] = from_float<T>(sum);
    }
  }
}

template <typename T>
int64_t forward_smem(const ConvShape& s) {
  if constexpr (std::is_same<T, float>::value)
    return 4LL * (s.H * kForwardTiles * kSplitTileFloats + s.kh * kPaddedRow);
  return 2LL * (s.kh * kTileElems + s.H * kForwardImages * kPitch) + 4LL * s.kh * s.kw;
}

template <typename T>
int64_t weight_grad_smem(const ConvShape& s, int images) {
  const int64_t x_elems = std::is_same<T, float>::value ? s.H * (images / 16) * kSplitTileFloats
                                                        : s.H * images * kPitch;
  const int64_t staging = int64_t(sizeof(T)) * (s.Ho * images * kPitch + x_elems);
  return std::max<int64_t>(staging, 4LL * kWarps * 16 * kScratchPitch);
}

template <typename T, int P>
cudaError_t small_forward_typed(const void* x, const Filter& filter, void* y, const ConvShape& s,
                                cudaStream_t stream) {
  const int64_t smem = forward_smem<T>(s);
  cudaError_t err = allow_smem(small_forward_kernel<T, P>, smem);
  if (err != cudaSuccess) return err;
  // Two outputs per store when every (row, even column) pair is aligned to two elements.
  const dim3 grid(s.C, ceil_div(s.N, kForwardImages));
  small_forward_kernel<T, P><<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(x), filter, static_cast<T*>(y), s,
      rows_in_vectors<T>(x, s.in_stride, s.W, 2), rows_in_vectors<T>(y, s.out_stride, s.Wo, 2));
  return cudaGetLastError();
}

template <typename T, int R, int Images>
cudaError_t small_weight_grad_typed(const void* x, const void* dy, void* dw, const ConvShape& s,
                                    cudaStream_t stream) {
  const int64_t smem = weight_grad_smem<T>(s, Images);
  cudaError_t err = allow_smem(small_weight_grad_kernel<T, R, Images>, smem);
  if (err != cudaSuccess) return err;
  small_weight_grad_kernel<T, R, Images><<<s.C, kThreads, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(dy), static_cast<T*>(dw), s,
      rows_in_vectors<T>(x, s.in_stride, s.W, 2), rows_in_vectors<T>(dy, s.out_stride, s.Wo, 2));
  return cudaGetLastError();
}

template <typename T>
cudaError_t small_forward_rows(const void* x, const Filter& filter, void* y, const ConvShape& s,
                               cudaStream_t stream) {
  return s.Ho <= kWarps ? small_forward_typed<T, 1>(x, filter, y, s, stream)
                        : small_forward_typed<T, 2>(x, filter, y, s, stream);
}

template <typename T, int R>
cudaError_t small_weight_grad_images(const void* x, const void* dy, void* dw, const ConvShape& s,
                                     cudaStream_t stream) {
  constexpr int kHalf = kGradImages / 2;
  // fp32 always steps 32 images: 64 would stage 172 KB at 14x14.
  if constexpr (std::is_same<T, float>::value)
    return small_weight_grad_typed<T, R, kHalf>(x, dy, dw, s, stream);
  else
    return s.N <= kHalf ? small_weight_grad_typed<T, R, kHalf>(x, dy, dw, s, stream)
                        : small_weight_grad_typed<T, R, kGradImages>(x, dy, dw, s, stream);
}

template <typename T>
cudaError_t small_weight_grad_rows(const void* x, const void* dy, void* dw, const ConvShape& s,
                                   cudaStream_t stream) {
  return reached_rows(s).count <= 2 * kWarps ? small_weight_grad_images<T, 2>(x, dy, dw, s, stream)
                                             : small_weight_grad_images<T, 4>(x, dy, dw, s, stream);
}

}  // namespace

bool small_supported(const ConvShape& s) {
  return s.H <= kPlane && s.W <= kPlane && s.Ho <= kPlane && s.Wo <= kPlane;
}

cudaError_t launch_forward_small(DType dtype, const void* x, const Filter& filter, void* y,
                                 const ConvShape& shape, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return small_forward_rows<float>(x, filter, y, shape, stream);
    case DType::kFloat16: return small_forward_rows<__half>(x, filter, y, shape, stream);
    case DType::kBFloat16:
      return small_forward_rows<__nv_bfloat16>(x, filter, y, shape, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_weight_grad_small(DType dtype, const void* x, const void* grad_out,
                                     void* grad_weight, const ConvShape& shape,
                                     cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return small_weight_grad_rows<float>(x, grad_out, grad_weight, shape, stream);
    case DType::kFloat16:
      return small_weight_grad_rows<__half>(x, grad_out, grad_weight, shape, stream);
    case DType::kBFloat16:
      return small_weight_grad_rows<__nv_bfloat16>(x, grad_out, grad_weight, shape, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace lknets
