"""Time-series data for UniRepLKNet's forecasting and classification models (models/timeseries.py).

Every data set here ships inside a package, so nothing is downloaded:

- forecasting: statsmodels' ``co2`` (weekly Mauna Loa CO2, 2,284 weeks, univariate) and
  ``macrodata`` (203 US quarters, 12 economic series);
- classification: sktime's UCR/UEA sets ``gunpoint`` (GunPoint), ``basicmotions`` (BasicMotions)
  and ``japanese_vowels`` (JapaneseVowels).

statsmodels and sktime are optional extras: they are imported only inside the loaders, so the
image path never needs them, and a missing one is a one-line UserError naming the pip command.

Forecasting splits a series chronologically, 70/10/20 as in the usual long-horizon forecasting
protocol: training windows lie entirely in the first 70%; test windows predict every step of
the last 20%, with their input context taken from just before each target (it may reach back
into the middle 10%, the protocol's validation part, which is never a target here).
Values are standardised per variable with the training part's mean and std, so MSE/MAE are in
units of the training std, comparable between data sets and with published numbers that use the
same convention, and no test statistic leaks into training.
"""
from __future__ import annotations

import argparse
import functools
import importlib
from types import ModuleType
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from utils import UserError

__all__ = ["TASKS", "TRAIN_FRACTION", "TEST_FRACTION", "MACRO_COLUMNS", "load_co2",
           "load_macrodata", "ForecastWindows", "naive_last_value", "forecast_errors",
           "SeriesClassification", "build_timeseries_dataset"]

TASKS: Dict[str, str] = {"co2": "forecasting", "macrodata": "forecasting",
                         "gunpoint": "classification", "basicmotions": "classification",
                         "japanese_vowels": "classification"}

TRAIN_FRACTION = 0.7
TEST_FRACTION = 0.2

# macrodata without its calendar columns (year, quarter): the 12 economic series, in the file's
# order. Levels (GDP, CPI, population, ...) trend strongly; the forecaster's per-window
# normalisation is what makes them learnable together with the rates (tbilrate, unemp, infl).
MACRO_COLUMNS: Tuple[str, ...] = ("realgdp", "realcons", "realinv", "realgovt", "realdpi", "cpi",
                                  "m1", "tbilrate", "unemp", "pop", "infl", "realint")

_SKTIME_LOADERS = {"gunpoint": "load_gunpoint", "basicmotions": "load_basic_motions",
                   "japanese_vowels": "load_japanese_vowels"}


def _import(module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"the time-series data sets need {package}, which is not installed: "
                        f"pip install {package}") from err


def load_co2() -> np.ndarray:
    """statsmodels' weekly Mauna Loa CO2 (ppm, March 1958 to December 2001) as (2284, 1) float64.

    59 weeks have no measurement; each is filled by linear interpolation between the nearest
    measured weeks before and after it (the weeks are evenly spaced, so position is time).
    """
    datasets = _import("statsmodels.datasets", "statsmodels")
    values = datasets.co2.load_pandas().data["co2"].to_numpy(dtype=np.float64)
    steps = np.arange(len(values))
    known = ~np.isnan(values)
    return np.interp(steps, steps[known], values[known])[:, None]


def load_macrodata() -> np.ndarray:
    """statsmodels' US macroeconomic data, 1959Q1-2009Q3, as (203, 12) float64: the columns of
    :data:`MACRO_COLUMNS`, in that order."""
    datasets = _import("statsmodels.datasets", "statsmodels")
    return datasets.macrodata.load_pandas().data[list(MACRO_COLUMNS)].to_numpy(dtype=np.float64)


_FORECAST_LOADERS = {"co2": load_co2, "macrodata": load_macrodata}


