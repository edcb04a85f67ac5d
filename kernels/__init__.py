"""lknets' own large-kernel depthwise convolution for CUDA.

``depthwise_conv2d(x, weight, bias=None, padding=None, dilation=1)`` runs our kernels (forward,
input grad and weight grad; fp32/fp16/bf16 with fp32 accumulation; any layout; kernel sides 1..63;
stride 1; dilated convs as the undilated conv of their interleaved sub-grids) as
the torch custom op ``lknets::dwconv2d`` (autograd, autocast, torch.compile and CUDA graphs work).
``oriented_conv1d`` (kernels/oriented.py) is the oriented 1D depthwise conv of ConvNeXt-1D, on
the same extension. ``kernels.plan`` decides what runs: torch's conv or ours, and for ours the
formulation of every launch (models call ``plan.planned_depthwise_conv2d``).
``DepthwiseConv2dImplicitGEMM`` is a drop-in for upstream's module of that name. The extension is
built by ``python setup.py build_ext --inplace``, or compiled on first use and cached.
Nothing here compiles or touches CUDA at import time.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import (depthwise_conv2d, dilate_kernel, is_available, is_built, load_extension,
                  merge_subgrids, split_subgrids)
from . import plan
from .oriented import oriented_conv1d

__all__ = ["depthwise_conv2d", "DepthwiseConv2dImplicitGEMM", "dilate_kernel", "is_available",
           "is_built", "load_extension", "merge_subgrids", "oriented_conv1d", "plan", "split_subgrids"]


class DepthwiseConv2dImplicitGEMM(nn.Conv2d):
    """Depthwise stride-1 'same' conv on our kernel; nn.Conv2d's parameters and state_dict keys.

    Same constructor as upstream's ``DepthWiseConv2dImplicitGEMM(channels, kernel, bias)``. Inputs
    not on a GPU use torch's convolution, so checkpoints load and evaluate anywhere.
    """

    def __init__(self, channels: int, kernel: int, bias: bool = False) -> None:
        super().__init__(channels, channels, kernel, stride=1, padding=kernel // 2,
                         groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return depthwise_conv2d(x, self.weight, self.bias, self.padding)
        return F.conv2d(x, self.weight, self.bias, 1, self.padding, 1, self.groups)
