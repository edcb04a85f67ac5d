"""Area ratios and heatmaps of ERF matrices written by tools/visualize_erf.py.

    python tools/analyze_erf.py --source erf_replknet31b.npy --heatmap_save erf_replknet31b.png
    python tools/analyze_erf.py --compare erf_replknet31b.npy erf_convnext_atto.npy \\
        --labels RepLKNet-31B convnext_atto --heatmap_save erf_compare.png

The analysis is RepLKNet's (CVPR 2022): the matrix M is normalised to
N = log10(M + 1) / max(log10(M + 1)) (the scores span orders of magnitude; the max makes models
comparable), and for each threshold t of 20%, 30%, 50% and 99% the tool finds the smallest centred
square of odd side 2i + 1 (i = 1, 2, ..., centre (h // 2, w // 2)) whose sum of N is more than t of
the sum over the map, and prints

    thresh, rectangle side length, area ratio: t side side^2 / (h * w)

as upstream. Upstream tries squares up to side 2 * (h // 2) - 1 and crashed when none qualified,
which happens when the ERF covers the whole input (small inputs); then the whole map is reported:
side h, area ratio 1.0. A larger area ratio at a threshold means the contributions spread further
from the centre. The heatmap draws N with upstream's colours (seaborn's RdYlGn centred at 0: from
yellow at 0 to green at 1); ``--compare`` draws several matrices side by side on one colour scale,
each with its area ratios.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

import matplotlib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import utils  # noqa: E402
from utils import UserError  # noqa: E402

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
# Upstream drew with seaborn's heatmap(cmap='RdYlGn', center=0) on values in [0, 1], which keeps
# the upper half of RdYlGn (yellow to green); the same colours without seaborn.
CMAP = ListedColormap(matplotlib.colormaps["RdYlGn"](np.linspace(0.5, 1.0, 256)),
                      name="RdYlGn_upper")
PANEL_INCHES = 4.0

Ratio = Tuple[float, int, float]  # (threshold, side, area ratio)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--source", help="an ERF matrix (.npy) from tools/visualize_erf.py")
    sources.add_argument("--compare", nargs="+", metavar="NPY",
                         help="several ERF matrices, drawn side by side")
    parser.add_argument("--heatmap_save", default="heatmap.png",
                        help="the heatmap image to write (default heatmap.png, as upstream)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="a title per matrix (default: the file names without .npy)")
    return parser


def load_matrix(path: str) -> np.ndarray:
    """A square, finite, non-negative 2-D ERF matrix from ``path``, or UserError."""
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} as a .npy array: {err}") from err
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 3:
        raise UserError(f"{path} holds an array of shape {matrix.shape}, not a square ERF "
                        "matrix of side 3 or more")
    if not np.issubdtype(matrix.dtype, np.number) or not np.isfinite(matrix).all() \
            or (matrix < 0).any():
        raise UserError(f"{path} is not an ERF matrix: its values must be finite and >= 0")
    return matrix.astype(np.float64)


def normalize(matrix: np.ndarray) -> np.ndarray:
    """log10(M + 1) / max(log10(M + 1)): values in [0, 1]. ValueError for an all-zero matrix
    (no pixel reached the centre: nothing to normalise by)."""
    scaled = np.log10(matrix + 1.0)
    peak = scaled.max()
    if not peak > 0:
        raise ValueError("the ERF matrix is zero everywhere: no input pixel contributed")
    return scaled / peak


def area_ratios(normalized: np.ndarray, thresholds: Sequence[float] = THRESHOLDS
                ) -> List[Ratio]:
    """(t, side, area ratio) per threshold t: the smallest centred square of side 2i + 1,
    1 <= i < h // 2, holding more than t of the sum of ``normalized`` (see the module
    docstring; the whole map, (t, h, 1.0), when none does)."""
    height, width = normalized.shape
    # Pixel (r, c) lies in the centred square of half-side i when its Chebyshev distance to
    # the centre is at most i, so the squares' sums are the cumulative sums over that distance.
    rows = np.abs(np.arange(height) - height // 2)
    cols = np.abs(np.arange(width) - width // 2)
    distance = np.maximum.outer(rows, cols).ravel()
    inside = np.cumsum(np.bincount(distance, weights=normalized.ravel()))
    fraction = inside / inside[-1]
    result = []
    for thresh in thresholds:
        half_sides = [i for i in range(1, height // 2) if fraction[i] > thresh]
        if half_sides:
            side = 2 * half_sides[0] + 1
            result.append((thresh, side, side / height * side / width))
        else:
            result.append((thresh, height, 1.0))
    return result


def analyze(path: str) -> Tuple[np.ndarray, List[Ratio]]:
    """Print the max, min and area ratios of the matrix at ``path``; return (N, ratios)."""
    matrix = load_matrix(path)
    try:
        normalized = normalize(matrix)
    except ValueError as err:
        raise UserError(f"{path}: {err}") from err
    ratios = area_ratios(normalized)
    print(f"{path}: {matrix.shape[0]}x{matrix.shape[1]}, max {matrix.max():.6g}, "
          f"min {matrix.min():.6g}")
    for thresh, side, ratio in ratios:
        print(f"thresh, rectangle side length, area ratio: {thresh} {side} {ratio:.6g}")
    return normalized, ratios


def draw_heatmaps(panels: Sequence[Tuple[str, np.ndarray, List[Ratio]]], path: str) -> None:
    """One heatmap per (title, normalized matrix, ratios), side by side on one colour scale,
    written to ``path`` (the format follows its extension: .png, .pdf, .svg, ...)."""
    fig = Figure(figsize=(PANEL_INCHES * len(panels), PANEL_INCHES + 1.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, normalized, ratios) in zip(axes, panels):
        image = ax.imshow(normalized, cmap=CMAP, vmin=0.0, vmax=1.0, interpolation="antialiased")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title)
        ax.set_xlabel("area ratio at " + ", ".join(f"{t:.0%}: {r:.2%}" for t, _, r in ratios[:2])
                      + "\n" + ", ".join(f"{t:.0%}: {r:.2%}" for t, _, r in ratios[2:]),
                      fontsize=9)
    fig.colorbar(image, ax=list(axes), location="top", shrink=0.6 if len(panels) > 1 else 0.9,
                 label="log10(M + 1), normalised by its max")
    try:
        fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.1)
    except (OSError, ValueError) as err:  # a missing folder, an extension matplotlib lacks
        raise UserError(f"cannot write {path}: {err}") from err


def main(argv: Optional[List[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)

    def run() -> None:
        paths = [args.source] if args.source else args.compare
        if args.labels is not None and len(args.labels) != len(paths):
            raise UserError(f"--labels gives {len(args.labels)} title(s) for {len(paths)} "
                            "matrices")
        titles = args.labels or [os.path.splitext(os.path.basename(p))[0] for p in paths]
        panels = []
        for path, title in zip(paths, titles):
            normalized, ratios = analyze(path)
            panels.append((title, normalized, ratios))
        draw_heatmaps(panels, args.heatmap_save)
        print(f"wrote {args.heatmap_save}")

    return utils.exit_status(run)


if __name__ == "__main__":
    sys.exit(main())
