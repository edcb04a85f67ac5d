"""RepLKNet: upstream-exact keys, parameter counts, FLOPs, re-parameterization, layer decay."""
import json
import os

import pytest
import timm
import torch
import torch.nn as nn

from models import create_model, get_family, list_models, reparameterize_model
from models.layers import DepthwiseConv2d
from models.replknet import ReparamLargeKernelConv, RepLKBlock, RepLKNet, replknet_layer_id
from optim_factory import get_parameter_groups, layer_scales
from test_reparam import (assert_checkpointing_keeps_gradients, assert_keys_equal_upstream,
                          assert_param_counts, key_shapes, perturb_, reparam_equivalence, rel_err)
from tools.count import count

SNAPSHOT = os.path.join(os.path.dirname(__file__), "snapshots", "replknet.json")
with open(SNAPSHOT) as f:
    UPSTREAM = json.load(f)["models"]

NAMES = ["RepLKNet-31B", "RepLKNet-31L", "RepLKNet-XL"]
# Upstream README / facts: parameters in millions, training form and after structural_reparam().
PARAMS_M = {"RepLKNet-31B": (79.86, 79.53), "RepLKNet-31L": (172.67, 172.17),
            "RepLKNet-XL": (335.44, 335.40)}
# RepLKNet README: FLOPs (multiply-accumulates) of the released models at their resolution.
PAPER_GFLOPS = {("RepLKNet-31B", 224): 15.3, ("RepLKNet-31B", 384): 45.1,
                ("RepLKNet-31L", 384): 96.0, ("RepLKNet-XL", 320): 128.7}

# A scaled-down RepLKNet for numerics: every block type, four stages, stride-32 layout.
SMALL = dict(large_kernel_sizes=(13, 11, 9, 7), layers=(1, 1, 2, 1), channels=(8, 16, 16, 24))


def test_registry_names_and_family():
    assert list_models(family="replknet") == NAMES
    assert all(get_family(n).name == "replknet" for n in NAMES)
    with torch.device("meta"):
        assert isinstance(timm.create_model("RepLKNet-31B"), RepLKNet)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_and_shapes_equal_upstream(name):
    assert_keys_equal_upstream(name, UPSTREAM, ({"small_kernel_merged": True}, {"deploy": True}))


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_equal_upstream(name):
    assert_param_counts(name, UPSTREAM, PARAMS_M)


@pytest.mark.parametrize("name,size", sorted(PAPER_GFLOPS))
def test_flops_match_the_paper(name, size):
    result = count(name, input_size=size)
    assert result["deploy"][1] / 1e9 == pytest.approx(PAPER_GFLOPS[name, size], rel=0.02)
    assert result["deploy"][0] == UPSTREAM[name]["params"][1]
    # The training form differs only by the small 5x5 branches (none in XL).
    assert result["train"][1] >= result["deploy"][1]


def test_every_large_kernel_goes_through_the_shared_depthwise_entry_point():
    with torch.device("meta"):
        train, deploy = create_model("RepLKNet-31B"), create_model("RepLKNet-31B", deploy=True)
    large = [m for m in train.modules() if isinstance(m, ReparamLargeKernelConv)]
    assert len(large) == 24
    for m in large:
        assert type(m.lkb_origin.conv) is DepthwiseConv2d
        assert type(m.small_conv.conv) is DepthwiseConv2d
    merged = [m.lkb_reparam for m in deploy.modules() if isinstance(m, ReparamLargeKernelConv)]
    assert len(merged) == 24 and all(type(c) is DepthwiseConv2d for c in merged)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("small_kernel,dw_ratio", [(5, 1.0), (None, 1.5), (3, 2.0)])
def test_reparameterized_network_computes_the_same_logits(dtype, tol, small_kernel, dw_ratio):
    model = RepLKNet(**SMALL, small_kernel=small_kernel, dw_ratio=dw_ratio, num_classes=10)
    before, after, model, _ = reparam_equivalence(model, dtype)
    assert before.dtype == dtype and before.abs().max() > 0.1
    assert not any(hasattr(m, "lkb_origin") or hasattr(m, "small_conv") for m in model.modules())
    assert rel_err(after, before) < tol
    # The deploy build loads those weights strictly and computes the same function.
    deploy = RepLKNet(**SMALL, small_kernel=small_kernel, dw_ratio=dw_ratio, num_classes=10,
                      deploy=True).to(dtype).eval()
    deploy.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64, dtype=dtype)
    with torch.no_grad():
        assert rel_err(deploy(x), model(x)) < tol * 1e-2


def test_reparam_changes_nothing_it_should_not_and_is_idempotent():
    model = perturb_(RepLKNet(**SMALL, num_classes=10)).eval()
    before = model.state_dict()
    reparameterize_model(model)
    after = model.state_dict()
    removed = {k for k in before if k not in after}
    assert removed and all(".large_kernel.lkb_origin." in k or ".large_kernel.small_conv." in k
                           for k in removed)
    for key, value in after.items():
        if key in before:
            assert torch.equal(value, before[key]), key
    reparameterize_model(model)
    assert key_shapes(model) == {k: list(v.shape) for k, v in after.items()}


