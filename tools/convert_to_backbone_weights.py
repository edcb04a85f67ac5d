"""Convert an oriented-1D ConvNeXt classifier checkpoint into detection/segmentation backbone weights.

    python tools/convert_to_backbone_weights.py --model convnext_tiny --variant 1dpp \
        --checkpoint convnext_tiny_1dpp_best_ema.pth --output_dir backbones/

Oriented1D's downstream backbones (mmdet/mmseg) wrap every oriented conv in a ``Wrapper``, so its
keys gain ``.conv.`` (``stages.2.0.dwconv.weight`` -> ``stages.2.0.dwconv.conv.weight``, same for
``bias`` and ``theta``), and they use shorter kernels in the blocks, because at 224 px the
classifier's outer taps were never trained: 1d ``[31, 31, 27, 13]``, 1dpp ``[15, 31], [15, 31],
[15, 27], [13, 13]``, 2dpp ``[7, 31], [7, 31], [7, 27], [7, 13]`` per stage; the stems are kept.
A kernel is cropped around its centre, which keeps every remaining tap at its position.

Unlike upstream's script (which cannot run: it calls an undefined ``reshape_kernel``), this one
renames only oriented convs (the 7x7 convs of 2d/2dpp are not wrapped downstream), reads a raw
state dict or a ``{'model': ...}`` checkpoint, checks it against ``--model --variant``, and
writes a raw state dict to ``output_dir/<checkpoint file name>`` atomically.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import models  # noqa: E402
import utils  # noqa: E402
from utils import UserError  # noqa: E402

# Kernel sizes of the downstream backbones' blocks, per stage: (dwconv or dwconv1, dwconv2).
BACKBONE_KERNELS = {
    "1d": [(31,), (31,), (27,), (13,)],
    "1dpp": [(15, 31), (15, 31), (15, 27), (13, 13)],
    "2dpp": [(7, 31), (7, 31), (7, 27), (7, 13)],
}
MODELS = ("convnext_tiny", "convnext_base")
VARIANTS = ("2d", "1d", "1dpp", "2dpp")


def centre_crop(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Keep the central ``size`` taps of a (C, 1, 1, S) oriented kernel."""
    full = kernel.shape[-1]
    if size > full or (full - size) % 2:
        raise UserError(f"cannot centre-crop a kernel of {full} taps to {size}")
    start = (full - size) // 2
    return kernel[..., start:start + size].clone()


def _target_size(prefix: str, variant: str) -> Optional[int]:
    """Backbone kernel size of the oriented conv at ``prefix`` (None: keep, e.g. the stem)."""
    parts = prefix.split(".")
    if parts[0] != "stages":
        return None
    stage_sizes = BACKBONE_KERNELS[variant][int(parts[1])]
    return stage_sizes[1] if parts[-1] == "dwconv2" else stage_sizes[0]


def convert(state: Dict[str, torch.Tensor], variant: str) -> Dict[str, torch.Tensor]:
    """Backbone state dict from a classifier state dict of the given variant."""
    if variant not in VARIANTS:
        raise UserError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    oriented = {key[:-len(".theta")] for key in state if key.endswith(".theta")}
    out: Dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix not in oriented:
            out[key] = value
            continue
        size = _target_size(prefix, variant)
        if leaf == "weight" and size is not None:
            value = centre_crop(value, size)
        out[f"{prefix}.conv.{leaf}"] = value
    return out


def convert_checkpoint(model: str, variant: str, checkpoint: str, output_dir: str,
                       trust: bool = False) -> str:
    """Read (weights-only unless ``trust``), check against ``model``/``variant``, convert and
    write; returns the output path."""
    if model not in MODELS:
        raise UserError(f"--model must be one of {', '.join(MODELS)}, got {model!r}")
    if variant not in VARIANTS:
        raise UserError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    state = utils.extract_state_dict(utils.load_checkpoint_file(checkpoint, trust),
                                     "model|module")
    head = state.get("head.weight")
    with torch.device("meta"):  # shapes only
        reference = models.create_model(model, variant=variant,
                                        num_classes=head.shape[0] if head is not None else 1000)
    missing, unexpected, shapes = utils.state_dict_mismatch(reference, state)
    if missing or unexpected or shapes:
        raise UserError(f"{checkpoint} is not a {model} --variant {variant} checkpoint: "
                        f"{utils.describe_mismatch(missing, unexpected, shapes)}")
    path = os.path.join(output_dir, os.path.basename(checkpoint))
    if os.path.abspath(path) == os.path.abspath(checkpoint):
        raise UserError(f"--output_dir {output_dir} would overwrite the source checkpoint")
    utils.atomic_save(convert(state, variant), path)
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--variant", required=True, choices=VARIANTS)
    parser.add_argument("--checkpoint", required=True,
                        help="classifier checkpoint (raw state dict or {'model': ...})")
    parser.add_argument("--output_dir", required=True,
                        help="folder for the backbone weights (same file name)")
    parser.add_argument("--trust_checkpoint", type=utils.str2bool, default=False,
                        help="unpickle --checkpoint without the weights-only guard (it can run "
                             "code: only for files you trust)")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)

    def convert() -> None:
        path = convert_checkpoint(args.model, args.variant, args.checkpoint, args.output_dir,
                                  args.trust_checkpoint)
        print(f"wrote backbone weights of {args.model} {args.variant} to {path}")

    return utils.exit_status(convert)


if __name__ == "__main__":
    sys.exit(main())
