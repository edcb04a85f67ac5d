"""Host synchronisations per training epoch of engine.train_one_epoch on CUDA, and its time.

    python benchmarks/host_syncs.py [--model convnext_atto] [--iters 40] [--update_freq 1]
        [--print_freq 10] [--engine path/to/engine.py]

torch.cuda.set_sync_debug_mode("warn") makes every operation that waits for the GPU (.item(),
.tolist(), torch.cuda.synchronize(), a device-to-host copy) issue a warning; this counts them
over one epoch of synthetic batches (bf16 autocast, AdamW, the ConvNeXt-style param groups, an
lr schedule and a TensorBoard-less run). --engine times another copy of engine.py (e.g. an older
commit's: `git show REV:engine.py > /tmp/engine_old.py`) side by side in the same process.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import engine as current_engine  # noqa: E402
import kernels.plan  # noqa: E402
import models  # noqa: E402
import utils  # noqa: E402


def load_engine(path: str):
    spec = importlib.util.spec_from_file_location("engine_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_epoch(engine, args) -> tuple:
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = models.create_model(args.model, num_classes=10).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = [(torch.randn(args.batch_size, 3, args.input_size, args.input_size),
                torch.randint(0, 10, (args.batch_size,))) for _ in range(args.iters)]
    steps = args.iters // args.update_freq
    schedule = np.linspace(1e-3, 1e-4, steps)
    kwargs = dict(num_training_steps_per_epoch=steps, update_freq=args.update_freq,
                  amp_dtype=torch.bfloat16, print_freq=args.print_freq,
                  lr_schedule_values=schedule)
    scaler = utils.LossScaler(False, "cuda")
    criterion = torch.nn.CrossEntropyLoss()
    engine.train_one_epoch(model, criterion, batches[:4], optimizer, device, 0, scaler,
                           **{**kwargs, "num_training_steps_per_epoch": 4 // args.update_freq})
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        start = time.perf_counter()
        stats = engine.train_one_epoch(model, criterion, batches, optimizer, device, 1, scaler,
                                       **kwargs)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        torch.cuda.set_sync_debug_mode("default")
    syncs = sum("synchronizing" in str(w.message) for w in caught)
    return syncs, elapsed, stats["loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="convnext_atto")
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--update_freq", type=int, default=1)
    parser.add_argument("--print_freq", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--input_size", type=int, default=224)
    parser.add_argument("--engine", default=None, help="another engine.py to count alongside")
    args = parser.parse_args()
    kernels.plan.set_lk_impl("torch")  # the loop is under test, not the conv: no build needed
    engines = [("current", current_engine)]
    if args.engine:
        engines.append((args.engine, load_engine(args.engine)))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.model}, batch "
          f"{args.batch_size} x {args.input_size}px, bf16, {args.iters} iterations, update_freq "
          f"{args.update_freq}, print_freq {args.print_freq}")
    for name, engine in engines:
        syncs, elapsed, loss = one_epoch(engine, args)
        print(f"{name}: {syncs} host syncs, {elapsed * 1e3 / args.iters:.2f} ms/iteration, "
              f"mean loss {loss:.6f}")


if __name__ == "__main__":
    main()
