"""Distillation on the embedded Fashion-MNIST, CPU: a convnext_atto student trained on 2,000
images with KD or NKD from a teacher, against the same student trained alone for the same steps.

    python benchmarks/distill_fashion_mnist.py [--seed 0] [--out output/distill_bench_seed0]
        [--json benchmarks/results/distill_fashion_mnist_seed0.json]

The teacher is a convnext_atto trained by main.py on 10,000 images (a better model through more
data); the three students see the same 2,000 images in the same order, with the same seed and
recipe (32 px, no RandAugment / random erasing / mixup, label smoothing 0.1), and are scored on
the same 2,000 test images. Every run is one process with OMP_NUM_THREADS=1 and 2 loader
workers (as `make demo`); on 2 cores the whole benchmark takes about 7 minutes. The JSON holds
each command, the accuracy after every epoch, wall times, the date and the machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--device", "cpu", "--input_size", "32", "--batch_size", "64", "--num_workers", "2",
          "--lr", "2e-3", "--warmup_epochs", "1", "--aa", "none", "--reprob", "0",
          "--mixup", "0", "--cutmix", "0", "--eval_subset", "2000"]
STUDENT = ["--train_subset", "2000", "--epochs", "3"]


def run(script: str, argv: List[str], out: str) -> Dict[str, Any]:
    """One training command from scratch in ``out``; its per-epoch log and wall time."""
    argv = argv + ["--output_dir", out]
    command = f"OMP_NUM_THREADS=1 python {script} {shlex.join(argv)}"
    print(command, flush=True)
    if os.path.isdir(out) and os.listdir(out):
        sys.exit(f"{out} is not empty: the benchmark starts every run from scratch")
    start = time.perf_counter()
    subprocess.run([sys.executable, script, *argv], cwd=ROOT, check=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    with open(os.path.join(ROOT, out, "log.txt")) as f:
        log = [json.loads(line) for line in f]
    acc = [round(row["test_acc1"], 2) for row in log]
    print(f"  test acc@1 per epoch: {acc}; {wall:.0f} s", flush=True)
    return {"command": command, "test_acc1_per_epoch": acc, "test_acc1": acc[-1],
            "wall_s": round(wall, 1)}


def machine() -> str:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", default=0, type=int, help="of every run, teacher included")
    parser.add_argument("--out", default=None, help="default: output/distill_bench_seed<SEED>")
    parser.add_argument("--json", default=None, help="default: "
                        "benchmarks/results/distill_fashion_mnist_seed<SEED>.json")
    args = parser.parse_args()
    args.out = args.out or f"output/distill_bench_seed{args.seed}"
    args.json = args.json or f"benchmarks/results/distill_fashion_mnist_seed{args.seed}.json"
    common = COMMON + ["--seed", str(args.seed)]
    teacher_dir = os.path.join(args.out, "teacher")
    teacher_ckpt = os.path.join(teacher_dir, "checkpoint-1.pth")
    distil = ["--model", "convnext_atto", "--resume", teacher_ckpt, "--model_s", "convnext_atto"]
    start = time.perf_counter()
    runs = {
        "teacher": run("main.py", ["--model", "convnext_atto", "--train_subset", "10000",
                                   "--epochs", "2", *common], teacher_dir),
        "student_alone": run("main.py", ["--model", "convnext_atto", *STUDENT, *common],
                             os.path.join(args.out, "alone")),
        "student_kd": run("main_KD.py", [*distil, "--distill_type", "KD", "--T", "4",
                                         "--alpha", "0.5", *STUDENT, *common],
                          os.path.join(args.out, "kd")),
        "student_nkd": run("main_KD.py", [*distil, "--distill_type", "NKD", "--T", "1",
                                          "--gamma", "1.5", *STUDENT, *common],
                           os.path.join(args.out, "nkd")),
    }
    result = {
        "benchmark": "benchmarks/distill_fashion_mnist.py",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "python": platform.python_version(), "torch": torch.__version__,
        "total_wall_s": round(time.perf_counter() - start, 1),
        "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.json)), exist_ok=True)
    with open(os.path.join(ROOT, args.json), "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps({name: r["test_acc1"] for name, r in runs.items()}))


if __name__ == "__main__":
    main()
