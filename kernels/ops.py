"""The depthwise-conv operator: ``lknets::dwconv2d`` and its gradients as torch custom ops.

The ops are defined in Python so that they exist (for torch.compile tracing, fake tensors and
autograd) whether or not the CUDA extension is built; the extension is loaded, or JIT-built and
cached, on the first call that runs on a GPU. Eager calls on plain CUDA tensors take a leaner
autograd.Function over the same extension ops (host time). The weight gradient is deterministic:
per-block partial sums are reduced in a fixed order, with no atomics.

The extension runs every dtype on tensor-core (GEMM) formulations; which one each launch takes,
whether tall kernels run on transposed views, and how a dilated conv runs (its interleaved
sub-grids, or its dense zero-filled kernel) is decided in kernels/plan.py, and the extension runs
exactly the formulation it is given. The tensor-core paths are NCHW-native: other layouts are read
and written through strides.
"""
from __future__ import annotations

import functools
import threading
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import plan
from .plan import _channels_last, _pair, _same_padding

__all__ = ["depthwise_conv2d", "dilate_kernel", "load_extension", "is_available", "is_built",
           "split_subgrids", "merge_subgrids"]

_lock = threading.Lock()
_state = {"loaded": False, "error": None}


def is_built() -> bool:
    """True when ``kernels._C`` was compiled in place (setup.py build_ext / install)."""
    import importlib.util
    return importlib.util.find_spec("kernels._C") is not None


def load_extension(jit: bool = True):
    """Load the compiled operators (``torch.ops.lknets_cuda``), JIT-building them if allowed.

    Raises RuntimeError with the reason when they cannot be had; the failure is remembered, so
    later calls fail fast instead of retrying a multi-minute build.
    """
    with _lock:
        if not _state["loaded"]:
            if _state["error"] is not None:
                raise RuntimeError(_state["error"])
            try:
                _load(jit)
            except Exception as exc:  # remembered and re-raised with its message
                _state["error"] = f"lknets kernels unavailable: {exc}"
                raise RuntimeError(_state["error"]) from exc
            _state["loaded"] = True
    return torch.ops.lknets_cuda


def _load(jit: bool) -> None:
    if torch.version.cuda is None:
        raise RuntimeError("this torch build has no CUDA support")
    try:
        from . import _C  # noqa: F401  (registers the ops)
        return
    except ImportError as exc:
        if not jit:
            raise RuntimeError(f"kernels._C is not built ({exc}); run `python setup.py build_ext "
                               "--inplace`") from exc
    from . import _build
    import warnings
    warnings.warn("lknets kernels: kernels._C is not built; compiling it now with "
                  "torch.utils.cpp_extension (a few minutes, once; cached for later runs)",
                  stacklevel=3)
    _build.jit_build()


def is_available(jit: bool = True) -> bool:
    """True when a CUDA device is present and the operators load (building them if ``jit``)."""
    if not torch.cuda.is_available():
        return False
    try:
        load_extension(jit)
    except RuntimeError:
        return False
    return True


def _output_layout(t: Tensor) -> torch.memory_format:
    # Mirrors ops.cpp and oriented.cu: outputs are channels_last only when the input is strictly
    # channels_last.
    return torch.channels_last if _channels_last(t) else torch.contiguous_format


@torch.library.custom_op("lknets::dwconv2d", mutates_args=(), device_types="cuda")
def dwconv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], pad_h: int, pad_w: int) -> Tensor:
    return _forward(load_extension(), x, weight, bias, pad_h, pad_w)


@dwconv2d.register_fake
def _dwconv2d_fake(x, weight, bias, pad_h, pad_w):
    n, c, h, w = x.shape
    kh, kw = weight.shape[-2:]
    return torch.empty((n, c, h + 2 * pad_h - kh + 1, w + 2 * pad_w - kw + 1), dtype=x.dtype,
                       device=x.device, memory_format=_output_layout(x))


@torch.library.custom_op("lknets::dwconv2d_input_grad", mutates_args=(), device_types="cuda")
def dwconv2d_input_grad(grad_out: Tensor, weight: Tensor, pad_h: int, pad_w: int) -> Tensor:
    return _input_grad(load_extension(), grad_out, weight, pad_h, pad_w)


@dwconv2d_input_grad.register_fake
def _dwconv2d_input_grad_fake(grad_out, weight, pad_h, pad_w):
    n, c, ho, wo = grad_out.shape
    kh, kw = weight.shape[-2:]
    return torch.empty((n, c, ho - 2 * pad_h + kh - 1, wo - 2 * pad_w + kw - 1),
                       dtype=grad_out.dtype, device=grad_out.device,
                       memory_format=_output_layout(grad_out))


