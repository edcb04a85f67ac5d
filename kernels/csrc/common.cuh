// Helpers shared by the kernel files: index arithmetic, conversions, the dynamic shared-memory
// opt-in, and for the tensor-core kernels ldmatrix / mma.sync wrappers (m16n8k16 for fp16 / bf16,
// 3xTF32 m16n8k8 for fp32), 16x16 operand fragments with their loaders, and cp.async copies
// (sm_80 and later).
#pragma once

#include "dwconv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace lknets {

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ inline int round_up(int a, int b) { return ceil_div(a, b) * b; }

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template <typename T>
__device__ __forceinline__ unsigned short bits_of(T v) {
  return *reinterpret_cast<const unsigned short*>(&v);
}

// Two 16-bit values in one 32-bit word, `lo` first in memory (an mma operand register, or a
// 4-byte store of two neighbouring outputs).
template <typename T>
__device__ __forceinline__ unsigned pack(T lo, T hi) {
  return unsigned(bits_of(lo)) | (unsigned(bits_of(hi)) << 16);
}

template <typename T>
__device__ __forceinline__ float filter_tap(const Filter& f, int c, int i, int j) {
  return to_float(static_cast<const T*>(f.weight)[f.offset + c * f.stride[0] + i * f.stride[1] +
                                                  j * f.stride[2]]);
}

template <typename T>
__device__ __forceinline__ float filter_bias(const Filter& f, int c) {
  return f.bias ? to_float(static_cast<const T*>(f.bias)[c]) : 0.f;
}

// Kernels asking for more than 48 KiB of dynamic shared memory must opt in first.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// d += a (16x16, row major) * b (16x8, column major), fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// fp32 on tensor cores ("3xTF32"): v = hi + lo with hi = v rounded to TF32 (11 significant
// bits) and lo the exact remainder; a * b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi leaves out a_lo b_lo
// and lo's own TF32 truncation, both about 2^-21 of the product, so the sums keep fp32's
// 1e-5-level accuracy that a single TF32 product (2^-11) would not.
__device__ __forceinline__ void split_tf32(float v, unsigned& hi, unsigned& lo) {
  // Round to nearest, ties away from zero (cvt.rna.tf32.f32) in two integer operations: add half
  // of the last kept bit to the magnitude, clear the 13 bits TF32 drops.
  hi = (__float_as_uint(v) + 0x1000u) & 0xffffe000u;
  lo = __float_as_uint(v - __uint_as_float(hi));
}

// d += a (16x8, row major) * b (8x8, column major) in TF32, fp32 accumulation.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d = a * b (a fresh accumulator: no zeroing moves).
__device__ __forceinline__ void mma_tf32_first(float (&d)[4], const unsigned (&a)[4],
                                               const unsigned (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%10,%10,%10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(0.f));
}

// One lane's share of a 16x16 (M x K) A operand and a 16x16 (K x N) B operand, for
// mma_tile(). 16-bit: the m16n8k16 registers, two elements each (B's registers 0-1 are output
// columns 0-7, 2-3 columns 8-15). fp32: per k half kk (8 columns of A, 8 rows of B) the m16n8k8
// TF32 registers, split into high and low parts; lane (g, t) = (lane / 4, lane % 4) holds A rows
// g, g + 8 at columns t, t + 4 and B rows t, t + 4 at column g of each 8-column half h.
template <typename T>
struct FragA {
  unsigned r[4];
};
template <>
struct FragA<float> {
  unsigned hi[2][4], lo[2][4];
};
template <typename T>
struct FragB {
  unsigned r[4];
};
template <>
struct FragB<float> {
  unsigned hi[2][2][2], lo[2][2][2];  // [kk][h][register]
};

// fp32 tile products go into fresh accumulators ("parts") rather than straight into a running
// sum: the tensor cores truncate what they add to the accumulator, and summed into one running
// accumulator over a whole plane and batch that bias grew to 5e-6 of a weight gradient (H100, N64
// 14x14 13x13) and 6e-3 of RepLKNet-31B's gradients. A few tile products (small terms first) are
// summed per part, then the parts are added to acc with rounded fp32 adds. One part per column
// half and, with KParts = 2, per k half: four independent chains of three MMAs instead of two of
// six (a chain's MMAs wait on each other) for twice the adds. Which wins depends on the kernel
// (H100, fp32 f+b, side by side): the small-plane forward runs faster with two chains (r31b224_s3
// forward 0.084 -> 0.079 ms), its weight gradient and the row-Toeplitz GEMM with four.
template <int KParts>
using Parts = float[KParts][2][4];

// parts (+)= a * b as 3xTF32; `fresh` starts the parts anew.
template <int KParts>
__device__ __forceinline__ void add_tile_product(Parts<KParts>& part, const FragA<float>& a,
                                                 const FragB<float>& b, bool fresh) {
#pragma unroll
  for (int kk = 0; kk < 2; ++kk)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float(&d)[4] = part[kk % KParts][h];
      if (fresh && kk < KParts) {
        mma_tf32_first(d, a.lo[kk], b.hi[kk][h]);
      } else {
        mma_tf32(d, a.lo[kk], b.hi[kk][h]);
      }
      mma_tf32(d, a.hi[kk], b.lo[kk][h]);
      mma_tf32(d, a.hi[kk], b.hi[kk][h]);
    }
}

