"""ConvNeXt (Liu et al., 2022), with state_dict keys identical to facebookresearch/ConvNeXt.

It is the baseline of lknets and the skeleton SLaK and the oriented-1D variants build on, so the
stem/downsample layout and the ConvNeXt layer-id rule live here.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .layers import DepthwiseConv2d, DropPath, LayerNorm2d, drop_path_rates, trunc_normal_
from .registry import Family, create_model, register_family, register_model
from .timm_api import TimmModelMixin, stage_feature_info

__all__ = ["ConvNeXtBlock", "ConvNeXtLayout", "ConvNeXt", "convnext_stem", "convnext_downsample",
           "convnext_layer_id", "convnext_atto", "convnext_tiny", "convnext_small",
           "convnext_base", "convnext_large", "convnext_xlarge"]


class ConvNeXtBlock(nn.Module):
    """token mixer -> LN -> Linear(4C) -> GELU -> Linear(C) -> layer scale, plus residual.

    The mixer is ConvNeXt's 7x7 depthwise conv (``dwconv``); families that swap it (SLaK's
    ``large_kernel``) subclass with their own ``mixer_name`` and pass ``mixer``. It is registered
    first, as upstream, so the parameter order (which optimizer states follow) matches.
    """

    mixer_name = "dwconv"

    def __init__(self, dim: int, drop_path: float = 0.0, layer_scale_init_value: float = 1e-6,
                 mixer: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.add_module(self.mixer_name,
                        mixer if mixer is not None else DepthwiseConv2d(dim, 7, bias=True))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self._modules[self.mixer_name](x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))


def convnext_stem(in_chans: int, dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_chans, dim, kernel_size=4, stride=4), LayerNorm2d(dim))


def convnext_downsample(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(LayerNorm2d(in_dim), nn.Conv2d(in_dim, out_dim, kernel_size=2, stride=2))


# (stage index, block index in the stage, width, drop-path rate) -> block
BlockFn = Callable[[int, int, int, float], nn.Module]


class ConvNeXtLayout(TimmModelMixin):
    """timm's hooks (models.timm_api) for the ConvNeXt layout, shared with UniRepLKNet: stage
    ``i`` is ``downsample_layers[i]`` (the stem for i = 0), then the blocks ``stages[i]``, each
    under activation checkpointing when ``use_checkpoint`` is set."""

    downsample_layers: nn.ModuleList
    use_checkpoint: bool

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample_layers[0](x)

    def _forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index > 0:
            x = self.downsample_layers[index](x)
        for block in self.stages[index]:
            if self.use_checkpoint and x.requires_grad:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def _truncate_stages(self, num_stages: int) -> None:
        self.downsample_layers = self.downsample_layers[:num_stages]
        self.stages = self.stages[:num_stages]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.use_checkpoint = enable

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups: the stem, then each stage (coarse) or each block, with the
        downsampling that leads into a stage in its first group."""
        return {"stem": r"^downsample_layers\.0\.",
                "blocks": r"^(?:downsample_layers|stages)\.(\d+)" if coarse else [
                    (r"^downsample_layers\.(\d+)", (0,)),
                    (r"^stages\.(\d+)\.(\d+)", None)]}


