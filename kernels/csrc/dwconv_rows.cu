// Row-Toeplitz tensor-core formulation: one matrix product per kernel row. fp16 / bf16 run
// m16n8k16 MMAs; fp32 runs the same tiles as 3xTF32 m16n8k8 MMAs (common.cuh), its Toeplitz tiles
// kept split in shared memory.
//
// For kernel row i, out[n][oy][:] += x[n][oy + i - ph][:] T_i with T_i[qx][ox] = K[i][qx - ox + pw]
// (zero off the band): the output rows of a few images are the GEMM's M, the output columns its N
// and the input columns its K. A block owns one channel, a tile of output rows and columns and a
// few images; it stages their input rows in shared memory once and, per kernel row, only moves
// where its A operand starts, so the input is read from global memory once per block. A 16x16
// tile of T_i depends only on the difference of its row and column tile indices, so per kernel row
// only (K tiles + N tiles - 1) tiles are built; tiles wholly off the band, and output-row tiles
// whose input rows lie in the zero padding, are skipped.
// The weight gradient is the same product transposed: G_i = dy^T x_i (output columns x input
// columns, summed over the block's images and rows), then dw[i][j] = sum over ox of
// G_i[ox][ox + j - pw], a fixed-order sum of G_i's diagonals. Per-block partial sums are reduced
// in a fixed order afterwards, so the result is deterministic.
// The MMAs are mma.sync with fp32 accumulation fed by ldmatrix (sm_80 and later).
#include "dwconv.h"
#include "common.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace lknets {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxCols = 64;        // output columns per block: at most 4 N tiles
constexpr int kMaxRows = 64;        // output rows per block and image
constexpr int kTilePitch = 24;      // 16-bit Toeplitz tiles: rows of 24 (no bank conflicts)
constexpr int kKernelPad = 32;      // zeros each side of a staged kernel row
// Forward: output row tiles per warp; weight grad: kernel rows per warp and pass. Two share
// each B (A) fragment in 16-bit; fp32 takes one (fewer registers: two blocks per SM; H100,
// RepLKNet-31B stage 1 f+b 6.73 -> 5.37 ms, stage 2 3.00 -> 2.28).
template <typename T>
__host__ __device__ constexpr int m_tiles_per_warp() {
  return sizeof(T) == 4 ? 1 : 2;
}
template <typename T>
__host__ __device__ constexpr int grad_rows_per_warp() {
  return sizeof(T) == 4 ? 1 : 2;
}
constexpr int kScratchPitch = 20;    // weight grad: a warp's 16x16 fp32 scratch tile
constexpr int kSmemBudget = 110 * 1024;  // two blocks per SM

// Elements of one Toeplitz tile in shared memory: 16-bit, 16 rows of kTilePitch; fp32, split
// into high and low parts in fragment order.
template <typename T>
__host__ __device__ constexpr int tile_elems() {
  return sizeof(T) == 4 ? kSplitTileFloats : 16 * kTilePitch;
}

// Vector width V (16 bytes, or 16-bit pairs) of a plane's global accesses and their direction:
// along its rows (contiguous rows, col0 / cols / w multiples of V) or down its columns (an H/W-
// transposed view of an NCHW tensor: contiguous columns, row0 / rows / h multiples of V). V = 1:
// scalar.
struct Access {
  int vec;
  bool down;
};

// dst[r][k] = plane[(row0 + r) * cs + col0 + k] (k < cols, r < rows, both multiples of V) with
// V-element loads down the columns, scattered into the row-major tile; zero outside [0, h) x [0, w).
template <int V, typename T>
__device__ __forceinline__ void stage_down_columns(T* dst, int ld, int rows, int cols,
                                                  const T* plane, int64_t cs, int row0, int col0,
                                                  int h, int w, bool valid) {
  constexpr int kWords = V * sizeof(T) / 4;
  using Vec = typename std::conditional<kWords == 4, uint4, unsigned>::type;
  constexpr int kBatch = 4;  // loads in flight per thread
  const int total = cols * (rows / V);
  for (int e0 = threadIdx.x; e0 < total; e0 += kBatch * kThreads) {
    unsigned words[kBatch][kWords];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = e0 + u * kThreads;
      const int k = e % cols, y = row0 + (e / cols) * V, xq = col0 + k;
      Vec v{};
      if (e < total && valid && y >= 0 && y < h && xq >= 0 && xq < w)
        v = *reinterpret_cast<const Vec*>(plane + xq * cs + y);
      if constexpr (kWords == 4) {
        words[u][0] = v.x, words[u][1] = v.y, words[u][2] = v.z, words[u][3] = v.w;
      } else {
        words[u][0] = v;
      }
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int e = e0 + u * kThreads;
      if (e >= total) break;
      const int k = e % cols, r = (e / cols) * V;
#pragma unroll
      for (int q = 0; q < V; ++q) {
        if constexpr (sizeof(T) == 4) {
          reinterpret_cast<unsigned*>(dst)[(r + q) * ld + k] = words[u][q];
        } else {
          reinterpret_cast<unsigned short*>(dst)[(r + q) * ld + k] =
              static_cast<unsigned short>(words[u][q / 2] >> (16 * (q % 2)));
        }
      }
    }
  }
}

