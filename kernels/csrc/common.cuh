// Helpers shared by the kernel files: index arithmetic, conversions, the dynamic shared-memory
// opt-in, and for the tensor-core kernels ldmatrix / mma.sync m16n8k16 wrappers and cp.async
// copies (sm_80 and later).
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

}  // namespace lknets
