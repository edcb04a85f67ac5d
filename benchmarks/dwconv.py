"""Depthwise conv: lknets' kernel vs torch (ATen / cuDNN) side by side, against the floor.

    python benchmarks/dwconv.py [--shapes r31b224_s1,...] [--dtypes bf16,fp16,fp32]
                                [--layouts nchw,nhwc] [--jsonl out.jsonl]

For every shape of the table below, dtype and layout: fwd, dgrad, wgrad and fwd+bwd times (median
of CUDA-event timings, L2 flushed before each repetition, host launch overhead hidden behind a spin
kernel) of both implementations; torch runs with
cudnn.benchmark off (autotuning channels_last large kernels takes 30 s+ per shape). The floor per
direction is max(flops / peak, bytes / copy bandwidth) with the peak and bandwidth measured in the
same run (16-bit peak: the dtype's matmul rate; fp32: matmul with TF32 off); "useful" counts only
the taps that land inside the image, at the fp32 (CUDA-core) rate.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import kernels.plan  # noqa: E402

# name: (N, C, H=W, (kh, kw))
SHAPES = {
    "r31b224_s1": (64, 128, 56, (31, 31)), "r31b224_s2": (64, 256, 28, (29, 29)),
    "r31b224_s3": (64, 512, 14, (27, 27)), "r31b224_s4": (64, 1024, 7, (13, 13)),
    "r31b384_s1": (32, 128, 96, (31, 31)), "r31b384_s2": (32, 256, 48, (29, 29)),
    "r31b384_s3": (32, 512, 24, (27, 27)), "r31b384_s4": (32, 1024, 12, (13, 13)),
    "uni_s3_k13": (64, 320, 14, (13, 13)), "uni_s4_k13": (64, 640, 7, (13, 13)),
    "slak_s1_51x5": (64, 124, 56, (51, 5)), "slak_s1_5x51": (64, 124, 56, (5, 51)),
    "slak_s3_47x5": (64, 499, 14, (47, 5)),
    "o1d_s1_1x31": (64, 96, 56, (1, 31)), "o1d_s1_31x1": (64, 96, 56, (31, 1)),
    "cnx_s1_k7": (64, 96, 56, (7, 7)), "cnx_s3_k7": (64, 384, 14, (7, 7)),
    # RepLKNet-31B's parallel 5x5 branches and UniRepLKNet-T's 3x3 blocks (not in the issue's
    # table; they decide the models' dispatch)
    "r31b224_s1_k5": (64, 128, 56, (5, 5)), "r31b224_s2_k5": (64, 256, 28, (5, 5)),
    "r31b224_s3_k5": (64, 512, 14, (5, 5)),
    "uni_s1_k3": (64, 80, 56, (3, 3)), "uni_s3_k3": (64, 320, 14, (3, 3)),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DIRECTIONS = ("fwd", "dgrad", "wgrad", "f+b")

_flush = None
# A spin kernel before each timed repetition keeps the GPU busy while the host queues the whole
# repetition, so host-side launch overhead is not timed (as in the pre-lknets baseline of torch's
# and MegEngine's kernels that kernels/DESIGN.md cites).
SPIN_CYCLES = 4_000_000


def timed(fn, budget_s: float = 0.1, max_reps: int = 20) -> float:
    """Median milliseconds of ``fn`` over CUDA-event timed repetitions with a cold L2."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 * 1024 * 1024 // 4, device="cuda")
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    reps = int(max(3, min(max_reps, budget_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        _flush.zero_()
        torch.cuda._sleep(SPIN_CYCLES)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_peaks() -> dict:
    peaks = {}
    n = 8192
    for name, dtype in DTYPES.items():
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        torch.backends.cuda.matmul.allow_tf32 = False
        ms = timed(lambda: a @ b, budget_s=0.1, max_reps=5)
        peaks[name] = 2 * n ** 3 / (ms * 1e-3)
    src = torch.empty(256 * 1024 * 1024, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), budget_s=0.1, max_reps=10)
    peaks["copy_Bps"] = 2 * src.numel() * 4 / (ms * 1e-3)
    return peaks


def useful_taps(size: int, k: int) -> float:
    """Mean number of kernel taps (along one axis) that land inside a 'same'-padded image."""
    pad = k // 2
    return sum(min(size, o - pad + k) - max(0, o - pad) for o in range(size)) / size


def floors(n, c, h, k, dtype, peaks) -> dict:
    kh, kw = k
    elt = torch.finfo(dtype).bits // 8
    act = n * c * h * h * elt
    flops = 2 * n * c * h * h * kh * kw
    useful = 2 * n * c * h * h * useful_taps(h, kh) * useful_taps(h, kw)
    bw, peak = peaks["copy_Bps"], peaks[[k_ for k_, v in DTYPES.items() if v == dtype][0]]
    bytes_ = {"fwd": 2 * act, "dgrad": 2 * act, "wgrad": 2 * act}
    out = {d: max(flops / peak, bytes_[d] / bw) * 1e3 for d in bytes_}
    out["f+b"] = sum(out.values())
    simt = {d: max(useful / peaks["fp32"], bytes_[d] / bw) * 1e3 for d in bytes_}
    out["useful f+b"] = sum(simt.values())
    return out


def run_case(impl, n, c, h, k, dtype, layout) -> dict:
    kh, kw = k
    pad = (kh // 2, kw // 2)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = torch.randn(n, c, h, h, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    w = (torch.randn(c, 1, kh, kw, device="cuda") / (kh * kw) ** 0.5).to(dtype)
    dy = torch.randn_like(x)
    xg, wg = x.detach().requires_grad_(), w.detach().requires_grad_()
    if impl.startswith("ours"):
        # "ours:direct" / "ours:plane" force one formulation (kernels.plan.FORMULATIONS) in every
        # direction; "ours" runs the plan's choice.
        kernels.plan.configure(formulation=impl.partition(":")[2] or "auto")
        fwd = lambda: torch.ops.lknets.dwconv2d(x, w, None, *pad)
        dgrad = lambda: torch.ops.lknets.dwconv2d_input_grad(dy, w, *pad)
        wgrad = lambda: torch.ops.lknets.dwconv2d_weight_grad(x, dy, kh, kw, *pad)
        conv = lambda a, b: kernels.depthwise_conv2d(a, b, None, pad)
    else:
        fwd = lambda: F.conv2d(x, w, None, 1, pad, 1, c)
        bwd = lambda mask: torch.ops.aten.convolution_backward(
            dy, x, w, None, [1, 1], list(pad), [1, 1], False, [0, 0], c, mask)
        dgrad = lambda: bwd([True, False, False])
        wgrad = lambda: bwd([False, True, False])
        conv = lambda a, b: F.conv2d(a, b, None, 1, pad, 1, c)

    def fwd_bwd():
        y = conv(xg, wg)
        torch.autograd.grad(y, [xg, wg], dy)

    return {"fwd": timed(fwd), "dgrad": timed(dgrad), "wgrad": timed(wgrad), "f+b": timed(fwd_bwd)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--layouts", default="nchw,nhwc")
    parser.add_argument("--impls", default="ours,torch",
                        help="ours, ours:FORMULATION (force one of kernels.plan.FORMULATIONS), torch")
    parser.add_argument("--jsonl", default=None)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = False
    kernels.load_extension()
    peaks = measure_peaks()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda}"
          f" | cuDNN {torch.backends.cudnn.version()} | peaks TFLOP/s "
          + ", ".join(f"{k} {v / 1e12:.0f}" for k, v in peaks.items() if k != "copy_Bps")
          + f" | copy {peaks['copy_Bps'] / 1e9:.0f} GB/s", flush=True)
    print("| shape | dtype | layout | impl | fwd | dgrad | wgrad | f+b | floor f+b | useful-SIMT f+b |"
          " % useful |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    out = open(args.jsonl, "a") if args.jsonl else None
    for name in args.shapes.split(","):
        n, c, h, k = SHAPES[name]
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            fl = floors(n, c, h, k, dtype, peaks)
            for layout in args.layouts.split(","):
                for impl in args.impls.split(","):
                    try:
                        t = run_case(impl, n, c, h, k, dtype, layout)
                    except (RuntimeError, ValueError) as exc:  # out of memory; a forced
                        # formulation that does not take the shape
                        print(f"| {name} | {dname} | {layout} | {impl} | failed: {exc} |")
                        continue
                    row = {"shape": name, "N": n, "C": c, "H": h, "k": list(k), "dtype": dname,
                           "layout": layout, "impl": impl, **t, "floor_fb": fl["f+b"],
                           "useful_fb": fl["useful f+b"]}
                    if out:
                        out.write(json.dumps(row) + "\n")
                        out.flush()
                    print(f"| {name} N{n} C{c} {h}x{h} k{k[0]}x{k[1]} | {dname} | {layout} | {impl} | "
                          + " | ".join(f"{t[d]:.3f}" for d in DIRECTIONS)
                          + f" | {fl['f+b']:.3f} | {fl['useful f+b']:.3f} | "
                          f"{100 * fl['useful f+b'] / t['f+b']:.1f} |", flush=True)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
