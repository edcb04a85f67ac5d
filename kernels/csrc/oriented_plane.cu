// Oriented 1D depthwise conv at stride 1 on NCHW planes, through shared memory: the "plane"
// formulation of kernels/plan.py (oriented_formulation); oriented.cu's gather kernels take the
// rest (stride 2, channels_last, planes too large to stage).
//
// Why: the gather kernels read every tap of every output from global memory, with bounds tests;
// on a plane the taps of neighbouring outputs are the same few pixels. Here a block owns one
// channel and `planes` images of it, copies those planes once into shared memory with a zero halo
// of min(S/2, side - 1) pixels (rows and columns; a tap farther out than the side reads only
// padding and is dropped), and computes every output from there without a bounds test. A thread
// takes kRows outputs down one column: neighbouring lanes read neighbouring shared-memory
// elements (no bank conflicts), and each tap's position and weight, read once, serve kRows
// multiply-adds. Taps are the same for the whole block (one channel), so every branch on them is
// uniform. Measured faster than the gather kernel from 56x56 planes up, slower below (the halo is
// most of a small staged plane): kernels/DESIGN.md.
//
// The input gradient at stride 1 is the same gather with the offsets negated. Offsets beyond the
// halo that still reach into the plane (not produced by the models, whose |offset| <= S/2, but
// allowed by the op) read global memory with bounds tests. The weight gradient stays on the
// gather kernel: a plane version of it (x staged the same way, dy * x summed per tap in
// registers, then across the block) measured slower (H100, bf16, N64 C96 56x56 S31: forward +
// backward 1.72 ms with every direction on plane kernels, 1.40 on the gather kernels).
#include "oriented.h"

#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

namespace lknets {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 4;  // outputs per thread, down one column

enum TapKind : int { kSkip = 0, kStaged = 1, kGlobal = 2 };

// One tap as the block applies it: its displacement in the staged plane, its offset, its kind.
struct __align__(16) Tap {
  int delta, dh, dw, kind;
};

__device__ __forceinline__ Tap make_tap(int2 off, bool negate, const PlaneGeometry& g) {
  const int dh = negate ? -off.x : off.x, dw = negate ? -off.y : off.y;
  Tap t{dh * g.wp + dw, dh, dw, kStaged};
  if (dh <= -g.h || dh >= g.h || dw <= -g.w || dw >= g.w) {
    t.kind = kSkip;  // reads only zero padding
  } else if (dh < -g.rh || dh > g.rh || dw < -g.rw || dw > g.rw) {
    t.kind = kGlobal;
  }
  return t;
}

// Copies planes [0, count) of `src` (plane j at src + j * image_step) into `buf` with the zero
// halo, a warp per staged row (no division per element); the planes beyond count and kRows tail
// rows (read by a last column's spare outputs) are zeroed.
template <typename T>
__device__ void stage_planes(const T* __restrict__ src, int64_t image_step, int count,
                             const PlaneGeometry& g, T* buf) {
  const int rows = g.planes * g.hp + kRows;
  for (int r = threadIdx.x / 32; r < rows; r += kWarps) {
    const int j = r / g.hp, h = r - j * g.hp - g.rh;
    const bool live = j < count && unsigned(h) < unsigned(g.h);
    const T* src_row = src + j * image_step + int64_t(h) * g.w;
    T* row = buf + r * g.wp;
    for (int col = threadIdx.x % 32; col < g.wp; col += 32) {
      const int w = col - g.rw;
      row[col] = live && unsigned(w) < unsigned(g.w) ? src_row[w] : T(0);
    }
  }
}

// Shared memory: taps (Tap[S]), weights (Acc[S]), then the staged planes (T).
template <typename Acc>
__host__ __device__ inline int64_t buffer_offset(int taps) {
  return (int64_t(taps) * (sizeof(Tap) + sizeof(Acc)) + 15) / 16 * 16;
}

// y = gather of src (forward: x with the offsets; input gradient: dy with them negated).
template <typename T, bool kNegate, typename Acc = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads) oriented_plane_gather_kernel(
    const T* __restrict__ src, const T* __restrict__ weight, const int2* __restrict__ offsets,
    const T* __restrict__ bias, T* __restrict__ dst, PlaneGeometry g) {
  extern __shared__ __align__(16) unsigned char smem[];
  Tap* taps = reinterpret_cast<Tap*>(smem);
  Acc* weights = reinterpret_cast<Acc*>(smem + int64_t(g.taps) * sizeof(Tap));
  T* buf = reinterpret_cast<T*>(smem + buffer_offset<Acc>(g.taps));
  const int c = blockIdx.x, n0 = blockIdx.y * g.planes;
  const int count = min(g.planes, g.n - n0);
  const int64_t plane_size = int64_t(g.h) * g.w, image_step = int64_t(g.c) * plane_size;
  const T* src_plane = src + int64_t(n0) * image_step + int64_t(c) * plane_size;
  for (int s = threadIdx.x; s < g.taps; s += kThreads) {
    taps[s] = make_tap(offsets[s * g.c + c], kNegate, g);
    weights[s] = static_cast<Acc>(weight[s * g.c + c]);
  }
  stage_planes(src_plane, image_step, count, g, buf);
  __syncthreads();
  const Acc b = bias != nullptr ? static_cast<Acc>(bias[c]) : Acc(0);
  const int row_groups = (g.h + kRows - 1) / kRows;
  const int tasks = count * row_groups * g.w;
  for (int t = threadIdx.x; t < tasks; t += kThreads) {
    const int q = t % g.w, rest = t / g.w;
    const int p0 = (rest % row_groups) * kRows, j = rest / row_groups;
    const T* base = buf + (j * g.hp + p0 + g.rh) * g.wp + q + g.rw;
    Acc acc[kRows];
#pragma unroll
    for (int k = 0; k < kRows; ++k) acc[k] = b;
    for (int s = 0; s < g.taps; ++s) {
      const Tap tap = taps[s];
      const Acc wt = weights[s];
      if (tap.kind == kStaged) {
#pragma unroll
        for (int k = 0; k < kRows; ++k) acc[k] += wt * static_cast<Acc>(base[tap.delta + k * g.wp]);
      } else if (tap.kind == kGlobal) {
        const int w = q + tap.dw;
#pragma unroll
        for (int k = 0; k < kRows; ++k) {
          const int h = p0 + k + tap.dh;
          if (unsigned(w) < unsigned(g.w) && unsigned(h) < unsigned(g.h)) {
            acc[k] += wt * static_cast<Acc>(src_plane[j * image_step + h * g.w + w]);
          }
        }
      }
    }
    T* out = dst + int64_t(n0 + j) * image_step + int64_t(c) * plane_size + q;
#pragma unroll
    for (int k = 0; k < kRows; ++k) {
      if (p0 + k < g.h) out[(p0 + k) * g.w] = static_cast<T>(acc[k]);
    }
  }
}

