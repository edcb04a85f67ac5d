"""Training images/s from a JPEG ImageFolder through main.py, next to the same model on synthetic
input: what the data loader costs.

    python benchmarks/jpeg_folder.py [--root /tmp/lknets_jpeg] [--images 12800] [--classes 100]
        [--model convnext_tiny,unireplknet_t] [--workers 10[,15]] [--batch_size 64] [--json PATH]
        [-- MAIN.PY FLAGS, e.g. --lk_impl cuda --compile]

Unless ROOT/train exists, ROOT/{train,val}/<class>/<i>.JPEG is written first (in parallel, one
process per CPU): synthetic photos of ImageNet's typical 500x375, smooth colour noise plus fine
noise, about 85-125 KB each at JPEG quality 90 (ImageNet's range, and decoding time follows the
file size); every image comes from its own seeded generator. Each --model and --workers then
trains one epoch through ``main.py --data_set IMNET --data_path ROOT`` with the upstream recipe
(main.py's defaults: RandAugment, random erasing, mixup/cutmix; EMA on, as upstream's README
trains) under bf16 autocast, no evaluation, nothing saved; its rate is the `Training throughput`
line (the second half of the epoch). The synthetic rate is benchmarks/throughput.py's train
step for the same model, batch, size, autocast dtype, --lk_impl and --compile (CUDA only; "n/a"
elsewhere). Flags after `--` go to main.py last, so they override the ones set here. The files,
just written, are read from the page cache: disk reads are not timed. The ratio also holds what
main.py adds to a step besides loading (EMA update, mixup, grad norm).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import PIL
import timm
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # before benchmarks/: its modalities.py is not main.py's modalities
from main import AMP_DTYPES, get_args_parser  # noqa: E402
from throughput import measure  # noqa: E402

SIZE = (500, 375)  # width, height: ImageNet's most common photo size
# (grid width, grid height, amplitude) of each octave of the smooth colour noise.
OCTAVES = ((12, 9, 70.0), (50, 38, 25.0))
FINE_SIGMA = (14.0, 36.0)  # per-image range of the fine noise: 85-125 KB at quality 90
QUALITY = 90
THROUGHPUT = re.compile(r"Training throughput: ([0-9.]+) images/s")


def synthetic_photo(index: int, seed: int = 0) -> Image.Image:
    """The ``index``-th photo: bicubic-upsampled colour noise plus per-pixel noise."""
    rng = np.random.default_rng([seed, index])
    pixels = np.full((SIZE[1], SIZE[0], 3), 128.0, dtype=np.float32)
    for width, height, amplitude in OCTAVES:
        grid = amplitude * rng.standard_normal((3, height, width), dtype=np.float32)
        pixels += np.stack([np.asarray(Image.fromarray(channel).resize(
            SIZE, Image.Resampling.BICUBIC)) for channel in grid], axis=-1)
    pixels += rng.uniform(*FINE_SIGMA) * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _write(task: Tuple[str, int]) -> None:
    path, index = task
    synthetic_photo(index).save(path, "JPEG", quality=QUALITY)


def write_folder(root: str, images: int, val_images: int, classes: int) -> None:
    """ROOT/val and ROOT/train, image i in class i % classes; train is renamed into place last,
    so an interrupted run leaves no ROOT/train."""
    tasks = []
    for split, first, count in (("val", images, val_images), ("train.partial", 0, images)):
        shutil.rmtree(os.path.join(root, split), ignore_errors=True)
        for c in range(classes):
            os.makedirs(os.path.join(root, split, f"class_{c:03d}"))
        tasks += [(os.path.join(root, split, f"class_{i % classes:03d}", f"{i:07d}.JPEG"), i)
                  for i in range(first, first + count)]
    with multiprocessing.Pool(len(os.sched_getaffinity(0))) as pool:
        for _ in pool.imap_unordered(_write, tasks, chunksize=64):
            pass
    os.rename(os.path.join(root, "train.partial"), os.path.join(root, "train"))


def folder_stats(folder: str) -> Tuple[int, float]:
    """(number of files, mean size in KB) of an ImageFolder split."""
    sizes = [entry.stat().st_size for class_dir in os.scandir(folder) if class_dir.is_dir()
             for entry in os.scandir(class_dir.path) if entry.is_file()]
    return len(sizes), sum(sizes) / max(len(sizes), 1) / 1024


def main_py_rate(argv: List[str]) -> float:
    """The training images/s main.py reports for one epoch with ``argv``."""
    done = subprocess.run([sys.executable, os.path.join(ROOT, "main.py")] + argv, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rates = THROUGHPUT.findall(done.stdout)
    if done.returncode != 0 or not rates:
        raise SystemExit(f"main.py {' '.join(argv)} failed (exit {done.returncode}):\n"
                         f"{done.stdout[-3000:]}")
    return float(rates[-1])


def synthetic_rate(name: str, args: argparse.Namespace) -> Optional[float]:
    """throughput.py's training images/s for main.py's parsed ``args``; None off CUDA."""
    if not (str(args.device).startswith("cuda") and torch.cuda.is_available()):
        return None
    amp_dtype = AMP_DTYPES[args.amp_dtype] if args.use_amp else None
    train = measure(name, args.lk_impl, amp_dtype, args.batch_size, args.input_size or 224,
                    warmup=3, steps=10, compile_mode=args.compile, inference=False)[0]
    torch.cuda.empty_cache()
    return train


def main() -> None:
    own, extra = (sys.argv[1:], [])
    if "--" in own:
        own, extra = own[:own.index("--")], own[own.index("--") + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", default="/tmp/lknets_jpeg")
    parser.add_argument("--images", type=int, default=12800, help="training images to write")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--model", default="convnext_tiny,unireplknet_t")
    parser.add_argument("--workers", default="10", help="main.py --num_workers values, comma list")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--json", default=None, help="write the setup and rows here")
    args = parser.parse_args(own)
    if args.classes < 2 or args.images < args.classes:
        parser.error("--classes must be >= 2 and --images >= --classes")
    common = ["--data_set", "IMNET", "--data_path", args.root, "--epochs", "1",
              "--batch_size", str(args.batch_size), "--disable_eval", "true",
              "--model_ema", "true", "--use_amp", "true", "--amp_dtype", "bfloat16"] + extra
    get_args_parser().parse_args(["--model", "convnext_tiny"] + common)  # bad flags fail now

    train_dir = os.path.join(args.root, "train")
    if not os.path.isdir(train_dir):
        start = time.perf_counter()
        write_folder(args.root, args.images, max(args.classes, args.images // 25), args.classes)
        print(f"# wrote {args.root}/train and val in {time.perf_counter() - start:.1f} s")
    count, mean_kb = folder_stats(train_dir)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else (platform.processor() or "CPU")
    print(f"# {device} | torch {torch.__version__} | timm {timm.__version__} | PIL "
          f"{PIL.__version__} | {len(os.sched_getaffinity(0))} CPUs | {count} training JPEGs "
          f"({SIZE[0]}x{SIZE[1]}), mean {mean_kb:.1f} KB | main.py {' '.join(common)}")
    print("| model | workers | JPEG ImageFolder via main.py img/s | synthetic input "
          "(throughput.py) img/s | ratio |\n|---|---|---|---|---|", flush=True)
    rows: List[Dict] = []
    for name in args.model.split(","):
        jpeg = {}
        for workers in args.workers.split(","):
            argv = ["--model", name, "--num_workers", workers] + common
            jpeg[workers] = main_py_rate(argv)
        synthetic = synthetic_rate(name, get_args_parser().parse_args(argv))
        for workers, rate in jpeg.items():
            ratio = f"{rate / synthetic:.2f}" if synthetic else "n/a"
            print(f"| {name} | {workers} | {rate:.1f} | "
                  f"{f'{synthetic:.1f}' if synthetic else 'n/a'} | {ratio} |", flush=True)
            rows.append({"model": name, "workers": int(workers), "jpeg_img_s": rate,
                         "synthetic_img_s": synthetic,
                         "ratio": rate / synthetic if synthetic else None})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "timm": timm.__version__,
                       "pil": PIL.__version__, "cpus": len(os.sched_getaffinity(0)),
                       "images": count, "mean_kb": round(mean_kb, 1),
                       "main_py_flags": common, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