// dst[r][k] = plane[(row0 + r) * rs + (col0 + k) * cs] for r < rows, k < cols, zero outside
// [0, h) x [0, w) or when !valid. Along rows, vector copies go through cp.async (complete after
// cp_async_wait_all); down columns through registers; scalar accesses have lanes walk whichever
// of the two axes is contiguous in memory.
template <typename T>
__device__ __forceinline__ void stage_tile(T* dst, int ld, int rows, int cols, const T* plane,
                                          int64_t rs, int64_t cs, int row0, int col0, int h, int w,
                                          bool valid, Access access) {
  if (access.down) {
    if constexpr (sizeof(T) == 4) {
      stage_down_columns<4>(dst, ld, rows, cols, plane, cs, row0, col0, h, w, valid);
    } else if (access.vec == 8) {
      stage_down_columns<8>(dst, ld, rows, cols, plane, cs, row0, col0, h, w, valid);
    } else {
      stage_down_columns<2>(dst, ld, rows, cols, plane, cs, row0, col0, h, w, valid);
    }
    return;
  }
  const int vec = access.vec;
  if (vec > 1) {
    const int per_row = cols / vec;
    for (int e = threadIdx.x; e < rows * per_row; e += kThreads) {
      const int r = e / per_row, xq = col0 + (e - r * per_row) * vec;
      const int y = row0 + r;
      const bool ok = valid && y >= 0 && y < h && xq < w;
      const T* src = ok ? plane + y * rs + xq : plane;
      T* d = dst + r * ld + (xq - col0);
      if (vec * sizeof(T) == 16) {
        cp_async_16(d, src, ok);
      } else {
        cp_async_4(d, src, ok);
      }
    }
    return;
  }
  // Scalar: lanes walk the columns unless only the rows are contiguous in memory.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T zero = from_float<T>(0.f);
  const bool lanes_on_cols = cs == 1 || rs != 1;
  const int outer = lanes_on_cols ? rows : cols, inner = lanes_on_cols ? cols : rows;
  for (int o = warp; o < outer; o += kWarps) {
    for (int i = lane; i < inner; i += 32) {
      const int r = lanes_on_cols ? o : i, k = lanes_on_cols ? i : o;
      const int y = row0 + r, xq = col0 + k;
      dst[r * ld + k] = (valid && y >= 0 && y < h && xq >= 0 && xq < w) ? plane[y * rs + xq * cs]
                                                                         : zero;
    }
  }
}

// V-element vector stores of src + bias (fp32, row pitch lds) into dst: along dst's rows,
// dst[r * ld + k] (cols a multiple of V), or when `down` down its columns, dst[k * ld + r] (rows a
// multiple of V); dst vectors aligned to V elements.
template <int V, typename T>
__device__ __forceinline__ void store_vectors(T* dst, int64_t ld, const float* src, int lds,
                                             int rows, int cols, float bias, bool down) {
  const int per_line = (down ? rows : cols) / V;
  const int step = down ? lds : 1;
  for (int e = threadIdx.x; e < (down ? cols : rows) * per_line; e += kThreads) {
    const int line = e / per_line, at = (e - line * per_line) * V;
    const int r = down ? at : line, k = down ? line : at;
    union {
      T v[V];
      uint4 u4;
      unsigned u1;
    } pack;
#pragma unroll
    for (int q = 0; q < V; ++q) pack.v[q] = from_float<T>(src[r * lds + k + q * step] + bias);
    T* d = dst + (down ? k * ld + r : r * ld + k);
    if constexpr (V * sizeof(T) == 16) {
      *reinterpret_cast<uint4*>(d) = pack.u4;
    } else {
      *reinterpret_cast<unsigned*>(d) = pack.u1;
    }
  }
}

