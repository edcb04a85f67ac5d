// Launch interface of the depthwise-conv kernels. Kept free of torch headers so that the .cu
// translation unit compiles quickly; the torch glue lives in ops.cpp.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace lknets {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// One depthwise, stride-1 cross-correlation problem. `in` is (N, C, H, W) and `out` is
// (N, C, Ho, Wo) with Ho = H + 2 * pad_h - kh + 1; both addressed through element strides, so any
// memory layout (NCHW, channels_last, views) is read and written in place.
struct ConvShape {
  int N, C, H, W;
  int Ho, Wo;
  int kh, kw;
  int pad_h, pad_w;  // may be negative (the input gradient of a conv padded by more than k - 1)
  int64_t in_stride[4];
  int64_t out_stride[4];
};

// The kernel and bias a forward launch applies, read in place in the input's dtype: tap (c, i, j)
// is weight[offset + c * stride[0] + i * stride[1] + j * stride[2]] (strides may be negative), so
// the input gradient's rotated kernel and the tall kernels' transposed view need no copy, nor a
// cast to fp32 first. `bias` is (C) contiguous, or null.
struct Filter {
  const void* weight;
  int64_t offset;
  int64_t stride[3];
  const void* bias;
};

// The formulations, numbered as FORMULATIONS in kernels/plan.py, which decides which one each
// launch runs (the direct CUDA-core kernels, and the plane, small-plane, mid-plane and
// row-Toeplitz tensor-core GEMMs). `supports` says whether one can take a shape (plan.py mirrors
// it; tests assert they agree); ops.cpp refuses a launch whose formulation does not take it.
enum class Formulation : int { kDirect = 0, kPlane = 1, kSmall = 2, kMid = 3, kRows = 4 };
constexpr int kNumFormulations = 5;
bool supports(Formulation f, bool weight_grad, DType dtype, const ConvShape& shape);

// y = x (*) filter + bias.
cudaError_t launch_forward(Formulation f, DType dtype, const void* x, const Filter& filter,
                           void* y, const ConvShape& shape, cudaStream_t stream);

// Weight gradient dw[c, i, j] = sum over n, oy, ox of dy[n, c, oy, ox] * x[n, c, oy + i - ph, ox + j - pw].
// `in` of the shape is x, `out` is dy. It runs in two deterministic passes: per-block partial sums
// into `workspace` (fp32, weight_grad_workspace_floats() elements), then a fixed-order reduction
// into `grad_weight` (contiguous (C, kh, kw), of `dtype`). The GEMM path needs no workspace.
int64_t weight_grad_workspace_floats(Formulation f, DType dtype, const ConvShape& shape);
cudaError_t launch_weight_grad(Formulation f, DType dtype, const void* x, const void* grad_out,
                               float* workspace, void* grad_weight, const ConvShape& shape,
                               cudaStream_t stream);

// Plane GEMM, tensor cores, every dtype (dwconv_gemm.cu; fp32 as 3xTF32).
bool gemm_forward_supported(const ConvShape& shape);
bool gemm_weight_grad_supported(const ConvShape& shape);
cudaError_t launch_forward_gemm(DType dtype, const void* x, const Filter& filter, void* y,
                                const ConvShape& shape, cudaStream_t stream);
cudaError_t launch_weight_grad_gemm(DType dtype, const void* x, const void* grad_out,
                                    void* grad_weight, const ConvShape& shape, cudaStream_t stream);

// Row-Toeplitz tensor-core formulation (dwconv_rows.cu): one GEMM per kernel row, for planes too
// large for the plane GEMM, every dtype (fp32 as 3xTF32). Its weight gradient reduces per-block
// partial sums from `workspace` (rows_weight_grad_workspace_floats() floats) in a fixed order.
int64_t rows_weight_grad_workspace_floats(DType dtype, const ConvShape& shape, int num_sms);
cudaError_t launch_forward_rows(DType dtype, const void* x, const Filter& filter, void* y,
                                const ConvShape& shape, cudaStream_t stream);
cudaError_t launch_weight_grad_rows(DType dtype, const void* x, const void* grad_out,
                                    float* workspace, void* grad_weight, const ConvShape& shape,
                                    int num_sms, cudaStream_t stream);

// Small-plane tensor-core formulation (dwconv_small.cu): planes of at most 16x16, the batch as the
// GEMM's M, every dtype (fp32 as 3xTF32); its weight gradient needs no workspace.
bool small_supported(const ConvShape& shape);
cudaError_t launch_forward_small(DType dtype, const void* x, const Filter& filter, void* y,
                                 const ConvShape& shape, cudaStream_t stream);
cudaError_t launch_weight_grad_small(DType dtype, const void* x, const void* grad_out,
                                     void* grad_weight, const ConvShape& shape,
                                     cudaStream_t stream);

// Mid-plane tensor-core formulation (dwconv_mid.cu), fp32 only (3xTF32): the batch as M, rows in
// 8-column chunks; forward on planes of 17 to 64 columns (kernel taps reaching at most 24 columns),
// weight gradient on 17 to 32. Its weight gradient reduces per-block partial sums from `workspace`
// (mid_weight_grad_workspace_floats() floats) in a fixed order.
bool mid_forward_supported(const ConvShape& shape);
bool mid_weight_grad_supported(const ConvShape& shape);
int64_t mid_weight_grad_workspace_floats(const ConvShape& shape);
cudaError_t launch_forward_mid(const void* x, const Filter& filter, void* y,
                               const ConvShape& shape, cudaStream_t stream);
cudaError_t launch_weight_grad_mid(const void* x, const void* grad_out, float* workspace,
                                   void* grad_weight, const ConvShape& shape,
                                   cudaStream_t stream);

// out[i] = sum over k < num_partials of partials[k * count + i], in that order, cast to `dtype`.
cudaError_t launch_reduce_partials(DType dtype, const float* partials, int num_partials,
                                   int64_t count, void* out, cudaStream_t stream);

}  // namespace lknets
