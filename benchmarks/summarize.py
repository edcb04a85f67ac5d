"""Per-shape table for benchmarks/RESULTS.md from the JSON lines of benchmarks/dwconv.py --jsonl.

    python benchmarks/summarize.py benchmarks/results/dwconv_16bit.jsonl benchmarks/results/dwconv_fp32.jsonl

One row per (shape, dtype): ours and torch per layout, best torch over layouts against ours in
NCHW (f+b), and the floors dwconv.py computed.
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Optional, Tuple


def _load(paths: List[str]) -> Tuple[List[Tuple[str, str]], Dict[tuple, dict]]:
    order, rows = [], {}
    for path in paths:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                key = (r["shape"], r["dtype"])
                if key not in order:
                    order.append(key)
                rows[key + (r["layout"], r["impl"])] = r
    return order, rows


def _dirs(r: Optional[dict]) -> str:
    if r is None:
        return "—"
    return " / ".join(f"{r[d]:.3f}" for d in ("fwd", "dgrad", "wgrad", "f+b"))


def _fb(r: Optional[dict]) -> str:
    return "—" if r is None else f"{r['f+b']:.3f}"


def table(paths: List[str]) -> str:
    order, rows = _load(paths)
    out = ["| shape (N, C, HxW, k) | dtype | ours NCHW fwd / dgrad / wgrad / f+b | ours channels_last "
           "f+b | torch NCHW fwd / dgrad / wgrad / f+b | torch channels_last f+b | best torch / ours "
           "(f+b) | floor f+b | useful-SIMT floor f+b | ours % of useful floor |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for shape, dtype in order:
        get = lambda layout, impl: rows.get((shape, dtype, layout, impl))  # noqa: E731
        ours, ours_cl = get("nchw", "ours"), get("nhwc", "ours")
        torch_nchw, torch_cl = get("nchw", "torch"), get("nhwc", "torch")
        ref = ours or ours_cl
        if ref is None:
            continue
        best_torch = min((r["f+b"] for r in (torch_nchw, torch_cl) if r is not None), default=None)
        ratio = f"{best_torch / ours['f+b']:.1f}x" if best_torch and ours else "—"
        useful = f"{100 * ref['useful_fb'] / ours['f+b']:.0f}%" if ours else "—"
        kh, kw = ref["k"]
        out.append(f"| {shape} ({ref['N']}, {ref['C']}, {ref['H']}x{ref['H']}, {kh}x{kw}) | {dtype} | "
                   f"{_dirs(ours)} | {_fb(ours_cl)} | {_dirs(torch_nchw)} | {_fb(torch_cl)} | {ratio} | "
                   f"{ref['floor_fb']:.3f} | {ref['useful_fb']:.3f} | {useful} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("jsonl", nargs="+")
    print(table(parser.parse_args().jsonl))


if __name__ == "__main__":
    main()
