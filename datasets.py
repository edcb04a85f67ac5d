"""Datasets and transforms: ImageNet/ImageFolder, CIFAR from local files, and the embedded
Fashion-MNIST set that runs with no download (Debian's ``dataset-fashion-mnist``)."""
from __future__ import annotations

import argparse
import gzip
import os
import random
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                 IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from utils import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
DATA_SETS = ("IMNET", "image_folder", "CIFAR", "CIFAR10", "CIFAR100", "fashion_mnist")


def _read_idx(path: str) -> np.ndarray:
    """Read an idx file (optionally gzipped): big-endian dims, then uint8 data."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{path} is not an idx file of unsigned bytes")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(dims))} values, "
                        f"found {body.size}")
    return body.reshape(tuple(dims))


class FashionMNIST(Dataset):
    """Fashion-MNIST from its idx files, as RGB PIL images so the ImageFolder transforms apply."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str, train: bool, transform: Optional[Callable] = None) -> None:
        prefix = "train" if train else "t10k"
        images = _find_idx(root, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        self.images = _read_idx(images)
        self.targets = _read_idx(labels).astype(np.int64).tolist()
        if len(self.images) != len(self.targets):
            raise UserError(f"{images} and {labels} disagree on the number of samples")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[object, int]:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _find_idx(root: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise UserError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install the embedded dataset with "
        f"'apt-get install dataset-fashion-mnist' (files go to {FASHION_MNIST_DIR}) or pass "
        "--data_path to a folder with train/t10k images/labels idx files")


def resolve_data_set(args: argparse.Namespace) -> str:
    """--data_set, defaulting to the embedded set without --data_path and to IMNET with one."""
    if args.data_set is None:
        return "fashion_mnist" if args.data_path is None else "IMNET"
    return args.data_set


def _require_dir(path: Optional[str], what: str) -> str:
    if not path:
        raise UserError(f"--data_set {what} needs --data_path")
    if not os.path.isdir(path):
        raise UserError(f"data path {path} does not exist or is not a directory ({what})")
    return path


def _image_folder(root: str, transform: Callable) -> datasets.ImageFolder:
    _require_dir(root, "image folder")
    try:
        return datasets.ImageFolder(root, transform=transform)
    except (FileNotFoundError, RuntimeError) as err:
        raise UserError(f"no images found in {root} (expected {root}/<class>/<image>): "
                        f"{err}") from err


def build_dataset(is_train: bool, args: argparse.Namespace) -> Tuple[Dataset, int]:
    """The train or eval split of --data_set with its transform, and its number of classes."""
    data_set = resolve_data_set(args)
    transform = build_transform(is_train, args)
    if data_set == "fashion_mnist":
        dataset = FashionMNIST(args.data_path or FASHION_MNIST_DIR, is_train, transform)
        nb_classes = len(FASHION_MNIST_CLASSES)
    elif data_set in ("CIFAR", "CIFAR100", "CIFAR10"):
        root = _require_dir(args.data_path, data_set)
        cls = datasets.CIFAR10 if data_set == "CIFAR10" else datasets.CIFAR100
        try:
            dataset = cls(root, train=is_train, transform=transform, download=False)
        except RuntimeError as err:
            raise UserError(f"{cls.__name__} files not found under {root} (lknets never "
                            f"downloads; place the extracted python version there): {err}") from err
        nb_classes = len(dataset.classes)
    elif data_set == "IMNET":
        root = os.path.join(_require_dir(args.data_path, "IMNET"), "train" if is_train else "val")
        dataset = _image_folder(root, transform)
        nb_classes = len(dataset.classes)
    elif data_set == "image_folder":
        root = args.data_path if is_train else (args.eval_data_path or args.data_path)
        dataset = _image_folder(_require_dir(root, "image_folder"), transform)
        nb_classes = len(dataset.classes)
    else:
        raise UserError(f"unknown --data_set {data_set!r}; choose from {', '.join(DATA_SETS)}")
    if args.nb_classes is not None and args.nb_classes != nb_classes:
        raise UserError(f"--nb_classes {args.nb_classes} does not match the {nb_classes} classes "
                        f"of the {'train' if is_train else 'eval'} data ({data_set})")
    subset = args.train_subset if is_train else args.eval_subset
    if subset:
        dataset = Subset(dataset, stratified_indices(dataset.targets, subset))
    return dataset, nb_classes


def stratified_indices(targets: Sequence[int], count: int) -> List[int]:
    """``count`` indices taking classes in turn (first occurrences first): a balanced subset."""
    by_class: dict = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    queues = [by_class[c] for c in sorted(by_class)]
    chosen: List[int] = []
    depth = 0
    while len(chosen) < min(count, len(targets)):
        for queue in queues:
            if depth < len(queue) and len(chosen) < count:
                chosen.append(queue[depth])
        depth += 1
    return sorted(chosen)


class EpochSeededDataset(Dataset):
    """Seeds the augmentation of each sample from (seed, epoch, index).

    A sample then gets the same random crop/flip/jitter whichever process, worker or batch loads
    it, so runs on different numbers of GPUs see the same data, and a resumed run replays the
    epoch it restarts. Call :meth:`set_epoch` before each epoch (loaders re-created per epoch,
    i.e. non-persistent workers, pick it up).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        sample_seed = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**63
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def build_transform(is_train: bool, args: argparse.Namespace) -> Callable:
    """timm's training pipeline, or ConvNeXt's eval resize + centre crop (warp at >= 384)."""
    mean, std = ((IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
                 if args.imagenet_default_mean_and_std
                 else (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD))
    cifar_sized = resolve_data_set(args).startswith("CIFAR") and args.input_size <= 32
    if is_train:
        transform = create_transform(
            input_size=args.input_size, is_training=True, color_jitter=args.color_jitter,
            auto_augment=None if args.aa in (None, "", "none") else args.aa,
            interpolation=args.train_interpolation, re_prob=args.reprob, re_mode=args.remode,
            re_count=args.recount, mean=mean, std=std)
        if cifar_sized:  # CIFAR images already have the input size: pad-and-crop instead
            transform.transforms[0] = transforms.RandomCrop(args.input_size, padding=4)
        return transform

    size = args.test_size if args.test_size > 0 else args.input_size
    steps: List[Callable] = []
    if not cifar_sized:
        if args.input_size >= 384:
            steps.append(transforms.Resize((size, size),
                                           interpolation=transforms.InterpolationMode.BICUBIC))
        else:
            crop_pct = args.crop_pct if args.crop_pct is not None else 224 / 256
            steps.append(transforms.Resize(int(size / crop_pct),
                                           interpolation=transforms.InterpolationMode.BICUBIC))
            steps.append(transforms.CenterCrop(size))
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)
