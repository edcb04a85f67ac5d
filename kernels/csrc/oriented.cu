// Depthwise oriented 1D convolution (forward, input gradient, weight gradient).
//
//   y[n, c, p, q] = b[c] + sum_s w[s, c] * x[n, c, p * st + dh[s, c], q * st + dw[s, c]]
//
// with zero padding: each channel's S taps sit at integer offsets (dh, dw) that the caller computes
// once from the channel's angle (models/oriented_conv.py: upstream's truncation rule; several taps
// may share a pixel, and they add up). The output is ceil(H / st) x ceil(W / st).
//
// Why this shape of kernel: the op does S multiply-adds per output, so it is bound by memory and
// by issuing loads, not by arithmetic. Each thread gathers the S taps of a run of kRun outputs
// straight from global memory; neighbouring threads read neighbouring addresses (along W in NCHW,
// along C in channels_last), so loads coalesce and are served mostly by L1, since the taps of
// neighbouring outputs overlap. Weights and offsets are stored (S, C) so that both layouts
// read them coalesced or as broadcasts. One launch covers every channel and direction, with no
// kernel construction per call. The input gradient is the same gather run backwards (a tap
// contributes where (h - dh) and (w - dw) are multiples of the stride), so neither pass needs
// atomics. The weight gradient reduces over N * Ho * Wo per (s, c): each block takes a channel
// slice and a pixel chunk, keeps SC tap sums in registers, reduces them across its threads in
// shared memory, and writes one partial per chunk; the chunks are summed in a fixed order (the
// gradient is deterministic).
//
// These are the "gather" formulation; for the forward and input gradient at stride 1 on NCHW
// planes that fit shared memory the plan (kernels/plan.py: oriented_formulation) can run the
// "plane" kernels of oriented_plane.cu instead, and each op runs the formulation it is given.
#include "oriented.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace lknets {
namespace {

constexpr int kThreads = 256;
constexpr int kTapChunk = 16;  // weight-gradient tap sums each thread keeps in registers

struct Geometry {
  int64_t n, c, h, w, ho, wo;
  int taps, stride;
  int64_t xs[4];  // element strides of the full-resolution tensor (x or dx): n, c, h, w
  int64_t ys[4];  // element strides of the strided tensor (y or dy)
};

// Kernels are compiled per stride (1, 2, or 0: read at run time) and index type (32-bit where
// the tensors fit, which turns the index divisions and the stride's division and modulo from
// tens of instructions into a few; measured: the 64-bit, run-time-stride version spent most of
// the stem's backward on them).
template <int kStride>
__device__ __forceinline__ int stride_of(const Geometry& g) {
  return kStride > 0 ? kStride : g.stride;
}

// The i-th element in memory order of an (n, c, rows, cols) tensor, NCHW or channels_last.
template <bool kChannelsLast, typename Index>
__device__ __forceinline__ void decompose(Index i, Index c, Index rows, Index cols, Index& n_,
                                          Index& c_, Index& r_, Index& q_) {
  if (kChannelsLast) {
    c_ = i % c; i /= c;
    q_ = i % cols; i /= cols;
    r_ = i % rows; n_ = i / rows;
  } else {
    q_ = i % cols; i /= cols;
    r_ = i % rows; i /= rows;
    c_ = i % c; n_ = i / c;
  }
}

// Each thread computes kRun outputs of one channel that are neighbours along W, so that every
// tap's offset and weight, loaded once, serve kRun multiply-adds (measured: loading them per
// output made the tap loop bound by load issue).
constexpr int kRun = 4;

// Accumulation in float for the 16-bit types and float, in double for double.
template <typename T, bool kChannelsLast, int kStride, typename Index,
          typename Acc = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads) oriented_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ weight, const int2* __restrict__ offsets,
    const T* __restrict__ bias, T* __restrict__ y, Geometry g) {
  const Index runs = Index((g.wo + kRun - 1) / kRun);
  const Index total = Index(g.n * g.c * g.ho) * runs;
  const int st = stride_of<kStride>(g);
  const Index xh = Index(g.xs[2]), xw = Index(g.xs[3]), yw = Index(g.ys[3]);
  for (Index i = blockIdx.x * Index(kThreads) + threadIdx.x; i < total;
       i += Index(gridDim.x) * kThreads) {
    Index n, c, p, run;
    decompose<kChannelsLast, Index>(i, Index(g.c), Index(g.ho), runs, n, c, p, run);
    const int q0 = int(run) * kRun;
    const T* plane = x + (n * Index(g.xs[0]) + c * Index(g.xs[1]));
    const int h0 = int(p) * st, w0 = q0 * st;
    Acc acc[kRun];
    const Acc b = bias != nullptr ? static_cast<Acc>(bias[c]) : Acc(0);
#pragma unroll
    for (int k = 0; k < kRun; ++k) acc[k] = b;
#pragma unroll 2
    for (int s = 0; s < g.taps; ++s) {
      const int2 off = offsets[s * int(g.c) + int(c)];
      const int h = h0 + off.x;
      if (unsigned(h) >= unsigned(g.h)) continue;
      const Acc wt = static_cast<Acc>(weight[s * int(g.c) + int(c)]);
      const T* row = plane + Index(h) * xh;
#pragma unroll
      for (int k = 0; k < kRun; ++k) {
        const int w = w0 + k * st + off.y;
        if (unsigned(w) < unsigned(g.w)) acc[k] += wt * static_cast<Acc>(row[Index(w) * xw]);
      }
    }
    T* out = y + (n * Index(g.ys[0]) + c * Index(g.ys[1]) + p * Index(g.ys[2]));
#pragma unroll
    for (int k = 0; k < kRun; ++k) {
      if (q0 + k < g.wo) out[Index(q0 + k) * yw] = static_cast<T>(acc[k]);
    }
  }
}

