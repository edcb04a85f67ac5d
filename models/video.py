"""Video classification with a UniRepLKNet backbone: a 16-frame clip as one large image.

UniRepLKNet's video models give the backbone a (B, C, T, H, W) clip of T = 16 frames reshaped in
memory to (B, C, 4H, 4W) (224 px frames: an 896 x 896 image). The reshape is not a 4 x 4 tiling
of the frames: with the clip's natural (T, H, W) memory order, image row r holds frame rows
4r .. 4r + 3 side by side (each image row is 4W long), so frame t fills image rows
t * H / 4 .. (t + 1) * H / 4 - 1, each a quarter of the frame's rows laid end to end.
:func:`clip_to_image` does exactly that and nothing else; the backbone's own classifier is the
head. Mixup, as upstream, mixes clips before the reshape, as (B, C * T, H, W) images (engine.py).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .registry import create_model

__all__ = ["FRAMES", "clip_to_image", "UniRepLKNetVideo", "create_video_classifier"]

FRAMES = 16  # the reshape needs T * H * W == 4H * 4W


def clip_to_image(clip: torch.Tensor) -> torch.Tensor:
    """(B, C, 16, H, W), or the same memory as (B, C * 16, H, W), to (B, C, 4H, 4W)."""
    if clip.dim() == 5:
        b, c, t, h, w = clip.shape
    elif clip.dim() == 4 and clip.shape[1] % FRAMES == 0:
        b, ct, h, w = clip.shape
        c, t = ct // FRAMES, FRAMES
    else:
        raise ValueError(f"expected a clip (B, C, {FRAMES}, H, W) or (B, C * {FRAMES}, H, W), got "
                         f"{tuple(clip.shape)}")
    if t != FRAMES:
        raise ValueError(f"the clip-to-image reshape needs {FRAMES} frames, got {t} "
                         f"(clip {tuple(clip.shape)})")
    return clip.reshape(b, c, 4 * h, 4 * w)


class UniRepLKNetVideo(nn.Module):
    """A backbone (with its classifier) applied to clips through :func:`clip_to_image`."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = backbone.num_classes

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.backbone(clip_to_image(clip))


def create_video_classifier(backbone: str, num_classes: int, in_chans: int = 3,
                            **backbone_kwargs: Any) -> UniRepLKNetVideo:
    """A registered backbone (e.g. ``unireplknet_b``, as upstream's Kinetics-400 model) for clips
    of ``in_chans`` x 16 frames."""
    return UniRepLKNetVideo(create_model(backbone, num_classes=num_classes, in_chans=in_chans,
                                         **backbone_kwargs))
