"""Oriented 1D depthwise conv: lknets' CUDA kernel vs torch's path (a sparse 2D conv per angle
group), side by side in one run.

    python benchmarks/oriented.py [--shapes o1d_s1,...] [--dtypes bf16,fp32] [--jsonl out.jsonl]
    python benchmarks/oriented.py --table benchmarks/results/oriented_h200.jsonl   # print only

Each row times one ``OrientedConv1d`` (upstream's 8 directions over the channels) forward, and
forward + backward (input, weight and bias gradients), with the timing of benchmarks/dwconv.py
(median of CUDA-event timings, cold L2, host launch overhead hidden). The shapes are
ConvNeXt-T-1D's at 224 px, batch 64, and the paper's benchmark (Kirchmeyer & Deng, Table 5:
N 64, C 512, 56 x 56, K 31, fp32; their RTX 3090 numbers are not comparable to an H200's).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.dwconv import timed  # noqa: E402
from kernels import plan  # noqa: E402
from kernels.plan import set_lk_impl  # noqa: E402
from models.oriented_conv import OrientedConv1d, channel_angles  # noqa: E402

# name: (N, C, H=W, S, stride, layout, resid) -- where ConvNeXt-T-1D / -1D++ runs it
SHAPES = {
    "o1d_stem1": (64, 64, 224, 31, 2, "nhwc", False),   # stem dw1: 224 -> 112
    "o1d_stem2": (64, 64, 112, 31, 2, "nhwc", False),   # stem dw2: 112 -> 56
    "o1d_s1": (64, 96, 56, 31, 1, "nchw", False),       # 1d block dwconv, stage 1
    "o1d_s2": (64, 192, 28, 31, 1, "nchw", False),
    "o1d_s3": (64, 384, 14, 31, 1, "nchw", False),
    "o1d_s4": (64, 768, 7, 31, 1, "nchw", False),
    "o1dpp_s1_4c": (64, 384, 56, 31, 1, "nhwc", True),  # 1dpp dwconv2 on 4C, residual
    "o1dpp_s3_4c": (64, 1536, 14, 31, 1, "nhwc", True),
    "paper_c512": (64, 512, 56, 31, 1, "nchw", False),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def time_shape(shape, dtype) -> dict:
    n, c, h, s, stride, layout, resid = shape
    conv = OrientedConv1d(c, s, stride=stride, angle=channel_angles(c), resid=resid,
                          nhwc=layout == "nhwc").to("cuda", dtype)
    size = (n, h, h, c) if layout == "nhwc" else (n, c, h, h)
    x = torch.randn(size, device="cuda", dtype=dtype, requires_grad=True)
    y = conv(x)
    grad = torch.randn_like(y)

    def forward():
        with torch.no_grad():
            conv(x)

    def forward_backward():
        conv(x).backward(grad)

    out = {}
    for impl in ("cuda", "torch"):
        set_lk_impl(impl)
        out[impl] = {"fwd": timed(forward), "f+b": timed(forward_backward)}
    planned = plan.oriented_formulation("forward", (n, c, h, h), s, dtype, stride,
                                        layout == "nhwc")
    if plan.oriented_plane_can_run("forward", (n, c, h, h), s, dtype, stride, layout == "nhwc"):
        set_lk_impl("cuda")  # both formulations on the same conv, for the plan's rule
        for name in ("plane", "gather"):
            with plan.using(oriented=name):
                out[name] = {"fwd": timed(forward), "f+b": timed(forward_backward)}
    set_lk_impl("auto")
    return {"formulation": planned, **out}


HEADER = ("| shape (N, C, H, S, stride, layout) | formulation | bf16 ours fwd | bf16 ours f+b | "
          "bf16 plane / gather fwd | bf16 torch f+b | speed-up | fp32 ours f+b | fp32 torch f+b | "
          "speed-up |"
          "\n|---|---|---|---|---|---|---|---|---|---|")


def describe(name: str, shape) -> str:
    n, c, h, s, stride, layout, resid = shape
    return f"{name} ({n}, {c}, {h}, {s}, /{stride}, {layout}{', resid' if resid else ''})"


def table(records) -> str:
    """One row per shape, bf16 and fp32 side by side (ms)."""
    by_shape = {}
    for r in records:
        by_shape.setdefault(r["shape"], {"dims": r["dims"]})[r["dtype"]] = r
    rows = [HEADER]
    for name, runs in by_shape.items():
        cells = [next(r.get("formulation", "gather") for r in runs.values() if "cuda" in r)]
        for dtype in ("bf16", "fp32"):
            r = runs.get(dtype)
            if r is None:
                cells += ["—"] * (5 if dtype == "bf16" else 3)
                continue
            ours, theirs = r["cuda"], r["torch"]
            gather = (f"{r['plane']['fwd']:.3f} / {r['gather']['fwd']:.3f}" if "gather" in r
                      else "—")
            cells += ([f"{ours['fwd']:.3f}", f"{ours['f+b']:.3f}", gather] if dtype == "bf16"
                      else [f"{ours['f+b']:.3f}"]) + [
                f"{theirs['f+b']:.3f}", f"{theirs['f+b'] / ours['f+b']:.1f}x"]
        rows.append(f"| {describe(name, runs['dims'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--jsonl", default=None)
    parser.add_argument("--table", default=None, metavar="JSONL",
                        help="print the table of an earlier run's --jsonl file and exit")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            records = [json.loads(line) for line in f]
        print(f"# {records[0]['device']} | torch {records[0]['torch_version']}\n{table(records)}")
        return
    torch.backends.cudnn.benchmark = False
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}")
    records = []
    sink = open(args.jsonl, "a") if args.jsonl else None
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        for dname in args.dtypes.split(","):
            r = time_shape(shape, DTYPES[dname])
            records.append({"shape": name, "dims": shape, "dtype": dname,
                            "device": torch.cuda.get_device_name(),
                            "torch_version": torch.__version__, **r})
            gather = "".join(f", {k} {r[k]['fwd']:.3f} / {r[k]['f+b']:.3f}"
                             for k in ("plane", "gather") if k in r)
            print(f"{describe(name, shape)} {dname}: ours ({r['formulation']}) "
                  f"{r['cuda']['fwd']:.3f} / {r['cuda']['f+b']:.3f} ms{gather}, torch "
                  f"{r['torch']['fwd']:.3f} / {r['torch']['f+b']:.3f} ms (fwd / f+b)", flush=True)
            if sink:
                sink.write(json.dumps(records[-1]) + "\n")
    if sink:
        sink.close()
    print(table(records))


if __name__ == "__main__":
    main()
