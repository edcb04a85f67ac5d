"""RepLKNet (Ding et al., CVPR 2022, "Scaling Up Your Kernels to 31x31").

State_dict keys and shapes are identical to DingXiaoH/RepLKNet-pytorch's ``replknet.py`` in the
training form (``large_kernel.lkb_origin`` + ``large_kernel.small_conv``) and in the merged form
(``large_kernel.lkb_reparam``), so the released checkpoints load strictly in either form.

Differences from upstream, on purpose:
- BatchNorm is ``nn.SyncBatchNorm`` only when ``use_sync_bn=True`` is passed to *this* model;
  upstream flips a module-global switch that turns every later model's BN into SyncBN.
- ``deploy=True`` is accepted as an alias of ``small_kernel_merged=True``, so every family of
  lknets builds its inference form the same way.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .layers import DepthwiseConv2d, DropPath, drop_path_rates
from .registry import Family, register_family, register_model
from .reparam import ConvBN, depthwise_conv_from, merge_kernels
from .timm_api import TimmModelMixin, stage_feature_info

__all__ = ["ReparamLargeKernelConv", "RepLKBlock", "ConvFFN", "RepLKNetStage", "RepLKNet",
           "replknet_layer_id", "replknet_31b", "replknet_31l", "replknet_xl"]


class ReparamLargeKernelConv(nn.Module):
    """Depthwise k x k conv+BN with a parallel small-kernel conv+BN, mergeable into one conv.

    Training form: ``lkb_origin`` (k x k) + ``small_conv`` (s x s, centred); deploy form:
    ``lkb_reparam``, one biased k x k depthwise conv computing the same function in eval mode.
    """

    def __init__(self, channels: int, kernel_size: int, small_kernel: Optional[int] = None,
                 deploy: bool = False, norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        if small_kernel is not None and small_kernel > kernel_size:
            raise ValueError(f"small_kernel ({small_kernel}) cannot be larger than the large "
                             f"kernel ({kernel_size})")
        self.kernel_size = kernel_size
        self.small_kernel = small_kernel
        if deploy:
            self.lkb_reparam = DepthwiseConv2d(channels, kernel_size, bias=True)
        else:
            self.lkb_origin = ConvBN(channels, channels, kernel_size, groups=channels,
                                     norm_layer=norm_layer)
            if small_kernel is not None:
                self.small_conv = ConvBN(channels, channels, small_kernel, groups=channels,
                                         norm_layer=norm_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "lkb_reparam"):
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        if hasattr(self, "small_conv"):
            out = out + self.small_conv(x)
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold both BNs and add the small kernel into the centre of the large one."""
        if hasattr(self, "lkb_reparam"):
            return
        kernel, bias = self.lkb_origin.fused_kernel_bias()
        if hasattr(self, "small_conv"):
            kernel, bias = merge_kernels(kernel, bias, *self.small_conv.fused_kernel_bias())
            del self.small_conv
        del self.lkb_origin
        self.lkb_reparam = depthwise_conv_from(kernel, bias)


class RepLKBlock(nn.Module):
    """BN -> 1x1 conv+BN+ReLU -> large depthwise conv -> ReLU -> 1x1 conv+BN, plus residual."""

    def __init__(self, in_channels: int, dw_channels: int, kernel_size: int,
                 small_kernel: Optional[int], drop_path: float = 0.0, deploy: bool = False,
                 norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        # Registration order follows upstream, so state_dict() lists keys in upstream's order.
        self.pw1 = ConvBN(in_channels, dw_channels, 1, relu=True, norm_layer=norm_layer)
        self.pw2 = ConvBN(dw_channels, in_channels, 1, norm_layer=norm_layer)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, kernel_size, small_kernel, deploy,
                                                   norm_layer)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = norm_layer(in_channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw1(self.prelkb_bn(x))
        out = self.pw2(self.lk_nonlinear(self.large_kernel(out)))
        return x + self.drop_path(out)


class ConvFFN(nn.Module):
    """BN -> 1x1 conv+BN (expand) -> GELU -> 1x1 conv+BN (project), plus residual."""

    def __init__(self, channels: int, hidden_channels: int, drop_path: float = 0.0,
                 norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.preffn_bn = norm_layer(channels)
        self.pw1 = ConvBN(channels, hidden_channels, 1, norm_layer=norm_layer)
        self.pw2 = ConvBN(hidden_channels, channels, 1, norm_layer=norm_layer)
        self.nonlinear = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x)))))