struct RowsPlan {
  ConvShape s;
  int cols, col_tiles;    // output columns per block (multiple of 16, <= 64) and tiles across Wo
  int rows, row_tiles;    // output rows per block and image (multiple of 16, <= 64), tiles down Ho
  int in_cols;            // input columns a block can reach, rounded to 16 (the forward's K)
  int ldx;                // pitch of the staged input rows (elements)
  int x_rows;             // input rows an image's outputs reach: rows + kh - 1
  int x_pitch;            // rows reserved per image (x_rows, more for vectors down columns)
  int images;             // images staged together
  int image_blocks;       // blocks along N
  int images_per_block;   // a multiple of `images` (weight grad: reduced by one block)
  int kernel_rows_per_chunk;  // forward: Toeplitz tiles built for this many kernel rows at once
  Access in, out;         // global accesses of the input and output planes
};

// The column window of one block: outputs [ox0, ox0 + cols) reach inputs [qx_lo, qx_lo + in_cols),
// and T's diagonal j = base + k - col (input column k, output column col, both block-local).
struct ColumnWindow {
  int ox0, qx_lo, in_cols, base;
};

__device__ __forceinline__ ColumnWindow column_window(const RowsPlan& p, int col_tile) {
  const ConvShape& s = p.s;
  ColumnWindow win;
  win.ox0 = col_tile * p.cols;
  const int ox_end = min(win.ox0 + p.cols, s.Wo);
  const int align = p.in.down ? 1 : p.in.vec;  // vector copies along rows start aligned
  win.qx_lo = max(0, win.ox0 - s.pad_w) / align * align;
  const int qx_hi = min(s.W, ox_end - 1 - s.pad_w + s.kw);
  win.in_cols = qx_hi > win.qx_lo ? round_up(qx_hi - win.qx_lo, 16) : 0;
  win.base = win.qx_lo - win.ox0 + s.pad_w;
  return win;
}

// Whether the 16x16 tile at (K tile - N tile) = d holds any tap of a kw-wide kernel row.
__device__ __forceinline__ bool on_band(int base, int d, int kw) {
  const int j = base + 16 * d;
  return j + 15 >= 0 && j - 15 < kw;
}

// Whether image rows [y0, y0 + 16) miss [0, h) entirely (the rows are zero padding).
__device__ __forceinline__ bool rows_in_padding(int y0, int h) { return y0 + 16 <= 0 || y0 >= h; }

// Stages the input rows that output rows [oy0, oy0 + rows) of image n reach, over the window's
// columns, into dst (x_pitch rows of ldx). Returns the tile row holding input row
// oy0 - pad_h: 0, or up to 7 when vectors down columns must start on an aligned row.
template <typename T>
__device__ __forceinline__ int stage_input_rows(T* dst, const RowsPlan& p, const T* x, int n, int c,
                                                int oy0, const ColumnWindow& win, bool valid) {
  const ConvShape& s = p.s;
  const int row0 = oy0 - s.pad_h;
  const int shift = p.in.down ? (row0 % p.in.vec + p.in.vec) % p.in.vec : 0;
  const int rows = p.in.down ? round_up(p.x_rows + shift, p.in.vec) : p.x_rows;
  stage_tile(dst, p.ldx, rows, p.in_cols, x + n * s.in_stride[0] + c * s.in_stride[1],
             s.in_stride[2], s.in_stride[3], row0 - shift, win.qx_lo, s.H, s.W, valid, p.in);
  return shift;
}

