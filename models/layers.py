"""Layers shared by every family.

All depthwise convolutions with large kernels go through :func:`depthwise_conv2d` (or the
:class:`DepthwiseConv2d` module that calls it), and so through kernels/plan.py, the one place that
decides whether torch's convolution or lknets' CUDA kernel runs.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

from kernels.plan import planned_depthwise_conv2d

__all__ = ["DropPath", "trunc_normal_", "LayerNorm2d", "DepthwiseConv2d", "depthwise_conv2d",
           "to_2tuple", "drop_path_rates"]

IntOrPair = Union[int, Tuple[int, int]]


def to_2tuple(value: IntOrPair) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> List[float]:
    """Stochastic-depth rate of each block, rising linearly from 0 to ``drop_path_rate``.

    Plain Python (not torch.linspace) so models can be built on the meta device.
    """
    if num_blocks == 1:
        return [0.0]
    return [drop_path_rate * i / (num_blocks - 1) for i in range(num_blocks)]


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     padding: Optional[IntOrPair] = None, dilation: IntOrPair = 1) -> torch.Tensor:
    """Depthwise, stride-1 cross-correlation of ``x`` (N, C, H, W) with ``weight`` (C, 1, kh, kw).

    ``padding`` defaults to ``dilation * (k // 2)``, which keeps H and W for odd kernels. torch's
    convolution or lknets' kernel runs, as kernels/plan.py decides (``--lk_impl``).
    """
    return planned_depthwise_conv2d(x, weight, bias, padding, dilation)


# The plan reads the input's device and the --lk_impl choice, which fx symbolic
# tracing cannot see (it traces with shapeless, deviceless proxies). fx records each call as one
# node instead, so a traced graph still dispatches when it runs; torch.export and torch.compile
# trace real (fake) tensors and go through the dispatch as usual.
torch.fx.wrap("depthwise_conv2d")


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise stride-1 conv with 'same' padding; parameters and state_dict keys of nn.Conv2d.

    A drop-in for upstream's ``DepthWiseConv2dImplicitGEMM(channels, kernel, bias)``, and, with
    ``dilation``, for the ``nn.Conv2d`` of UniRepLKNet's dilated branches.
    """

    def __init__(self, channels: int, kernel_size: IntOrPair, bias: bool = False,
                 dilation: int = 1) -> None:
        kh, kw = to_2tuple(kernel_size)
        super().__init__(channels, channels, (kh, kw), stride=1,
                         padding=(dilation * (kh // 2), dilation * (kw // 2)), dilation=dilation,
                         groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.padding, self.dilation)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor (ConvNeXt's channels_first LN).

    Parameters are ``weight`` and ``bias`` of shape (C,), as in upstream's hand-written module.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
