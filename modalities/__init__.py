"""UniRepLKNet beyond images: the data side of audio, time series, video and point clouds.

Each modality turns its input into the backbone's 2-D input in an adapter under models/
(models/audio.py, models/timeseries.py, models/video.py, models/pointcloud.py); the modules here
read and prepare its data. ``DATA_SETS`` maps main.py's ``--data_set`` values to both, with what
``--input_size`` means for each and which parts of the image recipe apply. The packages some need
(statsmodels, sktime: ``pip install -r requirements-modalities.txt``) are imported only when
their data set is used.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
from typing import Dict, Optional, Tuple

import torch.nn as nn
from torch.utils.data import Dataset

__all__ = ["Modality", "DATA_SETS", "get", "build_dataset", "create_model"]


@dataclasses.dataclass(frozen=True)
class Modality:
    """One ``--data_set`` beyond images.

    ``task``: ``classification`` (cross-entropy, accuracy) or ``forecasting`` (MSE loss; MSE and
    MAE against the naive last-value forecast). ``input_size``: what ``--input_size`` means, and
    ``default_input_size`` its value when the flag is not given. ``mixup`` / ``cutmix``: whether
    the recipe's mixup and cutmix apply (cutmix cuts boxes out of images: video frames only).
    ``series``: for time series, (sequence length, variables) when fixed by the data set.
    """

    kind: str
    task: str
    input_size: str
    default_input_size: int
    mixup: bool
    cutmix: bool
    series: Optional[Tuple[int, int]] = None
    d_model: Optional[int] = None


_SERIES_CLASSES = "ignored: the series' own length (padded to the longest)"
DATA_SETS: Dict[str, Modality] = {
    "speech_commands": Modality("audio", "classification",
                                "fbank frames per clip (10 ms each; upstream 128)", 128,
                                mixup=True, cutmix=False),
    "co2": Modality("timeseries", "forecasting", "past steps per window (seq_len)", 64,
                    mixup=False, cutmix=False, series=(0, 1)),
    "macrodata": Modality("timeseries", "forecasting", "past steps per window (seq_len)", 64,
                          mixup=False, cutmix=False, series=(0, 12)),
    "gunpoint": Modality("timeseries", "classification", _SERIES_CLASSES, 150, mixup=True,
                         cutmix=False, series=(150, 1)),
    "basicmotions": Modality("timeseries", "classification", _SERIES_CLASSES, 100, mixup=True,
                             cutmix=False, series=(100, 6)),
    # 29 steps x d_model 116 = 58 x 58: an image the backbone's 32x downsampling can take.
    "japanese_vowels": Modality("timeseries", "classification", _SERIES_CLASSES, 29, mixup=True,
                                cutmix=False, series=(29, 12), d_model=116),
    "synthetic_video": Modality("video", "classification",
                                "frame side (16 frames; the backbone sees 4x the side)", 32,
                                mixup=True, cutmix=True),
    "synthetic_points": Modality("points", "classification", "side of each rendered view", 64,
                                 mixup=False, cutmix=False),
}


def get(name: Optional[str]) -> Optional[Modality]:
    """The modality of a ``--data_set`` value, or None for the image data sets."""
    return DATA_SETS.get(name) if name is not None else None


# kind -> (module of this package, its builder (is_train, args) -> (dataset, classes)).
_BUILDERS = {"audio": ("audio", "build_audio_dataset"), "video": ("video", "build_video_dataset"),
             "points": ("pointcloud", "build_point_dataset")}


def build_dataset(name: str, is_train: bool, args: argparse.Namespace) -> Tuple[Dataset, int]:
    """The train or eval split and its number of classes (forecasting: the horizon)."""
    kind = DATA_SETS[name].kind
    if kind == "timeseries":
        from .timeseries import build_timeseries_dataset
        return build_timeseries_dataset(name, is_train, args)
    module, builder = _BUILDERS[kind]
    return getattr(importlib.import_module(f"{__name__}.{module}"), builder)(is_train, args)


def create_model(name: str, args: argparse.Namespace, num_outputs: int,
                 **backbone_kwargs) -> nn.Module:
    """The modality's adapter around the ``--model`` backbone; ``num_outputs`` is the number of
    classes, or the forecast horizon."""
    spec = DATA_SETS[name]
    if spec.kind == "audio":
        from models.audio import create_audio_classifier
        return create_audio_classifier(args.model, num_outputs, target_length=args.input_size,
                                       **backbone_kwargs)
    if spec.kind == "video":
        from models.video import create_video_classifier
        return create_video_classifier(args.model, num_outputs, **backbone_kwargs)
    if spec.kind == "points":
        from models.pointcloud import create_point_classifier
        return create_point_classifier(args.model, num_outputs, image_size=args.input_size,
                                       **backbone_kwargs)
    from models.timeseries import create_forecaster, create_series_classifier
    seq_len, n_vars = spec.series
    d_model = args.d_model or spec.d_model
    if spec.task == "forecasting":
        return create_forecaster(args.model, args.input_size, num_outputs, n_vars, d_model,
                                 **backbone_kwargs)
    return create_series_classifier(args.model, seq_len, n_vars, num_outputs, d_model,
                                    **backbone_kwargs)
