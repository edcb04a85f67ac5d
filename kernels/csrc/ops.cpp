// Torch glue for the depthwise-conv kernels: argument checks, output allocation, and registration
// of the CUDA operators lknets_cuda::{forward, input_grad, weight_grad}. The Python op in
// kernels/ops.py (autograd, fake tensors, autocast) calls these.
//
// Layout: the kernels address every tensor through its strides, so NCHW, channels_last and other
// views are read and written in place (no copies). Outputs take x's layout: channels_last when x is
// channels_last, NCHW otherwise. Each operator runs the formulation and orientation it is given
// (kernels/plan.py decides them): `formulation` indexes the Formulation enum, `transposed` runs
// the launch on the H/W-transposed views of its tensors and kernel (a stride swap, not a copy).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dwconv.h"

#include <utility>

namespace lknets {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, "lknets depthwise conv: dtype ", t.scalar_type(),
                  " is not supported; accepted: float32, float16, bfloat16");
  }
  return DType::kFloat32;
}

at::MemoryFormat layout_of(const at::Tensor& t) {
  return (!t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast))
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// Known problem: on the H100 machine's build (g++ 13.3, torch 2.11) a failing TORCH_CHECK whose
// message formats integers or shapes ended the process with SIGSEGV instead of raising (the dtype
// check below raises normally; the cause is not found). kernels/ops.py therefore checks shapes,
// padding and kernel sizes in Python before calling these operators.
void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lknets depthwise conv: ", name, " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == 4, "lknets depthwise conv: ", name, " must be 4-D (N, C, H, W), got ",
              t.sizes());
  TORCH_CHECK(t.numel() < (int64_t(1) << 31) * 64, "lknets depthwise conv: ", name,
              " is too large");
}

void check_kernel_size(int64_t kh, int64_t kw) {
  TORCH_CHECK(kh >= 1 && kh <= 63 && kw >= 1 && kw <= 63,
              "lknets depthwise conv: kernel size must be within 1..63 per side, got ", kh, "x", kw);
}

void check_weight(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(0) == x.size(1),
              "lknets depthwise conv: weight must be (C, 1, kh, kw) with C = ", x.size(1),
              ", got ", weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), "lknets depthwise conv: weight is on ",
              weight.device(), " but the input is on ", x.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "lknets depthwise conv: weight dtype ",
              weight.scalar_type(), " differs from the input dtype ", x.scalar_type());
  check_kernel_size(weight.size(2), weight.size(3));
}

Formulation formulation_of(int64_t index) {
  TORCH_CHECK(index >= 0 && index < kNumFormulations,
              "lknets depthwise conv: unknown formulation index (kernels/plan.py FORMULATIONS)");
  return static_cast<Formulation>(index);
}

// The shape of out = in (*) k for the (possibly H/W-transposed) views `in` and `out`.
ConvShape make_shape(const at::Tensor& in, const at::Tensor& out, int64_t kh, int64_t kw,
                     int64_t pad_h, int64_t pad_w) {
  ConvShape s{};
  s.N = static_cast<int>(in.size(0));
  s.C = static_cast<int>(in.size(1));
  s.H = static_cast<int>(in.size(2));
  s.W = static_cast<int>(in.size(3));
  s.Ho = static_cast<int>(out.size(2));
  s.Wo = static_cast<int>(out.size(3));
  s.kh = static_cast<int>(kh);
  s.kw = static_cast<int>(kw);
  s.pad_h = static_cast<int>(pad_h);
  s.pad_w = static_cast<int>(pad_w);
  for (int d = 0; d < 4; ++d) {
    s.in_stride[d] = in.stride(d);
    s.out_stride[d] = out.stride(d);
  }
  return s;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lknets depthwise conv: ", what, " failed: ",
              cudaGetErrorString(err));
}

