"""The pretrained configuration of every lknets model: one entry per released checkpoint.

Keys are ``"<lknets name>.<tag>"`` (or the bare name for a model without a release), values are
timm ``PretrainedCfg`` fields: the data config a checkpoint was evaluated with (input size, crop,
interpolation, mean/std), its number of classes, the first conv and classifier names, and where
upstream published the file. Tags follow timm's style (``in1k``, ``in22k``, ``in22k_ft_in1k_384``).
timm's registry reads this table (``models.timm_api``); main.py can read its eval defaults here.

Nothing here downloads: ``url`` and ``hf_hub_id`` name the public upstream location, ``file`` the
upstream file name where the file sits on a drive without a stable URL (Google Drive, SURFdrive).
Tags of releases without a published file name are listed with their data config only.
A model's first entry with a file is its default (timm's rule: what a name without a tag
builds), so models list an ImageNet-1K (1000-class) checkpoint first.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from timm.data import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                       IMAGENET_INCEPTION_STD)

__all__ = ["PRETRAINED_CFGS", "pretrained_cfgs", "pretrained_cfg"]

IN22K_CLASSES = 21841
# The eval transform of every upstream repo (ConvNeXt's datasets.py): below 384 px, resize to
# size / 0.875 and centre-crop; from 384 px, resize (warp) straight to the size.
SMALL_CROP_PCT = 224 / 256
WARP_FROM = 384


def _cfg(first_conv: str, origin_url: str, input_size: int = 224, **fields: Any) -> Dict[str, Any]:
    warp = input_size >= WARP_FROM
    return {
        "input_size": (3, input_size, input_size), "pool_size": (input_size // 32,) * 2,
        "crop_pct": 1.0 if warp else SMALL_CROP_PCT, "crop_mode": "squash" if warp else "center",
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "num_classes": 1000, "first_conv": first_conv, "classifier": "head",
        "origin_url": origin_url, **fields,
    }


def _replknet(**fields: Any) -> Dict[str, Any]:
    return _cfg("stem.0.conv", "https://github.com/DingXiaoH/RepLKNet-pytorch", **fields)


def _unireplknet(filename: str, **fields: Any) -> Dict[str, Any]:
    return _cfg("downsample_layers.0.0", "https://github.com/AILab-CVC/UniRepLKNet",
                hf_hub_id="DingXiaoH/UniRepLKNet", hf_hub_filename=filename, **fields)


def _convnext(filename: Optional[str] = None, **fields: Any) -> Dict[str, Any]:
    url = f"https://dl.fbaipublicfiles.com/convnext/{filename}" if filename else None
    return _cfg("downsample_layers.0.0", "https://github.com/facebookresearch/ConvNeXt", url=url,
                **fields)


def _slak(**fields: Any) -> Dict[str, Any]:
    return _cfg("downsample_layers.0.0", "https://github.com/VITA-Group/SLaK", **fields)


def _oriented(variant: str, **fields: Any) -> Dict[str, Any]:
    first_conv = "downsample_layers.0.pw1" if variant in ("1d", "1dpp") else "downsample_layers.0.0"
    return _cfg(first_conv, "https://github.com/princeton-vl/Oriented1D", **fields)


_SLAK_FLAGS = ("released weights are of the model built with kernel_size=[51, 49, 47, 13, 5], "
               "width_factor=1.3, Decom=True (upstream's README)",)

PRETRAINED_CFGS: Dict[str, Dict[str, Any]] = {
    # RepLKNet (README): Google Drive / Baidu; file names as in its eval commands.
    "RepLKNet-31B.in1k": _replknet(file="RepLKNet-31B_ImageNet-1K_224.pth"),
    "RepLKNet-31B.in1k_384": _replknet(input_size=384),
    "RepLKNet-31B.in22k": _replknet(file="RepLKNet-31B_ImageNet-22K.pth",
                                    num_classes=IN22K_CLASSES),
    "RepLKNet-31B.in22k_ft_in1k": _replknet(),
    "RepLKNet-31B.in22k_ft_in1k_384": _replknet(input_size=384),
    "RepLKNet-31L.in22k_ft_in1k_384": _replknet(
        file="RepLKNet-31L_ImageNet-22K-to-1K_384.pth", input_size=384),
    "RepLKNet-31L.in22k": _replknet(file="RepLKNet-31L_ImageNet-22K.pth",
                                    num_classes=IN22K_CLASSES),
    # Evaluated with --imagenet_default_mean_and_std false (0.5/0.5) at 320 px (README).
    "RepLKNet-XL.megdata73m_ft_in1k_320": _replknet(
        file="RepLKNet-XL_MegData73M_ImageNet1K.pth", input_size=320,
        mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD),

    # UniRepLKNet: Hugging Face repo DingXiaoH/UniRepLKNet (unireplknet.py's file table).
    "unireplknet_a.in1k": _unireplknet("unireplknet_a_in1k_224_acc77.03.pth"),
    "unireplknet_f.in1k": _unireplknet("unireplknet_f_in1k_224_acc78.58.pth"),
    "unireplknet_p.in1k": _unireplknet("unireplknet_p_in1k_224_acc80.23.pth"),
    "unireplknet_n.in1k": _unireplknet("unireplknet_n_in1k_224_acc81.64.pth"),
    "unireplknet_t.in1k": _unireplknet("unireplknet_t_in1k_224_acc83.21.pth"),
    "unireplknet_s.in1k": _unireplknet("unireplknet_s_in1k_224_acc83.91.pth"),
    "unireplknet_s.in22k": _unireplknet("unireplknet_s_in22k_pretrain.pth",
                                        num_classes=IN22K_CLASSES),
    "unireplknet_s.in22k_ft_in1k_384": _unireplknet(
        "unireplknet_s_in22k_to_in1k_384_acc86.44.pth", input_size=384),
    "unireplknet_b.in22k_ft_in1k_384": _unireplknet(
        "unireplknet_b_in22k_to_in1k_384_acc87.40.pth", input_size=384),
    "unireplknet_b.in22k": _unireplknet("unireplknet_b_in22k_pretrain.pth",
                                        num_classes=IN22K_CLASSES),
    # L and XL were pretrained on 22K at 192 px (README).
    "unireplknet_l.in22k_ft_in1k_384": _unireplknet(
        "unireplknet_l_in22k_to_in1k_384_acc87.88.pth", input_size=384),
    "unireplknet_l.in22k": _unireplknet("unireplknet_l_in22k_pretrain.pth", input_size=192,
                                        num_classes=IN22K_CLASSES),
    "unireplknet_xl.in22k_ft_in1k_384": _unireplknet(
        "unireplknet_xl_in22k_to_in1k_384_acc87.96.pth", input_size=384),
    "unireplknet_xl.in22k": _unireplknet("unireplknet_xl_in22k_pretrain.pth", input_size=192,
                                         num_classes=IN22K_CLASSES),

    # ConvNeXt (facebookresearch): the keys of these files are lknets' ConvNeXt keys.
    "convnext_atto": _convnext(),  # a small lknets configuration, no release
    "convnext_tiny.in1k": _convnext("convnext_tiny_1k_224_ema.pth"),
    "convnext_tiny.in22k": _convnext("convnext_tiny_22k_224.pth", num_classes=IN22K_CLASSES),
    "convnext_tiny.in22k_ft_in1k": _convnext("convnext_tiny_22k_1k_224.pth"),
    "convnext_tiny.in22k_ft_in1k_384": _convnext("convnext_tiny_22k_1k_384.pth", input_size=384),
    "convnext_small.in1k": _convnext("convnext_small_1k_224_ema.pth"),
    "convnext_small.in22k": _convnext("convnext_small_22k_224.pth", num_classes=IN22K_CLASSES),
    "convnext_small.in22k_ft_in1k": _convnext("convnext_small_22k_1k_224.pth"),
    "convnext_small.in22k_ft_in1k_384": _convnext("convnext_small_22k_1k_384.pth",
                                                  input_size=384),
    "convnext_base.in1k": _convnext("convnext_base_1k_224_ema.pth"),
    "convnext_base.in22k": _convnext("convnext_base_22k_224.pth", num_classes=IN22K_CLASSES),
    "convnext_base.in22k_ft_in1k": _convnext("convnext_base_22k_1k_224.pth"),
    "convnext_base.in22k_ft_in1k_384": _convnext("convnext_base_22k_1k_384.pth", input_size=384),
    "convnext_large.in1k": _convnext("convnext_large_1k_224_ema.pth"),
    "convnext_large.in22k": _convnext("convnext_large_22k_224.pth", num_classes=IN22K_CLASSES),
    "convnext_large.in22k_ft_in1k": _convnext("convnext_large_22k_1k_224.pth"),
    "convnext_large.in22k_ft_in1k_384": _convnext("convnext_large_22k_1k_384.pth",
                                                  input_size=384),
    "convnext_xlarge.in22k_ft_in1k": _convnext("convnext_xlarge_22k_1k_224_ema.pth"),
    "convnext_xlarge.in22k_ft_in1k_384": _convnext("convnext_xlarge_22k_1k_384_ema.pth",
                                                   input_size=384),
    "convnext_xlarge.in22k": _convnext("convnext_xlarge_22k_224.pth", num_classes=IN22K_CLASSES),

    # SLaK (README table, 224 px, ImageNet-1K, 40% sparse); no file names are published.
    "SLaK_tiny.in1k": _slak(notes=_SLAK_FLAGS),
    "SLaK_small.in1k": _slak(notes=_SLAK_FLAGS),
    "SLaK_base.in1k": _slak(notes=_SLAK_FLAGS),
    "SLaK_large": _slak(),

    # Oriented1D: convnext_{size}_{variant}_best.pth (weights under "model") and
    # ..._best_ema.pth (evaluated from its "model_ema" weights, upstream's USE_EMA=1).
    **{f"convnext_{size}_{variant}.{tag}": _oriented(
        variant, file=f"convnext_{size}_{variant}_{suffix}.pth")
       for size in ("tiny", "base") for variant in ("2d", "1d", "1dpp", "2dpp")
       for tag, suffix in (("in1k", "best"), ("in1k_ema", "best_ema"))},
}


def pretrained_cfgs(model_name: str) -> Dict[str, Dict[str, Any]]:
    """Every entry of ``model_name`` (``name`` or ``name.tag`` keys), in table order."""
    cfgs = {key: cfg for key, cfg in PRETRAINED_CFGS.items()
            if key.split(".", 1)[0] == model_name}
    if not cfgs:
        raise KeyError(f"models/pretrained.py has no entry for {model_name!r}; add its released "
                       f"checkpoints (or an untagged data config) there")
    return cfgs


def pretrained_cfg(model_name: str, tag: Optional[str] = None) -> Dict[str, Any]:
    """The cfg of one checkpoint of ``model_name``: ``tag``, or the model's first entry."""
    cfgs = pretrained_cfgs(model_name)
    if tag is None:
        return next(iter(cfgs.values()))
    key = f"{model_name}.{tag}"
    if key not in cfgs:
        raise KeyError(f"{model_name} has no checkpoint tagged {tag!r}; its entries: "
                       f"{', '.join(cfgs)}")
    return cfgs[key]