// The input gradient gathers, for input pixel (h, w), the taps whose output p = (h - dh) / st,
// q = (w - dw) / st exists. A thread takes kRun input columns of one residue r modulo the stride,
// w = w0 + r + st * k (k < kRun, w0 a multiple of st * kRun): a tap then reaches all of them or
// none ((w - dw) divisible by st for one k means for every k), and it reaches kRun consecutive
// gradient columns q0 + k. Per tap: one row test and one column test, then kRun multiply-adds on
// contiguous reads (measured on the stride-2 stem: one test per column, with per-column division,
// left three of four column slots idle). Whether a tap reaches a thread's columns depends on its
// offset and residue, so the lanes of a warp are laid out to agree: the residue is the slowest
// part of the run index (neighbouring runs share it), and on channels_last input with C a multiple
// of kChannelBlock the lanes take kChannelBlock channels of 32 / kChannelBlock neighbouring runs
// rather than 32 channels, since upstream's direction groups are runs of C / 8 channels (the
// stem's 64 channels: 8 per direction), and 32 channels would span four directions whose lanes
// take different taps.
constexpr int kChannelBlock = 8;

template <typename Index>
__device__ __forceinline__ void decompose_blocked(Index i, Index c, Index rows, Index cols,
                                                  Index& n_, Index& c_, Index& r_, Index& q_) {
  const Index inner = i % Index(kChannelBlock);
  i /= Index(kChannelBlock);
  q_ = i % cols; i /= cols;
  const Index blocks = c / Index(kChannelBlock);
  c_ = (i % blocks) * Index(kChannelBlock) + inner; i /= blocks;
  r_ = i % rows; n_ = i / rows;
}

