"""UniRepLKNet's dilated re-param branches: torch's dilated depthwise conv vs lknets' kernel, on
the interleaved sub-grids and on the dense, zero-filled kernel (kernels/ops.py), in one run.

    python benchmarks/dilated_branches.py [--dtypes bf16,fp16,fp32] [--layouts nchw,nhwc]
        [--batch_size 64]

Forward and forward + backward (input and weight gradient) of each branch of a 13x13
DilatedReparamBlock at UniRepLKNet-T's stages 2-4 (C160 28x28, C320 14x14, C640 7x7), timed as in
benchmarks/dwconv.py (median of CUDA-event timings, L2 flushed, host launch overhead hidden) with
``cudnn.benchmark`` on, as training runs. Ours includes the sub-grid copies or the kernel's
expansion. The model's activations are channels_last-strided (its LayerNorms and linears run in
NHWC), hence nhwc.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
from kernels.plan import using  # noqa: E402
from benchmarks.dwconv import DTYPES, timed  # noqa: E402
from models.unireplknet import DILATED_BRANCHES  # noqa: E402

PLANES = ((160, 28), (320, 14), (640, 7))


def conv_torch(x: torch.Tensor, w: torch.Tensor, dilation: int) -> torch.Tensor:
    return F.conv2d(x, w, None, 1, dilation * (w.shape[-1] // 2), dilation, x.shape[1])


def conv_ours(x: torch.Tensor, w: torch.Tensor, dilation: int) -> torch.Tensor:
    return kernels.depthwise_conv2d(x, w, None, None, dilation)


IMPLS = (("torch", conv_torch), ("subgrids", conv_ours), ("dense", conv_ours))
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--layouts", default="nchw,nhwc")
    parser.add_argument("--batch_size", type=int, default=64)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    kernels.load_extension()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}"
          f" | cuDNN {torch.backends.cudnn.version()} | batch {args.batch_size}")
    names = " / ".join(name for name, _ in IMPLS)
    print(f"| plane | branch | dtype | layout | fwd ms: {names} | f+b ms: {names} |\n"
          "|---|---|---|---|---|---|")
    for c, size in PLANES:
        for k, r in DILATED_BRANCHES[13]:
            for dtype_name in args.dtypes.split(","):
                for layout in args.layouts.split(","):
                    dtype = DTYPES[dtype_name]
                    x = torch.randn(args.batch_size, c, size, size, device="cuda", dtype=dtype)
                    x = x.contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
                    w = torch.randn(c, 1, k, k, device="cuda", dtype=dtype, requires_grad=True)
                    dy = torch.randn(x.shape, device="cuda", dtype=dtype)
                    fwd, fb = [], []
                    for name, conv in IMPLS:
                        with using(dilation=name if name in ("subgrids", "dense") else "auto"):
                            with torch.no_grad():
                                fwd.append(timed(lambda: conv(x, w, r)))
                            fb.append(timed(lambda: torch.autograd.grad(conv(x, w, r), [x, w],
                                                                        dy)))
                    print(f"| C{c} {size}x{size} | {k}x{k} d{r} | {dtype_name} | {layout} | "
                          + " / ".join(f"{t:.3f}" for t in fwd) + " | "
                          + " / ".join(f"{t:.3f}" for t in fb) + " |", flush=True)


if __name__ == "__main__":
    main()
