"""SLaK (Liu et al., ICLR 2023): ConvNeXt with sparse, decomposed 51x51 kernels.

State_dict keys are identical to VITA-Group/SLaK ``models/SLaK.py``: each block's token mixer is
``large_kernel`` with, per branch, ``conv.weight`` plus ``bn.*`` (when ``bn=True``):

* ``Decom=True``: ``LoRA1`` (k x N) + ``LoRA2`` (N x k) + ``small_conv`` (N x N),
* ``Decom=False``: ``lkb_origin`` (k x k) + ``small_conv`` (N x N),

where ``small_conv`` exists only when N < k. ``kernel_size=[7, 7, 7, 7, 100]`` gives a ConvNeXt
(7x7 kernels, no small branch), as upstream documents. Unlike upstream, :meth:`reparameterize`
also merges the decomposed branches into one k x k kernel (``lkb_reparam``).
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn

from .convnext import ConvNeXt, ConvNeXtBlock, convnext_layer_id
from .layers import DepthwiseConv2d
from .registry import Family, register_family, register_model
from .reparam import ConvBN, merge_kernels, pad_kernel_to

__all__ = ["LargeKernelConv", "SLaKBlock", "SLaK", "SLaK_tiny", "SLaK_small", "SLaK_base",
           "SLaK_large"]

DEFAULT_KERNEL_SIZE = (51, 49, 47, 13, 5)


class LargeKernelConv(nn.Module):
    """SLaK's depthwise token mixer (upstream ``ReparamLargeKernelConv``), stride 1, 'same' size.

    Args:
        channels: C (depthwise: in = out = groups = C).
        kernel_size: k, the large kernel of the stage.
        small_kernel: N, the short side of the LoRA strips and the size of ``small_conv``.
        Decom: two k x N / N x k strips instead of one k x k kernel.
        bn: a BatchNorm after every branch.
        sync_bn: use nn.SyncBatchNorm (upstream always does; here only on request).
        deploy: build the re-parameterized form directly (``lkb_reparam`` alone, k x k with a
            bias), to load the output of :meth:`reparameterize`.
    """

    def __init__(self, channels: int, kernel_size: int, small_kernel: int, Decom: bool = False,
                 bn: bool = True, sync_bn: bool = False, deploy: bool = False) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        self.Decom = Decom
        if deploy:
            # What reparameterize() leaves: one centred kernel as large as the largest branch
            # (the LoRA strips reach N on their short side; small_conv exists only when N < k).
            size = max(kernel_size, small_kernel) if Decom else kernel_size
            self.lkb_reparam = DepthwiseConv2d(channels, size, bias=True)
            return
        norm = nn.SyncBatchNorm if sync_bn else nn.BatchNorm2d

        def branch(kernel) -> ConvBN:
            return ConvBN(channels, channels, kernel, groups=channels, bn=bn, norm_layer=norm)

        if Decom:
            self.LoRA1 = branch((kernel_size, small_kernel))
            self.LoRA2 = branch((small_kernel, kernel_size))
        else:
            self.lkb_origin = branch(kernel_size)
        if small_kernel < kernel_size:
            self.small_conv = branch(small_kernel)

    def _branches(self):
        names = ("LoRA1", "LoRA2") if self.Decom else ("lkb_origin",)
        return [getattr(self, n) for n in names + ("small_conv",) if hasattr(self, n)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        branches = self._branches()
        out = branches[0](x)
        for branch in branches[1:]:
            out = out + branch(x)
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every BN into its conv and sum all branches into one square kernel with bias.

        All branches are centred 'same' convs, so a branch equals its kernel zero-padded to the
        common size; the sum is exact (up to rounding) for Decom and non-Decom blocks alike.
        """
        if hasattr(self, "lkb_reparam"):
            return
        branches = self._branches()
        size = max(max(b.conv.kernel_size) for b in branches)
        kernel, bias = branches[0].fused_kernel_bias()
        kernel = pad_kernel_to(kernel, (size, size))
        for branch in branches[1:]:
            kernel, bias = merge_kernels(kernel, bias, *branch.fused_kernel_bias())
        channels = kernel.shape[0]
        reparam = DepthwiseConv2d(channels, size, bias=True).to(kernel.device, kernel.dtype)
        reparam.weight.copy_(kernel)
        reparam.bias.copy_(bias)
        for name in ("LoRA1", "LoRA2", "lkb_origin", "small_conv"):
            if hasattr(self, name):
                delattr(self, name)
        self.lkb_reparam = reparam


