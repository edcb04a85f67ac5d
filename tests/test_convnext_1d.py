"""ConvNeXt with oriented 1D kernels: upstream keys, theta values, param counts, flags."""
import argparse
import json
import math
import os

import pytest
import torch

import models
from models.convnext import ConvNeXt
from models.convnext_1d import ConvNeXt1D
from tools.count import count as count_flops

SNAPSHOTS = os.path.join(os.path.dirname(__file__), "snapshots")
VARIANTS = ("2d", "1d", "1dpp", "2dpp")
# Parameter counts (theta included) of princeton-vl/Oriented1D's models/convnext.py.
PARAMS_M = {("tiny", "2d"): 28.59, ("tiny", "1d"): 28.48, ("tiny", "1dpp"): 29.25,
            ("tiny", "2dpp"): 29.46, ("base", "2d"): 88.59, ("base", "1d"): 88.29,
            ("base", "1dpp"): 90.38, ("base", "2dpp"): 90.97}
# FLOPs (G) at 224x224 from the "Image Classification / Results" table of princeton-vl/Oriented1D
# README.md (ConvNeXt-T/B (rep.), -1D, -1D++, -2D++). Upstream counts them with fvcore and counts
# each oriented conv as C * H_out * W_out * S multiply-accumulates, as tools/count.py does.
README_GFLOPS = {("tiny", "2d"): 4.5, ("tiny", "1d"): 4.4, ("tiny", "1dpp"): 4.7,
                 ("tiny", "2dpp"): 4.8, ("base", "2d"): 15.4, ("base", "1d"): 15.3,
                 ("base", "1dpp"): 15.8, ("base", "2dpp"): 15.9}


def _snapshot(size, variant):
    with open(os.path.join(SNAPSHOTS, f"convnext_1d_{size}_{variant}.json")) as f:
        return json.load(f)


def _build(size, variant, device="meta"):
    with torch.device(device):
        return models.create_model(f"convnext_{size}", variant=variant)


def _rle(values):
    runs = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return runs