// grid (C, col_tiles * row_tiles, image_blocks), 256 threads.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) rows_forward_kernel(const T* __restrict__ x,
                                                                const Filter filter,
                                                                T* __restrict__ y, RowsPlan p) {
  constexpr bool kF32 = std::is_same<T, float>::value;
  using Tap = typename std::conditional<kF32, float, unsigned short>::type;
  constexpr int kTile = tile_elems<T>();
  constexpr int MT = m_tiles_per_warp<T>();
  extern __shared__ float4 smem4[];
  const ConvShape& s = p.s;
  const int c = blockIdx.x;
  const int col_tile = blockIdx.y % p.col_tiles;
  const int oy0 = (blockIdx.y / p.col_tiles) * p.rows;
  const int n0 = blockIdx.z * p.images;
  const ColumnWindow win = column_window(p, col_tile);
  const int n_tiles = p.cols / 16;
  const int k_tiles = win.in_cols / 16;
  const int band_tiles = p.in_cols / 16 + n_tiles - 1;  // Toeplitz tiles per kernel row
  const int ldx = p.ldx;
  const int kp_len = s.kw + 2 * kKernelPad;

  // Shared memory: padded kernel rows (16-bit: their bits), staged inputs, Toeplitz tiles; fp32
  // output staging reuses the inputs and tiles once the products are done.
  Tap* kp = reinterpret_cast<Tap*>(smem4);
  T* xs = reinterpret_cast<T*>(kp + round_up(s.kh * kp_len, 8));
  T* ts = xs + p.images * p.x_pitch * ldx;
  float* os = reinterpret_cast<float*>(xs);
  const int ldo = p.cols + 4;

  for (int e = threadIdx.x; e < s.kh * kp_len; e += kThreads) {
    const int i = e / kp_len, j = e - i * kp_len - kKernelPad;
    const float tap = j >= 0 && j < s.kw ? filter_tap<T>(filter, c, i, j) : 0.f;
    if constexpr (kF32) {
      kp[e] = tap;
    } else {
      kp[e] = bits_of(from_float<T>(tap));
    }
  }
  int x_shift = 0;
  for (int g = 0; g < p.images; ++g)
    x_shift = stage_input_rows(xs + g * p.x_pitch * ldx, p, x, min(n0 + g, s.N - 1), c, oy0, win,
                               n0 + g < s.N && win.in_cols > 0);
  cp_async_wait_all();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_steps = p.rows / 16;  // 16-row tiles per image
  float acc[MT][4][2][4] = {};
  for (int i0 = 0; i0 < s.kh && k_tiles > 0; i0 += p.kernel_rows_per_chunk) {
    const int chunk = min(p.kernel_rows_per_chunk, s.kh - i0);
    __syncthreads();
    // Tile t of kernel row i holds T[k][col] for k - col = 16 * d + r - c', d = t - n_tiles + 1
    // (r, c' the row and column in the tile): kernel taps j = base + 16 * d + r - c'. A warp fills
    // one on-band tile at a time (16-bit: a lane 8 taps of one row, 16 bytes; fp32: a lane its
    // split fragment); on-band taps stay within the kernel rows' zero padding, so they need no
    // range checks.
    for (int tile = warp; tile < chunk * band_tiles; tile += kWarps) {
      const int ii = tile / band_tiles, t = tile - ii * band_tiles;
      const int d = t - n_tiles + 1;
      if (!on_band(win.base, d, s.kw)) continue;
      const Tap* taps = kp + (i0 + ii) * kp_len + kKernelPad + win.base + 16 * d;
      if constexpr (kF32) {
        FragB<float> b;
        fill_b(b, lane, [taps](int k, int n) { return taps[k - n]; });
        store_split_b(ts + tile * kTile, b, lane);
      } else {
        const int r = lane / 2, half = lane % 2;
        const Tap* row = taps + r - 8 * half;
        unsigned packed[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) packed[e] = pack(row[-2 * e], row[-2 * e - 1]);
        *reinterpret_cast<uint4*>(ts + tile * kTile + r * kTilePitch + 8 * half) =
            make_uint4(packed[0], packed[1], packed[2], packed[3]);
      }
    }
    __syncthreads();
    for (int ii = 0; ii < chunk; ++ii) {
      const int i = i0 + ii;
      const T* tiles = ts + ii * band_tiles * kTile;
      bool active[MT];
      const T* a_rows[MT];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int mt = warp + m * kWarps;
        const int g = mt / row_steps, rt = mt - g * row_steps;
        active[m] = g < p.images && n0 + g < s.N && oy0 + rt * 16 < s.Ho &&
                    !rows_in_padding(oy0 + rt * 16 + i - s.pad_h, s.H);
        a_rows[m] = xs + (g * p.x_pitch + x_shift + rt * 16 + i) * ldx;
      }
      bool any_active = false;
#pragma unroll
      for (int m = 0; m < MT; ++m) any_active |= active[m];
      if (!any_active) continue;
      for (int kt = 0; kt < k_tiles; ++kt) {
        FragA<T> a[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m)
          if (active[m]) load_a(a[m], a_rows[m] + kt * 16, ldx, lane);
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          if (nt >= n_tiles || !on_band(win.base, kt - nt, s.kw)) continue;
          const T* tile = tiles + (kt - nt + n_tiles - 1) * kTile;
          FragB<T> b;
          if constexpr (kF32) {
            load_split_b(b, tile, lane);
          } else {
            load_b(b, tile, kTilePitch, lane);
          }
#pragma unroll
          for (int m = 0; m < MT; ++m)
            if (active[m]) mma_tile(acc[m][nt], a[m], b);
        }
      }
    }
  }
  __syncthreads();
  // Accumulator element e of an m16n8 tile sits at row lane / 4 + 8 * (e / 2), column
  // 2 * (lane % 4) + e % 2.
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int mt = warp + m * kWarps;
    if (mt >= p.images * row_steps) continue;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      if (nt >= n_tiles) continue;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float* o = os + (mt * 16 + lane / 4) * ldo + nt * 16 + h * 8 + 2 * (lane % 4);
        *reinterpret_cast<float2*>(o) = make_float2(acc[m][nt][h][0], acc[m][nt][h][1]);
        *reinterpret_cast<float2*>(o + 8 * ldo) = make_float2(acc[m][nt][h][2], acc[m][nt][h][3]);
      }
    }
  }
  __syncthreads();
  const float b = filter_bias<T>(filter, c);
  const int out_rows = min(p.rows, s.Ho - oy0), out_cols = min(p.cols, s.Wo - win.ox0);
  const bool rows_contiguous = s.out_stride[3] == 1 || s.out_stride[2] != 1;
  for (int g = 0; g < p.images && n0 + g < s.N; ++g) {
    T* out = y + (n0 + g) * s.out_stride[0] + c * s.out_stride[1];
    const float* src = os + g * p.rows * ldo;
    T* corner = out + oy0 * s.out_stride[2] + win.ox0 * s.out_stride[3];
    if (p.out.vec > 1) {
      const int64_t ld = p.out.down ? s.out_stride[3] : s.out_stride[2];
      if constexpr (kF32) {
        store_vectors<4>(corner, ld, src, ldo, out_rows, out_cols, b, p.out.down);
      } else if (p.out.vec == 8) {
        store_vectors<8>(corner, ld, src, ldo, out_rows, out_cols, b, p.out.down);
      } else {
        store_vectors<2>(corner, ld, src, ldo, out_rows, out_cols, b, p.out.down);
      }
      continue;
    }
    for (int e = threadIdx.x; e < out_rows * out_cols; e += kThreads) {
      int r, k;
      if (rows_contiguous) {
        r = e / out_cols, k = e - r * out_cols;
      } else {
        k = e / out_rows, r = e - k * out_rows;
      }
      out[(oy0 + r) * s.out_stride[2] + (win.ox0 + k) * s.out_stride[3]] =
          from_float<T>(src[r * ldo + k] + b);
    }
  }
}

