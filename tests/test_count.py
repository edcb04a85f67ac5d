"""tools/count.py: family flags on the command line, oriented convs counted by taps, sparsity."""
import math

import pytest
import torch
import torch.nn as nn

from models.oriented_conv import OrientedConv1d
from tools.count import _oriented_output, count_macs, count_params, main

SLAK_FLAGS = ["--kernel_size", "51", "49", "47", "13", "5", "--width_factor", "1.3",
              "--Decom", "true"]


def _rows(out):
    """{form: (params, params (M), GFLOPs)} from the printed table."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] in ("train", "deploy"):
            rows[parts[0]] = (int(parts[1].replace(",", "")), float(parts[2]), float(parts[3]))
    return rows


def test_cli_takes_slak_flags(capsys):
    assert main(["--model", "SLaK_tiny", *SLAK_FLAGS]) == 0
    out = capsys.readouterr().out
    assert "kernel_size=[51, 49, 47, 13, 5] width_factor=1.3 Decom=True" in out
    rows = _rows(out)
    assert rows["train"][0] == 50_703_838  # upstream's dense SLaK_tiny with the official flags
    assert set(rows) == {"train", "deploy"}


def test_cli_sparsity_counts_the_training_form_only(capsys):
    assert main(["--model", "SLaK_base", *SLAK_FLAGS, "--sparsity", "0.4"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert set(rows) == {"train"}
    assert round(rows["train"][1]) == 95  # SLaK README: SLaK-B 95M
    assert rows["train"][2] == pytest.approx(17.1, rel=0.02)  # SLaK README: 17.1G


def test_cli_takes_the_oriented_variant(capsys):
    assert main(["--model", "convnext_tiny", "--variant", "1d"]) == 0
    out = capsys.readouterr().out
    assert "variant=1d" in out
    assert _rows(out)["train"][1] == 28.48


@pytest.mark.parametrize("argv,message", [
    (["--model", "convnext_small", "--variant", "1d"], "convnext_tiny and convnext_base"),
    (["--model", "SLaK_tiny", "--sparsity", "1"], "--sparsity must be in"),
    (["--model", "SLaK_tiny", "--kernel_size", "51", "49"], "5 ints"),
    (["--model", "convnext_tiny", "--input_size", "16"], "--input_size must be >= 32"),
    (["--model", "SLaK_tinny"], "Did you mean: SLaK_tiny"),
])
def test_cli_names_bad_input(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("stride,size", [(1, 32), (2, 33), (2, 40)])
def test_oriented_conv_counts_its_taps_not_the_zeros_of_its_2d_kernel(stride, size):
    channels, taps = 8, 7
    # 45 degrees: the op runs a 5 x 5 sparse kernel, 25 MACs per output instead of 7.
    conv = OrientedConv1d(channels, taps, stride=stride, angle=math.pi / 4)
    model = nn.Sequential(nn.Conv2d(3, channels, 1, bias=False), conv)
    out_side = -(-size // stride)
    assert count_macs(model, size) == 3 * channels * size * size \
        + channels * out_side * out_side * taps
    assert "forward" not in vars(conv)  # the stand-in is gone: the real op runs again
    y = model(torch.randn(1, 3, size, size))
    assert y.shape == (1, channels, out_side, out_side) and y.abs().sum() > 0


@pytest.mark.parametrize("nhwc", [False, True])
def test_the_shape_only_stand_in_matches_the_real_op(nhwc):
    conv = OrientedConv1d(4, 5, stride=2, angle=[0.0, 0.5, 1.0, 2.0], nhwc=nhwc)
    x = torch.randn(2, 4, 13, 10)
    if nhwc:
        x = x.permute(0, 2, 3, 1).contiguous()
    assert _oriented_output(conv, x).shape == conv(x).shape


def test_density_scales_conv_and_linear_weights_only():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Flatten(),
                          nn.Linear(8 * 32 * 32, 10))
    weights = 3 * 8 * 9 + 8 * 32 * 32 * 10
    others = 8 + 2 * 8 + 10  # conv bias, BN affine, linear bias
    assert count_params(model) == weights + others
    assert count_params(model, density=0.5) == weights // 2 + others
    dense = count_macs(model, 32)
    assert dense == 3 * 8 * 9 * 32 * 32 + 8 * 32 * 32 * 10
    assert count_macs(model, 32, density=0.5) == dense // 2
