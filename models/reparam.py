"""The shared structural re-parameterization vocabulary.

Every family that merges parallel branches into one kernel (RepLKNet, UniRepLKNet, SLaK) uses
these helpers, so a merge rule is written once. All of them work in any floating dtype (float64
included) and on any device.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.ops import dilate_kernel
from .layers import DepthwiseConv2d, to_2tuple

BatchNorm = nn.modules.batchnorm._BatchNorm


def fuse_bn(kernel: torch.Tensor, bn: BatchNorm,
            conv_bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm that follows a conv into the conv's kernel and bias.

    Returns ``(kernel * gamma / std, beta + (conv_bias - running_mean) * gamma / std)``.
    """
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std
    bias = bn.bias - bn.running_mean * scale
    if conv_bias is not None:
        bias = bias + conv_bias * scale
    return kernel * scale.reshape(-1, *([1] * (kernel.dim() - 1))), bias


def pad_kernel_to(kernel: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Zero-pad a (..., kh, kw) kernel to ``size`` keeping it centred (odd sizes, size >= k)."""
    kh, kw = kernel.shape[-2:]
    th, tw = to_2tuple(size)
    if (th - kh) % 2 or (tw - kw) % 2 or th < kh or tw < kw:
        raise ValueError(f"cannot centre a {kh}x{kw} kernel in {th}x{tw}")
    ph, pw = (th - kh) // 2, (tw - kw) // 2
    return F.pad(kernel, (pw, pw, ph, ph))


def merge_kernels(kernel: torch.Tensor, bias: torch.Tensor, other_kernel: torch.Tensor,
                  other_bias: torch.Tensor, dilation: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """Add a parallel branch (optionally dilated, possibly smaller) into ``kernel``/``bias``.

    Both branches must use 'same' padding so their outputs are aligned at the kernel centre.
    """
    other = pad_kernel_to(dilate_kernel(other_kernel, dilation), kernel.shape[-2:])
    return kernel + other, bias + other_bias


def depthwise_conv_from(kernel: torch.Tensor, bias: torch.Tensor) -> DepthwiseConv2d:
    """A biased :class:`DepthwiseConv2d` holding a merged ``kernel`` (C, 1, k, k) and ``bias`` (C,).

    The module lives on the kernel's device and dtype, so merging works on meta tensors and in
    float64 alike.
    """
    with torch.device(kernel.device):
        conv = DepthwiseConv2d(kernel.shape[0], tuple(kernel.shape[-2:]), bias=True)
    conv = conv.to(kernel.dtype)
    with torch.no_grad():
        conv.weight.copy_(kernel)
        conv.bias.copy_(bias)
    return conv


def linear_from(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """A biased nn.Linear holding ``weight`` (out, in) and ``bias`` (out,), on their device."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=True, device=weight.device,
                       dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear


class ConvBN(nn.Sequential):
    """Bias-free conv followed by BatchNorm (and optionally ReLU), as upstream's ``conv_bn``.

    Child names ``conv``, ``bn`` and ``nonlinear`` give the upstream state_dict keys.
    Depthwise stride-1 'same' convs go through the shared large-kernel entry point.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1,
                 padding=None, groups: int = 1, dilation: int = 1, relu: bool = False,
                 bn: bool = True, norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        kh, kw = to_2tuple(kernel_size)
        padding = (kh // 2, kw // 2) if padding is None else to_2tuple(padding)
        depthwise_same = (in_channels == out_channels == groups and stride == 1 and dilation == 1
                          and padding == (kh // 2, kw // 2))
        if depthwise_same:
            self.add_module("conv", DepthwiseConv2d(in_channels, (kh, kw), bias=False))
        else:
            self.add_module("conv", nn.Conv2d(in_channels, out_channels, (kh, kw), stride, padding,
                                              dilation, groups, bias=False))
        if bn:
            self.add_module("bn", norm_layer(out_channels))
        if relu:
            self.add_module("nonlinear", nn.ReLU())

    def fused_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias of the single conv equivalent to conv + BN (eval statistics)."""
        if "bn" not in self._modules:
            return self.conv.weight, self.conv.weight.new_zeros(self.conv.out_channels)
        return fuse_bn(self.conv.weight, self.bn)
