"""Datasets and transforms: ImageNet/ImageFolder, CIFAR from local files, and the embedded
Fashion-MNIST set that runs with no download (Debian's ``dataset-fashion-mnist``)."""
from __future__ import annotations

import argparse
import gzip
import multiprocessing
import os
import random
import sys
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform
from timm.data.auto_augment import AugMixAugment, AugmentOp, AutoAugment, RandAugment
from timm.data.constants import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD,
                                 IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD)
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

import modalities
import utils
from utils import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
IMAGE_DATA_SETS = ("IMNET", "image_folder", "CIFAR", "CIFAR10", "CIFAR100", "fashion_mnist")
# Audio, time series, video and point clouds (modalities/): their own data and adapters.
DATA_SETS = IMAGE_DATA_SETS + tuple(modalities.DATA_SETS)


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
        self.labels_path = labels
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


def resolve_input_size(args: argparse.Namespace) -> int:
    """--input_size, defaulting to 224 for images and to the modality's own default otherwise
    (fbank frames, window length, ...: modalities.DATA_SETS); sets it on ``args``."""
    if args.input_size is None:
        modality = modalities.get(args.data_set)
        args.input_size = modality.default_input_size if modality is not None else 224
    return args.input_size


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


def _names(items: Sequence[str], limit: int = 5) -> str:
    """``a, b, c`` for a message; long lists end in ``... (N in all)`` to keep it one line."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def _class_folders(root: str, split: str) -> List[str]:
    """The class folder names of an ImageFolder root (sorted, as ImageFolder numbers them)."""
    try:
        classes, _ = find_classes(root)
    except FileNotFoundError as err:
        raise UserError(f"no images found in {root}: it has no class folders (expected "
                        f"{root}/<class>/<image>)") from err
    if len(classes) < 2:
        raise UserError(f"the {split} data {root} has a single class folder ({classes[0]}); "
                        f"a classifier needs at least two ({root}/<class>/<image>)")
    return classes


def _check_image_folders(args: argparse.Namespace, data_set: str) -> None:
    """Checks that need only the folder names, before any folder is scanned for its images
    (minutes on ImageNet): the eval folder is given, each split has two or more classes, and
    train and eval name the same classes. ImageFolder numbers classes by sorted name, so
    differing names would mislabel the eval images silently even when the counts agree."""
    training = not args.eval
    evaluating = args.eval or not args.disable_eval
    if data_set == "IMNET":
        base = _require_dir(args.data_path, "IMNET")
        train_root, eval_root = os.path.join(base, "train"), os.path.join(base, "val")
    else:
        # Without --eval_data_path lknets used to evaluate on the training images, which
        # reports a meaningless accuracy; the eval set is always named explicitly now.
        if evaluating and not args.eval_data_path:
            raise UserError("--data_set image_folder evaluates on --eval_data_path, which is not "
                            "set: pass --eval_data_path DIR" +
                            ("" if args.eval else " (or --disable_eval true to train without "
                             "evaluating)"))
        train_root = _require_dir(args.data_path, "image_folder") if training else None
        eval_root = args.eval_data_path
        if evaluating and not os.path.isdir(eval_root):
            raise UserError(f"--eval_data_path {eval_root} does not exist or is not a directory")
    train_classes = _class_folders(train_root, "train") if training else None
    eval_classes = _class_folders(eval_root, "eval") if evaluating else None
    if train_classes and eval_classes and train_classes != eval_classes:
        only_train = [c for c in train_classes if c not in eval_classes]
        only_eval = [c for c in eval_classes if c not in train_classes]
        raise UserError(f"the class folders of the train data {train_root} and the eval data "
                        f"{eval_root} differ: only in train: {_names(only_train) or '-'}; only "
                        f"in eval: {_names(only_eval) or '-'} (both need the same class names)")


class UndecodableImageError(UserError):
    """An image file PIL cannot open or decode (truncated, corrupt, not an image at all)."""

    def __init__(self, message: str, path: str = "", reason: str = "") -> None:
        super().__init__(message)  # one line also when re-raised from a worker (UserError)
        self.path = path
        self.reason = reason


def load_rgb(path: str) -> Image.Image:
    """ImageFolder's loader: the image at ``path`` decoded in full as RGB, or an
    UndecodableImageError naming the file."""
    try:
        with open(path, "rb") as f:
            # convert() decodes every pixel here, so a truncated file fails now, naming its
            # path, rather than later inside a transform.
            return Image.open(f).convert("RGB")
    # PIL's decoders fail with many exception types (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError, ...); nothing but this one file is handled here.
    except Exception as err:  # noqa: BLE001 - reported with the file's path
        if isinstance(err, UnidentifiedImageError):  # its own text repeats the path
            reason = "not an image in a format PIL reads"
        else:
            reason = " ".join(str(err).split()) or type(err).__name__  # one line
        raise UndecodableImageError(f"cannot decode {path}: {reason}; pass --skip_bad_images "
                                    "true to skip such files", path=path, reason=reason) from err


def _image_folder(root: str, transform: Callable) -> datasets.ImageFolder:
    # allow_empty: an empty class folder gets the message below, naming it, instead of
    # torchvision's error.
    dataset = datasets.ImageFolder(root, transform=transform, loader=load_rgb, allow_empty=True)
    found = set(dataset.targets)
    empty = [os.path.join(root, c) for i, c in enumerate(dataset.classes) if i not in found]
    if empty:
        raise UserError(f"no images found in class folder{'s' if len(empty) > 1 else ''} "
                        f"{_names(empty)} (accepted extensions: {', '.join(IMG_EXTENSIONS)})")
    return dataset


# The target of an eval sample that stands in for an undecodable image: the loss ignores it
# (torch's default ignore_index) and engine.evaluate counts it nowhere.
IGNORED_TARGET = -100


class SkipUndecodable(Dataset):
    """--skip_bad_images: a sample whose image cannot be decoded is replaced by the next
    decodable one, with a warning naming the file.

    Replacing (rather than dropping) keeps every batch full, which mixup's even batches need,
    and the replacement depends only on the index, so runs stay reproducible. In evaluation
    (``ignore_substitutes``) a replacement carries IGNORED_TARGET, so no image is scored twice.
    Skips are counted in shared memory because DataLoader worker processes do the decoding; the
    main process reads the count with :meth:`take_skipped` (see :func:`report_skipped`).
    """

    def __init__(self, dataset: Dataset, split: str, ignore_substitutes: bool = False) -> None:
        self.dataset = dataset
        self.split = split
        self.ignore_substitutes = ignore_substitutes
        self.skipped = multiprocessing.Value("q", 0)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        size = len(self.dataset)
        last: Optional[UndecodableImageError] = None
        for offset in range(size):
            try:
                image, target = self.dataset[(index + offset) % size]
            except UndecodableImageError as err:
                last = err
                # Only the index's own file is reported and counted; a failing substitute is
                # reported when its own index is loaded.
                if offset == 0:
                    # Written to stdout directly: print() is silenced on all ranks but the
                    # first (utils.setup_for_distributed), and each rank meets its own files.
                    sys.stdout.write(f"WARNING: skipping undecodable image {err.path}: "
                                     f"{err.reason}\n")
                    sys.stdout.flush()
                    with self.skipped.get_lock():
                        self.skipped.value += 1
                continue
            return image, IGNORED_TARGET if offset and self.ignore_substitutes else target
        raise UndecodableImageError(f"none of the {size} images of the {self.split} data can be "
                                    f"decoded (the last: {last.path}: {last.reason})")

    def take_skipped(self) -> int:
        """The number of samples skipped since the last call (and the count reset to 0)."""
        with self.skipped.get_lock():
            count, self.skipped.value = self.skipped.value, 0
        return count


def report_skipped(loader: Optional[DataLoader], when: str, device: torch.device) -> None:
    """Prints how many undecodable images ``loader`` skipped (summed over processes) since the
    last report, as ``Skipped N undecodable images in <when>``; nothing without
    --skip_bad_images. Every process must call it (the count is all-reduced)."""
    dataset = getattr(loader, "dataset", None)
    while dataset is not None and not isinstance(dataset, SkipUndecodable):
        dataset = getattr(dataset, "dataset", None)  # through Subset / EpochSeededDataset
    if dataset is None:
        return
    count = torch.tensor([dataset.take_skipped()], dtype=torch.int64)
    if utils.is_dist_avail_and_initialized():
        count = count.to(device)
        torch.distributed.all_reduce(count)
    total = int(count.item())
    print(f"Skipped {total} undecodable image{'' if total == 1 else 's'} in {when}")


def build_dataset(is_train: bool, args: argparse.Namespace) -> Tuple[Dataset, int]:
    """The train or eval split of --data_set with its transform, and its number of classes."""
    data_set = resolve_data_set(args)
    resolve_input_size(args)
    if modalities.get(data_set) is not None:
        return _modality_dataset(data_set, is_train, args)
    split = "train" if is_train else "eval"
    if data_set in ("IMNET", "image_folder") and (is_train or args.eval):
        _check_image_folders(args, data_set)  # on the first call, for both splits
    transform = build_transform(is_train, args)
    if data_set == "fashion_mnist":
        dataset = FashionMNIST(args.data_path or FASHION_MNIST_DIR, is_train, transform)
        nb_classes = len(FASHION_MNIST_CLASSES)
        source = dataset.labels_path
    elif data_set in ("CIFAR", "CIFAR100", "CIFAR10"):
        root = _require_dir(args.data_path, data_set)
        cls = datasets.CIFAR10 if data_set == "CIFAR10" else datasets.CIFAR100
        try:
            dataset = cls(root, train=is_train, transform=transform, download=False)
        except RuntimeError as err:
            raise UserError(f"{cls.__name__} files not found under {root} (lknets never "
                            f"downloads; place the extracted python version there): {err}") from err
        nb_classes = len(dataset.classes)
        source = root
    elif data_set in ("IMNET", "image_folder"):
        if data_set == "IMNET":
            source = os.path.join(args.data_path, "train" if is_train else "val")
        else:
            source = args.data_path if is_train else args.eval_data_path
        dataset = _image_folder(source, transform)
        nb_classes = len(dataset.classes)
    else:
        raise UserError(f"unknown --data_set {data_set!r}; choose from {', '.join(DATA_SETS)}")
    if args.nb_classes is not None and args.nb_classes != nb_classes:
        classes = f": {_names(dataset.classes)}" if data_set in ("IMNET", "image_folder") else ""
        raise UserError(f"--nb_classes {args.nb_classes} does not match the {nb_classes} classes "
                        f"of the {split} data in {source} ({data_set}{classes})")
    # Labels read from files (Fashion-MNIST, CIFAR) could hold any value; one outside the
    # classes would fail deep inside the loss, mid-epoch.
    outside = [t for t in set(dataset.targets) if not 0 <= t < nb_classes]
    if outside:
        raise UserError(f"the {split} labels in {source} include "
                        f"{_names([str(t) for t in sorted(outside)])}, outside the {nb_classes} "
                        f"classes 0..{nb_classes - 1} of {data_set}")
    subset = args.train_subset if is_train else args.eval_subset
    if subset:
        dataset = Subset(dataset, stratified_indices(dataset.targets, subset))
    if args.skip_bad_images:
        dataset = SkipUndecodable(dataset, split, ignore_substitutes=not is_train)
    return dataset, nb_classes


def _modality_dataset(data_set: str, is_train: bool,
                      args: argparse.Namespace) -> Tuple[Dataset, int]:
    """A non-image data set (modalities/), with --train_subset / --eval_subset: class-balanced
    where samples have classes, else evenly spaced (forecast windows)."""
    dataset, outputs = modalities.build_dataset(data_set, is_train, args)
    subset = args.train_subset if is_train else args.eval_subset
    if subset:
        targets = getattr(dataset, "targets", None)
        if targets is not None:
            indices = stratified_indices(targets, subset)
        else:
            step = len(dataset) / min(subset, len(dataset))
            indices = sorted({int(i * step) for i in range(min(subset, len(dataset)))})
        dataset = Subset(dataset, indices)
    return dataset, outputs


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


def posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Keeps the ``bits_to_keep`` most significant bits of each channel: 0 gives a black image
    (all bits masked off), 8 or more the image unchanged."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _augment_ops(transform: Any) -> Iterator[AugmentOp]:
    """Every timm AugmentOp inside a built transform: RandAugment's and AugMix's ops and each
    AutoAugment sub-policy's, found through Compose."""
    if isinstance(transform, AugmentOp):
        yield transform
    elif isinstance(transform, transforms.Compose):
        for step in transform.transforms:
            yield from _augment_ops(step)
    elif isinstance(transform, (RandAugment, AugMixAugment)):
        for op in transform.ops:
            yield from _augment_ops(op)
    elif isinstance(transform, AutoAugment):
        for sub_policy in transform.policy:
            for op in sub_policy:
                yield from _augment_ops(op)


def guard_posterize(transform: Callable) -> Callable:
    """Points the Posterize ops of a timm transform at :func:`posterize`; returns ``transform``.

    timm's Posterize levels can ask for 0 bits (RandAugment's 'inc1' PosterizeIncreasing at
    magnitude 10, reached through mstd noise; AutoAugment v0's ('Posterize', 0.8, 2)), and newer
    Pillow releases reject ImageOps.posterize(img, 0) with a ValueError where older ones
    returned a black image: about one image in a thousand would then stop training with the
    default --aa. The fix is made on this transform's own ops, not in timm's module-level op
    table, so importing lknets leaves timm's behaviour for other code unchanged.
    """
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    return transform


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
        guard_posterize(transform)
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
