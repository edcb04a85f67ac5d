"""The oriented 1D depthwise-conv operator: ``lknets::oriented_conv1d`` and its gradients.

``oriented_conv1d(x, weight, offsets, bias, stride)`` computes, for CUDA ``x`` (N, C, H, W) in
NCHW or channels_last memory, ``y[n, c, p, q] = bias[c] + sum_s weight[s, c] * x[n, c, p * stride
+ offsets[s, c, 0], q * stride + offsets[s, c, 1]]`` with zero padding, an output of
ceil(H / stride) x ceil(W / stride) in the input's memory format. ``weight`` is (S, C) and
``offsets`` int32 (S, C, 2): the caller (models/oriented_conv.py) computes the tap offsets once,
from the angles. One launch covers all channels and directions; kernels/plan.py
(``oriented_formulation``) picks the plane or gather kernels of each forward and input-gradient
launch (kernels/csrc/oriented_plane.cu and oriented.cu say how they run). Gradients reach ``x``,
``weight`` and ``bias``; the weight gradient is deterministic.
As for ``lknets::dwconv2d``, the op is a torch custom op (torch.compile, fake tensors) and eager
calls on plain CUDA tensors take a leaner autograd.Function over the same extension ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .ops import _output_layout, load_extension
from .plan import _channels_last, oriented_formulation

__all__ = ["oriented_conv1d"]


def _plane(direction: str, full: Tensor, taps: int, stride: int) -> bool:
    """Whether the launch of ``direction`` runs the plane kernels; ``full`` is x or, for the
    input gradient, the output gradient (dx's layout, and its shape where the plane kernels
    can run: stride 1)."""
    return oriented_formulation(direction, tuple(full.shape), taps, full.dtype, stride,
                                _channels_last(full)) == "plane"


def _forward(x: Tensor, weight: Tensor, offsets: Tensor, bias: Optional[Tensor],
             stride: int) -> Tensor:
    return load_extension().oriented_forward(x, weight, offsets, bias, stride,
                                             _plane("forward", x, weight.shape[0], stride))


def _input_grad(grad_out: Tensor, weight: Tensor, offsets: Tensor, height: int, width: int,
                stride: int) -> Tensor:
    return load_extension().oriented_input_grad(
        grad_out, weight, offsets, height, width, stride,
        _plane("input_grad", grad_out, weight.shape[0], stride))


def _weight_grad(x: Tensor, grad_out: Tensor, offsets: Tensor, stride: int) -> Tensor:
    return load_extension().oriented_weight_grad(x, grad_out, offsets, stride)


@torch.library.custom_op("lknets::oriented_conv1d", mutates_args=(), device_types="cuda")
def _oriented_op(x: Tensor, weight: Tensor, offsets: Tensor, bias: Optional[Tensor],
                 stride: int) -> Tensor:
    return _forward(x, weight, offsets, bias, stride)


@_oriented_op.register_fake
def _oriented_fake(x, weight, offsets, bias, stride):
    n, c, h, w = x.shape
    return torch.empty((n, c, (h - 1) // stride + 1, (w - 1) // stride + 1), dtype=x.dtype,
                       device=x.device, memory_format=_output_layout(x))


@torch.library.custom_op("lknets::oriented_conv1d_input_grad", mutates_args=(),
                         device_types="cuda")
def _oriented_input_grad(grad_out: Tensor, weight: Tensor, offsets: Tensor, height: int,
                         width: int, stride: int) -> Tensor:
    return _input_grad(grad_out, weight, offsets, height, width, stride)


@_oriented_input_grad.register_fake
def _oriented_input_grad_fake(grad_out, weight, offsets, height, width, stride):
    n, c = grad_out.shape[:2]
    return torch.empty((n, c, height, width), dtype=grad_out.dtype, device=grad_out.device,
                       memory_format=_output_layout(grad_out))


@torch.library.custom_op("lknets::oriented_conv1d_weight_grad", mutates_args=(),
                         device_types="cuda")
def _oriented_weight_grad(x: Tensor, grad_out: Tensor, offsets: Tensor, stride: int) -> Tensor:
    return _weight_grad(x, grad_out, offsets, stride)


@_oriented_weight_grad.register_fake
def _oriented_weight_grad_fake(x, grad_out, offsets, stride):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((offsets.shape[0], x.shape[1]), dtype=dtype)


def _setup_context(ctx, inputs, output):
    x, weight, offsets, bias, stride = inputs
    ctx.save_for_backward(x, weight, offsets)
    ctx.stride = stride
    ctx.has_bias = bias is not None


def _gradients(ctx, grad: Tensor, input_grad, weight_grad):
    x, weight, offsets = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = input_grad(grad, weight, offsets, x.shape[2], x.shape[3], ctx.stride)
    if ctx.needs_input_grad[1]:
        grad_w = weight_grad(x, grad, offsets, ctx.stride).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        grad_b = grad.sum((0, 2, 3), dtype=acc).to(grad.dtype)
    return grad_x, grad_w, None, grad_b, None


def _backward(ctx, grad: Tensor):
    return _gradients(ctx, grad, _oriented_input_grad, _oriented_weight_grad)


_oriented_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerOriented(torch.autograd.Function):
    """The op for eager calls on plain CUDA tensors, without the custom op's dispatch cost."""

    @staticmethod
    def forward(ctx, x, weight, offsets, bias, stride):
        _setup_context(ctx, (x, weight, offsets, bias, stride), None)
        return _forward(x, weight, offsets, bias, stride)

    @staticmethod
    def backward(ctx, grad):
        return _gradients(ctx, grad, _input_grad, _weight_grad)


def oriented_conv1d(x: Tensor, weight: Tensor, offsets: Tensor, bias: Optional[Tensor] = None,
                    stride: int = 1) -> Tensor:
    """Oriented depthwise conv of CUDA ``x`` (N, C, H, W) with ``weight`` (S, C) at ``offsets``
    (S, C, 2) int32 (row, column); see the module docstring. Under ``torch.autocast`` the inputs
    are cast to the autocast dtype, as for ``F.conv2d``."""
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    weight = weight.contiguous()
    if type(x) is Tensor and not torch.compiler.is_compiling():
        return _EagerOriented.apply(x, weight, offsets, bias, stride)
    return _oriented_op(x, weight, offsets, bias, stride)