class ForecastWindows(Dataset):
    """Sliding windows (stride 1) over one split of a (T, n_vars) series.

    Item ``i`` is ``(x, y)``: ``x`` the ``seq_len`` steps before target start ``t_i`` and ``y``
    the ``pred_len`` steps from ``t_i``, float32, standardised with the training part's
    statistics (``mean``, ``std``; see the module docstring for the split). Target starts run
    over ``[seq_len, n_train - pred_len]`` for ``split="train"`` and over
    ``[test_start, T - pred_len]`` for ``split="test"``; ``target_starts`` lists them.
    """

    def __init__(self, series: np.ndarray, seq_len: int, pred_len: int, split: str = "train",
                 name: str = "series") -> None:
        series = np.asarray(series, dtype=np.float64)
        if series.ndim != 2:
            raise ValueError(f"{name}: expected a (T, n_vars) series, got shape {series.shape}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if seq_len < 1 or pred_len < 1:
            raise UserError(f"{name}: seq_len (--input_size) and --pred_len must be positive "
                            f"integers; got seq_len={seq_len}, pred_len={pred_len}")
        length = len(series)
        n_train = int(length * TRAIN_FRACTION)
        test_start = length - int(length * TEST_FRACTION)
        if seq_len + pred_len > n_train:
            raise UserError(f"{name} has {length} steps, too short for seq_len={seq_len}, "
                            f"pred_len={pred_len}: training windows lie in its first 70% "
                            f"({n_train} steps), so seq_len + pred_len must be at most {n_train}")
        if pred_len > length - test_start:
            raise UserError(f"{name} has {length} steps, too short for pred_len={pred_len}: the "
                            f"test targets are its last 20% ({length - test_start} steps), so "
                            f"pred_len must be at most {length - test_start}")
        self.seq_len, self.pred_len, self.n_vars = seq_len, pred_len, series.shape[1]
        self.split = split
        self.mean = series[:n_train].mean(axis=0)
        # A variable constant over the training part is only centred, not divided by zero.
        std = series[:n_train].std(axis=0)
        self.std = np.where(std > 0, std, 1.0)
        self.data = ((series - self.mean) / self.std).astype(np.float32)
        first, end = (seq_len, n_train) if split == "train" else (test_start, length)
        self.target_starts = range(first, end - pred_len + 1)

    def __len__(self) -> int:
        return len(self.target_starts)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        t = self.target_starts[index]
        return (torch.from_numpy(self.data[t - self.seq_len:t]),
                torch.from_numpy(self.data[t:t + self.pred_len]))


def naive_last_value(x: torch.Tensor, pred_len: int) -> torch.Tensor:
    """The persistence forecast: every future step equals the window's last value.
    (B, seq_len, n_vars) -> (B, pred_len, n_vars)."""
    if x.ndim != 3:
        raise ValueError(f"expected a (B, seq_len, n_vars) series, got shape {tuple(x.shape)}")
    return x[:, -1:, :].repeat(1, pred_len, 1)


def forecast_errors(pred: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
    """MSE and MAE as plain means over every element (batch, step and variable). For a data
    set's value, average per-batch results weighted by the batch's element count."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target shapes differ: {tuple(pred.shape)} vs "
                         f"{tuple(target.shape)}")
    diff = (pred - target).float()
    return {"mse": diff.pow(2).mean().item(), "mae": diff.abs().mean().item()}


def _label_key(label: str) -> Tuple[bool, int, str]:
    # Numeric labels ('1', ..., '10') in numeric order, then the others alphabetically.
    return (not label.isdigit(), int(label) if label.isdigit() else 0, label)


@functools.lru_cache(maxsize=None)
def _load_sktime(name: str, split: str) -> Tuple[List[np.ndarray], np.ndarray]:
    """One split as a list of (length, n_vars) float64 arrays and the string labels (cached:
    each dataset reads both splits; callers must not modify them).

    sktime's ``df-list`` return type (one DataFrame per series) is used because its ``numpy3D``
    type cannot hold JapaneseVowels' unequal lengths.
    """
    datasets = _import("sktime.datasets", "sktime")
    frames, labels = getattr(datasets, _SKTIME_LOADERS[name])(split=split, return_type="df-list")
    return [frame.to_numpy(dtype=np.float64) for frame in frames], np.asarray(labels).astype(str)


class SeriesClassification(Dataset):
    """One split of a UCR/UEA classification set from sktime: items ``(x, label)``, ``x``
    float32 (seq_len, n_vars) in the data's own units, ``label`` int64 indexing ``classes``.

    ``seq_len`` is the longest series over both splits (150 for GunPoint, 100 for BasicMotions,
    29 for JapaneseVowels), so train and test share one model input size. Shorter series are
    padded at the end by repeating their last value rather than with zeros: a jump to zero would
    be an artefact larger than the signal, and it would distort the per-sample normalisation of
    the classifier. ``lengths`` keeps each series' original length. ``classes`` (the sorted
    labels of both splits) is the same for either split.
    """

    def __init__(self, name: str, split: str = "train") -> None:
        if name not in _SKTIME_LOADERS:
            raise UserError(f"unknown time-series classification set {name!r}; accepted: "
                            f"{', '.join(_SKTIME_LOADERS)}")
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        series, labels = _load_sktime(name, split)
        other_series, other_labels = _load_sktime(name, "test" if split == "train" else "train")
        self.name, self.split = name, split
        self.classes: List[str] = sorted(set(labels) | set(other_labels), key=_label_key)
        self.num_classes = len(self.classes)
        self.seq_len = max(len(s) for s in series + other_series)
        self.n_vars = series[0].shape[1]
        self.lengths = np.array([len(s) for s in series])
        self.data = np.stack([np.concatenate([s, np.repeat(s[-1:], self.seq_len - len(s), axis=0)])
                              for s in series]).astype(np.float32)
        index = {label: i for i, label in enumerate(self.classes)}
        self.targets = np.array([index[label] for label in labels], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.data[index]), torch.tensor(self.targets[index])


def build_timeseries_dataset(name: str, is_train: bool,
                             args: argparse.Namespace) -> Tuple[Dataset, int]:
    """The train (``is_train``) or test split of a :data:`TASKS` data set.

    Forecasting sets give ``(ForecastWindows, pred_len)``, with ``args.input_size`` as seq_len
    and ``args.pred_len`` (default 24) as the horizon. Classification sets give
    ``(SeriesClassification, num_classes)``; their sequence length is the data's own (padded),
    so ``args.input_size`` is ignored there.
    """
    if name not in TASKS:
        raise UserError(f"unknown time-series data set {name!r}; accepted: {', '.join(TASKS)}")
    split = "train" if is_train else "test"
    if TASKS[name] == "classification":
        dataset = SeriesClassification(name, split)
        return dataset, dataset.num_classes
    pred_len = getattr(args, "pred_len", 24)
    series = _FORECAST_LOADERS[name]()
    return ForecastWindows(series, args.input_size, pred_len, split, name), pred_len