// A plan that the kernels refuse means plan.py's mirror of `supports` and the kernels disagree.
void check_supported(Formulation f, bool weight_grad, DType dtype, const ConvShape& s) {
  TORCH_CHECK(supports(f, weight_grad, dtype, s),
              "lknets depthwise conv: the planned formulation cannot take this shape "
              "(kernels/plan.py and the kernels disagree)");
}

// out = in (*) weight (+ bias); `flip` rotates the kernel by 180 degrees (the input gradient).
at::Tensor correlate(const at::Tensor& in, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, int64_t pad_h, int64_t pad_w,
                     bool flip, Formulation formulation, bool transpose) {
  const int64_t kh = weight.size(2), kw = weight.size(3);
  const int64_t Ho = in.size(2) + 2 * pad_h - kh + 1;
  const int64_t Wo = in.size(3) + 2 * pad_w - kw + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "lknets depthwise conv: kernel ", kh, "x", kw,
              " with padding (", pad_h, ", ", pad_w, ") does not fit the input ", in.sizes());
  at::Tensor out = at::empty({in.size(0), in.size(1), Ho, Wo},
                             in.options().memory_format(layout_of(in)));
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(in.device());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == in.size(1),
                "lknets depthwise conv: bias must be (C,) with C = ", in.size(1), ", got ",
                bias->sizes());
    b = bias->to(in.scalar_type()).contiguous();
  }
  // The kernels read the weight where it is: the rotation and the transposed view are strides.
  Filter f{weight.data_ptr(), 0, {weight.stride(0), weight.stride(2), weight.stride(3)},
           b.defined() ? b.data_ptr() : nullptr};
  if (flip) {
    f.offset = (kh - 1) * f.stride[1] + (kw - 1) * f.stride[2];
    f.stride[1] = -f.stride[1];
    f.stride[2] = -f.stride[2];
  }
  if (transpose) std::swap(f.stride[1], f.stride[2]);
  const at::Tensor in_v = transpose ? in.transpose(2, 3) : in;
  const at::Tensor out_v = transpose ? out.transpose(2, 3) : out;
  const ConvShape s = transpose ? make_shape(in_v, out_v, kw, kh, pad_w, pad_h)
                                : make_shape(in_v, out_v, kh, kw, pad_h, pad_w);
  check_supported(formulation, false, dtype_of(in), s);
  check_launch(launch_forward(formulation, dtype_of(in), in_v.data_ptr(), f, out_v.data_ptr(), s,
                              c10::cuda::getCurrentCUDAStream().stream()),
               "forward kernel");
  return out;
}

at::Tensor forward(const at::Tensor& x, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, int64_t pad_h, int64_t pad_w,
                   int64_t formulation, bool transposed) {
  check_activation(x, "input");
  check_weight(x, weight);
  TORCH_CHECK(pad_h >= 0 && pad_w >= 0, "lknets depthwise conv: padding must be >= 0, got (",
              pad_h, ", ", pad_w, ")");
  return correlate(x, weight, bias, pad_h, pad_w, /*flip=*/false, formulation_of(formulation),
                   transposed);
}

// grad_input = grad_out (*) rot180(weight) with padding k - 1 - pad (negative padding crops).
at::Tensor input_grad(const at::Tensor& grad_out, const at::Tensor& weight, int64_t pad_h,
                      int64_t pad_w, int64_t formulation, bool transposed) {
  check_activation(grad_out, "grad_output");
  check_weight(grad_out, weight);
  return correlate(grad_out, weight, std::nullopt, weight.size(2) - 1 - pad_h,
                   weight.size(3) - 1 - pad_w, /*flip=*/true, formulation_of(formulation),
                   transposed);
}