template <int KParts>
__device__ __forceinline__ void add_parts(float (&acc)[2][4], const Parts<KParts>& part) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float sum = part[0][h][e];
#pragma unroll
      for (int k = 1; k < KParts; ++k) sum += part[k][h][e];
      acc[h][e] += sum;
    }
}

// acc[h] (16 x 8, output columns 8h..8h+7) += a * b (fp32: KParts as above).
template <typename T, int KParts = 2>
__device__ __forceinline__ void mma_tile(float (&acc)[2][4], const FragA<T>& a, const FragB<T>& b) {
  if constexpr (std::is_same<T, float>::value) {
    Parts<KParts> part;
    add_tile_product<KParts>(part, a, b, /*fresh=*/true);
    add_parts<KParts>(acc, part);
  } else {
    mma<T>(acc[0], a.r, b.r[0], b.r[1]);
    mma<T>(acc[1], a.r, b.r[2], b.r[3]);
  }
}

// Asynchronous global -> shared copies of 16 or 4 bytes; a copy that is not `valid` writes zeros
// (and reads nothing).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

// Offset of this lane's ldmatrix row in a 16x16 tile stored row major with pitch `ld`, for
// operands whose fragment rows are the stored rows (A of a row-major M x K tile, or B via .trans
// from a K x N tile): matrices (rows 0-7 | 8-15) x (columns 0-7 | 8-15), rows first.
__device__ __forceinline__ int lane_offset(int lane, int ld) {
  return (lane % 16) * ld + (lane / 16) * 8;
}

// Same for an A operand stored K x M (read with .trans): matrices ordered columns first.
__device__ __forceinline__ int lane_offset_transposed_a(int lane, int ld) {
  return ((lane / 16) * 8 + lane % 8) * ld + ((lane / 8) % 2) * 8;
}

// fp32 fragments of one k8 step (8 columns of A, 8 rows of B), split: the pieces the 16x16
// loaders below are made of, and what the mid-plane GEMM loads directly.
__device__ __forceinline__ void split_fragment(const float (&v)[4], unsigned (&hi)[4],
                                               unsigned (&lo)[4]) {
#pragma unroll
  for (int r = 0; r < 4; ++r) split_tf32(v[r], hi[r], lo[r]);
}

// A (16 x 8) by ldmatrix on fp32 rows: `row` is this lane's address, row lane % 16 of the tile at
// column (lane / 16) * 4 (rows 16-byte aligned). ldmatrix moves 16-byte rows: on fp32 data its
// four 8x8 16-bit matrices are the 8 x 4 fp32 blocks of the TF32 A layout (rows 0-7 / 8-15,
// columns 0-3 / 4-7).
__device__ __forceinline__ void load_a_k8(unsigned (&hi)[4], unsigned (&lo)[4], const float* row) {
  unsigned v[4];
  ldsm_x4(v, row);
  const float f[4] = {__uint_as_float(v[0]), __uint_as_float(v[1]), __uint_as_float(v[2]),
                      __uint_as_float(v[3])};
  split_fragment(f, hi, lo);
}

// A (16 x 8) from its transpose, an 8 x 16 (K x M) tile stored row major with pitch `ld`.
__device__ __forceinline__ void load_a_trans_k8(unsigned (&hi)[4], unsigned (&lo)[4],
                                                const float* tile, int ld, int lane) {
  const float* p = tile + (lane % 4) * ld + lane / 4;
  const float f[4] = {p[0], p[8], p[4 * ld], p[4 * ld + 8]};
  split_fragment(f, hi, lo);
}

// B (8 x 8) from a K x N tile stored row major with pitch `ld`.
__device__ __forceinline__ void load_b_k8(unsigned (&hi)[2], unsigned (&lo)[2], const float* tile,
                                          int ld, int lane) {
  const float* p = tile + (lane % 4) * ld + lane / 4;
  split_tf32(p[0], hi[0], lo[0]);
  split_tf32(p[4 * ld], hi[1], lo[1]);
}

// A from an M x K tile stored row major with pitch `ld` elements (fp32: rows 16-byte aligned).
template <typename T>
__device__ __forceinline__ void load_a(FragA<T>& a, const T* tile, int ld, int lane) {
  if constexpr (std::is_same<T, float>::value) {
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
      load_a_k8(a.hi[kk], a.lo[kk], tile + (lane % 16) * ld + kk * 8 + (lane / 16) * 4);
  } else {
    ldsm_x4(a.r, tile + lane_offset(lane, ld));
  }
}

// A from its transpose, a K x M tile stored row major with pitch `ld` (fp32: conflict-free when
// ld % 32 is 8 or 24).
template <typename T>
__device__ __forceinline__ void load_a_trans(FragA<T>& a, const T* tile, int ld, int lane) {
  if constexpr (std::is_same<T, float>::value) {
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) load_a_trans_k8(a.hi[kk], a.lo[kk], tile + kk * 8 * ld, ld, lane);
  } else {
    ldsm_x4_trans(a.r, tile + lane_offset_transposed_a(lane, ld));
  }
}

