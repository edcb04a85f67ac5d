"""Base of the generated data sets (synthetic video and point clouds): reproducible samples."""
from __future__ import annotations

import abc
from typing import List, Sequence, Tuple

import torch
from torch.utils.data import Dataset

__all__ = ["GeneratedDataset"]


class GeneratedDataset(Dataset, abc.ABC):
    """``length`` samples, sample ``index`` of class ``index % len(classes)`` (balanced), drawn
    from a generator seeded by (``seed``, ``index``): the same every time it is read, whatever
    worker or epoch reads it, and different between splits of different seeds."""

    def __init__(self, length: int, seed: int, classes: Sequence[str]) -> None:
        self.length, self.seed = length, seed
        self.classes = list(classes)
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return self.length

    @property
    def targets(self) -> List[int]:
        return [index % self.num_classes for index in range(self.length)]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        label = index % self.num_classes
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return self.sample(label, generator), label

    @abc.abstractmethod
    def sample(self, label: int, generator: torch.Generator) -> torch.Tensor:
        """One sample of class ``label``, drawn from ``generator`` only."""