// Weight gradient. Warp w owns K tile kt = w % k_tiles (a 16-column slice of the input window)
// and R = grad_rows_per_warp() kernel rows of each pass, and accumulates G_i[mt][kt] = dy^T x_i
// for every output-column tile mt on kt's band, over the block's images and rows: one x fragment
// serves all its column tiles and one dy fragment all its kernel rows. Its tiles' diagonals are
// summed through a private scratch tile into part[warp][row][tap]; once per pass the warps' sums
// are added into dwacc in warp order (deterministic). grid (C, col_tiles * row_tiles,
// image_blocks), 256 threads; the block's partial dw goes to
// workspace[((blockIdx.z * gridDim.y + blockIdx.y) * C + c) * kh * kw + tap].
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) rows_weight_grad_kernel(const T* __restrict__ x,
                                                                    const T* __restrict__ dy,
                                                                    float* __restrict__ workspace,
                                                                    RowsPlan p) {
  constexpr int R = grad_rows_per_warp<T>();
  extern __shared__ float4 smem4[];
  const ConvShape& s = p.s;
  const int c = blockIdx.x;
  const int col_tile = blockIdx.y % p.col_tiles;
  const int oy0 = (blockIdx.y / p.col_tiles) * p.rows;
  const ColumnWindow win = column_window(p, col_tile);
  const int m_tiles = p.cols / 16;
  const int k_tiles = win.in_cols / 16;
  const int row_steps = p.rows / 16;  // 16-row tiles per image
  const int ldx = p.ldx, ldd = p.cols + 8;
  const int taps = s.kh * s.kw;
  constexpr int kPartFloats = kWarps * R * 64;

  float* dwacc = reinterpret_cast<float*>(smem4);
  float* part = dwacc + round_up(taps, 4);  // two buffers (alternate passes) of kPartFloats
  float* scratch = part + 2 * kPartFloats;  // per warp 16 x kScratchPitch
  T* xs = reinterpret_cast<T*>(scratch + kWarps * 16 * kScratchPitch);
  T* ds = xs + p.images * p.x_pitch * ldx;
  for (int e = threadIdx.x; e < taps; e += kThreads) dwacc[e] = 0.f;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row_groups = k_tiles > 0 ? kWarps / k_tiles : 0;
  const int kt = k_tiles > 0 ? warp % k_tiles : 0;
  const int row_group = k_tiles > 0 ? warp / k_tiles : 0;
  const int pass_rows = row_groups * R;
  float* my_scratch = scratch + warp * 16 * kScratchPitch;
  bool band[4];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) band[mt] = mt < m_tiles && on_band(win.base, kt - mt, s.kw);

  const int n_begin = blockIdx.z * p.images_per_block;
  const int n_end = min(s.N, n_begin + p.images_per_block);
  int pass = 0, x_shift = 0;
  for (int n0 = n_begin; n0 < n_end && k_tiles > 0; n0 += p.images) {
    __syncthreads();  // the previous chunk's products are done with xs and ds
    for (int g = 0; g < p.images; ++g) {
      const int n = min(n0 + g, s.N - 1);
      const bool valid = n0 + g < n_end;
      x_shift = stage_input_rows(xs + g * p.x_pitch * ldx, p, x, n, c, oy0, win, valid);
      stage_tile(ds + g * p.rows * ldd, ldd, p.rows, p.cols,
                 dy + n * s.out_stride[0] + c * s.out_stride[1], s.out_stride[2], s.out_stride[3],
                 oy0, win.ox0, s.Ho, s.Wo, valid, p.out);
    }
    cp_async_wait_all();
    __syncthreads();
    const int images_here = min(p.images, n_end - n0);
    for (int i0 = 0; i0 < s.kh; i0 += pass_rows, ++pass) {
      float* part_now = part + (pass % 2) * kPartFloats;
      float* my_part = part_now + warp * R * 64;
      const int row0 = i0 + row_group * R;  // this warp's first kernel row
      if (row_group < row_groups) {
        float acc[4][R][2][4] = {};
        for (int g = 0; g < images_here; ++g) {
          for (int rt = 0; rt < row_steps && oy0 + rt * 16 < s.Ho; ++rt) {
            const T* dy_rows = ds + (g * p.rows + rt * 16) * ldd;
            const T* x_rows = xs + (g * p.x_pitch + x_shift + rt * 16) * ldx + kt * 16;
            bool row_ok[R];
#pragma unroll
            for (int r = 0; r < R; ++r)
              row_ok[r] = row0 + r < s.kh &&
                          !rows_in_padding(oy0 + rt * 16 + row0 + r - s.pad_h, s.H);
            if constexpr (sizeof(T) == 2) {
              // 16-bit holds the dy fragments of every column tile while it walks its rows.
              FragA<T> a[4];
#pragma unroll
              for (int mt = 0; mt < 4; ++mt)
                if (band[mt]) load_a_trans(a[mt], dy_rows + mt * 16, ldd, lane);
#pragma unroll
              for (int r = 0; r < R; ++r) {
                if (!row_ok[r]) continue;
                FragB<T> b;
                load_b(b, x_rows + (row0 + r) * ldx, ldx, lane);
#pragma unroll
                for (int mt = 0; mt < 4; ++mt)
                  if (band[mt]) mma_tile(acc[mt][r], a[mt], b);
              }
            } else {
              // fp32's split fragments would not all fit in registers: one column tile's at a time.
              FragB<T> b[R];
#pragma unroll
              for (int r = 0; r < R; ++r)
                if (row_ok[r]) load_b(b[r], x_rows + (row0 + r) * ldx, ldx, lane);
#pragma unroll
              for (int mt = 0; mt < 4; ++mt) {
                if (!band[mt]) continue;
                FragA<T> a;
                load_a_trans(a, dy_rows + mt * 16, ldd, lane);
#pragma unroll
                for (int r = 0; r < R; ++r)
                  if (row_ok[r]) mma_tile(acc[mt][r], a, b[r]);
              }
            }
          }
        }
        // Tile (mt, kt) of G_i adds its diagonal col - row = delta to tap j = base + 16 (kt - mt)
        // + delta; lane delta + 15 sums one diagonal, tiles in a fixed order.
        for (int e = lane; e < R * 64; e += 32) my_part[e] = 0.f;
#pragma unroll
        for (int mt = 0; mt < 4; ++mt) {
          if (!band[mt]) continue;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            __syncwarp();
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float* o = my_scratch + (lane / 4) * kScratchPitch + h * 8 + 2 * (lane % 4);
              *reinterpret_cast<float2*>(o) = make_float2(acc[mt][r][h][0], acc[mt][r][h][1]);
              *reinterpret_cast<float2*>(o + 8 * kScratchPitch) =
                  make_float2(acc[mt][r][h][2], acc[mt][r][h][3]);
            }
            __syncwarp();
            const int delta = lane - 15;
            const int j = win.base + 16 * (kt - mt) + delta;
            if (lane < 31 && j >= 0 && j < s.kw) {
              float sum = 0.f;
              for (int q = max(0, -delta); q < min(16, 16 - delta); ++q)
                sum += my_scratch[q * (kScratchPitch + 1) + delta];
              my_part[r * 64 + j] += sum;
            }
          }
        }
      }
      __syncthreads();
      for (int e = threadIdx.x; e < pass_rows * s.kw; e += kThreads) {
        const int q = e / s.kw, j = e - q * s.kw;
        if (i0 + q >= s.kh) continue;
        const int group = q / R, r = q % R;
        float sum = 0.f;
        for (int t = 0; t < k_tiles; ++t)
          sum += part_now[((group * k_tiles + t) * R + r) * 64 + j];
        dwacc[(i0 + q) * s.kw + j] += sum;
      }
    }
  }
  __syncthreads();
  float* out = workspace + ((static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * s.C + c) *
                               static_cast<int64_t>(taps);
  for (int e = threadIdx.x; e < taps; e += kThreads) out[e] = dwacc[e];
}

