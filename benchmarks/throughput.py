"""End-to-end training and inference images/s, torch's depthwise conv vs lknets' kernel, one run.

    python benchmarks/throughput.py [--model RepLKNet-31B,unireplknet_t,SLaK_tiny]
        [--lk_impl torch,auto[,bound]] [--forms train[,deploy]] [--amp_dtype bf16]
        [--batch_size 64] [--input_size 224] [--profile] [--compile [MODE]]

A training step is forward, cross-entropy, backward and an AdamW step under torch.autocast;
inference is the forward under autocast and no_grad, model in eval mode. Synthetic inputs; each
number is the median over timed steps after warm-up. `bound` is no implementation: every
stride-1 depthwise conv (the large kernels and the re-param branches, dilated or not) and every
oriented 1D conv is skipped, so its rate bounds what any depthwise-conv kernel could give the
model. The `deploy` form times the model re-parameterized (``models.reparameterize_model``, as
main.py's `--with_small_kernel_merged true` and tools/export.py do: each multi-branch block one
conv, BatchNorms after convs folded): its inference is what a deployed model runs, and its
training rate bounds what fusing a training-form multi-branch block (all branches and their
BatchNorms in one pass) could give, since such a block still computes the batch statistics
that the folded form skips. Models without re-param blocks have no deploy row. --profile adds the
GPU time (sum of kernel times, torch.profiler) and the GPU op count of one training step: a step
that takes much longer than its GPU time is bound by the host launching its kernels.
--compile runs the model through torch.compile for every lk_impl alike (inductor; MODE as
torch.compile's, e.g. reduce-overhead for CUDA graphs; default mode without one).
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models import create_model, oriented_conv, reparameterize_model  # noqa: E402
from kernels.plan import set_lk_impl  # noqa: E402

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

# Models timed as their papers train them: SLaK-T with 51x5 / 5x51 strips (SLaK README:
# --kernel_size 51 49 47 13 5 --width_factor 1.3 --Decom True), not the dense 51x51 default.
PAPER_KWARGS = {
    "SLaK_tiny": dict(kernel_size=[51, 49, 47, 13, 5], width_factor=1.3, Decom=True),
}


@contextlib.contextmanager
def depthwise_convs_skipped():
    """F.conv2d (which nn.Conv2d and the torch path of models.layers call) with every stride-1
    depthwise conv skipped, and every oriented 1D conv: the input is passed on (plus the bias;
    an oriented conv of stride s keeps every s-th pixel), in the dtype autocast would give the
    conv. Nothing is computed for it and its weight gets no gradient."""
    conv2d = F.conv2d
    oriented = oriented_conv.oriented_conv1d_planned

    def passed_on(y, bias, nhwc=False):
        if torch.is_autocast_enabled("cuda"):
            y = y.to(torch.get_autocast_dtype("cuda"))
        if bias is None:
            return y
        return y + bias.to(y.dtype) if nhwc else y + bias.to(y.dtype).view(1, -1, 1, 1)

    def oriented_skipped(x, weight, bias, groups, positions, offsets, stride, resid, nhwc):
        return passed_on(x[:, ::stride, ::stride] if nhwc else x[:, :, ::stride, ::stride],
                         bias, nhwc)

    def skipped(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        if groups == 1 or groups != x.shape[1] or weight.shape[0] != groups or stride not in (1, (1, 1)):
            return conv2d(x, weight, bias, stride, padding, dilation, groups)
        return passed_on(x, bias)

    F.conv2d = skipped
    oriented_conv.oriented_conv1d_planned = oriented_skipped
    try:
        yield
    finally:
        F.conv2d = conv2d
        oriented_conv.oriented_conv1d_planned = oriented


def median_step_s(step, warmup: int, steps: int) -> tuple:
    """(median seconds of a timed step, seconds of the warm-up steps: compiling included)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), warmup_s


