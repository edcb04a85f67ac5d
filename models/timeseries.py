"""UniRepLKNet on time series: forecasting and classification heads around an image backbone.

Following UniRepLKNet's time-series experiments (Corrformer-based), a series is embedded to a
``(seq_len, d_model)`` token matrix per node, that matrix is reshaped into a one-channel square
image of side ``sqrt(seq_len * d_model)``, and an ordinary 2-D backbone (``in_chans=1``) encodes
it. With the default ``d_model = seq_len`` the image is ``seq_len x seq_len`` and row ``t`` is the
embedding of time step ``t``, so the large kernels see many neighbouring time steps at once.

Both models take ``(B, seq_len, n_vars)`` batches and normalise every series over time first, so
the backbone sees the shape of a window rather than its level and scale.

Any registered model that supports ``in_chans=1, num_classes=0`` and timm's
``forward_features`` / ``forward_head`` works as the backbone (every family here does), so the same
heads give the small-kernel ConvNeXt baseline for comparison.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Set, Tuple

import torch
import torch.nn as nn

from .layers import trunc_normal_
from .registry import create_model

__all__ = ["image_side", "series_to_image", "image_to_series", "SeriesStats", "SeriesNorm",
           "UniRepLKNetForecaster", "UniRepLKNetSeriesClassifier", "create_forecaster",
           "create_series_classifier"]

# Added to the variance before the square root, so a constant series normalises to zeros.
_EPS = 1e-5


def _square_free_part(n: int) -> int:
    """The product of the primes with an odd exponent in ``n``: ``n * d`` is a perfect square
    exactly when ``d`` is this number times a square."""
    part, rest, p = 1, n, 2
    while p * p <= rest:
        exponent = 0
        while rest % p == 0:
            rest //= p
            exponent += 1
        if exponent % 2:
            part *= p
        p += 1
    return part * rest


def image_side(seq_len: int, d_model: int) -> int:
    """Side of the square image holding ``seq_len * d_model`` values; ValueError (with d_model
    values that would work) when the product is not a perfect square."""
    side = math.isqrt(seq_len * d_model)
    if side * side == seq_len * d_model:
        return side
    base = _square_free_part(seq_len)
    root = math.isqrt(d_model // base)
    options = [base * c * c for c in (root, root + 1) if c > 0]
    raise ValueError(
        f"seq_len * d_model must be a perfect square to form a square image; got "
        f"seq_len={seq_len}, d_model={d_model} (product {seq_len * d_model}); with "
        f"seq_len={seq_len} d_model must be {base} times a square, e.g. "
        f"{' or '.join(map(str, options))} (d_model=seq_len always works)")


def series_to_image(x: torch.Tensor) -> torch.Tensor:
    """(nodes, seq_len, d_model) tokens -> (nodes, 1, s, s) with s * s == seq_len * d_model.

    A plain memory reshape, not a tiling: the flattened tokens fill the image row by row, so
    element ``[n, 0, i, j]`` is ``x.flatten(1)[n, i * s + j]``. When ``d_model == seq_len``, row
    ``t`` is exactly the embedding of time step ``t``.
    """
    if x.ndim != 3:
        raise ValueError(f"series_to_image expects (nodes, seq_len, d_model) tokens, got shape "
                         f"{tuple(x.shape)}")
    side = image_side(x.shape[1], x.shape[2])
    return x.reshape(x.shape[0], 1, side, side)


def image_to_series(img: torch.Tensor, seq_len: int, d_model: int) -> torch.Tensor:
    """Inverse of :func:`series_to_image`: (nodes, 1, s, s) -> (nodes, seq_len, d_model)."""
    side = image_side(seq_len, d_model)
    if img.ndim != 4 or tuple(img.shape[1:]) != (1, side, side):
        raise ValueError(f"image_to_series expects (nodes, 1, {side}, {side}) for "
                         f"seq_len={seq_len}, d_model={d_model}, got shape {tuple(img.shape)}")
    return img.reshape(img.shape[0], seq_len, d_model)


class SeriesStats(NamedTuple):
    """Per-series statistics over time, each (B, 1, n_vars), kept to undo the normalisation."""
    mean: torch.Tensor
    std: torch.Tensor


def _standardize(x: torch.Tensor, eps: float) -> Tuple[torch.Tensor, SeriesStats]:
    """Zero mean, unit std over time (dim 1) per sample and variable."""
    mean = x.mean(dim=1, keepdim=True)
    std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + eps)
    return (x - mean) / std, SeriesStats(mean, std)


class SeriesNorm(nn.Module):
    """Per-series normalisation over time with a learnable per-variable affine.

    ``normalize`` returns the statistics with the result instead of storing them on the module,
    so one module can serve interleaved batches; ``denormalize`` applies the exact inverse
    (affine, then the series' std and mean) to a prediction in the normalised space.
    """

    def __init__(self, num_vars: int, eps: float = _EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_vars))
        self.bias = nn.Parameter(torch.zeros(num_vars))

    def normalize(self, x: torch.Tensor) -> Tuple[torch.Tensor, SeriesStats]:
        """(B, T, n_vars) -> normalised (B, T, n_vars) and the statistics to undo it."""
        z, stats = _standardize(x, self.eps)
        return z * self.weight + self.bias, stats

    def denormalize(self, y: torch.Tensor, stats: SeriesStats) -> torch.Tensor:
        """(B, T', n_vars) in the normalised space -> the original units of its series."""
        return (y - self.bias) / self.weight * stats.std + stats.mean


class _SeriesImageEncoder(nn.Module):
    """Shared part of both models: token positions, the token-to-image reshape and the backbone's
    pooled features."""

    def __init__(self, backbone: str, seq_len: int, d_model: Optional[int],
                 **backbone_kwargs) -> None:
        super().__init__()
        if seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len}")
        self.seq_len = seq_len
        self.d_model = seq_len if d_model is None else d_model
        self.image_size = image_side(seq_len, self.d_model)
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, self.d_model))
        trunc_normal_(self.pos_embed, std=0.02)
        self.backbone = create_model(backbone, in_chans=1, num_classes=0, **backbone_kwargs)
        self.num_features = self.backbone.num_features

    def no_weight_decay(self) -> Set[str]:
        """The position embedding is 3-D, so optim_factory would otherwise decay it."""
        return {"pos_embed"}

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(nodes, seq_len, d_model) tokens -> (nodes, num_features) pooled backbone features."""
        img = series_to_image(tokens + self.pos_embed)
        return self.backbone.forward_head(self.backbone.forward_features(img), pre_logits=True)

    def _check_input(self, x: torch.Tensor, n_vars: int) -> None:
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.seq_len, n_vars):
            raise ValueError(f"expected a (B, seq_len={self.seq_len}, n_vars={n_vars}) series, "
                             f"got shape {tuple(x.shape)}")


class UniRepLKNetForecaster(_SeriesImageEncoder):
    """(B, seq_len, n_vars) -> (B, pred_len, n_vars) forecaster.

    Channel-independent: every variable of every sample is its own node (one image), embedded
    value by value with ``Linear(1, d_model)``, so one model handles any mix of variables with
    shared weights and no variable leaks into another's forecast (in eval mode; in training, the
    backbone's BatchNorm statistics are shared over the batch of nodes). The pooled features are
    mapped to ``pred_len`` normalised values, then de-normalised with the input window's own
    statistics.
    """

    def __init__(self, backbone: str, seq_len: int, pred_len: int, n_vars: int,
                 d_model: Optional[int] = None, **backbone_kwargs) -> None:
        super().__init__(backbone, seq_len, d_model, **backbone_kwargs)
        if pred_len < 1 or n_vars < 1:
            raise ValueError(f"pred_len and n_vars must be positive integers, got "
                             f"pred_len={pred_len}, n_vars={n_vars}")
        self.pred_len = pred_len
        self.n_vars = n_vars
        self.norm = SeriesNorm(n_vars)
        self.value_embed = nn.Linear(1, self.d_model)
        self.head = nn.Linear(self.num_features, pred_len)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, self.n_vars)
        batch = x.shape[0]
        z, stats = self.norm.normalize(x)
        # (B, T, V) -> (B * V, T, 1): one node per (sample, variable).
        nodes = z.transpose(1, 2).reshape(batch * self.n_vars, self.seq_len, 1)
        y = self.head(self.encode(self.value_embed(nodes)))
        y = y.reshape(batch, self.n_vars, self.pred_len).transpose(1, 2)
        return self.norm.denormalize(y, stats)


class UniRepLKNetSeriesClassifier(_SeriesImageEncoder):
    """(B, seq_len, n_vars) -> (B, num_classes) logits; one node (image) per sample.

    Each sample is standardised per variable over time without an affine (the embedding
    ``Linear(n_vars, d_model)`` that follows would absorb it), then each time step's ``n_vars``
    values are embedded jointly, so the backbone sees the interactions between variables.
    """

    def __init__(self, backbone: str, seq_len: int, n_vars: int, num_classes: int,
                 d_model: Optional[int] = None, **backbone_kwargs) -> None:
        super().__init__(backbone, seq_len, d_model, **backbone_kwargs)
        if n_vars < 1 or num_classes < 1:
            raise ValueError(f"n_vars and num_classes must be positive integers, got "
                             f"n_vars={n_vars}, num_classes={num_classes}")
        self.n_vars = n_vars
        self.num_classes = num_classes
        self.value_embed = nn.Linear(n_vars, self.d_model)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, self.n_vars)
        z, _ = _standardize(x, _EPS)
        return self.head(self.encode(self.value_embed(z)))


def create_forecaster(backbone: str, seq_len: int, pred_len: int, n_vars: int,
                      d_model: Optional[int] = None, **backbone_kwargs) -> nn.Module:
    """A :class:`UniRepLKNetForecaster` on the registered model ``backbone`` (e.g.
    ``unireplknet_a``); ``backbone_kwargs`` (drop_path_rate, ...) go to its constructor."""
    return UniRepLKNetForecaster(backbone, seq_len, pred_len, n_vars, d_model, **backbone_kwargs)


def create_series_classifier(backbone: str, seq_len: int, n_vars: int, num_classes: int,
                             d_model: Optional[int] = None, **backbone_kwargs) -> nn.Module:
    """A :class:`UniRepLKNetSeriesClassifier` on the registered model ``backbone``;
    ``backbone_kwargs`` go to its constructor."""
    return UniRepLKNetSeriesClassifier(backbone, seq_len, n_vars, num_classes, d_model,
                                       **backbone_kwargs)