RowsPlan plan_columns_and_rows(const ConvShape& s, int ldx_extra) {
  RowsPlan p{};
  p.s = s;
  p.col_tiles = ceil_div(s.Wo, kMaxCols);
  p.cols = round_up(ceil_div(s.Wo, p.col_tiles), 16);
  p.in_cols = round_up(std::min(s.W, p.cols + s.kw - 1 + 7), 16);  // 7: qx_lo's alignment
  p.ldx = p.in_cols + ldx_extra;
  p.row_tiles = ceil_div(s.Ho, kMaxRows);
  p.rows = round_up(ceil_div(s.Ho, p.row_tiles), 16);
  p.x_rows = p.rows + s.kh - 1;
  // Vectors down the columns of a transposed view start up to 7 rows early (stage_input_rows).
  p.x_pitch = s.in_stride[2] == 1 ? round_up(p.x_rows + 7, 8) : p.x_rows;
  return p;
}


template <typename T>
int64_t kernel_rows_bytes(const ConvShape& s) {
  return int64_t(sizeof(T)) * round_up(s.kh * (s.kw + 2 * kKernelPad), 8);
}

int band_tiles(const RowsPlan& p) { return p.in_cols / 16 + p.cols / 16 - 1; }

template <typename T>
int64_t forward_smem(const RowsPlan& p) {
  const int64_t inputs = int64_t(sizeof(T)) * p.images * p.x_pitch * p.ldx;
  const int64_t tiles =
      int64_t(sizeof(T)) * p.kernel_rows_per_chunk * band_tiles(p) * tile_elems<T>();
  const int64_t staging = 4LL * p.images * p.rows * (p.cols + 4);
  return kernel_rows_bytes<T>(p.s) + std::max(inputs + tiles, staging);
}