def gpu_time_ms(step) -> tuple:
    """(GPU kernel time in ms, number of GPU ops) of one call of ``step``."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    return sum(e.self_device_time_total for e in events) / 1e3, sum(e.count for e in events)


def has_deploy_form(name: str) -> bool:
    with torch.device("meta"):  # structure only: no weights are initialised
        model = create_model(name, **PAPER_KWARGS.get(name, {}))
    return any(hasattr(m, "reparameterize") for m in model.modules())


def measure(name: str, impl: str, amp_dtype, batch: int, size: int, warmup: int, steps: int,
            profile: bool = False, compile_mode: Optional[str] = None, deploy: bool = False,
            inference: bool = True):
    """(train img/s, inference img/s or None, (GPU ms, GPU ops) or None, warm-up s)."""
    if impl == "bound":
        with depthwise_convs_skipped():
            return measure(name, "torch", amp_dtype, batch, size, warmup, steps, profile,
                           compile_mode, deploy, inference)
    set_lk_impl(impl)
    torch.manual_seed(0)
    model = create_model(name, **PAPER_KWARGS.get(name, {}))
    if deploy:
        reparameterize_model(model.eval())
    model = model.cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if compile_mode is not None:
        torch._dynamo.reset()
        model = torch.compile(model, mode=compile_mode)
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    x = torch.randn(batch, 3, size, size, device="cuda")
    target = torch.randint(0, 1000, (batch,), device="cuda")

    def train_step():
        with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def infer_step():
        with torch.no_grad(), torch.autocast("cuda", dtype=amp_dtype or torch.float32,
                                             enabled=amp_dtype is not None):
            model(x)

    model.train()
    step_s, warmup_s = median_step_s(train_step, warmup, steps)
    gpu = gpu_time_ms(train_step) if profile else None
    infer_rate = None
    if inference:
        model.eval()
        infer_s, infer_warmup_s = median_step_s(infer_step, warmup, steps)
        infer_rate, warmup_s = batch / infer_s, warmup_s + infer_warmup_s
    del model, optimizer
    torch.cuda.empty_cache()
    return batch / step_s, infer_rate, gpu, warmup_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="RepLKNet-31B,unireplknet_t,SLaK_tiny")
    parser.add_argument("--lk_impl", default="torch,auto")
    parser.add_argument("--forms", default="train",
                        help="train (the model as built), deploy (re-parameterized), or both")
    parser.add_argument("--amp_dtype", default="bf16", choices=list(AMP))
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", action="store_true",
                        help="also report GPU time and GPU ops of one training step")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="torch.compile the model (every lk_impl alike), in MODE")
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
          f"cuDNN {torch.backends.cudnn.version()} | batch {args.batch_size} | {args.input_size}px | "
          f"amp {args.amp_dtype}" + (f" | torch.compile {args.compile}" if args.compile else ""))
    extra = " train step ms | GPU ms / GPU ops of one step |" if args.profile else ""
    extra += " warm-up s (compiling included) |" if args.compile else ""
    forms = args.forms.split(",")
    if not set(forms) <= {"train", "deploy"}:
        parser.error(f"--forms takes train and/or deploy, got {args.forms!r}")
    print(f"| model | form | lk_impl | train img/s | inference img/s |{extra}\n"
          "|---|---|---|---|---|" + ("---|---|" if args.profile else "")
          + ("---|" if args.compile else ""))
    for name in args.model.split(","):
        base = None
        deployable = "deploy" in forms and has_deploy_form(name)
        runs = itertools.product([f for f in forms if f == "train" or deployable],
                                 args.lk_impl.split(","))
        for form, impl in runs:
            train, infer, gpu, warmup_s = measure(
                name, impl, AMP[args.amp_dtype], args.batch_size, args.input_size, args.warmup,
                args.steps, args.profile, args.compile, deploy=form == "deploy")
            base = base or (train, infer)
            row = (f"| {name} | {form} | {impl} | {train:.1f} ({train / base[0]:.2f}x) | "
                   f"{infer:.1f} ({infer / base[1]:.2f}x) |")
            if gpu is not None:
                row += f" {1e3 * args.batch_size / train:.1f} | {gpu[0]:.1f} / {gpu[1]} |"
            if args.compile:
                row += f" {warmup_s:.0f} |"
            print(row, flush=True)
    set_lk_impl("auto")


if __name__ == "__main__":
    main()
