"""Parameters and FLOPs of a registered model, in training and in deploy (re-parameterized) form.

    python tools/count.py --model RepLKNet-31B --input_size 224
    python tools/count.py --model SLaK_tiny --kernel_size 51 49 47 13 5 --width_factor 1.3 \\
        --Decom true --sparsity 0.4
    python tools/count.py --model convnext_tiny --variant 1d

The model flags are main.py's: each family's own flags (SLaK's ``--kernel_size``, ``--width_factor``,
``--Decom``, ``--bn``; Oriented1D's ``--variant``; ...) come from the model registry.

FLOPs are reported as multiply-accumulates (torch.utils.flop_counter's count / 2), the unit the
RepLKNet, UniRepLKNet, SLaK, ConvNeXt and Oriented1D papers call "FLOPs" (RepLKNet-31B: 15.3G at
224). Convolutions and matrix products are counted; normalizations, activations and pooling are
not, as in those papers. Oriented 1D convs count their taps, C * H_out * W_out * S per image (as
Oriented1D's own counter does), not the zeros of the sparse 2D kernels our op runs them with.
``--sparsity S`` counts a SLaK sparse-training result as SLaK's tables do: every conv and linear
weight (the tensors sparse training masks) is only 1 - S dense, so its parameters and MACs scale
by 1 - S (training form only: re-parameterization merges the sparse strips into one k x k kernel
whose non-zeros depend on the trained masks). The model is built on the meta device, so nothing
is allocated or computed and the largest models count in about a second (on the CPU for a model
that cannot be built on meta).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import models  # noqa: E402
from models.oriented_conv import OrientedConv1d  # noqa: E402


def count_params(model: nn.Module, density: float = 1.0) -> int:
    """Parameters; with ``density`` < 1, conv and linear weights count that fraction."""
    return round(sum(p.numel() * (density if _maskable(p) else 1.0) for p in model.parameters()))


def _maskable(p: torch.Tensor) -> bool:
    # The tensors SLaK's sparse training masks: conv kernels and linear weights.
    return p.dim() in (2, 4)


def _oriented_output(module: OrientedConv1d, x: torch.Tensor) -> torch.Tensor:
    """An empty tensor shaped as the oriented conv's output: ceil(H / st) x ceil(W / st)."""
    stride = module.stride[0]
    if module.nhwc:
        n, h, w, c = x.shape
        return x.new_empty(n, -(-h // stride), -(-w // stride), c)
    n, c, h, w = x.shape
    return x.new_empty(n, c, -(-h // stride), -(-w // stride))


@contextlib.contextmanager
def _oriented_convs_by_taps(model: nn.Module, macs: Dict[nn.Module, int]) -> Iterator[None]:
    """Run each oriented conv as a shape-only stand-in and record its taps * outputs in ``macs``.

    Our op convolves with a sparse 2D kernel per angle group, so the counter would count its
    zeros (21 x 21 taps for a 1 x 31 kernel at 45 degrees); the stand-in also needs no theta
    values, so these models count on the meta device.
    """
    convs = [m for m in model.modules() if isinstance(m, OrientedConv1d)]

    def stand_in(module: OrientedConv1d):
        def forward(x: torch.Tensor) -> torch.Tensor:
            out = _oriented_output(module, x)
            macs[module] = macs.get(module, 0) + out.numel() * module.kernel_size[1]
            return out
        return forward

    for conv in convs:
        conv.forward = stand_in(conv)
    try:
        yield
    finally:
        for conv in convs:
            del conv.forward


@contextlib.contextmanager
def _macs_per_layer(layers: List[nn.Module], counter: FlopCounterMode,
                    macs: Dict[nn.Module, int]) -> Iterator[None]:
    """Record in ``macs`` what ``counter`` counts inside each of ``layers`` (MACs)."""
    start: Dict[nn.Module, int] = {}

    def before(module: nn.Module, args: Any) -> None:
        start[module] = counter.get_total_flops()

    def after(module: nn.Module, args: Any, out: Any) -> None:
        macs[module] = macs.get(module, 0) + (counter.get_total_flops() - start[module]) // 2

    hooks = [h for m in layers
             for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def count_macs(model: nn.Module, input_size: int, in_chans: int = 3,
               density: float = 1.0) -> int:
    """Multiply-accumulates of one forward pass of a single image (model on any device).

    With ``density`` < 1, the MACs of every layer whose weight is a conv kernel or a linear
    weight scale by ``density`` (a uniformly sparse model, as SLaK counts).
    """
    device = next(model.parameters()).device
    x = torch.empty(1, in_chans, input_size, input_size, device=device)
    counter = FlopCounterMode(display=False)
    weighted = [m for m in model.modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor) and _maskable(m.weight)
                and not isinstance(m, OrientedConv1d)]
    by_layer: Dict[nn.Module, int] = {}
    oriented: Dict[nn.Module, int] = {}
    with _macs_per_layer(weighted, counter, by_layer), \
            _oriented_convs_by_taps(model, oriented), counter, torch.no_grad():
        model(x)
    total = counter.get_total_flops() // 2 + sum(oriented.values())
    sparse_part = sum(by_layer.values()) + sum(oriented.values())
    return total - round((1.0 - density) * sparse_part)


def count(model_name: str, input_size: int = 224, nb_classes: int = 1000, sparsity: float = 0.0,
          **model_kwargs: Any) -> Dict[str, Tuple[int, int]]:
    """{'train': (params, MACs), 'deploy': (params, MACs)} for a registered model.

    ``model_kwargs`` go to the constructor (e.g. SLaK's ``kernel_size``, ``width_factor``,
    ``Decom``; Oriented1D's ``variant``). With ``sparsity`` > 0 only 'train' is counted, with
    conv and linear weights at density ``1 - sparsity``.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    try:
        return _count_on("meta", model_name, input_size, nb_classes, sparsity, model_kwargs)
    except NotImplementedError:
        # A constructor that reads tensor values (e.g. linspace(...).tolist() on the default
        # device) cannot run on meta; count on the CPU instead, slower but the same numbers.
        return _count_on("cpu", model_name, input_size, nb_classes, sparsity, model_kwargs)


def _count_on(device: str, model_name: str, input_size: int, nb_classes: int, sparsity: float,
              model_kwargs: Dict[str, Any]) -> Dict[str, Tuple[int, int]]:
    density = 1.0 - sparsity
    with torch.device(device):
        model = models.create_model(model_name, num_classes=nb_classes, **model_kwargs).eval()
        result = {"train": (count_params(model, density),
                            count_macs(model, input_size, density=density))}
        if sparsity == 0.0:
            models.reparameterize_model(model)
            result["deploy"] = (count_params(model), count_macs(model, input_size))
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--input_size", type=int, default=224, help="square input side")
    parser.add_argument("--nb_classes", type=int, default=1000, help="classifier head size")
    parser.add_argument("--sparsity", type=float, default=0.0,
                        help="count conv/linear weights at density 1 - sparsity, as SLaK's "
                             "tables do for its sparse models (0.4 there); default 0: dense")
    models.add_family_args(parser)
    args = parser.parse_args(argv)
    if args.input_size < 32:
        parser.error(f"--input_size must be >= 32 (the networks downsample 32x), "
                     f"got {args.input_size}")
    if not 0.0 <= args.sparsity < 1.0:
        parser.error(f"--sparsity must be in [0, 1), got {args.sparsity}")
    try:
        kwargs = models.family_kwargs(args.model, args)
        result = count(args.model, args.input_size, args.nb_classes, args.sparsity, **kwargs)
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    flags = " ".join(f"{k}={v}" for k, v in kwargs.items())
    sparse = f", sparsity {args.sparsity}" if args.sparsity else ""
    print(f"{args.model} {flags}".rstrip() + f" at {args.input_size}x{args.input_size}, "
          f"{args.nb_classes} classes{sparse}")
    print(f"{'form':<8}{'params':>16}{'params (M)':>12}{'FLOPs (G, MACs)':>18}")
    for form, (params, macs) in result.items():
        print(f"{form:<8}{params:>16,}{params / 1e6:>12.2f}{macs / 1e9:>18.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