int64_t smem_bytes(const PlaneGeometry& g, at::ScalarType dtype) {
  const int64_t staged = (int64_t(g.planes) * g.hp + kRows) * g.wp;
  if (dtype == at::kDouble) return buffer_offset<double>(g.taps) + staged * 8;
  return buffer_offset<float>(g.taps) + staged * (dtype == at::kFloat ? 4 : 2);
}

// Kernels launched with more than the default 48 KB of dynamic shared memory must opt in.
template <typename Kernel>
void allow_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(bytes)));
  }
}

}  // namespace

PlaneGeometry plane_geometry(int64_t n, int64_t c, int64_t h, int64_t w, int64_t taps,
                             at::ScalarType dtype) {
  PlaneGeometry g;
  g.n = int(n);
  g.c = int(c);
  g.h = int(h);
  g.w = int(w);
  g.taps = int(taps);
  g.rh = int(std::min<int64_t>(taps / 2, std::max<int64_t>(h - 1, 0)));
  g.rw = int(std::min<int64_t>(taps / 2, std::max<int64_t>(w - 1, 0)));
  g.hp = g.h + 2 * g.rh;
  g.wp = g.w + 2 * g.rw;
  g.planes = int(std::clamp<int64_t>(kPlanePixels / std::max<int64_t>(h * w, 1), 1,
                                     std::min<int64_t>(kMaxPlanes, std::max<int64_t>(n, 1))));
  while (g.planes > 1 && smem_bytes(g, dtype) > kPlaneSmemLimit) --g.planes;
  return g;
}

bool plane_takes(int64_t n, int64_t c, int64_t h, int64_t w, int64_t taps,
                 at::ScalarType dtype) {
  return smem_bytes(plane_geometry(n, c, h, w, taps, dtype), dtype) <= kPlaneSmemLimit;
}

void plane_gather(const at::Tensor& src, const at::Tensor& weight, const at::Tensor& offsets,
                  const at::Tensor& bias, const at::Tensor& dst, bool input_grad) {
  const PlaneGeometry g = plane_geometry(src.size(0), src.size(1), src.size(2), src.size(3),
                                         weight.size(0), src.scalar_type());
  const int64_t bytes = smem_bytes(g, src.scalar_type());
  const dim3 grid{static_cast<unsigned>(g.c), static_cast<unsigned>((g.n + g.planes - 1) / g.planes)};
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto* off = reinterpret_cast<const int2*>(offsets.data_ptr<int>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "oriented_plane", [&] {
    const scalar_t* b = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    auto launch = [&](auto kernel) {
      allow_smem(kernel, bytes);
      kernel<<<grid, kThreads, bytes, stream>>>(src.data_ptr<scalar_t>(),
                                                weight.data_ptr<scalar_t>(), off, b,
                                                dst.data_ptr<scalar_t>(), g);
    };
    if (input_grad) {
      launch(oriented_plane_gather_kernel<scalar_t, true>);
    } else {
      launch(oriented_plane_gather_kernel<scalar_t, false>);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace lknets