template <typename T, bool kChannelsLast, int kStride, typename Index,
          typename Acc = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads) oriented_input_grad_kernel(
    const T* __restrict__ grad_out, const T* __restrict__ weight,
    const int2* __restrict__ offsets, T* __restrict__ grad_in, Geometry g) {
  const int st = stride_of<kStride>(g);
  const Index span = Index(st * kRun);
  const Index runs = Index((g.w + span - 1) / span) * Index(st);
  const Index total = Index(g.n * g.c * g.h) * runs;
  const Index yh = Index(g.ys[2]), yw = Index(g.ys[3]), xw = Index(g.xs[3]);
  for (Index i = blockIdx.x * Index(kThreads) + threadIdx.x; i < total;
       i += Index(gridDim.x) * kThreads) {
    Index n, c, h, run;
    if (kChannelsLast && g.c % kChannelBlock == 0) {
      decompose_blocked<Index>(i, Index(g.c), Index(g.h), runs, n, c, h, run);
    } else {
      decompose<kChannelsLast, Index>(i, Index(g.c), Index(g.h), runs, n, c, h, run);
    }
    const Index per_residue = runs / Index(st);
    const int r = int(run / per_residue);
    const int w0 = int(run % per_residue) * int(span) + r;
    const T* plane = grad_out + (n * Index(g.ys[0]) + c * Index(g.ys[1]));
    Acc acc[kRun];
#pragma unroll
    for (int k = 0; k < kRun; ++k) acc[k] = Acc(0);
#pragma unroll 2
    for (int s = 0; s < g.taps; ++s) {
      const int2 off = offsets[s * int(g.c) + int(c)];
      // p and q may be negative; a zero remainder still means divisible, and the division exact.
      const int p = int(h) - off.x, q = w0 - off.y;
      if (p < 0 || p % st != 0 || q % st != 0) continue;
      const int po = p / st, q0 = q / st;
      if (po >= g.ho) continue;
      const Acc wt = static_cast<Acc>(weight[s * int(g.c) + int(c)]);
      const T* row = plane + Index(po) * yh;
#pragma unroll
      for (int k = 0; k < kRun; ++k) {
        const int qk = q0 + k;
        if (unsigned(qk) < unsigned(g.wo)) acc[k] += wt * static_cast<Acc>(row[Index(qk) * yw]);
      }
    }
    T* out = grad_in + (n * Index(g.xs[0]) + c * Index(g.xs[1]) + h * Index(g.xs[2]));
#pragma unroll
    for (int k = 0; k < kRun; ++k) {
      const int w = w0 + st * k;
      if (w < g.w) out[Index(w) * xw] = static_cast<T>(acc[k]);
    }
  }
}

// Block = kChannels channels x (kThreads / kChannels) pixel lanes; grid = channel slices x chunks.
// partial[chunk, s, c] = sum over the chunk's outputs of dy * x at tap s.
template <typename T, int kChannels, int kStride, typename Index,
          typename Acc = at::opmath_type<T>>
