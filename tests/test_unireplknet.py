"""UniRepLKNet: upstream-exact keys, parameter counts, FLOPs, re-parameterization, layer decay,
and the deploy-checkpoint path through tools/reparameterize.py and main.py."""
import json
import os

import pytest
import timm
import torch
import torch.nn as nn

from models import create_model, get_family, list_models
from models.convnext import convnext_layer_id
from models.layers import DepthwiseConv2d
from models.unireplknet import (DILATED_BRANCHES, GRN, DilatedReparamBlock, UniRepLKNet,
                                UniRepLKNetBlock)
from optim_factory import get_parameter_groups, layer_scales
from test_reparam import (assert_checkpointing_keeps_gradients, assert_keys_equal_upstream,
                          assert_param_counts, perturb_, reparam_equivalence, rel_err)
from tools.count import count
from tools.reparameterize import main as reparameterize_main

SNAPSHOT = os.path.join(os.path.dirname(__file__), "snapshots", "unireplknet.json")
with open(SNAPSHOT) as f:
    UPSTREAM = json.load(f)["models"]

NAMES = [f"unireplknet_{s}" for s in ("a", "f", "p", "n", "t", "s", "b", "l", "xl")]
# Upstream (facts file, verified): parameters in millions, training form / deploy form.
PARAMS_M = {"unireplknet_a": (4.65, 4.44), "unireplknet_f": (6.49, 6.24),
            "unireplknet_p": (11.08, 10.74), "unireplknet_n": (18.82, 18.32),
            "unireplknet_t": (31.69, 31.04), "unireplknet_s": (56.46, 55.65),
            "unireplknet_b": (99.09, 98.01), "unireplknet_l": (220.08, 218.45),
            "unireplknet_xl": (388.69, 386.53)}
# UniRepLKNet README: FLOPs (multiply-accumulates) at the released resolutions.
PAPER_GFLOPS = {("unireplknet_a", 224): 0.6, ("unireplknet_n", 224): 2.8,
                ("unireplknet_t", 224): 4.9, ("unireplknet_s", 224): 9.1,
                ("unireplknet_b", 384): 47.2}
SMALL = dict(depths=(1, 1, 2, 1), dims=(16, 32, 32, 48),
             kernel_sizes=((17,), (15,), (11, 3), (7,)))


def test_registry_names_and_family():
    assert list_models(family="unireplknet") == sorted(NAMES)
    family = get_family("unireplknet_t")
    assert family.layer_id_for is convnext_layer_id and family.num_layers == 12
    with torch.device("meta"):
        assert isinstance(timm.create_model("unireplknet_a"), UniRepLKNet)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes_equal_upstream(name):
    assert_keys_equal_upstream(name, UPSTREAM)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_equal_upstream(name):
    assert_param_counts(name, UPSTREAM, PARAMS_M)


@pytest.mark.parametrize("name,size", sorted(PAPER_GFLOPS))
def test_flops_match_the_paper(name, size):
    result = count(name, input_size=size)
    paper = PAPER_GFLOPS[name, size]
    # The README rounds to one decimal; 0.6G (A) is only known to +-0.05G.
    assert result["deploy"][1] / 1e9 == pytest.approx(paper, rel=0.02, abs=0.05)
    assert result["deploy"][0] == UPSTREAM[name]["params"][1]
    assert result["train"][1] > result["deploy"][1]