@torch.library.custom_op("lknets::dwconv2d_weight_grad", mutates_args=(), device_types="cuda")
def dwconv2d_weight_grad(x: Tensor, grad_out: Tensor, kernel_h: int, kernel_w: int, pad_h: int,
                         pad_w: int) -> Tensor:
    return _weight_grad(load_extension(), x, grad_out, kernel_h, kernel_w, pad_h, pad_w)


@dwconv2d_weight_grad.register_fake
def _dwconv2d_weight_grad_fake(x, grad_out, kernel_h, kernel_w, pad_h, pad_w):
    return x.new_empty((x.shape[1], 1, kernel_h, kernel_w))


# Each launch runs the formulation kernels/plan.py gives it (an index into plan.FORMULATIONS) on
# the transposed views when the plan says so.
def _forward(ops, x, weight, bias, pad_h, pad_w):
    kernel = tuple(weight.shape[-2:])
    algo, swap = plan.formulation("forward", x, kernel, (pad_h, pad_w))
    return ops.forward(x, weight, bias, pad_h, pad_w, algo, swap)


def _input_grad(ops, grad_out, weight, pad_h, pad_w):
    kernel = tuple(weight.shape[-2:])
    algo, swap = plan.formulation("input_grad", grad_out, kernel, (pad_h, pad_w))
    return ops.input_grad(grad_out, weight, pad_h, pad_w, algo, swap)


def _weight_grad(ops, x, grad_out, kernel_h, kernel_w, pad_h, pad_w):
    algo, swap = plan.formulation("weight_grad", x, (kernel_h, kernel_w), (pad_h, pad_w))
    return ops.weight_grad(x, grad_out, kernel_h, kernel_w, pad_h, pad_w, algo, swap)


def _setup_context(ctx, inputs, output):
    x, weight, bias, pad_h, pad_w = inputs
    ctx.save_for_backward(x, weight)
    ctx.pad = (pad_h, pad_w)
    ctx.has_bias = bias is not None


def _gradients(ctx, grad: Tensor, input_grad, weight_grad):
    x, weight = ctx.saved_tensors
    pad_h, pad_w = ctx.pad
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = input_grad(grad, weight, pad_h, pad_w)
    if ctx.needs_input_grad[1]:
        grad_w = weight_grad(x, grad, weight.shape[2], weight.shape[3], pad_h, pad_w)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.sum((0, 2, 3), dtype=torch.float32).to(grad.dtype)
    return grad_x, grad_w, grad_b, None, None


def _backward(ctx, grad: Tensor):
    return _gradients(ctx, grad, dwconv2d_input_grad, dwconv2d_weight_grad)


dwconv2d.register_autograd(_backward, setup_context=_setup_context)


