"""ConvNeXt with oriented 1D kernels (Kirchmeyer & Deng, ICCV 2023).

State_dict keys and ``theta`` values are identical to princeton-vl/Oriented1D ``models/convnext.py``.
Variants (``--model convnext_tiny --variant 1d`` or ``--model convnext_tiny_1d``):

* ``2d``: plain ConvNeXt (7x7 dwconv),
* ``1d``: the 7x7 dwconv becomes an oriented 1 x 31 conv; 1D stem,
* ``1dpp``: oriented 1 x 15 on C, plus an oriented 1 x 31 on 4C after the GELU with a fused
  residual (``x + conv(x)``); 1D stem,
* ``2dpp``: 7x7 dwconv, plus the same oriented 1 x 31 on 4C; ConvNeXt stem.

Orientations: 8 directions, channel c at ``pi * (n / 8 + offset) % pi`` with ``n = (8 (c+1) - 1) // C``;
in 1d/1dpp/2dpp every odd block of a stage (and the stem's second conv) is rotated by +90 degrees
(upstream's docstring says 45, its code adds half a turn of pi).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convnext import ConvNeXt, convnext_layer_id
from .layers import DepthwiseConv2d, DropPath
from .oriented_conv import OrientedConv1d, channel_angles
from .registry import Family, register_family, register_model

__all__ = ["Stem1D", "OrientedBlock", "ConvNeXt1D", "build_oriented_convnext"]

VARIANTS = ("2d", "1d", "1dpp", "2dpp")
NUM_DIRECTIONS = 8
# Per-stage kernel sizes of each variant: [first dwconv, dwconv inside the MLP].
BLOCK_KERNELS = {"1d": (31,), "1dpp": (15, 31), "2dpp": (7, 31)}
STEM_KERNELS = {"1d": 31, "1dpp": 15}
STEM_DIM = 64


def layer_offset(index: int) -> float:
    """Rotation of block ``index`` within its stage, as a fraction of pi: +90 degrees if odd."""
    return (index % 2) / 2


def oriented_conv(channels: int, kernel_size: int, offset: float, stride: int = 1,
                  resid: bool = False, nhwc: bool = False) -> OrientedConv1d:
    angles = channel_angles(channels, NUM_DIRECTIONS, offset)
    return OrientedConv1d(channels, kernel_size, stride=stride, angle=angles, resid=resid,
                          nhwc=nhwc)


class Stem1D(nn.Module):
    """pw1 -> oriented /2 -> LN -> GELU -> oriented /2 (+90 deg) -> LN -> GELU -> pw2 -> LN (NHWC)."""

    def __init__(self, in_chans: int, mid_dim: int, out_dim: int, kernel_size: int) -> None:
        super().__init__()
        self.pw1 = nn.Linear(in_chans, mid_dim)
        self.pw2 = nn.Linear(mid_dim, out_dim)
        self.dw1 = oriented_conv(mid_dim, kernel_size, layer_offset(0), stride=2, nhwc=True)
        self.dw2 = oriented_conv(mid_dim, kernel_size, layer_offset(1), stride=2, nhwc=True)
        self.norm1 = nn.LayerNorm(mid_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(mid_dim, eps=1e-6)
        self.norm3 = nn.LayerNorm(out_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pw1(x.permute(0, 2, 3, 1))
        x = F.gelu(self.norm1(self.dw1(x)))
        x = F.gelu(self.norm2(self.dw2(x)))
        x = self.norm3(self.pw2(x))
        return x.permute(0, 3, 1, 2)


class OrientedBlock(nn.Module):
    """ConvNeXt block of the 1d, 1dpp and 2dpp variants.

    1d: ``dwconv`` (oriented) -> LN -> pwconv1 -> GELU -> pwconv2. 1dpp/2dpp: ``dwconv1``
    (oriented, or 7x7 for 2dpp) -> LN -> pwconv1 -> GELU -> ``dwconv2`` (oriented on 4C, with
    residual) -> pwconv2. Modules are registered in upstream's order (norm, MLP, then dwconvs),
    which fixes the parameter order optimizer checkpoints rely on.
    """

    def __init__(self, dim: int, variant: str, kernel_sizes: Sequence[int], offset: float,
                 drop_path: float = 0.0, layer_scale_init_value: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if variant == "1d":
            self.dwconv = oriented_conv(dim, kernel_sizes[0], offset)
            return
        if variant == "2dpp":
            self.dwconv1 = DepthwiseConv2d(dim, kernel_sizes[0], bias=True)
        else:
            self.dwconv1 = oriented_conv(dim, kernel_sizes[0], offset)
        self.dwconv2 = oriented_conv(4 * dim, kernel_sizes[1], offset, resid=True, nhwc=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        mixer = self.dwconv if hasattr(self, "dwconv") else self.dwconv1
        x = F.gelu(self.pwconv1(self.norm(mixer(x).permute(0, 2, 3, 1))))
        if hasattr(self, "dwconv2"):
            x = self.dwconv2(x)
        x = self.pwconv2(x)
        if self.gamma is not None:
            x = self.gamma * x
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


class ConvNeXt1D(ConvNeXt):
    """The ConvNeXt skeleton (downsampling, head, layer-id rule) with oriented-1D blocks and stem."""

    def __init__(self, variant: str = "1d", in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-6,
                 head_init_scale: float = 1.0, use_checkpoint: bool = False,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        if variant not in BLOCK_KERNELS:
            raise ValueError(f"ConvNeXt1D variant must be one of {sorted(BLOCK_KERNELS)} "
                             f"(2d is models.convnext.ConvNeXt), got {variant!r}")
        stem = (Stem1D(in_chans, STEM_DIM, dims[0], STEM_KERNELS[variant])
                if variant in STEM_KERNELS else None)

        def block(stage: int, index: int, dim: int, drop_path: float) -> OrientedBlock:
            return OrientedBlock(dim, variant, BLOCK_KERNELS[variant], layer_offset(index),
                                 drop_path, layer_scale_init_value)

        super().__init__(in_chans, num_classes, depths, dims, drop_path_rate,
                         layer_scale_init_value, head_init_scale, use_checkpoint,
                         block_fn=block, stem=stem, global_pool=global_pool, drop_rate=drop_rate)
        self.variant = variant


register_family(Family(name="convnext_1d", layer_id_for=convnext_layer_id))

# Oriented1D's registry defaults drop_path_rate to 0.1 (tiny) and 0.5 (base) when not given.
_SIZES = {"tiny": ((3, 3, 9, 3), (96, 192, 384, 768), 0.1),
          "base": ((3, 3, 27, 3), (128, 256, 512, 1024), 0.5)}


def build_oriented_convnext(size: str, variant: str, drop_path_rate: Optional[float] = None,
                            **kwargs) -> nn.Module:
    """``convnext_{size}`` of Oriented1D with ``variant`` in 2d/1d/1dpp/2dpp."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    depths, dims, default_rate = _SIZES[size]
    rate = default_rate if drop_path_rate is None else drop_path_rate
    if variant == "2d":
        return ConvNeXt(depths=depths, dims=dims, drop_path_rate=rate, **kwargs)
    return ConvNeXt1D(variant, depths=depths, dims=dims, drop_path_rate=rate, **kwargs)


def _register(size: str, variant: str) -> str:
    name = f"convnext_{size}_{variant}"

    def constructor(drop_path_rate: Optional[float] = None, **kwargs) -> nn.Module:
        return build_oriented_convnext(size, variant, drop_path_rate, **kwargs)

    constructor.__name__ = constructor.__qualname__ = name
    constructor.__doc__ = f"ConvNeXt-{size} with Oriented1D variant {variant!r}."
    register_model("convnext_1d", name=name)(constructor)
    # A module attribute like any registered constructor (``from models.convnext_1d import *``).
    globals()[name] = constructor
    return name


__all__ += [_register(_size, _variant) for _size in _SIZES for _variant in VARIANTS]
