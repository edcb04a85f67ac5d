"""What runs for every depthwise conv of a model on a GPU: kernels/plan.py's decisions as a table.

    python tools/show_plan.py --model RepLKNet-31B --input_size 224 --dtype bf16
    python tools/show_plan.py --model SLaK_tiny --kernel_size 51 49 47 13 5 --width_factor 1.3 \\
        --Decom true
    python tools/show_plan.py --model unireplknet_t --compiling   # as under torch.compile

The model flags are main.py's (each family's own flags come from the model registry), and
``--lk_impl`` as main.py takes it. The model runs once on the CPU at batch 1 to see each conv's
input; the plan is then made for ``--batch_size`` images in ``--dtype`` (the autocast dtype of
``--amp``), as a GPU run would be planned: torch's conv or lknets' kernel, and for lknets' kernel
the formulation of the forward / input-gradient / weight-gradient launches (plane, small, mid,
rows or direct GEMM), and whether dilated convs run as sub-grids or a dense kernel and tall
kernels on transposed views. Oriented 1D convs report the implementation and, on lknets' kernel,
the formulation of each launch (plane or gather).
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

import models  # noqa: E402
from kernels import plan  # noqa: E402
from models.layers import DepthwiseConv2d  # noqa: E402
from models.oriented_conv import OrientedConv1d  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def conv_inputs(model: torch.nn.Module, input_size: int) -> Dict[Tuple, int]:
    """{(kind, (C, H, W), kernel, dilation or stride): how many convs see it} for one forward."""
    seen: Dict[Tuple, int] = {}

    def record(module: torch.nn.Module, inputs: Tuple[torch.Tensor, ...]) -> None:
        shape = tuple(inputs[0].shape[1:])
        if isinstance(module, OrientedConv1d):
            shape = (shape[2], shape[0], shape[1]) if module.nhwc else shape
            key = ("oriented", shape, tuple(module.kernel_size), (module.stride[0], module.nhwc))
        else:
            key = ("depthwise", shape, tuple(module.weight.shape[-2:]), module.dilation[0])
        seen[key] = seen.get(key, 0) + 1

    hooks = [m.register_forward_pre_hook(record) for m in model.modules()
             if isinstance(m, (DepthwiseConv2d, OrientedConv1d))]
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    for hook in hooks:
        hook.remove()
    return seen


def plan_rows(seen: Dict[Tuple, int], batch_size: int, dtype: torch.dtype, channels_last: bool,
              compiling: bool) -> List[str]:
    rows = []
    for (kind, shape, kernel, extra), count in seen.items():
        if kind == "oriented":
            stride, nhwc = extra
            runs = "torch (sparse 2D)"
            if plan.get_lk_impl() != "torch":
                runs = "lknets oriented " + "/".join(
                    plan.oriented_formulation(direction, (batch_size,) + shape, kernel[1], dtype,
                                              stride, nhwc) for direction in plan.DIRECTIONS)
            rows.append(f"| {shape} | oriented 1x{kernel[1]} | stride {stride} | {count} | "
                        f"{runs} |")
            continue
        got = plan.plan_conv((batch_size,) + shape, kernel, dtype, channels_last,
                             (extra, extra), compiling)
        rows.append(f"| {shape} | {kernel[0]}x{kernel[1]} | dilation {extra} | {count} | {got} |")
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES),
                        help="the input dtype, or the autocast dtype (default: bf16)")
    parser.add_argument("--channels_last", action="store_true", help="channels_last inputs")
    parser.add_argument("--compiling", action="store_true", help="plan as under torch.compile")
    parser.add_argument("--lk_impl", default="auto", choices=plan.IMPLS)
    models.add_family_args(parser)
    args = parser.parse_args(argv)
    try:
        model = models.create_model(args.model, **models.family_kwargs(args.model, args)).eval()
    except (ValueError, TypeError) as err:
        parser.error(str(err))
    with plan.using(impl=args.lk_impl):
        rows = plan_rows(conv_inputs(model, args.input_size), args.batch_size, DTYPES[args.dtype],
                         args.channels_last, args.compiling)
    layout = ", channels_last" if args.channels_last else ""
    mode = ", compiling" if args.compiling else ""
    print(f"| input (C, H, W) | kernel | | convs | plan ({args.dtype}, batch {args.batch_size}"
          f"{layout}{mode}; forward/input grad/weight grad) |\n|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
