"""Generated video clips for shape-level end-to-end runs of the video adapter (models/video.py).

No package ships real video classification data, so ``--data_set synthetic_video`` generates it:
each clip is 16 frames of a bright square moving across a noisy background; the class is the
direction of motion (right, left, down, up). Position, size, speed and noise are drawn from a
generator seeded by the split and the index, so a clip is the same every time it is read and the
train and eval splits differ. ``--input_size`` is the frame side (the backbone sees 4x that).
"""
from __future__ import annotations

import argparse
from typing import Tuple

import torch
from torch.utils.data import Dataset

from models.video import FRAMES

from .generated import GeneratedDataset

__all__ = ["DIRECTIONS", "MovingSquares", "build_video_dataset"]

DIRECTIONS = ("right", "left", "down", "up")
_STEP = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}


class MovingSquares(GeneratedDataset):
    """``length`` clips (3, 16, size, size), float32 around zero, labelled by direction."""

    def __init__(self, length: int, size: int, seed: int) -> None:
        if size < 8:
            raise ValueError(f"frames of {size} px are too small for moving squares; use >= 8")
        super().__init__(length, seed, DIRECTIONS)
        self.size = size

    def sample(self, label: int, g: torch.Generator) -> torch.Tensor:
        dy, dx = _STEP[DIRECTIONS[label]]
        side = int(torch.randint(self.size // 8, self.size // 4 + 1, (1,), generator=g))
        travel = self.size - side
        speed = travel / (FRAMES - 1)
        across = int(torch.randint(0, travel + 1, (1,), generator=g))
        colour = torch.rand(3, generator=g) * 0.5 + 0.5
        clip = torch.randn(3, FRAMES, self.size, self.size, generator=g) * 0.1
        for t in range(FRAMES):
            along = round(t * speed) if dx + dy > 0 else travel - round(t * speed)
            top, left = (along, across) if dy else (across, along)
            clip[:, t, top:top + side, left:left + side] += colour[:, None, None]
        return clip


def build_video_dataset(is_train: bool, args: argparse.Namespace) -> Tuple[Dataset, int]:
    """1024 training and 256 evaluation clips at ``args.input_size`` px."""
    dataset = MovingSquares(1024 if is_train else 256, args.input_size, 0 if is_train else 1)
    return dataset, dataset.num_classes