template <typename T>
int64_t weight_grad_smem(const RowsPlan& p) {
  const int64_t fixed = 4LL * (round_up(p.s.kh * p.s.kw, 4) +
                               2 * kWarps * grad_rows_per_warp<T>() * 64 +
                               kWarps * 16 * kScratchPitch);
  const int64_t per_image = int64_t(sizeof(T)) * (p.x_pitch * p.ldx + p.rows * (p.cols + 8));
  return fixed + per_image * p.images;
}

// Input row pitch: 16-bit, 8 elements over the window (ldmatrix without bank conflicts); fp32,
// 4 for the forward's ldmatrix and 8 for the weight gradient's scalar fragment loads.
template <typename T>
RowsPlan plan_forward(const ConvShape& s) {
  RowsPlan p = plan_columns_and_rows(s, sizeof(T) == 4 ? 4 : 8);
  const int tile_bytes = int(sizeof(T)) * band_tiles(p) * tile_elems<T>();
  p.kernel_rows_per_chunk = std::max(1, std::min(s.kh, 40 * 1024 / tile_bytes));
  p.images = std::max(1, std::min(m_tiles_per_warp<T>() * kWarps / (p.rows / 16), s.N));
  while (p.images > 1 && forward_smem<T>(p) > kSmemBudget) --p.images;
  p.image_blocks = ceil_div(s.N, p.images);
  p.images_per_block = p.images;
  return p;
}