__global__ void __launch_bounds__(kThreads) oriented_weight_grad_kernel(
    const T* __restrict__ x, const T* __restrict__ grad_out, const int2* __restrict__ offsets,
    Acc* __restrict__ partial, Geometry g, int64_t chunk_items) {
  constexpr int kLanes = kThreads / kChannels;
  __shared__ Acc sums[kTapChunk][kThreads];
  const int st = stride_of<kStride>(g);
  const int local_c = threadIdx.x % kChannels, lane = threadIdx.x / kChannels;
  const int64_t c = int64_t(blockIdx.x) * kChannels + local_c;
  const bool live = c < g.c;
  // Work items are runs of kRun outputs along W, as in the forward.
  const Index runs = Index((g.wo + kRun - 1) / kRun);
  const Index items = Index(g.n * g.ho) * runs;
  const Index begin = Index(int64_t(blockIdx.y) * chunk_items);
  const Index end = min(items, Index(begin + chunk_items));
  for (int s0 = 0; s0 < g.taps; s0 += kTapChunk) {
    Acc acc[kTapChunk];
#pragma unroll
    for (int j = 0; j < kTapChunk; ++j) acc[j] = Acc(0);
    if (live) {
      for (Index item = begin + lane; item < end; item += kLanes) {
        const Index run = item % runs, rest = item / runs;
        const Index p = rest % Index(g.ho), n = rest / Index(g.ho);
        const int q0 = int(run) * kRun;
        const T* dy_row = grad_out + (n * Index(g.ys[0]) + Index(c) * Index(g.ys[1]) +
                                      p * Index(g.ys[2]));
        Acc dy[kRun];
#pragma unroll
        for (int k = 0; k < kRun; ++k) {
          dy[k] = q0 + k < g.wo ? static_cast<Acc>(dy_row[Index(q0 + k) * Index(g.ys[3])])
                                : Acc(0);
        }
        const T* plane = x + (n * Index(g.xs[0]) + Index(c) * Index(g.xs[1]));
        const int h0 = int(p) * st, w0 = q0 * st;
#pragma unroll
        for (int j = 0; j < kTapChunk; ++j) {
          const int s = s0 + j;
          if (s >= g.taps) continue;
          const int2 off = offsets[s * int(g.c) + int(c)];
          const int h = h0 + off.x;
          if (unsigned(h) >= unsigned(g.h)) continue;
          const T* row = plane + Index(h) * Index(g.xs[2]);
#pragma unroll
          for (int k = 0; k < kRun; ++k) {
            const int w = w0 + k * st + off.y;
            if (unsigned(w) < unsigned(g.w)) {
              acc[j] += dy[k] * static_cast<Acc>(row[Index(w) * Index(g.xs[3])]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kTapChunk; ++j) sums[j][threadIdx.x] = acc[j];
    __syncthreads();
    // Tree over the lanes, in a fixed order: sums[j][lane * kChannels + local_c].
    for (int half = kLanes / 2; half > 0; half /= 2) {
      for (int idx = threadIdx.x; idx < kTapChunk * kChannels * half; idx += kThreads) {
        const int j = idx / (kChannels * half), r = idx % (kChannels * half);
        sums[j][r] += sums[j][r + half * kChannels];
      }
      __syncthreads();
    }
    for (int idx = threadIdx.x; idx < kTapChunk * kChannels; idx += kThreads) {
      const int j = idx / kChannels, cl = idx % kChannels;
      const int64_t cc = int64_t(blockIdx.x) * kChannels + cl;
      if (s0 + j < g.taps && cc < g.c) {
        partial[(int64_t(blockIdx.y) * g.taps + s0 + j) * g.c + cc] = sums[j][cl];
      }
    }
    __syncthreads();
  }
}

// Calls f with the compile-time variant of a kernel: layout, stride (1, 2, other) and index
// type (32-bit when every index of the launch fits).
template <typename F>
void with_variant(bool channels_last, int64_t stride, int64_t max_index, F&& f) {
  auto with_index = [&](auto cl, auto st) {
    if (max_index < (int64_t(1) << 31)) {
      f(cl, st, uint32_t(0));
    } else {
      f(cl, st, int64_t(0));
    }
  };
  auto with_stride = [&](auto cl) {
    if (stride == 1) {
      with_index(cl, std::integral_constant<int, 1>{});
    } else if (stride == 2) {
      with_index(cl, std::integral_constant<int, 2>{});
    } else {
      with_index(cl, std::integral_constant<int, 0>{});
    }
  };
  if (channels_last) {
    with_stride(std::true_type{});
  } else {
    with_stride(std::false_type{});
  }
}

// Channels_last when the tensor is laid out so (not when it is also plainly contiguous).
bool channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor in_layout(const at::Tensor& t, bool cl) {
  return t.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

Geometry make_geometry(const at::Tensor& full, const at::Tensor& strided, int64_t taps,
                       int64_t stride) {
  Geometry g;
  g.n = full.size(0);
  g.c = full.size(1);
  g.h = full.size(2);
  g.w = full.size(3);
  g.ho = strided.size(2);
  g.wo = strided.size(3);
  g.taps = int(taps);
  g.stride = int(stride);
  for (int d = 0; d < 4; ++d) {
    g.xs[d] = full.stride(d);
    g.ys[d] = strided.stride(d);
  }
  return g;
}

void check_args(const at::Tensor& t, const at::Tensor& weight, const at::Tensor& offsets,
                int64_t stride) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 4, "oriented conv: expected a 4-D CUDA tensor");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == t.size(1) && weight.is_contiguous() &&
                  weight.scalar_type() == t.scalar_type(),
              "oriented conv: weight must be contiguous (S, C) of the input's dtype");
  TORCH_CHECK(offsets.dim() == 3 && offsets.size(0) == weight.size(0) &&
                  offsets.size(1) == weight.size(1) && offsets.size(2) == 2 &&
                  offsets.scalar_type() == at::kInt && offsets.is_contiguous(),
              "oriented conv: offsets must be contiguous int32 (S, C, 2)");
  TORCH_CHECK(stride >= 1, "oriented conv: stride must be >= 1");
}

// The plane formulation where the plan asks for it; refused where it cannot take the conv (the
// plan's mirror and the kernels disagree).
bool runs_plane(bool plane, bool cl, const at::Tensor& full, int64_t taps, int64_t stride) {
  if (plane) {
    TORCH_CHECK(!cl && stride == 1 && plane_takes(full.size(0), full.size(1), full.size(2),
                                                  full.size(3), taps, full.scalar_type()),
                "oriented conv: the plane formulation cannot take this conv (stride ", stride,
                ", channels_last ", cl, ", shape ", full.sizes(), ", ", taps, " taps, ",
                full.scalar_type(), "); kernels/plan.py's oriented_formulation should not ask");
  }
  return plane;
}

int grid_for(int64_t total) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return int(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, sms * 16)));
}