def test_large_kernels_use_the_shared_entry_point_and_branches_are_dilated_convs():
    with torch.device("meta"):
        model = create_model("unireplknet_t")
    blocks = [m for m in model.modules() if isinstance(m, DilatedReparamBlock)]
    assert len(blocks) == 3 + 9 + 3
    for block in blocks:
        assert type(block.lk_origin) is DepthwiseConv2d and block.lk_origin.kernel_size == (13, 13)
        dilated = [m for n, m in block.named_children() if n.startswith("dil_conv_")]
        assert [(m.kernel_size[0], m.dilation[0]) for m in dilated] == list(DILATED_BRANCHES[13])
        assert all(type(m) is DepthwiseConv2d and m.bias is None for m in dilated)
        assert [m.padding[0] for m in dilated] == [r * (k - 1) // 2 for k, r in DILATED_BRANCHES[13]]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_reparameterized_unireplknet_a_computes_the_same_logits_and_loads_strictly(dtype, tol):
    before, after, model, x = reparam_equivalence(
        create_model("unireplknet_a", num_classes=10), dtype)
    assert before.dtype == dtype and before.std() > 0.1
    assert rel_err(after, before) < tol
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(b.gamma is None and not hasattr(b.act[1], "beta")
               for b in model.modules() if isinstance(b, UniRepLKNetBlock))
    deploy = create_model("unireplknet_a", num_classes=10, deploy=True).to(dtype).eval()
    deploy.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(deploy(x), after) < tol * 1e-2


def test_every_branch_table_and_small_kernels_reparameterize_exactly():
    # Kernel sizes 17, 15, 11, 9 and 7 are not in any released model; 0 means no dwconv.
    before, after, _, _ = reparam_equivalence(UniRepLKNet(**SMALL, num_classes=5),
                                              torch.float64, size=96)
    assert rel_err(after, before) < 1e-10
    for k in (0, 3, 5, 9):
        torch.manual_seed(k)
        block = perturb_(UniRepLKNetBlock(8, k)).double().eval()
        x = torch.randn(2, 8, 20, 20, dtype=torch.float64)
        with torch.no_grad():
            y = block(x)
            block.reparameterize()
            assert rel_err(block(x), y) < 1e-12, k
        assert set(block.state_dict()) == set(UniRepLKNetBlock(8, k, deploy=True).state_dict())


@pytest.mark.parametrize("kernel", sorted(DILATED_BRANCHES))
def test_dilated_reparam_block_merges_every_branch(kernel):
    torch.manual_seed(0)
    block = perturb_(DilatedReparamBlock(6, kernel)).double().eval()
    x = torch.randn(2, 6, 2 * kernel, 2 * kernel, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
        block.reparameterize()
        assert list(block.state_dict()) == ["lk_origin.weight", "lk_origin.bias"]
        assert rel_err(block(x), y) < 1e-12


def test_block_reparameterize_folds_scale_even_without_grn_bias():
    # Upstream leaves gamma unfolded (and drops it) when GRN has no beta; we fold it.
    torch.manual_seed(0)
    block = perturb_(UniRepLKNetBlock(8, 3)).double().eval()
    del block.act[1].beta
    block.act[1].use_bias = False
    x = torch.randn(1, 8, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        y = block(x)
        block.reparameterize()
        assert block.gamma is None
        assert rel_err(block(x), y) < 1e-12


def test_timm_reparameterize_model_works_too():
    # timm visits parents before children; the block merges its own dilated branches first.
    from timm.utils import reparameterize_model as timm_reparameterize
    before, _, _, x = reparam_equivalence(UniRepLKNet(**SMALL, num_classes=5), torch.float64,
                                          size=96)
    model = perturb_(UniRepLKNet(**SMALL, num_classes=5)).double().eval()
    with torch.no_grad():
        y = model(x)
        timm_reparameterize(model, inplace=True)
        assert rel_err(model(x), y) < 1e-10
    assert set(model.state_dict()) == set(UniRepLKNet(**SMALL, num_classes=5,
                                                      deploy=True).state_dict())


def test_grn_matches_its_definition():
    torch.manual_seed(0)
    grn = perturb_(GRN(6)).double()
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    gx = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    assert torch.allclose(grn(x), grn.gamma * (x * nx) + grn.beta + x, atol=1e-12)


def test_checkpointing_alias_and_gradients():
    torch.manual_seed(0)
    assert UniRepLKNet(**SMALL, use_checkpoint=True).with_cp
    plain = UniRepLKNet(**SMALL, num_classes=5).double()
    ckpt = UniRepLKNet(**SMALL, num_classes=5, with_cp=True).double()
    assert_checkpointing_keeps_gradients(plain, ckpt)


def test_backbone_mode_one_channel_input_and_head_init_scale():
    model = create_model("unireplknet_a", num_classes=None, in_chans=1).eval()
    assert not hasattr(model, "head")
    assert {k.split(".")[0] for k in model.state_dict() if k.startswith("norm")} == \
        {"norm0", "norm1", "norm2", "norm3"}
    outs = model(torch.randn(1, 1, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 40, 16, 16), (1, 80, 8, 8), (1, 160, 4, 4),
                                              (1, 320, 2, 2)]
    two = create_model("unireplknet_a", num_classes=None, out_indices=(2, 3))
    assert len(two(torch.randn(1, 3, 64, 64))) == 2
    torch.manual_seed(0)
    ref = create_model("unireplknet_a", num_classes=10)
    torch.manual_seed(0)
    scaled = create_model("unireplknet_a", num_classes=10, head_init_scale=0.001)
    assert torch.allclose(scaled.head.weight, ref.head.weight * 0.001)


def test_sync_bn_only_when_asked():
    assert any(isinstance(m, nn.SyncBatchNorm)
               for m in UniRepLKNet(**SMALL, use_sync_bn=True).modules())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in UniRepLKNet(**SMALL).modules())


@pytest.mark.parametrize("kwargs,match", [
    (dict(depths=(1, 1, 1, 1), kernel_sizes=None), "no default kernel sizes"),
    (dict(kernel_sizes=((3,), (3,), (3,), (3,))), "one size per block"),
    (dict(kernel_sizes=((3,), (3,), (3, 21), (3,))), "kernel_size must be"),
    (dict(out_indices=(3,)), "not both"),
])
def test_bad_constructor_arguments_are_named(kwargs, match):
    args = {**SMALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        UniRepLKNet(**args)


def test_layer_decay_ids_and_lr_scales_for_every_parameter():
    with torch.device("meta"):
        model = create_model("unireplknet_t")
    family = get_family("unireplknet_t")
    scales = layer_scales(0.8, family.num_layers)
    groups = get_parameter_groups(model, 0.05, layer_id_for=family.layer_id_for, scales=scales)
    ids = {}
    for group in groups:
        for name in group["param_names"]:
            ids[name] = family.layer_id_for(name)
            assert group["lr_scale"] == pytest.approx(0.8 ** (13 - ids[name])), name
    assert len(ids) == len(list(model.parameters()))
    # ConvNeXt's rule: stem 0, stage 0 -> 1, downsample 1 / stage 1 -> 2, downsample 2 -> 3,
    # stage 2 block b -> 3 + b // 3 (18 blocks: 3..8), stage 3 and its downsample -> 12, head 13.
    for name, layer_id in ids.items():
        parts = name.split(".")
        if parts[0] == "downsample_layers":
            expected = {0: 0, 1: 2, 2: 3, 3: 12}[int(parts[1])]
        elif parts[0] == "stages":
            stage = int(parts[1])
            expected = {0: 1, 1: 2, 3: 12}.get(stage, 3 + int(parts[2]) // 3)
        else:
            expected = 13
        assert layer_id == expected, name
    assert sorted(set(ids.values())) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 13]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """unireplknet_a with random weights and BN statistics, saved as upstream's main.py does."""
    torch.manual_seed(0)
    model = perturb_(create_model("unireplknet_a", num_classes=10)).eval()
    with torch.no_grad():  # confident logits, so a wrong fold would move the loss visibly
        model.head.weight.mul_(20)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "epoch": "best"}, path)
    return path, model


def test_reparameterize_tool_round_trip(trained_checkpoint, tmp_path):
    src, model = trained_checkpoint
    dst = tmp_path / "deploy.pth"
    assert reparameterize_main(["--model", "unireplknet_a", "--src", str(src),
                                "--dst", str(dst)]) == 0
    saved = torch.load(dst, map_location="cpu", weights_only=True)
    assert list(saved) == ["model"]
    assert {k: list(v.shape) for k, v in saved["model"].items()} == \
        {k: v for k, v in UPSTREAM["unireplknet_a"]["deploy"].items()
         if not k.startswith("head.")} | {"head.weight": [10, 320], "head.bias": [10]}
    deploy = create_model("unireplknet_a", num_classes=10, deploy=True).eval()
    deploy.load_state_dict(saved["model"], strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(deploy(x), model(x)) < 1e-4
    assert sorted(os.listdir(tmp_path)) == ["deploy.pth"]


def test_reparameterize_tool_reports_bad_input(trained_checkpoint, tmp_path, capsys):
    src, _ = trained_checkpoint
    dst = tmp_path / "deploy.pth"
    assert reparameterize_main(["--model", "unireplknet_a", "--src", str(tmp_path / "nope.pth"),
                                "--dst", str(dst)]) == 2
    assert "not found" in capsys.readouterr().err
    assert reparameterize_main(["--model", "unireplknet_f", "--src", str(src),
                                "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "does not fit model unireplknet_f" in err and "shape mismatches" in err
    assert reparameterize_main(["--model", "RepLKNet-31B", "--src", str(src),
                                "--dst", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "unexpected" in err and "stem.0.conv.weight" in err
    assert not dst.exists()


def test_main_eval_with_resume_in_training_merged_and_deploy_form(trained_checkpoint, tmp_path):
    import main as lk_main

    src, _ = trained_checkpoint
    common = ["--model", "unireplknet_a", "--device", "cpu", "--input_size", "32",
              "--batch_size", "50", "--num_workers", "0", "--eval_subset", "200",
              "--data_set", "fashion_mnist", "--eval", "true"]

    def run(extra):
        return lk_main.main(lk_main.get_args_parser().parse_args(common + extra))

    train_form = run(["--resume", str(src)])
    merged = run(["--resume", str(src), "--with_small_kernel_merged", "true"])
    dst = tmp_path / "deploy.pth"
    assert reparameterize_main(["--model", "unireplknet_a", "--src", str(src),
                                "--dst", str(dst)]) == 0
    deploy = run(["--resume", str(dst), "--deploy", "true"])
    for stats in (merged, deploy):
        assert stats["loss"] == pytest.approx(train_form["loss"], rel=1e-4)
        assert stats["acc1"] == pytest.approx(train_form["acc1"], abs=0.5)


def test_a_checkpoint_of_the_other_form_says_which_flag_to_change(trained_checkpoint, tmp_path,
                                                                   capsys):
    import main as lk_main

    src, _ = trained_checkpoint
    dst = tmp_path / "deploy.pth"
    assert reparameterize_main(["--model", "unireplknet_a", "--src", str(src),
                                "--dst", str(dst)]) == 0
    common = ["--model", "unireplknet_a", "--device", "cpu", "--input_size", "32",
              "--num_workers", "0", "--eval_subset", "20", "--eval", "true"]
    to_deploy = "it holds the deploy (re-parameterized) form: add --deploy true"
    to_training = ("it holds the training form: drop --deploy true (or convert it with "
                   "tools/reparameterize.py)")
    for extra, advice in ((["--resume", str(dst)], to_deploy),
                          (["--resume", str(src), "--deploy", "true"], to_training),
                          (["--finetune", str(dst)], to_deploy)):
        capsys.readouterr()
        assert lk_main.cli(common + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        assert "does not fit model unireplknet_a" in err or "fits only 132 of the 626" in err
        assert err.endswith(advice), err
