"""Effective receptive field (ERF) of a model: the contribution matrix of RepLKNet's ERF tool.

    python tools/visualize_erf.py --model RepLKNet-31B \\
        --weights RepLKNet-31B_ImageNet-1K_224.pth --data_path /path/to/imagenet \\
        --save_path erf_replknet31b.npy
    python tools/visualize_erf.py --model SLaK_tiny --kernel_size 51 49 47 13 5 \\
        --width_factor 1.3 --Decom true --weights slak_tiny.pth --data_path /path/to/imagenet \\
        --save_path erf_slak.npy
    python tools/visualize_erf.py --model convnext_atto --input_size 256 --num_images 10 \\
        --device cpu
    python tools/analyze_erf.py --source erf_replknet31b.npy --heatmap_save erf_replknet31b.png

For each image x the tool takes F(x), the model's last feature map (the last stage's output,
before pooling and before any final norm, through timm's ``forward_intermediates``: the same map
for every family), the scalar s(x) = sum over channels c of ReLU(F_c(x)) at the centre pixel
(h // 2, w // 2), and the map ReLU(ds/dx) summed over the three colour channels. The matrix saved
to ``--save_path`` (.npy, float32, input_size x input_size) is the mean of these maps over
``--num_images`` images; an image whose map is not finite is skipped and the next one taken.
``tools/analyze_erf.py`` turns it into area ratios and a heatmap.

Images: ``<data_path>/val`` when it exists (ImageNet's layout, as upstream), else ``--data_path``
itself, as an ImageFolder; without ``--data_path`` the embedded Fashion-MNIST test set (grey
images as RGB). Images are taken one class at a time in turn (the first image of every class,
then the second, ...), so any ``--num_images`` covers the classes evenly; upstream read the
folder in order, which gives 50 images of ImageNet's first class. Each image is resized to
``--input_size`` squared (bicubic, aspect ratio not kept, no crop) and normalised with ImageNet's
mean and std, as upstream.

The model is in eval mode (BatchNorm on its running statistics, no drop path) with the weights of
``--weights`` (training or deploy form; ``{'model': ...}``, ``{'state_dict': ...}`` or a raw state
dict, read weights-only), or random weights from ``--seed`` without it. The ERF is meant for
large inputs (upstream uses 1024): at small sizes every model's ERF covers the whole image. It
also reflects training, not the architecture alone: at initialization the layer scales (1e-6) of
the ConvNeXt-style families make each block nearly the identity, so their untrained ERF is the
32 x 32 patch that the stem and downsampling layers see.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import datasets  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402
from tools.export import load_model  # noqa: E402
from utils import UserError  # noqa: E402

# Every family downsamples 32x and runs from 64 px on (main.py's input-size check), where the
# last map is 2 x 2; an ERF of a smaller input would not say anything anyway.
MIN_INPUT_SIZE = 64
# Progress is printed about this many times per run (and after every image of short runs).
PROGRESS_LINES = 20

Features = Callable[[torch.Tensor], torch.Tensor]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="registered model name, e.g. RepLKNet-31B")
    parser.add_argument("--weights", default=None,
                        help="checkpoint in training or deploy form; default: random weights")
    parser.add_argument("--data_path", default=None,
                        help="image folder (DATA/val/<class>/<image>, or DATA/<class>/<image>); "
                             "default: the embedded Fashion-MNIST test set")
    parser.add_argument("--save_path", default=None,
                        help="the .npy file to write; default: erf_{model}_{input_size}.npy")
    parser.add_argument("--num_images", type=int, default=50,
                        help="number of images to average over (default 50)")
    parser.add_argument("--input_size", type=int, default=1024,
                        help="side of the square input in pixels (default 1024, as upstream)")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:1, cpu, ...; default: cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights when no --weights is given")
    parser.add_argument("--trust_checkpoint", type=utils.str2bool, default=False,
                        help="unpickle --weights without the weights-only guard (it can run "
                             "code: only for files you trust)")
    models.add_family_args(parser)
    return parser


def last_feature_map(model: nn.Module) -> Features:
    """x -> the model's last stage output, before pooling and before the final norm.

    ``norm=False`` keeps RepLKNet's final BatchNorm (the only family whose final norm acts on the
    map) out, as upstream's ERF model did; the other families normalize the pooled vector.
    """

    def features(x: torch.Tensor) -> torch.Tensor:
        return model.forward_intermediates(x, indices=1, norm=False, intermediates_only=True)[-1]

    return features


def contribution_map(features: Features, image: torch.Tensor) -> torch.Tensor:
    """ReLU(ds/dx) summed over the batch and the colour channels, with
    s = sum_c ReLU(features(x)_c) at the centre pixel (h // 2, w // 2): an (H, W) map."""
    image = image.detach().requires_grad_(True)
    fmap = features(image)
    height, width = fmap.shape[-2:]
    centre = F.relu(fmap[:, :, height // 2, width // 2]).sum()
    (grad,) = torch.autograd.grad(centre, image)
    return F.relu(grad).sum(dim=(0, 1))


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """float32 convolutions and matrix products without TF32 (cuDNN convolves float32 in TF32 by
    default): with it, a random-init RepLKNet-31B's matrix at 128 px was off by up to 10% of its
    max against float64 on an H200, without it by 0.1%."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def erf_matrix(features: Features, images: Iterable[torch.Tensor], num_images: int,
               report: Optional[Callable[[int, int, float], None]] = None
               ) -> Tuple[np.ndarray, int]:
    """The mean contribution map of the first ``num_images`` images whose map is finite, as a
    float32 array, and the number of images skipped for a non-finite map.

    ``images`` yields (1, 3, H, W) tensors on the device ``features`` runs on; it is read only as
    far as needed. ``report(done, num_images, seconds so far)`` is called after each image used.
    UserError when ``images`` runs out first.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    total: Optional[torch.Tensor] = None
    used = skipped = 0
    start = time.perf_counter()
    for image in images:
        with full_float32():
            gmap = contribution_map(features, image)
        if not torch.isfinite(gmap).all():
            skipped += 1
            continue
        total = gmap if total is None else total + gmap
        used += 1
        if report is not None:
            report(used, num_images, time.perf_counter() - start)
        if used == num_images:
            return (total / used).float().cpu().numpy(), skipped
    raise UserError(f"only {used} image(s) gave a finite contribution map ({skipped} did not); "
                    f"--num_images is {num_images}")


def interleave_classes(targets: Sequence[int]) -> List[int]:
    """Every index of ``targets``, taking the classes in turn (in class order, each class's
    images in dataset order): any prefix holds the classes as evenly as possible."""
    by_class: Dict[int, List[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(int(target), []).append(index)
    queues = [by_class[c] for c in sorted(by_class)]
    depth = max(len(q) for q in queues) if queues else 0
    return [q[d] for d in range(depth) for q in queues if d < len(q)]


def build_erf_dataset(data_path: Optional[str], input_size: int) -> Dataset:
    """The images the ERF is averaged over, transformed as upstream (see the module docstring)."""
    transform = transforms.Compose([
        transforms.Resize((input_size, input_size),
                          interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
    if data_path is None:
        return datasets.FashionMNIST(datasets.FASHION_MNIST_DIR, train=False, transform=transform)
    if not os.path.isdir(data_path):
        raise UserError(f"--data_path {data_path} does not exist or is not a directory")
    val = os.path.join(data_path, "val")
    root = val if os.path.isdir(val) else data_path
    try:
        return tv_datasets.ImageFolder(root, transform=transform, loader=datasets.load_rgb)
    except FileNotFoundError as err:  # no class folders, or no image in any of them
        raise UserError(f"no images in {root} (expected {root}/<class>/<image>): {err}") from err


def iterate_images(dataset: Dataset, order: Sequence[int], device: torch.device
                   ) -> Iterator[torch.Tensor]:
    """The images of ``dataset`` in ``order``, one at a time, as (1, 3, H, W) on ``device``."""
    for index in order:
        image, _ = dataset[index]
        yield image.unsqueeze(0).to(device)


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name}: {err}") from err
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise UserError(f"--device {name}: no CUDA device is available (use --device cpu)")
        if device.index is not None and device.index >= count:
            raise UserError(f"--device {name}: there {'is' if count == 1 else 'are'} only "
                            f"{count} CUDA device(s)")
    return device


def check_writable(path: str) -> None:
    """Fail before the images are processed, not after, when ``path`` cannot be written."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from err
    if os.path.isdir(path) or not os.access(directory, os.W_OK):
        raise UserError(f"cannot write {path}: "
                        + ("it is a directory" if os.path.isdir(path) else "permission denied"))


def print_progress(done: int, total: int, seconds: float) -> None:
    if done == total or done % max(1, total // PROGRESS_LINES) == 0:
        rate = seconds / done
        print(f"image {done}/{total}  {rate:.2f} s/image  elapsed {seconds:.0f} s  "
              f"eta {rate * (total - done):.0f} s", flush=True)


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)

    def run() -> None:
        if args.num_images < 1:
            raise UserError(f"--num_images must be at least 1, got {args.num_images}")
        if args.input_size < MIN_INPUT_SIZE:
            raise UserError(f"--input_size must be at least {MIN_INPUT_SIZE} (the models "
                            f"downsample 32x), got {args.input_size}")
        try:
            model_kwargs = models.family_kwargs(args.model, args)
        except ValueError as err:
            raise UserError(str(err)) from err
        device = resolve_device(args.device)
        save_path = args.save_path or f"erf_{args.model}_{args.input_size}.npy"
        check_writable(save_path)
        dataset = build_erf_dataset(args.data_path, args.input_size)
        if len(dataset) < args.num_images:
            raise UserError(f"--num_images {args.num_images} but the data has only "
                            f"{len(dataset)} images")
        torch.manual_seed(args.seed)
        model, loaded = load_model(args.model, args.weights, trust=args.trust_checkpoint,
                                   **model_kwargs)
        # Only the input's gradient is wanted: with frozen weights autograd keeps nothing for
        # theirs and computes none.
        model.requires_grad_(False).to(device)
        weights = (f"{loaded} from {args.weights}" if args.weights
                   else f"random weights, seed {args.seed}")
        print(f"{args.model} ({weights}) on {device}, {args.num_images} images at "
              f"{args.input_size}x{args.input_size} from "
              f"{args.data_path or 'the embedded Fashion-MNIST test set'}", flush=True)
        order = interleave_classes(dataset.targets)
        matrix, skipped = erf_matrix(last_feature_map(model),
                                     iterate_images(dataset, order, device), args.num_images,
                                     print_progress)
        try:
            with open(save_path, "wb") as f:  # np.save(path) would append .npy to other names
                np.save(f, matrix)
        except OSError as err:
            raise UserError(f"cannot write {save_path}: {err.strerror or err}") from err
        classes = len({dataset.targets[i] for i in order[:args.num_images + skipped]})
        note = f", {skipped} skipped for a non-finite map" if skipped else ""
        print(f"saved the ERF matrix ({matrix.shape[0]}x{matrix.shape[1]}, mean over "
              f"{args.num_images} images of {classes} classes{note}) to {save_path}")

    return utils.exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
