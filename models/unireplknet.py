"""UniRepLKNet (Ding et al., CVPR 2024, "UniRepLKNet: A Universal Perception Large-Kernel ConvNet").

State_dict keys and shapes are identical to AILab-CVC/UniRepLKNet's ``unireplknet.py`` in the
training form and in the deploy form (``deploy=True``, or a trained model after
``models.reparameterize_model``), so the released checkpoints and ``*_deploy.pth`` files load
strictly.

Differences from upstream, on purpose:
- The dilated-branch merge dilates kernels by strided assignment (``models.reparam``), so
  re-parameterization works in float64 (upstream's conv_transpose trick fails there).
- ``reparameterize()`` always folds the layer scale, BN and GRN bias into ``pwconv2``; upstream
  drops the layer scale unfolded when GRN has no bias.
- ``use_checkpoint=True`` is accepted as an alias of ``with_cp=True`` (the framework's flag).
- Unknown keyword arguments raise instead of being swallowed.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convnext import ConvNeXtLayout, _init_weights, convnext_layer_id
from .layers import DepthwiseConv2d, DropPath, LayerNorm2d, drop_path_rates
from .registry import Family, register_family, register_model
from .reparam import depthwise_conv_from, fuse_bn, linear_from, merge_kernels
from .timm_api import stage_feature_info

__all__ = ["DILATED_BRANCHES", "DilatedReparamBlock", "GRN", "SEBlock", "UniRepLKNetBlock",
           "UniRepLKNet", "unireplknet_a", "unireplknet_f", "unireplknet_p", "unireplknet_n",
           "unireplknet_t", "unireplknet_s", "unireplknet_b", "unireplknet_l", "unireplknet_xl"]

# Parallel dilated branches per large kernel size: (kernel, dilation) pairs, upstream's table.
# Every branch has a dilated extent r * (k - 1) + 1 <= K, so it merges into the K x K kernel.
DILATED_BRANCHES: Dict[int, Tuple[Tuple[int, int], ...]] = {
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    7: ((5, 1), (3, 2), (3, 3)),
    5: ((3, 1), (3, 2)),
}


class ToChannelsLast(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class ToChannelsFirst(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt V2) on NHWC input: ``(gamma * Nx + 1) * x + beta``.

    ``beta`` exists only with ``use_bias`` (the deploy form folds it into the next linear layer).
    """

    def __init__(self, dim: int, use_bias: bool = True) -> None:
        super().__init__()
        self.use_bias = use_bias
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        if use_bias:
            self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        out = (self.gamma * nx + 1) * x
        return out + self.beta if self.use_bias else out


class SEBlock(nn.Module):
    """Squeeze-and-excitation (NCHW): global pool -> 1x1 down -> ReLU -> 1x1 up -> sigmoid gate."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(channels, hidden, kernel_size=1, bias=True)
        self.up = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)
        self.nonlinear = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.adaptive_avg_pool2d(x, 1)
        w = torch.sigmoid(self.up(self.nonlinear(self.down(w))))
        return x * w


def _branch_name(kind: str, kernel: int, dilation: int) -> str:
    return f"dil_{kind}_k{kernel}_{dilation}"


class DilatedReparamBlock(nn.Module):
    """Depthwise K x K conv+BN plus parallel dilated small-kernel convs+BNs (all 'same').

    Training form keys: ``lk_origin``, ``origin_bn``, ``dil_conv_k{k}_{r}``, ``dil_bn_k{k}_{r}``;
    deploy form: ``lk_origin`` alone, with a bias.
    """

    def __init__(self, channels: int, kernel_size: int, deploy: bool = False,
                 norm_layer=nn.BatchNorm2d) -> None:
        super().__init__()
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(f"DilatedReparamBlock has no branch table for kernel_size "
                             f"{kernel_size}; supported: {sorted(DILATED_BRANCHES)}")
        self.lk_origin = DepthwiseConv2d(channels, kernel_size, bias=deploy)
        self.branches = DILATED_BRANCHES[kernel_size]
        if not deploy:
            self.origin_bn = norm_layer(channels)
            for k, r in self.branches:
                self.add_module(_branch_name("conv", k, r), DepthwiseConv2d(channels, k, dilation=r))
                self.add_module(_branch_name("bn", k, r), norm_layer(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "origin_bn"):
            return self.lk_origin(x)
        out = self.origin_bn(self.lk_origin(x))
        for k, r in self.branches:
            conv = getattr(self, _branch_name("conv", k, r))
            bn = getattr(self, _branch_name("bn", k, r))
            out = out + bn(conv(x))
        return out

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold every BN and add each dilated kernel, expanded and centred, into ``lk_origin``."""
        if not hasattr(self, "origin_bn"):
            return
        kernel, bias = fuse_bn(self.lk_origin.weight, self.origin_bn)
        for k, r in self.branches:
            conv_name, bn_name = _branch_name("conv", k, r), _branch_name("bn", k, r)
            branch = fuse_bn(getattr(self, conv_name).weight, getattr(self, bn_name))
            kernel, bias = merge_kernels(kernel, bias, *branch, dilation=r)
            delattr(self, conv_name)
            delattr(self, bn_name)
        del self.origin_bn
        self.lk_origin = depthwise_conv_from(kernel, bias)