// B from a K x N tile stored row major with pitch `ld` (fp32: as load_a_trans).
template <typename T>
__device__ __forceinline__ void load_b(FragB<T>& b, const T* tile, int ld, int lane) {
  if constexpr (std::is_same<T, float>::value) {
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        load_b_k8(b.hi[kk][h], b.lo[kk][h], tile + kk * 8 * ld + h * 8, ld, lane);
  } else {
    ldsm_x4_trans(b.r, tile + lane_offset(lane, ld));
  }
}

// B with element (k, n) = tap(k, n) (a float), built in registers.
template <typename T, typename Tap>
__device__ __forceinline__ void fill_b(FragB<T>& b, int lane, const Tap& tap) {
  const int g = lane / 4, t = lane % 4;
  if constexpr (std::is_same<T, float>::value) {
#pragma unroll
    for (int kk = 0; kk < 2; ++kk)
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          split_tf32(tap(kk * 8 + t + 4 * r, h * 8 + g), b.hi[kk][h][r], b.lo[kk][h][r]);
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int r = 0; r < 2; ++r)
        b.r[2 * h + r] = pack(from_float<T>(tap(8 * r + 2 * t, 8 * h + g)),
                              from_float<T>(tap(8 * r + 2 * t + 1, 8 * h + g)));
  }
}

// An fp32 B fragment kept split in shared memory ("fragment order"): a 16x16 tile is 32 x 4
// uint4s, lane l's hi[0], hi[1], lo[0], lo[1] at uint4 q * 32 + l, so a warp loads its fragment
// with four conflict-free 16-byte loads and no conversion.
constexpr int kSplitTileFloats = 32 * 16;

__device__ __forceinline__ void store_split_b(float* tile, const FragB<float>& b, int lane) {
  uint4* d = reinterpret_cast<uint4*>(tile) + lane;
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    d[32 * kk] = make_uint4(b.hi[kk][0][0], b.hi[kk][0][1], b.hi[kk][1][0], b.hi[kk][1][1]);
    d[32 * (kk + 2)] = make_uint4(b.lo[kk][0][0], b.lo[kk][0][1], b.lo[kk][1][0], b.lo[kk][1][1]);
  }
}

__device__ __forceinline__ void load_split_b(FragB<float>& b, const float* tile, int lane) {
  const uint4* src = reinterpret_cast<const uint4*>(tile) + lane;
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    const uint4 hi = src[32 * kk], lo = src[32 * (kk + 2)];
    b.hi[kk][0][0] = hi.x, b.hi[kk][0][1] = hi.y, b.hi[kk][1][0] = hi.z, b.hi[kk][1][1] = hi.w;
    b.lo[kk][0][0] = lo.x, b.lo[kk][0][1] = lo.y, b.lo[kk][1][0] = lo.z, b.lo[kk][1][1] = lo.w;
  }
}

// An fp32 A fragment kept split in shared memory in the same fragment order: lane l's hi[0],
// hi[1], lo[0], lo[1] at uint4 q * 32 + l.
__device__ __forceinline__ void load_split_a(FragA<float>& a, const float* tile, int lane) {
  const uint4* src = reinterpret_cast<const uint4*>(tile) + lane;
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    const uint4 hi = src[32 * kk], lo = src[32 * (kk + 2)];
    a.hi[kk][0] = hi.x, a.hi[kk][1] = hi.y, a.hi[kk][2] = hi.z, a.hi[kk][3] = hi.w;
    a.lo[kk][0] = lo.x, a.lo[kk][1] = lo.y, a.lo[kk][2] = lo.z, a.lo[kk][3] = lo.w;
  }
}

// Whether a plane of width w can be read or written v elements at a time along its rows: rows
// contiguous, every vector (row, multiple-of-v column) aligned to v elements, w a multiple of v.
template <typename T>
bool rows_in_vectors(const void* data, const int64_t* stride, int w, int v) {
  return stride[3] == 1 && stride[2] % v == 0 && stride[1] % v == 0 && stride[0] % v == 0 &&
         w % v == 0 && reinterpret_cast<uintptr_t>(data) % (v * sizeof(T)) == 0;
}

// The kernel rows whose products touch the plane, i in [first, first + count) (count may be 0 or
// less); the others' weight gradient is zero.
struct ReachedRows {
  int first, count;
};

__host__ __device__ inline ReachedRows reached_rows(const ConvShape& s) {
  const int first = max(0, s.pad_h - s.Ho + 1);
  return {first, min(s.kh - 1, s.pad_h + s.H - 1) - first + 1};
}

// Two neighbouring outputs in one store (dst aligned to two elements).
template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float v0, float v1) {
  if constexpr (std::is_same<T, float>::value) {
    *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
  } else {
    *reinterpret_cast<unsigned*>(dst) = pack(from_float<T>(v0), from_float<T>(v1));
  }
}

}  // namespace lknets