at::Tensor weight_grad(const at::Tensor& x, const at::Tensor& grad_out, int64_t kh, int64_t kw,
                       int64_t pad_h, int64_t pad_w, int64_t formulation, bool transpose) {
  const Formulation algo = formulation_of(formulation);
  check_activation(x, "input");
  check_activation(grad_out, "grad_output");
  check_kernel_size(kh, kw);
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "lknets depthwise conv: grad_output dtype ",
              grad_out.scalar_type(), " differs from the input dtype ", x.scalar_type());
  TORCH_CHECK(grad_out.size(0) == x.size(0) && grad_out.size(1) == x.size(1) &&
                  grad_out.size(2) == x.size(2) + 2 * pad_h - kh + 1 &&
                  grad_out.size(3) == x.size(3) + 2 * pad_w - kw + 1,
              "lknets depthwise conv: grad_output ", grad_out.sizes(),
              " does not match the input ", x.sizes(), " with kernel ", kh, "x", kw,
              " and padding (", pad_h, ", ", pad_w, ")");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_w = at::empty({x.size(1), 1, transpose ? kw : kh, transpose ? kh : kw},
                                x.options());
  if (x.numel() == 0 || grad_out.numel() == 0) {
    grad_w.zero_();
  } else {
    const at::Tensor x_v = transpose ? x.transpose(2, 3) : x;
    const at::Tensor g_v = transpose ? grad_out.transpose(2, 3) : grad_out;
    const ConvShape s = transpose ? make_shape(x_v, g_v, kw, kh, pad_w, pad_h)
                                  : make_shape(x_v, g_v, kh, kw, pad_h, pad_w);
    check_supported(algo, true, dtype_of(x), s);
    at::Tensor workspace = at::empty({weight_grad_workspace_floats(algo, dtype_of(x), s)},
                                     x.options().dtype(at::kFloat));
    check_launch(launch_weight_grad(algo, dtype_of(x), x_v.data_ptr(), g_v.data_ptr(),
                                    workspace.data_ptr<float>(), grad_w.data_ptr(), s,
                                    c10::cuda::getCurrentCUDAStream().stream()),
                 "weight-gradient kernel");
  }
  return transpose ? grad_w.transpose(2, 3).contiguous() : grad_w;
}

// Whether formulation `index` takes the launch `shape` = (N, C, H, W, Ho, Wo, kh, kw, pad_h,
// pad_w) (contiguous strides): what kernels/plan.py's `supports` mirrors, for the tests.
bool supports_shape(int64_t index, bool weight_grad, at::ScalarType dtype,
                    c10::IntArrayRef shape) {
  TORCH_CHECK(shape.size() == 10, "lknets depthwise conv: supports takes 10 sizes");
  const at::Tensor in = at::empty({shape[0], shape[1], shape[2], shape[3]},
                                  at::TensorOptions().dtype(dtype).device(at::kMeta));
  const at::Tensor out = at::empty({shape[0], shape[1], shape[4], shape[5]}, in.options());
  const ConvShape s = make_shape(in, out, shape[6], shape[7], shape[8], shape[9]);
  return supports(formulation_of(index), weight_grad, dtype_of(in), s);
}

}  // namespace
}  // namespace lknets

TORCH_LIBRARY(lknets_cuda, m) {
  m.def(
      "forward(Tensor x, Tensor weight, Tensor? bias, int pad_h, int pad_w, int formulation, "
      "bool transposed) -> Tensor");
  m.def(
      "input_grad(Tensor grad_out, Tensor weight, int pad_h, int pad_w, int formulation, "
      "bool transposed) -> Tensor");
  m.def(
      "weight_grad(Tensor x, Tensor grad_out, int kernel_h, int kernel_w, int pad_h, int pad_w, "
      "int formulation, bool transposed) -> Tensor");
  m.def("supports(int formulation, bool weight_grad, ScalarType dtype, int[] shape) -> bool",
        &lknets::supports_shape);
}

TORCH_LIBRARY_IMPL(lknets_cuda, CUDA, m) {
  m.impl("forward", &lknets::forward);
  m.impl("input_grad", &lknets::input_grad);
  m.impl("weight_grad", &lknets::weight_grad);
}

// `import kernels._C` only has to run the registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
