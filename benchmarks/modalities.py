"""What each non-image --data_set reaches through main.py: accuracy, or MSE/MAE against the naive
last-value forecast. A benchmark, not a test: short CPU runs of a tiny backbone, one process.

    python benchmarks/modalities.py [--data_sets co2,gunpoint,...] [--epochs 5]
        [--json benchmarks/results/modalities_cpu.json]

Each run is ``main.py --model unireplknet_a --data_set NAME --device cpu`` with the flags below
(recorded with its result); the table printed at the end goes into benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Per data set: flags beyond the common ones (a small window / view for the CPU).
FLAGS: Dict[str, List[str]] = {
    "co2": ["--input_size", "32", "--pred_len", "24"],
    "macrodata": ["--input_size", "16", "--pred_len", "4"],
    "gunpoint": ["--mixup", "0"],       # 50 / 40 training series: 3 / 2 steps an epoch
    "basicmotions": ["--mixup", "0"],
    "japanese_vowels": [],
    "synthetic_video": ["--input_size", "16", "--train_subset", "256"],
    "synthetic_points": ["--input_size", "32", "--train_subset", "256"],
}
# Epochs where the default (--epochs) is too few steps for the data set's size.
EPOCHS = {"gunpoint": 30, "basicmotions": 30}
COMMON = ["--model", "unireplknet_a", "--device", "cpu", "--batch_size", "16", "--num_workers",
          "2", "--lr", "1e-3", "--warmup_epochs", "1", "--seed", "0"]


def run(name: str, epochs: int) -> Dict:
    with tempfile.TemporaryDirectory() as out:
        argv = COMMON + ["--data_set", name, "--epochs", str(epochs), "--output_dir", out] + \
            FLAGS[name]
        start = time.time()
        done = subprocess.run([sys.executable, os.path.join(ROOT, "main.py")] + argv,
                              capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, OMP_NUM_THREADS="2"))
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed: {done.stderr[-2000:]}")
        with open(os.path.join(out, "log.txt")) as f:
            last = [json.loads(line) for line in f][-1]
    metrics = {k: round(v, 5) for k, v in last.items() if k.startswith("test_")}
    return {"data_set": name, "command": "python main.py " + " ".join(
        a for a in argv if a != out and a != "--output_dir"), "epochs": epochs,
        "wall_s": round(time.time() - start, 1), **metrics}


def table(rows: List[Dict]) -> str:
    lines = ["| --data_set | epochs | result | naive last value | CPU wall s |",
             "|---|---|---|---|---|"]
    for r in rows:
        if "test_mse" in r:
            result = f"MSE {r['test_mse']:.4f}, MAE {r['test_mae']:.4f}"
            naive = f"MSE {r['test_naive_mse']:.4f}, MAE {r['test_naive_mae']:.4f}"
        else:
            result, naive = f"top-1 {r['test_acc1']:.2f}%", "—"
        lines.append(f"| {r['data_set']} | {r['epochs']} | {result} | {naive} | {r['wall_s']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data_sets", default=",".join(FLAGS))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for name in args.data_sets.split(","):
        rows.append(run(name, EPOCHS.get(name, args.epochs)))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