at::Tensor oriented_forward(const at::Tensor& x_in, const at::Tensor& weight,
                            const at::Tensor& offsets, const c10::optional<at::Tensor>& bias,
                            int64_t stride, bool plane) {
  check_args(x_in, weight, offsets, stride);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = channels_last(x_in);
  const at::Tensor x = in_layout(x_in, cl);
  const int64_t ho = (x.size(2) - 1) / stride + 1, wo = (x.size(3) - 1) / stride + 1;
  at::Tensor y = at::empty({x.size(0), x.size(1), ho, wo},
                           x.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                        : at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const Geometry g = make_geometry(x, y, weight.size(0), stride);
  const at::Tensor b_t = bias.has_value() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!b_t.defined() || (b_t.numel() == x.size(1) && b_t.scalar_type() == x.scalar_type()),
              "oriented conv: bias must have C elements of the input's dtype");
  if (runs_plane(plane, cl, x, weight.size(0), stride)) {
    plane_gather(x, weight, offsets, b_t, y, false);
    return y;
  }
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "oriented_forward", [&] {
    const scalar_t* b = b_t.defined() ? b_t.data_ptr<scalar_t>() : nullptr;
    const auto* off = reinterpret_cast<const int2*>(offsets.data_ptr<int>());
    with_variant(cl, stride, std::max(x.numel(), y.numel()), [&](auto layout, auto st, auto index) {
      oriented_forward_kernel<scalar_t, decltype(layout)::value, decltype(st)::value,
                              decltype(index)><<<grid_for(y.numel() / kRun), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), off, b, y.data_ptr<scalar_t>(), g);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

at::Tensor oriented_input_grad(const at::Tensor& grad_in, const at::Tensor& weight,
                               const at::Tensor& offsets, int64_t height, int64_t width,
                               int64_t stride, bool plane) {
  check_args(grad_in, weight, offsets, stride);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const bool cl = channels_last(grad_in);
  const at::Tensor dy = in_layout(grad_in, cl);
  TORCH_CHECK(dy.size(2) == (height - 1) / stride + 1 && dy.size(3) == (width - 1) / stride + 1,
              "oriented conv: gradient shape does not match the input size and stride");
  at::Tensor dx = at::empty({dy.size(0), dy.size(1), height, width},
                            dy.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                          : at::MemoryFormat::Contiguous));
  if (dx.numel() == 0) return dx;
  if (runs_plane(plane, cl, dx, weight.size(0), stride)) {
    plane_gather(dy, weight, offsets, at::Tensor(), dx, true);
    return dx;
  }
  const Geometry g = make_geometry(dx, dy, weight.size(0), stride);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "oriented_input_grad", [&] {
    const auto* off = reinterpret_cast<const int2*>(offsets.data_ptr<int>());
    with_variant(cl, stride, dx.numel(), [&](auto layout, auto st, auto index) {
      oriented_input_grad_kernel<scalar_t, decltype(layout)::value, decltype(st)::value,
                                 decltype(index)><<<grid_for(dx.numel() / kRun), kThreads, 0,
                                                     stream>>>(
          dy.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), off, dx.data_ptr<scalar_t>(), g);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

// The weight gradient as (S, C), float32 (float64 for double input).
at::Tensor oriented_weight_grad(const at::Tensor& x_in, const at::Tensor& grad_in,
                                const at::Tensor& offsets, int64_t stride) {
  TORCH_CHECK(x_in.is_cuda() && grad_in.is_cuda() && x_in.dim() == 4 && grad_in.dim() == 4 &&
                  x_in.scalar_type() == grad_in.scalar_type(),
              "oriented conv: x and grad must be 4-D CUDA tensors of one dtype");
  TORCH_CHECK(offsets.dim() == 3 && offsets.size(1) == x_in.size(1) &&
                  offsets.scalar_type() == at::kInt && offsets.is_contiguous(),
              "oriented conv: offsets must be contiguous int32 (S, C, 2)");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const bool cl = channels_last(x_in);
  const at::Tensor x = in_layout(x_in, cl), dy = in_layout(grad_in, cl);
  const int64_t taps = offsets.size(0), channels = x.size(1);
  TORCH_CHECK(dy.size(0) == x.size(0) && dy.size(1) == channels &&
                  dy.size(2) == (x.size(2) - 1) / stride + 1 &&
                  dy.size(3) == (x.size(3) - 1) / stride + 1,
              "oriented conv: gradient shape does not match the input and stride");
  const Geometry g = make_geometry(x, dy, taps, stride);
  const int64_t items = g.n * g.ho * ((g.wo + kRun - 1) / kRun);
  const int block_channels = cl ? 32 : 1;
  const int64_t slices = (channels + block_channels - 1) / block_channels;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int lanes = kThreads / block_channels;
  // Enough chunks for ~8 blocks per SM, each lane still summing a few runs per chunk.
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>((8 * sms + slices - 1) / slices, (items + 4 * lanes - 1) / (4 * lanes)));
  const int64_t chunk_items = (items + chunks - 1) / chunks;
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor partial = at::zeros({chunks, taps, channels}, x.options().dtype(acc_type));
  if (items == 0) return partial.sum(0);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid{static_cast<unsigned>(slices), static_cast<unsigned>(chunks)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "oriented_weight_grad", [&] {
    const auto* off = reinterpret_cast<const int2*>(offsets.data_ptr<int>());
    with_variant(cl, stride, std::max(x.numel(), dy.numel()), [&](auto layout, auto st, auto index) {
      oriented_weight_grad_kernel<scalar_t, decltype(layout)::value ? 32 : 1, decltype(st)::value,
                                  decltype(index)><<<grid, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), dy.data_ptr<scalar_t>(), off,
          partial.data_ptr<at::opmath_type<scalar_t>>(), g, chunk_items);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial.sum(0);
}

}  // namespace
}  // namespace lknets

TORCH_LIBRARY_FRAGMENT(lknets_cuda, m) {
  m.def("oriented_forward(Tensor x, Tensor weight, Tensor offsets, Tensor? bias, int stride, "
        "bool plane) -> Tensor");
  m.def("oriented_input_grad(Tensor grad_out, Tensor weight, Tensor offsets, int height, "
        "int width, int stride, bool plane) -> Tensor");
  m.def("oriented_weight_grad(Tensor x, Tensor grad_out, Tensor offsets, int stride) -> Tensor");
  // What kernels/plan.py's oriented_formulation mirrors, for the tests (no tensor: any device).
  m.def("oriented_plane_takes(int n, int c, int h, int w, int taps, ScalarType dtype) -> bool",
        &lknets::plane_takes);
}

TORCH_LIBRARY_IMPL(lknets_cuda, CUDA, m) {
  m.impl("oriented_forward", &lknets::oriented_forward);
  m.impl("oriented_input_grad", &lknets::oriented_input_grad);
  m.impl("oriented_weight_grad", &lknets::oriented_weight_grad);
}