class UniRepLKNetBlock(nn.Module):
    """dwconv (dilated re-param for K >= 7) -> BN -> SE -> Linear(4C) -> GELU -> GRN -> Linear(C)
    -> BN -> layer scale, plus residual. ``kernel_size=0`` skips the dwconv and its BN."""

    def __init__(self, dim: int, kernel_size: int, drop_path: float = 0.0,
                 layer_scale_init_value: Optional[float] = 1e-6, deploy: bool = False,
                 norm_layer=nn.BatchNorm2d, ffn_factor: int = 4) -> None:
        super().__init__()
        dilated = sorted(k for k in DILATED_BRANCHES if k >= 7)
        if kernel_size not in [0, 3, 5] + dilated:
            raise ValueError(f"UniRepLKNet block kernel_size must be 0 (no dwconv), 3, 5 or one "
                             f"of {dilated} (dilated re-param); got {kernel_size}")
        if kernel_size == 0:
            self.dwconv = nn.Identity()
        elif kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size, deploy, norm_layer)
        else:
            self.dwconv = DepthwiseConv2d(dim, kernel_size, bias=deploy)
        self.norm = nn.Identity() if deploy or kernel_size == 0 else norm_layer(dim)
        self.se = SEBlock(dim, dim // 4)
        ffn_dim = int(ffn_factor * dim)
        self.pwconv1 = nn.Sequential(ToChannelsLast(), nn.Linear(dim, ffn_dim))
        self.act = nn.Sequential(nn.GELU(), GRN(ffn_dim, use_bias=not deploy))
        if deploy:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim), ToChannelsFirst())
        else:
            self.pwconv2 = nn.Sequential(nn.Linear(ffn_dim, dim, bias=False), ToChannelsFirst(),
                                         norm_layer(dim))
        use_scale = not deploy and layer_scale_init_value is not None and layer_scale_init_value > 0
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if use_scale else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.norm(self.dwconv(x)))
        y = self.pwconv2(self.act(self.pwconv1(y)))
        if self.gamma is not None:
            y = self.gamma.view(1, -1, 1, 1) * y
        return x + self.drop_path(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Switch to the deploy form: one biased dwconv, one biased ``pwconv2`` linear.

        The BN after the dwconv folds into it; GRN's ``beta`` (projected through the linear),
        the BN after ``pwconv2`` and the layer scale fold into ``pwconv2``.
        """
        if isinstance(self.dwconv, DilatedReparamBlock):
            self.dwconv.reparameterize()
        if not isinstance(self.norm, nn.Identity):
            conv = self.dwconv.lk_origin if isinstance(self.dwconv, DilatedReparamBlock) \
                else self.dwconv
            fused = depthwise_conv_from(*fuse_bn(conv.weight, self.norm, conv.bias))
            if isinstance(self.dwconv, DilatedReparamBlock):
                self.dwconv.lk_origin = fused
            else:
                self.dwconv = fused
            self.norm = nn.Identity()

        grn, linear = self.act[1], self.pwconv2[0]
        has_bn = len(self.pwconv2) == 3
        if not (grn.use_bias or has_bn or self.gamma is not None):
            return
        weight = linear.weight
        bias = linear.bias if linear.bias is not None else weight.new_zeros(weight.shape[0])
        if grn.use_bias:
            bias = bias + weight @ grn.beta.reshape(-1)
            del grn.beta
            grn.use_bias = False
        if has_bn:
            weight, bias = fuse_bn(weight, self.pwconv2[2], bias)
        if self.gamma is not None:
            weight, bias = weight * self.gamma[:, None], bias * self.gamma
            self.gamma = None
        self.pwconv2 = nn.Sequential(linear_from(weight, bias), ToChannelsFirst())


# Per-block kernel sizes picked by the depths tuple, as upstream (custom depths need kernel_sizes).
DEFAULT_KERNEL_SIZES: Dict[Tuple[int, ...], Tuple[Tuple[int, ...], ...]] = {
    (2, 2, 6, 2): ((3, 3), (13,) * 2, (13,) * 6, (13,) * 2),
    (2, 2, 8, 2): ((3, 3), (13,) * 2, (13,) * 8, (13,) * 2),
    (3, 3, 18, 3): ((3, 3, 3), (13,) * 3, (13, 3) * 9, (13,) * 3),
    (3, 3, 27, 3): ((3, 3, 3), (13,) * 3, (13, 3, 3) * 9, (13,) * 3),
}


class UniRepLKNet(ConvNeXtLayout, nn.Module):
    """UniRepLKNet with upstream's constructor arguments.

    ``num_classes=None`` builds a backbone: ``forward`` returns the feature maps of
    ``out_indices`` (default all four stages), each through its channels-first LayerNorm
    ``norm{i}``, as upstream's OpenMMLab backbone. ``num_classes=0`` leaves out the classifier
    of the classification model; ``global_pool`` ('avg', 'max', '') and ``drop_rate`` (dropout
    before the classifier) are timm's.
    """

    def __init__(self, in_chans: int = 3, num_classes: Optional[int] = 1000,
                 depths: Sequence[int] = (3, 3, 27, 3), dims: Sequence[int] = (96, 192, 384, 768),
                 drop_path_rate: float = 0.0, layer_scale_init_value: Optional[float] = 1e-6,
                 head_init_scale: float = 1.0,
                 kernel_sizes: Optional[Sequence[Sequence[int]]] = None, deploy: bool = False,
                 with_cp: bool = False, use_sync_bn: bool = False,
                 out_indices: Optional[Sequence[int]] = None, use_checkpoint: bool = False,
                 global_pool: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        depths = tuple(depths)
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"UniRepLKNet has 4 stages; got depths={depths}, dims={tuple(dims)}")
        if kernel_sizes is None:
            if depths not in DEFAULT_KERNEL_SIZES:
                raise ValueError(f"no default kernel sizes for depths {depths} (defaults exist "
                                 f"for {sorted(DEFAULT_KERNEL_SIZES)}); pass kernel_sizes, one "
                                 f"tuple per stage with one size per block")
            kernel_sizes = DEFAULT_KERNEL_SIZES[depths]
        if [len(k) for k in kernel_sizes] != list(depths):
            raise ValueError(f"kernel_sizes must give one size per block; got "
                             f"{[len(k) for k in kernel_sizes]} sizes for depths {depths}")
        if num_classes is not None and out_indices is not None:
            raise ValueError(f"UniRepLKNet takes num_classes (classification) or out_indices "
                             f"(backbone), not both; got num_classes={num_classes}, "
                             f"out_indices={out_indices}; pass num_classes=None for a backbone")
        norm_layer = nn.SyncBatchNorm if use_sync_bn else nn.BatchNorm2d
        self.in_chans = in_chans
        self.use_checkpoint = with_cp or use_checkpoint

        self.downsample_layers = nn.ModuleList([nn.Sequential(
            nn.Conv2d(in_chans, dims[0] // 2, kernel_size=3, stride=2, padding=1),
            LayerNorm2d(dims[0] // 2), nn.GELU(),
            nn.Conv2d(dims[0] // 2, dims[0], kernel_size=3, stride=2, padding=1),
            LayerNorm2d(dims[0]))])
        for i in range(3):
            self.downsample_layers.append(nn.Sequential(
                nn.Conv2d(dims[i], dims[i + 1], kernel_size=3, stride=2, padding=1),
                LayerNorm2d(dims[i + 1])))

        rates = drop_path_rates(drop_path_rate, sum(depths))
        self.stages = nn.ModuleList()
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.stages.append(nn.Sequential(*[
                UniRepLKNetBlock(dims[i], kernel_sizes[i][j], rates[start + j],
                                 layer_scale_init_value, deploy, norm_layer)
                for j in range(depth)]))

        self.feature_info = stage_feature_info(list(dims))
        if num_classes is not None:
            self._init_head(dims[-1], num_classes, global_pool, drop_rate,
                            norm=nn.LayerNorm(dims[-1], eps=1e-6))
        else:
            self.num_classes = 0
            self.num_features = self.head_hidden_size = dims[-1]
            self.out_indices = tuple(out_indices) if out_indices is not None else (0, 1, 2, 3)
            for i in self.out_indices:
                self.add_module(f"norm{i}", LayerNorm2d(dims[i]))

        self.apply(_init_weights)
        if isinstance(self._modules.get("head"), nn.Linear):
            with torch.no_grad():
                self.head.weight.mul_(head_init_scale)
                self.head.bias.mul_(head_init_scale)

    @property
    def with_cp(self) -> bool:
        """Upstream's name of ``use_checkpoint``."""
        return self.use_checkpoint

    def _stage_output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        norm = self._modules.get(f"norm{index}")
        return x if norm is None else norm(x)


register_family(Family(name="unireplknet", layer_id_for=convnext_layer_id))


def _unireplknet(depths: Sequence[int], dims: Sequence[int], **kwargs) -> UniRepLKNet:
    return UniRepLKNet(depths=depths, dims=dims, **kwargs)


@register_model("unireplknet")
def unireplknet_a(**kwargs) -> UniRepLKNet:
    return _unireplknet((2, 2, 6, 2), (40, 80, 160, 320), **kwargs)


@register_model("unireplknet")
def unireplknet_f(**kwargs) -> UniRepLKNet:
    return _unireplknet((2, 2, 6, 2), (48, 96, 192, 384), **kwargs)


@register_model("unireplknet")
def unireplknet_p(**kwargs) -> UniRepLKNet:
    return _unireplknet((2, 2, 6, 2), (64, 128, 256, 512), **kwargs)


@register_model("unireplknet")
def unireplknet_n(**kwargs) -> UniRepLKNet:
    return _unireplknet((2, 2, 8, 2), (80, 160, 320, 640), **kwargs)


@register_model("unireplknet")
def unireplknet_t(**kwargs) -> UniRepLKNet:
    return _unireplknet((3, 3, 18, 3), (80, 160, 320, 640), **kwargs)


@register_model("unireplknet")
def unireplknet_s(**kwargs) -> UniRepLKNet:
    return _unireplknet((3, 3, 27, 3), (96, 192, 384, 768), **kwargs)


@register_model("unireplknet")
def unireplknet_b(**kwargs) -> UniRepLKNet:
    return _unireplknet((3, 3, 27, 3), (128, 256, 512, 1024), **kwargs)


@register_model("unireplknet")
def unireplknet_l(**kwargs) -> UniRepLKNet:
    return _unireplknet((3, 3, 27, 3), (192, 384, 768, 1536), **kwargs)


@register_model("unireplknet")
def unireplknet_xl(**kwargs) -> UniRepLKNet:
    return _unireplknet((3, 3, 27, 3), (256, 512, 1024, 2048), **kwargs)
