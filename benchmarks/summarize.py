"""The depthwise-conv table of benchmarks/RESULTS.md from benchmarks/dwconv.py --jsonl output.

    python benchmarks/summarize.py benchmarks/results/dwconv_16bit.jsonl \\
        benchmarks/results/dwconv_fp32.jsonl

One row per shape: for bf16 and fp32, ours (NCHW) forward + backward, the best of torch's NCHW and
channels_last paths, the speed-up, and ours against the useful-SIMT floor dwconv.py computed. The
JSON lines hold every direction, fp16 and the channels_last timings of ours as well.
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Tuple


def _load(paths: List[str]) -> Tuple[List[str], Dict[tuple, dict]]:
    order, rows = [], {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r["shape"] not in order:
                    order.append(r["shape"])
                rows[(r["shape"], r["dtype"], r["layout"], r["impl"])] = r
    return order, rows


def _cells(rows: Dict[tuple, dict], shape: str, dtype: str, with_floor: bool) -> List[str]:
    ours = rows.get((shape, dtype, "nchw", "ours"))
    theirs = [rows.get((shape, dtype, layout, "torch")) for layout in ("nchw", "nhwc")]
    best: Optional[float] = min((r["f+b"] for r in theirs if r is not None), default=None)
    if ours is None or best is None:
        return ["—"] * (4 if with_floor else 3)
    cells = [f"{ours['f+b']:.3f}", f"{best:.3f}", f"{best / ours['f+b']:.1f}x"]
    if with_floor:
        cells.append(f"{100 * ours['useful_fb'] / ours['f+b']:.0f}%")
    return cells


def table(paths: List[str]) -> str:
    order, rows = _load(paths)
    out = ["| shape (N, C, HxW, k) | bf16 ours | bf16 best torch | speed-up | % of useful-SIMT floor "
           "| fp32 ours | fp32 best torch | speed-up |", "|---|---|---|---|---|---|---|---|"]
    for shape in order:
        ref = next(r for key, r in rows.items() if key[0] == shape)
        kh, kw = ref["k"]
        cells = _cells(rows, shape, "bf16", True) + _cells(rows, shape, "fp32", False)
        out.append(f"| {shape} ({ref['N']}, {ref['C']}, {ref['H']}x{ref['H']}, {kh}x{kw}) | "
                   + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("jsonl", nargs="+")
    print(table(parser.parse_args().jsonl))


if __name__ == "__main__":
    main()