class ConvNeXt(ConvNeXtLayout, nn.Module):
    """Stem, 4 stages with downsampling between them, global pool + LN + linear head.

    ``block_fn`` and ``stem`` let other families (SLaK, oriented 1D) reuse this skeleton; the
    defaults give facebookresearch's ConvNeXt. ``num_classes=0`` leaves out the classifier
    (``forward`` gives the normalized pooled features); ``global_pool`` ('avg', 'max', '')
    and ``drop_rate`` (dropout before the classifier) are timm's.
    """

    def __init__(self, in_chans: int = 3, num_classes: int = 1000,
                 depths: Sequence[int] = (3, 3, 9, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 drop_path_rate: float = 0.0, layer_scale_init_value: float = 1e-6,
                 head_init_scale: float = 1.0, use_checkpoint: bool = False,
                 block_fn: Optional[BlockFn] = None, stem: Optional[nn.Module] = None,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if block_fn is None:
            def block_fn(stage: int, index: int, dim: int, drop_path: float) -> nn.Module:
                return ConvNeXtBlock(dim, drop_path, layer_scale_init_value)
        self.in_chans = in_chans
        self.use_checkpoint = use_checkpoint
        self.downsample_layers = nn.ModuleList(
            [stem if stem is not None else convnext_stem(in_chans, dims[0])])
        self.downsample_layers.extend(
            convnext_downsample(dims[i], dims[i + 1]) for i in range(len(dims) - 1))
        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                block_fn(i, j, dims[i], rates[start + j]) for j in range(depth)]))
        self.feature_info = stage_feature_info(list(dims))
        self._init_head(dims[-1], num_classes, global_pool, drop_rate,
                        norm=nn.LayerNorm(dims[-1], eps=1e-6))

        self.apply(_init_weights)
        if isinstance(self.head, nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def convnext_layer_id(name: str, num_layers: int = 12) -> int:
    """ConvNeXt's layer-decay rule: stem 0, stages 1..12 (stage 3 in groups of 3 blocks), head 13.

    Shared by every family built on the ConvNeXt skeleton (``downsample_layers``/``stages``).
    """
    parts = name.split(".")
    if parts[0] == "downsample_layers":
        stage = int(parts[1])
        return {0: 0, 1: 2, 2: 3}.get(stage, num_layers)
    if parts[0] == "stages":
        stage = int(parts[1])
        if stage == 2:
            return 3 + int(parts[2]) // 3
        return {0: 1, 1: 2}.get(stage, num_layers)
    return num_layers + 1


ORIENTED_VARIANTS = ("2d", "1d", "1dpp", "2dpp")


def add_convnext_args(parser) -> None:
    """Oriented1D's ``--variant``: ``convnext_tiny``/``convnext_base`` with oriented 1D kernels."""
    parser.add_argument_group("ConvNeXt").add_argument(
        "--variant", type=str, default=None, choices=ORIENTED_VARIANTS,
        help="ConvNeXt variant (Oriented1D): 2d (ConvNeXt, the default), 1d, 1dpp, 2dpp")


def convnext_kwargs(args) -> dict:
    if args.variant in (None, "2d"):
        return {}
    if args.model not in ("convnext_tiny", "convnext_base"):
        raise ValueError(f"--variant {args.variant} exists for convnext_tiny and convnext_base "
                         f"only, not {args.model}")
    return {"variant": args.variant}


register_family(Family(name="convnext", layer_id_for=convnext_layer_id,
                       add_args=add_convnext_args, kwargs_from_args=convnext_kwargs))


def _convnext(depths: Sequence[int], dims: Sequence[int], **kwargs) -> ConvNeXt:
    return ConvNeXt(depths=depths, dims=dims, **kwargs)


@register_model("convnext")
def convnext_atto(**kwargs) -> ConvNeXt:
    """A tiny configuration (timm's naming) for demos and tests."""
    return _convnext((2, 2, 6, 2), (40, 80, 160, 320), **kwargs)


def _oriented(name: str, variant: str, kwargs) -> nn.Module:
    """Oriented1D's ``variant`` argument; those models are registered as ``{name}_{variant}``."""
    if variant not in ORIENTED_VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(ORIENTED_VARIANTS)}, got {variant!r}")
    return create_model(f"{name}_{variant}", **kwargs)


@register_model("convnext")
def convnext_tiny(variant: str = "2d", **kwargs) -> nn.Module:
    if variant != "2d":
        return _oriented("convnext_tiny", variant, kwargs)
    return _convnext((3, 3, 9, 3), (96, 192, 384, 768), **kwargs)


@register_model("convnext")
def convnext_small(**kwargs) -> ConvNeXt:
    return _convnext((3, 3, 27, 3), (96, 192, 384, 768), **kwargs)


@register_model("convnext")
def convnext_base(variant: str = "2d", **kwargs) -> nn.Module:
    if variant != "2d":
        return _oriented("convnext_base", variant, kwargs)
    return _convnext((3, 3, 27, 3), (128, 256, 512, 1024), **kwargs)


@register_model("convnext")
def convnext_large(**kwargs) -> ConvNeXt:
    return _convnext((3, 3, 27, 3), (192, 384, 768, 1536), **kwargs)


@register_model("convnext")
def convnext_xlarge(**kwargs) -> ConvNeXt:
    return _convnext((3, 3, 27, 3), (256, 512, 1024, 2048), **kwargs)