@pytest.mark.parametrize("size", ["tiny", "base"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_keys_shapes_order_and_params_match_upstream(size, variant):
    model = _build(size, variant)
    expected = _snapshot(size, variant)
    assert [[k, list(v.shape)] for k, v in model.state_dict().items()] == expected["keys"]
    count = sum(p.numel() for p in model.parameters())
    assert count == expected["params"]
    assert round(count / 1e6, 2) == PARAMS_M[(size, variant)]


@pytest.mark.parametrize("size", ["tiny", "base"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_flops_match_the_readme_table(size, variant):
    result = count_flops(f"convnext_{size}", variant=variant)
    assert result["train"][1] / 1e9 == pytest.approx(README_GFLOPS[size, variant], rel=0.02)
    assert round(result["train"][0] / 1e6, 2) == PARAMS_M[size, variant]
    assert result["deploy"] == result["train"]  # nothing to re-parameterize


@pytest.mark.parametrize("variant", ["1d", "1dpp", "2dpp"])
def test_theta_values_match_upstream(variant):
    model = _build("tiny", variant, device="cpu")
    expected = _snapshot("tiny", variant)["theta"]
    got = {k: _rle(v.tolist()) for k, v in model.state_dict().items() if k.endswith(".theta")}
    assert got == expected
    # 8 orientations per layer; odd blocks are rotated by +90 degrees.
    first = model.stages[0][0]
    conv = first.dwconv if variant == "1d" else first.dwconv2
    assert len(set(conv.theta.tolist())) == 8
    even = model.stages[2][0].state_dict()
    odd = model.stages[2][1].state_dict()
    key = "dwconv.theta" if variant == "1d" else "dwconv2.theta"
    torch.testing.assert_close((even[key] + math.pi / 2) % math.pi, odd[key] % math.pi)


def test_registered_names_and_variant_kwarg_agree():
    assert isinstance(models.create_model("convnext_tiny"), ConvNeXt)
    with torch.device("meta"):
        via_kwarg = models.create_model("convnext_base", variant="1dpp")
        via_name = models.create_model("convnext_base_1dpp")
    assert isinstance(via_kwarg, ConvNeXt1D) and via_kwarg.variant == "1dpp"
    assert list(via_kwarg.state_dict()) == list(via_name.state_dict())
    for name in ("convnext_tiny_1d", "convnext_tiny_1dpp", "convnext_tiny_2d", "convnext_tiny_2dpp",
                 "convnext_base_1d", "convnext_base_2d", "convnext_base_2dpp"):
        assert name in models.list_models()
    assert models.get_family("convnext_tiny_1d").layer_id_for("downsample_layers.0.dw1.weight") == 0
    with pytest.raises(ValueError, match="variant must be one of"):
        models.create_model("convnext_tiny", variant="3d")


def test_variant_flag_through_the_family_hooks():
    parser = argparse.ArgumentParser()
    models.add_family_args(parser)
    args = parser.parse_args(["--variant", "1d"])
    args.model = "convnext_tiny"
    assert models.family_kwargs("convnext_tiny", args) == {"variant": "1d"}
    args = parser.parse_args([])
    args.model = "convnext_small"
    assert models.family_kwargs("convnext_small", args) == {}
    args = parser.parse_args(["--variant", "2dpp"])
    args.model = "convnext_small"
    with pytest.raises(ValueError, match="convnext_tiny and convnext_base"):
        models.family_kwargs("convnext_small", args)
    with pytest.raises(SystemExit):
        parser.parse_args(["--variant", "3d"])


def test_upstream_drop_path_defaults():
    with torch.device("meta"):
        tiny = models.create_model("convnext_tiny_1d")
        base = models.create_model("convnext_base_1d")
        fixed = models.create_model("convnext_tiny_1d", drop_path_rate=0.3)
    assert tiny.stages[3][2].drop_path.drop_prob == pytest.approx(0.1)
    assert base.stages[3][2].drop_path.drop_prob == pytest.approx(0.5)
    assert fixed.stages[3][2].drop_path.drop_prob == pytest.approx(0.3)


@pytest.mark.parametrize("variant", ["1d", "1dpp", "2dpp"])
def test_small_model_trains_and_theta_stays_frozen(variant):
    torch.manual_seed(0)
    model = ConvNeXt1D(variant, num_classes=4, depths=(1, 2, 1, 1), dims=(8, 16, 16, 16))
    thetas = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("theta")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1)
    # 45 x 38 is not a multiple of the stem's stride: upstream needs its slow forward_safe.
    x = torch.randn(2, 3, 45, 38)
    out = model(x)
    assert out.shape == (2, 4)
    torch.nn.functional.cross_entropy(out, torch.tensor([0, 3])).backward()
    optimizer.step()
    for name, value in model.state_dict().items():
        if name.endswith("theta"):
            assert torch.equal(value, thetas[name])
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("theta"))
    # The 1D stem (two stride-2 oriented convs) rounds up, the 4x4/s4 conv stem down.
    expected = (12, 10) if variant in ("1d", "1dpp") else (11, 9)
    assert model.downsample_layers[0](x).shape[-2:] == expected


def _tool():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools",
                        "convert_to_backbone_weights.py")
    spec = importlib.util.spec_from_file_location("convert_to_backbone_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["1d", "1dpp", "2dpp"])
def test_backbone_conversion_renames_and_centre_crops(variant):
    tool = _tool()
    torch.manual_seed(0)
    state = models.create_model("convnext_tiny", variant=variant).state_dict()
    out = tool.convert(state, variant)
    assert len(out) == len(state)
    sizes = tool.BACKBONE_KERNELS[variant]
    for stage in range(4):
        name = "dwconv" if variant == "1d" else "dwconv2"
        src = state[f"stages.{stage}.1.{name}.weight"]
        dst = out[f"stages.{stage}.1.{name}.conv.weight"]
        size = sizes[stage][-1]
        assert dst.shape == (src.shape[0], 1, 1, size)
        start = (src.shape[-1] - size) // 2
        assert torch.equal(dst, src[..., start:start + size])
        assert torch.equal(out[f"stages.{stage}.1.{name}.conv.theta"],
                           state[f"stages.{stage}.1.{name}.theta"])
        assert f"stages.{stage}.1.{name}.weight" not in out
    if variant == "2dpp":  # the 7x7 conv is not wrapped downstream: unchanged
        assert torch.equal(out["stages.0.0.dwconv1.weight"], state["stages.0.0.dwconv1.weight"])
    else:  # the stem keeps its kernels, only renamed
        assert torch.equal(out["downsample_layers.0.dw1.conv.weight"],
                           state["downsample_layers.0.dw1.weight"])
    assert torch.equal(out["head.weight"], state["head.weight"])


def test_backbone_conversion_cli(tmp_path, capsys):
    tool = _tool()
    torch.manual_seed(0)
    state = models.create_model("convnext_tiny_1d", num_classes=10).state_dict()
    src = tmp_path / "convnext_tiny_1d_best_ema.pth"
    torch.save({"model": state, "epoch": 3}, src)
    out_dir = tmp_path / "backbones"
    assert tool.main(["--model", "convnext_tiny", "--variant", "1d", "--checkpoint", str(src),
                      "--output_dir", str(out_dir)]) == 0
    assert sorted(os.listdir(out_dir)) == ["convnext_tiny_1d_best_ema.pth"]
    converted = torch.load(out_dir / "convnext_tiny_1d_best_ema.pth")
    assert converted["stages.3.2.dwconv.conv.weight"].shape == (768, 1, 1, 13)
    assert converted["stages.0.0.dwconv.conv.weight"].shape == (96, 1, 1, 31)
    # A checkpoint of another variant is refused with the mismatch named.
    assert tool.main(["--model", "convnext_tiny", "--variant", "1dpp", "--checkpoint", str(src),
                      "--output_dir", str(out_dir)]) == 2
    assert "not a convnext_tiny --variant 1dpp checkpoint" in capsys.readouterr().err


def test_backbone_conversion_leaves_2d_untouched():
    state = {"stages.0.0.dwconv.weight": torch.randn(4, 1, 7, 7), "head.bias": torch.zeros(3)}
    out = _tool().convert(state, "2d")
    assert out.keys() == state.keys() and all(torch.equal(out[k], state[k]) for k in state)