def _run(module: nn.Module, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
    if use_checkpoint and x.requires_grad:
        return checkpoint(module, x, use_reentrant=False)
    return module(x)


class RepLKNetStage(nn.Module):
    """``blocks`` = [RepLKBlock, ConvFFN] x num_blocks, then ``norm`` (BN for backbone outputs
    when ``norm_intermediate_features``, else Identity)."""

    def __init__(self, channels: int, num_blocks: int, kernel_size: int,
                 drop_path: Sequence[float], small_kernel: Optional[int], dw_ratio: float = 1.0,
                 ffn_ratio: float = 4.0, use_checkpoint: bool = False, deploy: bool = False,
                 norm_intermediate_features: bool = False, norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        blocks: List[nn.Module] = []
        for i in range(num_blocks):
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), kernel_size, small_kernel,
                                     drop_path[i], deploy, norm_layer))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), drop_path[i], norm_layer))
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm_layer(channels) if norm_intermediate_features else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = _run(block, x, self.use_checkpoint)
        return x


class RepLKNet(TimmModelMixin, nn.Module):
    """RepLKNet with upstream's constructor arguments.

    Classification (``num_classes``) and backbone use (``out_indices``: a list of stage outputs,
    each passed through ``stages[i].norm``) are mutually exclusive, as upstream. The head
    normalizes the last map with ``norm`` (BN) before pooling; ``global_pool`` ('avg', 'max',
    '') and ``drop_rate`` (dropout before the classifier) are timm's, and ``num_classes=0``
    leaves out the classifier.
    """

    norm_before_pool = True

    def __init__(self, large_kernel_sizes: Sequence[int], layers: Sequence[int],
                 channels: Sequence[int], drop_path_rate: float = 0.0,
                 small_kernel: Optional[int] = 5, dw_ratio: float = 1.0, ffn_ratio: float = 4.0,
                 in_channels: int = 3, num_classes: Optional[int] = 1000,
                 out_indices: Optional[Sequence[int]] = None, use_checkpoint: bool = False,
                 small_kernel_merged: bool = False, use_sync_bn: bool = False,
                 norm_intermediate_features: bool = False, deploy: bool = False,
                 in_chans: Optional[int] = None, global_pool: str = "avg",
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if num_classes is None and out_indices is None:
            raise ValueError("RepLKNet needs num_classes (classification) or out_indices "
                             "(backbone); got neither")
        if num_classes is not None and out_indices is not None:
            raise ValueError(f"RepLKNet takes num_classes (classification) or out_indices "
                             f"(backbone), not both; got num_classes={num_classes}, "
                             f"out_indices={out_indices}; pass num_classes=None for a backbone")
        if norm_intermediate_features and out_indices is None:
            raise ValueError("norm_intermediate_features=True only applies to backbone use "
                             "(out_indices); classification does not normalize stage outputs")
        if not (len(large_kernel_sizes) == len(layers) == len(channels)):
            raise ValueError(f"large_kernel_sizes, layers and channels need one entry per stage; "
                             f"got {len(large_kernel_sizes)}, {len(layers)}, {len(channels)}")
        if in_chans is not None:  # timm's name for the same thing
            in_channels = in_chans
        deploy = deploy or small_kernel_merged
        norm_layer = nn.SyncBatchNorm if use_sync_bn else nn.BatchNorm2d

        self.in_chans = in_channels
        self.out_indices = tuple(out_indices) if out_indices is not None else None
        self.use_checkpoint = use_checkpoint
        self.num_stages = len(layers)
        width = channels[0]
        self.stem = nn.ModuleList([
            ConvBN(in_channels, width, 3, stride=2, relu=True, norm_layer=norm_layer),
            ConvBN(width, width, 3, groups=width, relu=True, norm_layer=norm_layer),
            ConvBN(width, width, 1, relu=True, norm_layer=norm_layer),
            ConvBN(width, width, 3, stride=2, groups=width, relu=True, norm_layer=norm_layer)])

        rates = drop_path_rates(drop_path_rate, sum(layers))
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        for i, depth in enumerate(layers):
            start = sum(layers[:i])
            self.stages.append(RepLKNetStage(
                channels[i], depth, large_kernel_sizes[i], rates[start:start + depth],
                small_kernel, dw_ratio, ffn_ratio, use_checkpoint, deploy,
                norm_intermediate_features, norm_layer))
            if i < self.num_stages - 1:
                self.transitions.append(nn.Sequential(
                    ConvBN(channels[i], channels[i + 1], 1, relu=True, norm_layer=norm_layer),
                    ConvBN(channels[i + 1], channels[i + 1], 3, stride=2, groups=channels[i + 1],
                           relu=True, norm_layer=norm_layer)))
        self.feature_info = stage_feature_info(list(channels))
        if num_classes is None:
            self.num_classes = 0
            self.num_features = self.head_hidden_size = channels[-1]
        else:
            self._init_head(channels[-1], num_classes, global_pool, drop_rate,
                            norm=norm_layer(channels[-1]))

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem[0](x)
        for layer in self.stem[1:]:
            x = _run(layer, x, self.use_checkpoint)
        return x

    def _forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index > 0:
            x = self.transitions[index - 1](x)
        return self.stages[index](x)

    def _stage_output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.stages[index].norm(x)

    def _truncate_stages(self, num_stages: int) -> None:
        self.stages = self.stages[:num_stages]
        self.transitions = self.transitions[:num_stages - 1]
        self.num_stages = num_stages

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.use_checkpoint = enable
        for stage in self.stages:
            stage.use_checkpoint = enable

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups: the stem, then each stage (coarse) or each block; a
        transition and a stage's output norm join the group before them."""
        return {"stem": r"^stem\.",
                "blocks": r"^(?:stages|transitions)\.(\d+)" if coarse else [
                    (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                    (r"^stages\.(\d+)\.norm", (99999,)),
                    (r"^transitions\.(\d+)", (99999,)),
                    (r"^norm\.", (99999,))]}


def replknet_layer_id(name: str, num_layers: int = 12) -> int:
    """Upstream's layer-decay groups for RepLKNet's [2, 2, 18, 2] layout.

    stem 0; stage 0 and transitions.0 -> 1; stage 1 and transitions.1 -> 2; stage 2 in groups of
    two RepLK blocks + two ConvFFNs (``blocks`` index // 4) -> 3..11, transitions.2 -> 11;
    stage 3 -> 12; head and final norm -> 13. ``stages.{s}.norm`` (backbone outputs; upstream
    crashes on it) takes the group of its stage's last block.
    """
    parts = name.split(".")
    last_of_stage = {0: 1, 1: 2, 2: num_layers - 1, 3: num_layers}
    if parts[0] == "stem":
        return 0
    if parts[0] == "stages":
        stage = int(parts[1])
        if parts[2] == "norm":
            return last_of_stage[stage]
        if stage == 2:
            return min(3 + int(parts[3]) // 4, num_layers - 1)
        return last_of_stage[stage]
    if parts[0] == "transitions":
        return last_of_stage[int(parts[1])]
    return num_layers + 1


register_family(Family(name="replknet", layer_id_for=replknet_layer_id))


# Upstream's factories default to drop_path_rate=0.3 and use_checkpoint=True, but its main.py
# always overrides both (--drop_path, default 0; --use_checkpoint, default false). The defaults
# here are those effective CLI values, the framework's convention: no stochastic depth and no
# activation checkpointing unless asked for.
def _replknet(large_kernel_sizes: Sequence[int], channels: Sequence[int],
              small_kernel: Optional[int], dw_ratio: float = 1.0, **kwargs) -> RepLKNet:
    return RepLKNet(large_kernel_sizes=large_kernel_sizes, layers=(2, 2, 18, 2),
                    channels=channels, small_kernel=small_kernel, dw_ratio=dw_ratio, **kwargs)


@register_model("replknet", name="RepLKNet-31B")
def replknet_31b(**kwargs) -> RepLKNet:
    return _replknet((31, 29, 27, 13), (128, 256, 512, 1024), small_kernel=5, **kwargs)


@register_model("replknet", name="RepLKNet-31L")
def replknet_31l(**kwargs) -> RepLKNet:
    return _replknet((31, 29, 27, 13), (192, 384, 768, 1536), small_kernel=5, **kwargs)


@register_model("replknet", name="RepLKNet-XL")
def replknet_xl(**kwargs) -> RepLKNet:
    """No small-kernel branch and 1.5x wider depthwise convs, as upstream."""
    return _replknet((27, 27, 27, 13), (256, 512, 1024, 2048), small_kernel=None, dw_ratio=1.5,
                     **kwargs)
