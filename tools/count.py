"""Parameters and FLOPs of a registered model, in training and in deploy (re-parameterized) form.

    python tools/count.py --model RepLKNet-31B --input_size 224

FLOPs are reported as multiply-accumulates (torch.utils.flop_counter's count / 2), the unit the
RepLKNet, UniRepLKNet, SLaK and ConvNeXt papers call "FLOPs" (RepLKNet-31B: 15.3G at 224).
Convolutions and matrix products are counted; normalizations, activations and pooling are not,
as in those papers. The model is built on the meta device, so nothing is allocated or computed
and the largest models count in about a second (on the CPU for a model that cannot be built on
meta).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import models  # noqa: E402


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int, in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass of a single image (model on any device)."""
    device = next(model.parameters()).device
    x = torch.empty(1, in_chans, input_size, input_size, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def count(model_name: str, input_size: int = 224,
          nb_classes: int = 1000) -> Dict[str, Tuple[int, int]]:
    """{'train': (params, MACs), 'deploy': (params, MACs)} for a registered model."""
    try:
        return _count_on("meta", model_name, input_size, nb_classes)
    except NotImplementedError:
        # A constructor that reads tensor values (e.g. linspace(...).tolist() on the default
        # device) cannot run on meta; count on the CPU instead, slower but the same numbers.
        return _count_on("cpu", model_name, input_size, nb_classes)


def _count_on(device: str, model_name: str, input_size: int,
              nb_classes: int) -> Dict[str, Tuple[int, int]]:
    with torch.device(device):
        model = models.create_model(model_name, num_classes=nb_classes).eval()
        result = {"train": (count_params(model), count_macs(model, input_size))}
        models.reparameterize_model(model)
        result["deploy"] = (count_params(model), count_macs(model, input_size))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--input_size", type=int, default=224, help="square input side")
    parser.add_argument("--nb_classes", type=int, default=1000, help="classifier head size")
    args = parser.parse_args(argv)
    if args.input_size < 32:
        parser.error(f"--input_size must be >= 32 (the networks downsample 32x), "
                     f"got {args.input_size}")
    try:
        result = count(args.model, args.input_size, args.nb_classes)
    except ValueError as err:
        parser.error(str(err))
    print(f"{args.model} at {args.input_size}x{args.input_size}, {args.nb_classes} classes")
    print(f"{'form':<8}{'params':>16}{'params (M)':>12}{'FLOPs (G, MACs)':>18}")
    for form, (params, macs) in result.items():
        print(f"{form:<8}{params:>16,}{params / 1e6:>12.2f}{macs / 1e9:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