class _EagerDwconv2d(torch.autograd.Function):
    """The same op for eager calls on plain CUDA tensors, calling the extension directly.

    A Python custom op's dispatch cost about 80 us of host time per forward and 350 us per
    backward (H100 machine, torch 2.11; the extension's own op 17 us), which left the GPU idle in
    models with many small depthwise convs (UniRepLKNet-T trained slower than on torch's path).
    torch.compile, fake tensors and tensor subclasses still go through ``lknets::dwconv2d``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, pad_h, pad_w):
        _setup_context(ctx, (x, weight, bias, pad_h, pad_w), None)
        return _forward(load_extension(), x, weight, bias, pad_h, pad_w)

    @staticmethod
    def backward(ctx, grad):
        ops = load_extension()
        return _gradients(ctx, grad, functools.partial(_input_grad, ops),
                          functools.partial(_weight_grad, ops))


def dilate_kernel(kernel: Tensor, dilation) -> Tensor:
    """The dense kernel equivalent to ``kernel`` applied with ``dilation`` (int or pair): each
    k-tap side becomes dilation * (k - 1) + 1 taps, with dilation - 1 zeros between the taps.
    Differentiable: the dense kernel's gradient reaches the taps."""
    dh, dw = _pair(dilation)
    if (dh, dw) == (1, 1):
        return kernel
    kh, kw = kernel.shape[-2:]
    dense = kernel.new_zeros(*kernel.shape[:-2], dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    dense[..., ::dh, ::dw] = kernel
    return dense


def split_subgrids(x: Tensor, dilation: Tuple[int, int]) -> Tensor:
    """(N, C, H, W) -> (N * dh * dw, C, ceil(H / dh), ceil(W / dw)): image n's sub-grid of rows
    ``a::dh`` and columns ``b::dw`` becomes image ``(n * dh + a) * dw + b``. Sub-grids shorter
    than the longest are zero-filled at their end, as the conv's padding would be."""
    n, c, h, w = x.shape
    dh, dw = dilation
    hs, ws = -(-h // dh), -(-w // dw)
    if hs * dh != h or ws * dw != w:
        x = torch.nn.functional.pad(x, (0, ws * dw - w, 0, hs * dh - h))
    return x.view(n, c, hs, dh, ws, dw).permute(0, 3, 5, 1, 2, 4).reshape(n * dh * dw, c, hs, ws)


def merge_subgrids(y: Tensor, dilation: Tuple[int, int], height: int, width: int) -> Tensor:
    """The inverse of :func:`split_subgrids`: interleave the sub-grids of each image back into one
    (N, C, height, width) image, dropping the zero-filled tail."""
    dh, dw = dilation
    b, c, hs, ws = y.shape
    y = y.view(b // (dh * dw), dh, dw, c, hs, ws).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(b // (dh * dw), c, hs * dh, ws * dw)[:, :, :height, :width]


def depthwise_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     padding=None, dilation=1) -> Tensor:
    """Depthwise, stride-1 cross-correlation of ``x`` (N, C, H, W) with ``weight`` (C, 1, kh, kw):
    lknets' kernels on CUDA tensors, torch's convolution on CPU tensors.

    ``padding`` (int or pair) defaults to half the dilated kernel, ``dilation * (k // 2)`` ('same'
    for odd kernels); with ``dilation`` (int or pair) above 1 it must be a multiple of it, as
    'same' padding is. Kernel sides 1..63; fp32, fp16 or bf16 with fp32 accumulation; any memory
    layout (a dilated conv returns NCHW-contiguous output). Under ``torch.autocast`` the inputs
    are cast to the autocast dtype, as for ``F.conv2d``.
    """
    if x.dim() != 4 or weight.dim() != 4 or weight.shape[1] != 1 or weight.shape[0] != x.shape[1]:
        raise ValueError("depthwise_conv2d expects x (N, C, H, W) and weight (C, 1, kh, kw); got "
                         f"x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    kh, kw = weight.shape[-2:]
    (pad_h, pad_w), (dh, dw) = _same_padding((kh, kw), padding, dilation)
    if not (1 <= kh <= 63 and 1 <= kw <= 63):
        raise ValueError(f"depthwise_conv2d: kernel sides must be within 1..63, got {kh}x{kw}")
    if min(dh, dw) < 1 or pad_h % dh or pad_w % dw:
        raise ValueError(f"depthwise_conv2d: dilation ({dh}, {dw}) must be >= 1 and divide the "
                         f"padding ({pad_h}, {pad_w}) (as 'same' padding does)")
    out_h = x.shape[2] + 2 * pad_h - dh * (kh - 1)
    out_w = x.shape[3] + 2 * pad_w - dw * (kw - 1)
    if min(pad_h, pad_w) < 0 or min(out_h, out_w) < 1:
        raise ValueError(f"depthwise_conv2d: kernel {kh}x{kw} with dilation ({dh}, {dw}) and "
                         f"padding ({pad_h}, {pad_w}) does not fit the input {tuple(x.shape)}; "
                         "padding must be >= 0 and leave at least a 1x1 output")
    if torch.is_autocast_enabled("cuda") and x.is_cuda:
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    elif weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"depthwise_conv2d: input dtype {x.dtype}, weight dtype {weight.dtype}"
                        + (f", bias dtype {bias.dtype}" if bias is not None else "")
                        + " must match (or run under torch.autocast)")
    if x.device.type == "cpu":
        # The extension is CUDA-only; on the CPU the same conv is torch's.
        return torch.nn.functional.conv2d(x, weight, bias, 1, (pad_h, pad_w), (dh, dw),
                                          weight.shape[0])
    if (dh, dw) == (1, 1):
        return _undilated(x, weight, bias, pad_h, pad_w)
    if plan.dilation_mode((x.shape[2], x.shape[3])) == "subgrids":
        y = _undilated(split_subgrids(x, (dh, dw)), weight, bias, pad_h // dh, pad_w // dw)
        return merge_subgrids(y, (dh, dw), out_h, out_w)
    return _undilated(x, dilate_kernel(weight, (dh, dw)), bias, pad_h, pad_w)


def _undilated(x: Tensor, weight: Tensor, bias: Optional[Tensor], pad_h: int, pad_w: int) -> Tensor:
    if type(x) is Tensor and x.is_cuda and not torch.compiler.is_compiling():
        return _EagerDwconv2d.apply(x, weight, bias, pad_h, pad_w)
    return dwconv2d(x, weight, bias, pad_h, pad_w)