@pytest.mark.parametrize("kernel,small", [(31, 5), (27, None), (13, 5)])
def test_block_level_equivalence_at_released_kernel_sizes(kernel, small):
    torch.manual_seed(0)
    block = perturb_(RepLKBlock(8, 12, kernel, small)).double().eval()
    x = torch.randn(2, 8, 40, 40, dtype=torch.float64)
    with torch.no_grad():
        before = block(x)
        reparameterize_model(block)
        assert type(block.large_kernel.lkb_reparam) is DepthwiseConv2d
        assert block.large_kernel.lkb_reparam.kernel_size == (kernel, kernel)
        assert rel_err(block(x), before) < 1e-12


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = RepLKNet(**SMALL, num_classes=10).double()
    ckpt = RepLKNet(**SMALL, num_classes=10, use_checkpoint=True).double()
    assert_checkpointing_keeps_gradients(plain, ckpt)


def test_backbone_outputs_and_intermediate_norms():
    model = RepLKNet(**SMALL, num_classes=None, out_indices=(1, 3),
                     norm_intermediate_features=True).eval()
    assert not hasattr(model, "head") and not hasattr(model, "norm")
    assert all(isinstance(s.norm, nn.BatchNorm2d) for s in model.stages)
    outs = model(torch.randn(1, 3, 64, 64))
    assert [tuple(o.shape) for o in outs] == [(1, 16, 8, 8), (1, 24, 2, 2)]
    plain = RepLKNet(**SMALL, num_classes=None, out_indices=(0,))
    assert isinstance(plain.stages[0].norm, nn.Identity)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_classes=None), "num_classes .* or out_indices"),
    (dict(num_classes=10, out_indices=(3,)), "not both"),
    (dict(num_classes=10, norm_intermediate_features=True), "backbone"),
    (dict(small_kernel=15), "small_kernel"),
])
def test_bad_constructor_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RepLKNet(**{**SMALL, **kwargs})


def test_create_model_rejects_unknown_arguments():
    with pytest.raises(TypeError, match="RepLKNet-31B"):
        create_model("RepLKNet-31B", layer_scale_init_value=1e-6)


def test_sync_bn_only_when_asked_and_never_leaks():
    synced = RepLKNet(**SMALL, use_sync_bn=True)
    plain = RepLKNet(**SMALL)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in plain.modules())
    synced.eval()
    with torch.no_grad():  # SyncBN in eval mode runs without a process group
        assert synced(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_in_channels_and_drop_path():
    model = RepLKNet(**SMALL, in_channels=1, num_classes=4, drop_path_rate=0.2)
    assert model.stem[0].conv.in_channels == 1
    assert RepLKNet(**SMALL, in_chans=1).stem[0].conv.in_channels == 1
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for s in model.stages for b in s.blocks]
    assert rates == pytest.approx([r for r in torch.linspace(0, 0.2, 5).tolist() for _ in (0, 1)])


def _expected_layer_id(name: str) -> int:
    """The rule written out as upstream's table (12 groups for [2, 2, 18, 2])."""
    if name.startswith("stem."):
        return 0
    if name.startswith(("stages.0.", "transitions.0.")):
        return 1
    if name.startswith(("stages.1.", "transitions.1.")):
        return 2
    if name.startswith("transitions.2."):
        return 11
    if name.startswith("stages.2.blocks."):
        return {b: 3 + b // 4 for b in range(36)}[int(name.split(".")[3])]
    if name.startswith("stages.3."):
        return 12
    assert name.startswith(("norm.", "head."))
    return 13


def test_layer_decay_ids_and_lr_scales_for_every_parameter():
    with torch.device("meta"):
        model = create_model("RepLKNet-31B")
    family = get_family("RepLKNet-31B")
    assert family.layer_id_for is replknet_layer_id and family.num_layers == 12
    scales = layer_scales(0.7, family.num_layers)
    groups = get_parameter_groups(model, 0.05, layer_id_for=family.layer_id_for, scales=scales)
    seen = {}
    for group in groups:
        for name in group["param_names"]:
            expected = _expected_layer_id(name)
            assert replknet_layer_id(name) == expected, name
            assert group["lr_scale"] == pytest.approx(0.7 ** (13 - expected)), name
            seen[name] = expected
    assert len(seen) == len(list(model.parameters()))
    assert set(seen.values()) == set(range(14))
    # Backbone-only keys: upstream's rule crashes on them; they join their stage's last group.
    assert [replknet_layer_id(f"stages.{s}.norm.weight") for s in range(4)] == [1, 2, 11, 12]