class SLaKBlock(ConvNeXtBlock):
    """ConvNeXt's block with SLaK's large-kernel mixer (``large_kernel``) for the 7x7 dwconv."""

    mixer_name = "large_kernel"

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 kernel_size: Sequence[int] = (7, 7), Decom: bool = False, bn: bool = True,
                 sync_bn: bool = False, deploy: bool = False) -> None:
        super().__init__(dim, drop_path, layer_scale_init_value,
                         mixer=LargeKernelConv(dim, kernel_size[0], kernel_size[1], Decom, bn,
                                               sync_bn, deploy))


def _check_kernel_size(kernel_size: Sequence[int], Decom: bool) -> list:
    sizes = [int(k) for k in kernel_size]
    if len(sizes) != 5 or any(k < 1 or k % 2 == 0 for k in sizes[:4]) or sizes[4] < 1:
        raise ValueError(
            f"kernel_size must be 5 ints: four odd stage kernels, then N > 0; got "
            f"{list(kernel_size)}; e.g. 51 49 47 13 5, or 7 7 7 7 100 for ConvNeXt")
    if Decom and sizes[4] % 2 == 0:
        raise ValueError(f"Decom needs an odd N (the strips' short side), got N={sizes[4]}")
    return sizes


class SLaK(ConvNeXt):
    """The ConvNeXt skeleton (stem, downsampling, head, layer-id rule) with SLaK blocks.

    ``width_factor`` scales every stage width as upstream: ``dims = [int(d * width_factor)]``.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-6,
                 head_init_scale: float = 1.0, kernel_size: Sequence[int] = DEFAULT_KERNEL_SIZE,
                 width_factor: float = 1.0, Decom: Optional[bool] = False, bn: bool = True,
                 sync_bn: bool = False, use_checkpoint: bool = False,
                 deploy: bool = False, global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        sizes = _check_kernel_size(kernel_size, bool(Decom))

        def block(stage: int, index: int, dim: int, drop_path: float) -> SLaKBlock:
            return SLaKBlock(dim, drop_path, layer_scale_init_value, (sizes[stage], sizes[-1]),
                             bool(Decom), bn, sync_bn, deploy)

        super().__init__(in_chans, num_classes, depths, [int(d * width_factor) for d in dims],
                         drop_path_rate, layer_scale_init_value, head_init_scale, use_checkpoint,
                         block_fn=block, global_pool=global_pool, drop_rate=drop_rate)
        self.kernel_size = sizes


def add_slak_args(parser: argparse.ArgumentParser) -> None:
    """SLaK's model flags, spelled as upstream main.py (its sparse flags live in sparse.py)."""
    from utils import str2bool

    # Defaults are None so that a flag given to a model of another family is caught (see
    # registry.family_kwargs); the model's own defaults apply when a flag is left out.
    group = parser.add_argument_group("SLaK")
    group.add_argument("--kernel_size", type=int, nargs="*", default=None,
                       help="kernel size of conv [stage1, stage2, stage3, stage4, N]; "
                            "7 7 7 7 100 gives ConvNeXt (default: "
                            f"{' '.join(map(str, DEFAULT_KERNEL_SIZE))})")
    group.add_argument("--width_factor", type=float, default=None,
                       help="set the width factor of the model (default: 1.0)")
    group.add_argument("--Decom", type=str2bool, default=None,
                       help="Enabling kernel decomposition (default: false)")
    group.add_argument("--bn", type=str2bool, default=None,
                       help="add batch norm layer after each path (default: true)")


def slak_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The SLaK flags given on the command line, as constructor keyword arguments."""
    flags = ("kernel_size", "width_factor", "Decom", "bn")
    kwargs = {name: getattr(args, name) for name in flags if getattr(args, name) is not None}
    if "kernel_size" in kwargs:  # checked here too, so a bad value fails before any work
        _check_kernel_size(kwargs["kernel_size"], bool(kwargs.get("Decom", False)))
    return kwargs


register_family(Family(name="slak", layer_id_for=convnext_layer_id, add_args=add_slak_args,
                       kwargs_from_args=slak_kwargs))


@register_model("slak")
def SLaK_tiny(**kwargs) -> SLaK:
    return SLaK(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), **kwargs)


@register_model("slak")
def SLaK_small(**kwargs) -> SLaK:
    return SLaK(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), **kwargs)


@register_model("slak")
def SLaK_base(**kwargs) -> SLaK:
    return SLaK(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), **kwargs)


@register_model("slak")
def SLaK_large(**kwargs) -> SLaK:
    return SLaK(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), **kwargs)
