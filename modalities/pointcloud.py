"""Generated point clouds for end-to-end runs of the point-cloud adapter (models/pointcloud.py).

``--data_set synthetic_points``: 1,024 points on the surface of one of four shapes (sphere, cube,
cylinder, torus), each randomly rotated, stretched by 0.8-1.2 per axis and jittered by 1% of its
size; the class is the shape. A generator seeded by the split and the index makes each cloud
reproducible. ``--input_size`` is the side of each rendered view.
"""
from __future__ import annotations

import argparse
import math
from typing import Tuple

import torch
from torch.utils.data import Dataset

from .generated import GeneratedDataset

__all__ = ["SHAPES", "SyntheticShapes", "build_point_dataset"]

SHAPES = ("sphere", "cube", "cylinder", "torus")
NUM_POINTS = 1024


def _surface(shape: str, n: int, g: torch.Generator) -> torch.Tensor:
    u, v = torch.rand(n, generator=g), torch.rand(n, generator=g)
    if shape == "sphere":
        d = torch.randn(n, 3, generator=g)
        return d / d.norm(dim=1, keepdim=True)
    if shape == "cube":
        face = torch.randint(0, 6, (n,), generator=g)
        p = torch.rand(n, 3, generator=g) * 2 - 1
        axis, sign = face % 3, (face // 3) * 2 - 1
        p[torch.arange(n), axis] = sign.float()
        return p
    a = 2 * math.pi * u
    if shape == "cylinder":
        return torch.stack([a.cos(), v * 2 - 1, a.sin()], dim=1)
    b = 2 * math.pi * v  # torus: tube radius 0.35 around a circle of radius 1
    r = 1 + 0.35 * b.cos()
    return torch.stack([r * a.cos(), 0.35 * b.sin(), r * a.sin()], dim=1)


def _random_rotation(g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


class SyntheticShapes(GeneratedDataset):
    """``length`` clouds (1024, 3), labelled by shape."""

    def __init__(self, length: int, seed: int) -> None:
        super().__init__(length, seed, SHAPES)

    def sample(self, label: int, g: torch.Generator) -> torch.Tensor:
        points = _surface(SHAPES[label], NUM_POINTS, g)
        points = points * (0.8 + 0.4 * torch.rand(3, generator=g))
        points = points @ _random_rotation(g).T
        return points + 0.01 * torch.randn(points.shape, generator=g)


def build_point_dataset(is_train: bool, args: argparse.Namespace) -> Tuple[Dataset, int]:
    """1024 training and 256 evaluation clouds."""
    dataset = SyntheticShapes(1024 if is_train else 256, 0 if is_train else 1)
    return dataset, dataset.num_classes
