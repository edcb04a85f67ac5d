"""Point-cloud classification with a UniRepLKNet backbone: a cloud rendered from several views.

UniRepLKNet's point-cloud models (P2P-style) repeat each cloud for a few fixed views, project it
into 224 x 224 images with a learned point-to-pixel colouring, run the backbone on each view and
pool the views before an MLP head. Here the projection is fixed, documented and differentiable:
each cloud is centred and scaled into the unit sphere, rotated into each view (azimuths 0, 90,
180 and 270 degrees at 30 degrees elevation for 4 views), projected orthographically (x to
columns, y to rows, z dropped) and splatted as a Gaussian of ``sigma`` pixels. Each point's colour
is learned from its rotated coordinates (a two-layer MLP and a sigmoid); a pixel shows the
splat-weighted mean colour of the points over it, times its coverage 1 - exp(-weight), so empty
pixels are 0 and the image stays bounded however many points land on a pixel. Gradients reach
the colouring and the points. The head pools the views' features (max and mean) into a
[512, 256] MLP with dropout 0.5, as upstream's pooling head.
"""
from __future__ import annotations

import math
from typing import Any, List

import torch
import torch.nn as nn

from .registry import create_model

__all__ = ["view_rotations", "PointRenderer", "UniRepLKNetPoint", "create_point_classifier"]


def view_rotations(num_views: int, elevation_deg: float = 30.0) -> torch.Tensor:
    """(V, 3, 3) rotations: azimuth 360 / V * v about the vertical axis, then the elevation."""
    e = math.radians(elevation_deg)
    tilt = torch.tensor([[1.0, 0.0, 0.0],
                         [0.0, math.cos(e), -math.sin(e)],
                         [0.0, math.sin(e), math.cos(e)]])
    rotations: List[torch.Tensor] = []
    for v in range(num_views):
        a = 2 * math.pi * v / num_views
        turn = torch.tensor([[math.cos(a), 0.0, math.sin(a)],
                             [0.0, 1.0, 0.0],
                             [-math.sin(a), 0.0, math.cos(a)]])
        rotations.append(tilt @ turn)
    return torch.stack(rotations)


class PointRenderer(nn.Module):
    """(B, N, 3) points -> (B, V, 3, S, S) images, differentiable (see the module docstring)."""

    def __init__(self, image_size: int, num_views: int = 4, sigma: float = 1.0) -> None:
        super().__init__()
        self.image_size, self.num_views, self.sigma = image_size, num_views, sigma
        self.register_buffer("rotations", view_rotations(num_views), persistent=False)
        self.colour = nn.Sequential(nn.Linear(3, 16), nn.GELU(), nn.Linear(16, 3))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"expected points (B, N, 3), got {tuple(points.shape)}")
        centred = points - points.mean(dim=1, keepdim=True)
        radius = centred.norm(dim=-1).amax(dim=1).clamp_min(1e-6)[:, None, None]
        unit = centred / radius
        rotated = torch.einsum("vij,bnj->bvni", self.rotations.to(unit.dtype), unit)
        size = self.image_size
        # [-1, 1] to pixel centres 0 .. size - 1; rows grow downwards, so y is flipped.
        cols = (rotated[..., 0] + 1) * (size - 1) / 2
        rows = (1 - rotated[..., 1]) * (size - 1) / 2
        grid = torch.arange(size, dtype=unit.dtype, device=unit.device)
        wx = torch.exp(-(cols[..., None] - grid) ** 2 / (2 * self.sigma ** 2))
        wy = torch.exp(-(rows[..., None] - grid) ** 2 / (2 * self.sigma ** 2))
        colour = torch.sigmoid(self.colour(rotated))
        painted = torch.einsum("bvnc,bvni,bvnj->bvcij", colour, wy, wx)
        weight = torch.einsum("bvni,bvnj->bvij", wy, wx)[:, :, None]
        return painted / weight.clamp_min(1e-6) * (1 - torch.exp(-weight))


class UniRepLKNetPoint(nn.Module):
    """Render, run the backbone on every view, pool the views, classify."""

    def __init__(self, backbone: nn.Module, num_classes: int, image_size: int,
                 num_views: int = 4) -> None:
        super().__init__()
        self.render = PointRenderer(image_size, num_views)
        self.backbone = backbone
        self.num_classes = num_classes
        features = backbone.num_features
        self.head = nn.Sequential(
            nn.Linear(2 * features, 512), nn.LayerNorm(512), nn.GELU(), nn.Dropout(0.5),
            nn.Linear(512, 256), nn.LayerNorm(256), nn.GELU(), nn.Dropout(0.5),
            nn.Linear(256, num_classes))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        views = self.render(points)
        b, v = views.shape[:2]
        # The renderer's [0, 1] images centred as the backbone's ImageNet-normalised inputs are.
        x = (views.flatten(0, 1) - 0.5) / 0.25
        features = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        features = features.view(b, v, -1)
        return self.head(torch.cat([features.amax(dim=1), features.mean(dim=1)], dim=1))


def create_point_classifier(backbone: str, num_classes: int, image_size: int = 224,
                            num_views: int = 4, **backbone_kwargs: Any) -> UniRepLKNetPoint:
    """A registered backbone (upstream: ``unireplknet_s``) under the multi-view renderer."""
    return UniRepLKNetPoint(create_model(backbone, num_classes=0, **backbone_kwargs), num_classes,
                            image_size, num_views)