template <typename T>
RowsPlan plan_weight_grad(const ConvShape& s, int num_sms) {
  RowsPlan p = plan_columns_and_rows(s, 8);
  p.images = std::min(s.N, 8);
  while (p.images > 1 && weight_grad_smem<T>(p) > kSmemBudget) --p.images;
  // About eight blocks per SM (short tail), each reducing whole chunks of `images`.
  const int tiles = s.C * p.col_tiles * p.row_tiles;
  const int splits = std::max(1, std::min(ceil_div(8 * num_sms, tiles), ceil_div(s.N, p.images)));
  p.images_per_block = round_up(ceil_div(s.N, splits), p.images);
  p.image_blocks = ceil_div(s.N, p.images_per_block);
  return p;
}

// How to read or write a plane of h x w: V elements at a time (16-bit: 8 or 2, fp32: 4) along
// its rows when they are contiguous, or down its columns when those are (an H/W-transposed NCHW
// view), provided every vector starts on a multiple of V elements and the extent it runs along is
// one; else scalar.
template <typename T>
Access plane_access(const void* data, const int64_t* stride, int h, int w) {
  const auto address = reinterpret_cast<uintptr_t>(data);
  const int widths[2] = {16 / int(sizeof(T)), sizeof(T) == 4 ? 0 : 2};
  for (const bool down : {false, true}) {
    const int64_t unit = down ? stride[2] : stride[3];
    const int64_t across = down ? stride[3] : stride[2];
    const int extent = down ? h : w;
    for (const int v : widths) {
      if (v > 0 && unit == 1 && across % v == 0 && stride[1] % v == 0 && stride[0] % v == 0 &&
          extent % v == 0 && address % (sizeof(T) * v) == 0)
        return Access{v, down};
    }
  }
  return Access{1, false};
}

template <typename T>
cudaError_t rows_forward_typed(const void* x, const Filter& filter, void* y,
                               const ConvShape& s, cudaStream_t stream) {
  RowsPlan p = plan_forward<T>(s);
  p.in = plane_access<T>(x, s.in_stride, s.H, s.W);
  p.out = plane_access<T>(y, s.out_stride, s.Ho, s.Wo);
  const int64_t smem = forward_smem<T>(p);
  auto kernel = rows_forward_kernel<T>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(s.C, p.col_tiles * p.row_tiles, p.image_blocks);
  kernel<<<grid, kThreads, smem, stream>>>(static_cast<const T*>(x), filter, static_cast<T*>(y), p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t rows_weight_grad_typed(DType dtype, const void* x, const void* dy, float* workspace,
                                   void* dw, const ConvShape& s, int num_sms, cudaStream_t stream) {
  RowsPlan p = plan_weight_grad<T>(s, num_sms);
  p.in = plane_access<T>(x, s.in_stride, s.H, s.W);
  p.out = plane_access<T>(dy, s.out_stride, s.Ho, s.Wo);
  const int64_t smem = weight_grad_smem<T>(p);
  auto kernel = rows_weight_grad_kernel<T>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const dim3 grid(s.C, p.col_tiles * p.row_tiles, p.image_blocks);
  kernel<<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(dy), workspace, p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int partials = p.image_blocks * p.col_tiles * p.row_tiles;
  return launch_reduce_partials(dtype, workspace, partials,
                                int64_t(s.C) * s.kh * s.kw, dw, stream);
}

}  // namespace

int64_t rows_weight_grad_workspace_floats(DType dtype, const ConvShape& s, int num_sms) {
  const RowsPlan p = dtype == DType::kFloat32 ? plan_weight_grad<float>(s, num_sms)
                                               : plan_weight_grad<__half>(s, num_sms);
  return int64_t(p.image_blocks) * p.col_tiles * p.row_tiles * s.C * s.kh * s.kw;
}

cudaError_t launch_forward_rows(DType dtype, const void* x, const Filter& filter,
                                void* y, const ConvShape& shape, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return rows_forward_typed<float>(x, filter, y, shape, stream);
    case DType::kFloat16: return rows_forward_typed<__half>(x, filter, y, shape, stream);
    case DType::kBFloat16:
      return rows_forward_typed<__nv_bfloat16>(x, filter, y, shape, stream);
    default: return cudaErrorInvalidValue;
  }
}

cudaError_t launch_weight_grad_rows(DType dtype, const void* x, const void* grad_out,
                                    float* workspace, void* grad_weight, const ConvShape& shape,
                                    int num_sms, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return rows_weight_grad_typed<float>(dtype, x, grad_out, workspace, grad_weight, shape, num_sms,
                                           stream);
    case DType::kFloat16:
      return rows_weight_grad_typed<__half>(dtype, x, grad_out, workspace, grad_weight, shape, num_sms,
                                            stream);
    case DType::kBFloat16:
      return rows_weight_grad_typed<__nv_bfloat16>(dtype, x, grad_out, workspace, grad_weight, shape,
                                                   num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace lknets
