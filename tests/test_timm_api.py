"""timm's model contract on every lknets family (models/timm_api.py, models/pretrained.py).

Importing lknets leaves timm's own models alone; every model has pretrained cfgs, takes timm's
constructor kwargs, has the model API timm's tools call (forward_features/forward_head,
forward_intermediates, prune_intermediate_layers, reset_classifier, ...), builds as a
``features_only`` backbone, traces with fx and exports with torch.export; and none of this changed
a logit. Small configurations on the CPU; the registered (full-size) models on the meta device.

TorchScript is not supported, so not tested: blocks look submodules up by computed names
(``self._modules[self.mixer_name]``, ``getattr(self, f"dil_conv_k{k}_{r}")``), the oriented convs
keep their tap plan in Python dataclasses, and the large-kernel dispatcher reads Python state
(models/layers.py); ``torch.jit.script`` compiles none of these. timm's suite leaves models it
cannot script out of its TorchScript tests (EXCLUDE_JIT_FILTERS); torch.export is the supported
path.
"""
import importlib
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import torch.nn as nn
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg
from timm.models._features import FeatureGetterNet
from timm.models._manipulate import group_parameters

import models
from models.convnext import ConvNeXt
from models.convnext_1d import ConvNeXt1D
from models.layers import depthwise_conv2d
from models.oriented_conv import oriented_conv1d_planned
from models.pretrained import PRETRAINED_CFGS, pretrained_cfg, pretrained_cfgs
from models.replknet import RepLKNet
from models.slak import SLaK
from models.unireplknet import UniRepLKNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One small network per family: every block type, four stages, stride 32.
SMALL = {
    "convnext": lambda **kw: ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 16, 24), **kw),
    "slak": lambda **kw: SLaK(depths=(1, 1, 2, 1), dims=(8, 8, 16, 16),
                              kernel_size=[13, 11, 9, 7, 3], Decom=True, **kw),
    "convnext_1d": lambda **kw: ConvNeXt1D("1dpp", depths=(1, 2, 1, 1), dims=(8, 16, 16, 16),
                                           **kw),
    "replknet": lambda **kw: RepLKNet(large_kernel_sizes=(13, 11, 9, 7), layers=(1, 1, 2, 1),
                                      channels=(8, 16, 16, 24), **kw),
    "unireplknet": lambda **kw: UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 32, 48),
                                            kernel_sizes=((17,), (15,), (11, 3), (7,)), **kw),
}
SMALL_DIMS = {"convnext": [8, 16, 16, 24], "slak": [8, 8, 16, 16], "convnext_1d": [8, 16, 16, 16],
              "replknet": [8, 16, 16, 24], "unireplknet": [16, 32, 32, 48]}
FAMILIES = sorted(SMALL)
# One registered model per family, by its timm name, with its stage widths.
TIMM_MODELS = {"convnext": ("lknets_convnext_atto", [40, 80, 160, 320]),
               "slak": ("SLaK_tiny", [96, 192, 384, 768]),
               "convnext_1d": ("convnext_tiny_1d", [96, 192, 384, 768]),
               "replknet": ("RepLKNet-31B", [128, 256, 512, 1024]),
               "unireplknet": ("unireplknet_a", [40, 80, 160, 320])}
# lknets' models whose names timm has too (its ConvNeXt's).
SHARED_NAMES = {"convnext_atto", "convnext_tiny", "convnext_small", "convnext_base",
                "convnext_large", "convnext_xlarge"}


def small(family, seed=0, **kwargs):
    torch.manual_seed(seed)
    return SMALL[family](**kwargs)


def meta_timm_model(name, **kwargs):
    return timm.create_model(name, pretrained=False, device="meta", **kwargs)


# --- 1. registry without side effects ---------------------------------------------------------

_SNAPSHOT = r"""
import json, warnings
import timm, torch

def snapshot():
    built = {}
    for name in ("convnext_tiny", "convnext_tiny.fb_in1k", "convnext_atto",
                 "convnext_tiny.fb_in22k", "resnet18"):
        model = timm.create_model(name, pretrained=False, device="meta")
        cfg = model.pretrained_cfg
        built[name] = [type(model).__module__ + "." + type(model).__qualname__,
                       model.num_classes, cfg.get("url") or cfg.get("hf_hub_id")]
    return {"models": timm.list_models(), "pretrained": timm.list_pretrained(),
            "convnext_module": timm.list_models(module="convnext"), "built": built}

before = snapshot()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import models
after = snapshot()
print(json.dumps({"before": before, "after": after, "warnings": [str(w.message) for w in caught],
                  "lknets": [models.timm_name(n) for n in models.list_models()]}))
"""


def test_importing_lknets_changes_nothing_timm_resolves():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", _SNAPSHOT], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout.splitlines()[-1])
    before, after, lknets = data["before"], data["after"], set(data["lknets"])
    assert not lknets & set(before["models"])
    assert set(after["models"]) == set(before["models"]) | lknets
    # Every pretrained tag timm had is still there (43 convnext_* tags were lost before).
    assert set(before["pretrained"]) <= set(after["pretrained"])
    assert {n.split(".")[0] for n in set(after["pretrained"]) - set(before["pretrained"])} <= lknets
    assert after["built"] == before["built"]
    assert after["built"]["convnext_tiny.fb_in1k"][0] == "timm.models.convnext.ConvNeXt"
    assert after["convnext_module"] == before["convnext_module"]
    assert not [w for w in data["warnings"] if "Overwriting" in w]


def test_timm_names_prefix_only_the_names_timm_has():
    for name in models.list_models():
        expected = "lknets_" + name if name in SHARED_NAMES else name
        assert models.timm_name(name) == expected
        assert timm.models.is_model(expected)
    assert set(timm.list_models(module="timm_api")) == {models.timm_name(n)
                                                        for n in models.list_models()}
    # main.py and models.create_model keep the upstream name.
    with torch.device("meta"):
        assert type(models.create_model("convnext_tiny")) is ConvNeXt
        assert type(meta_timm_model("lknets_convnext_tiny")) is ConvNeXt
        assert type(meta_timm_model("convnext_tiny")).__module__ == "timm.models.convnext"


@pytest.mark.parametrize("module,exported", [
    ("convnext", {"ConvNeXt", "convnext_tiny"}), ("slak", {"SLaK", "SLaK_tiny"}),
    ("convnext_1d", {"ConvNeXt1D", "convnext_tiny_1d", "convnext_base_2dpp"}),
    ("replknet", {"RepLKNet", "replknet_31b", "replknet_xl"}),
    ("unireplknet", {"UniRepLKNet", "unireplknet_a", "unireplknet_xl"}),
    ("timm_api", {"TimmModelMixin", "RepLKNet-31B"}), ("pretrained", {"PRETRAINED_CFGS"}),
])
def test_star_import_of_every_model_module(module, exported):
    namespace = {}
    exec(f"from models.{module} import *", namespace)
    assert exported <= set(namespace)
    assert set(importlib.import_module(f"models.{module}").__all__) <= set(namespace)


# --- 2. pretrained cfgs -----------------------------------------------------------------------

def test_every_model_has_consistent_cfgs_and_a_1000_class_default():
    for name in models.list_models():
        cfgs = pretrained_cfgs(name)
        default = get_pretrained_cfg(models.timm_name(name))
        assert default.num_classes == 1000, name
        assert {(c["first_conv"], c["classifier"]) for c in cfgs.values()} == \
            {(default.first_conv, "head")}, name
        for key, cfg in cfgs.items():
            assert cfg["num_classes"] in (1000, 21841), key
            assert cfg["pool_size"] == tuple(s // 32 for s in cfg["input_size"][1:]), key


def test_cfg_layer_names_are_real_layers():
    """One build per family and first-conv name (the 1D stems start with a Linear)."""
    checked = set()
    for name in models.list_models():
        cfg = pretrained_cfgs(name)
        key = (models.get_family(name).name, next(iter(cfg.values()))["first_conv"])
        if key in checked:
            continue
        checked.add(key)
        model = meta_timm_model(models.timm_name(name))
        keys = model.state_dict()
        assert model.pretrained_cfg["first_conv"] + ".weight" in keys, name
        assert keys["head.weight"].shape == (model.num_classes, model.num_features)
        assert model.in_chans == model.pretrained_cfg["input_size"][0] == 3
    assert len(checked) == 6


def test_released_tags_are_listed_and_build_with_their_cfg():
    listed = timm.list_pretrained("unireplknet_*")
    assert {"unireplknet_a.in1k", "unireplknet_b.in22k", "unireplknet_b.in22k_ft_in1k_384",
            "unireplknet_xl.in22k_ft_in1k_384"} <= set(listed)
    assert "lknets_convnext_tiny.in22k_ft_in1k_384" in timm.list_pretrained("lknets_*")
    assert "RepLKNet-XL.megdata73m_ft_in1k_320" in timm.list_pretrained("RepLKNet*")
    model = meta_timm_model("unireplknet_b.in22k_ft_in1k_384")
    cfg = model.pretrained_cfg
    assert (cfg["input_size"], cfg["crop_pct"], cfg["crop_mode"]) == ((3, 384, 384), 1.0, "squash")
    assert cfg["hf_hub_id"] == "DingXiaoH/UniRepLKNet"
    assert cfg["hf_hub_filename"] == "unireplknet_b_in22k_to_in1k_384_acc87.40.pth"
    assert model.head.out_features == 1000
    # A name without a tag builds the model's ImageNet-1K checkpoint config.
    assert meta_timm_model("unireplknet_b").num_classes == 1000


def test_in22k_tags_have_21841_classes():
    model = meta_timm_model("unireplknet_s.in22k")
    assert model.num_classes == 21841 and model.head.out_features == 21841
    for name in ("lknets_convnext_base.in22k", "RepLKNet-31B.in22k", "unireplknet_l.in22k"):
        assert get_pretrained_cfg(name).num_classes == 21841, name
    assert get_pretrained_cfg("unireplknet_l.in22k").input_size == (3, 192, 192)


def test_replknet_xl_data_config_is_320_px_with_inception_mean_std():
    config = resolve_data_config(model=meta_timm_model("RepLKNet-XL"))
    assert config["input_size"] == (3, 320, 320)
    assert config["mean"] == config["std"] == (0.5, 0.5, 0.5)
    assert config["crop_pct"] == pytest.approx(0.875) and config["interpolation"] == "bicubic"
    assert resolve_data_config(model=meta_timm_model("RepLKNet-31B"))["mean"] == \
        pytest.approx((0.485, 0.456, 0.406))


def test_pretrained_true_refuses_to_download_and_says_how_to_load():
    with pytest.raises(ValueError, match="does not download") as err:
        timm.create_model("RepLKNet-31B", pretrained=True)
    assert "--resume" in str(err.value) and "RepLKNet-31B_ImageNet-1K_224.pth" in str(err.value)
    with pytest.raises(ValueError, match="unireplknet_s_in22k_pretrain.pth"):
        timm.create_model("unireplknet_s.in22k", pretrained=True)


def test_pretrained_table_covers_every_model_and_only_registered_ones():
    registered = set(models.list_models())
    assert {key.split(".")[0] for key in PRETRAINED_CFGS} == registered
    with pytest.raises(KeyError, match="no entry"):
        pretrained_cfgs("not_a_model")
    # The look-up main.py's eval defaults can use: a model's default checkpoint, or a tag.
    assert pretrained_cfg("RepLKNet-XL")["input_size"] == (3, 320, 320)
    assert pretrained_cfg("unireplknet_b", "in22k")["num_classes"] == 21841
    with pytest.raises(KeyError, match="in1k_384"):
        pretrained_cfg("RepLKNet-31L", "in1k")


# --- 2. constructor kwargs --------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_timm_kwargs(family):
    name, dims = TIMM_MODELS[family]
    model = meta_timm_model(name, in_chans=1, num_classes=0, global_pool="", drop_rate=0.25,
                            drop_path_rate=0.1).eval()
    assert model.in_chans == 1 and model.num_classes == 0
    assert model.head_drop.p == 0.25
    assert max(m.drop_prob for m in model.modules() if hasattr(m, "drop_prob")) == \
        pytest.approx(0.1)
    first_conv = model.get_submodule(model.pretrained_cfg["first_conv"])
    assert first_conv.weight.shape[1] == 1
    out = model(torch.empty(2, 1, 64, 64, device="meta"))
    assert out.shape == (2, dims[-1], 2, 2)
    model = meta_timm_model(name, num_classes=7, dtype=torch.bfloat16)
    assert model(torch.empty(1, 3, 64, 64, device="meta", dtype=torch.bfloat16)).shape == (1, 7)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError):
        meta_timm_model(name, not_a_model_arg=1)


# --- 2. the model API -------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_features_head_and_classifier(family):
    dims = SMALL_DIMS[family]
    model = small(family, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    assert (model.num_classes, model.num_features, model.head_hidden_size, model.in_chans) == \
        (5, dims[-1], dims[-1], 3)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, dims[-1], 2, 2)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (2, dims[-1])
        logits = model(x)
        assert torch.equal(model.forward_head(features), logits)
        assert model.get_classifier() is model.head
        assert torch.equal(model.head(pre_logits), logits)

        model.reset_classifier(0)
        assert model.num_classes == 0 and torch.equal(model(x), pre_logits)
        model.reset_classifier(0, "")
        assert model(x).shape == (2, dims[-1], 2, 2)
        model.reset_classifier(3)  # keeps the pooling: a 3-class map for every position
        assert model.global_pool == "" and model(x).shape == (2, 3, 2, 2)
        model.reset_classifier(7, "max")
        assert model(x).shape == (2, 7) and not model.head.training
        assert model.forward_head(features, pre_logits=True).shape == (2, dims[-1])
    model.double()
    model.reset_classifier(4, "avg")
    assert model.head.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(4, "catavgmax")


@pytest.mark.parametrize("family", FAMILIES)
def test_grad_checkpointing_group_matcher_and_weight_decay(family):
    plain = small(family, num_classes=5).double()
    ckpt = small(family, num_classes=5).double()
    ckpt.set_grad_checkpointing()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        if p.requires_grad:
            assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12), name
    ckpt.set_grad_checkpointing(False)
    assert not getattr(ckpt, "use_checkpoint")

    names = [n for n, _ in plain.named_parameters()]
    fine = group_parameters(plain, plain.group_matcher(), reverse=True)
    coarse = group_parameters(plain, plain.group_matcher(coarse=True), reverse=True)
    assert set(fine) == set(coarse) == set(names)
    assert len(set(coarse.values())) == 6  # stem, four stages, head
    assert len(set(fine.values())) > len(set(coarse.values()))
    assert coarse[names[0]] == 0 and coarse["head.weight"] == 5
    assert plain.no_weight_decay() == set()


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_intermediates_and_feature_info(family):
    dims = SMALL_DIMS[family]
    model = small(family, num_classes=5).eval()
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in model.feature_info] == \
        [(d, 4 * 2 ** i, f"stages.{i}") for i, d in enumerate(dims)]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert [m.shape for m in maps] == [(1, d, 16 // 2 ** i, 16 // 2 ** i)
                                           for i, d in enumerate(dims)]
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last_two) == 2 and torch.equal(last_two[1], maps[3])
        picked = model.forward_intermediates(x, indices=[0, -2], stop_early=True)[1]
        assert torch.equal(picked[0], maps[0]) and torch.equal(picked[1], maps[2])
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
        # Only RepLKNet normalizes its last map (BN before pooling); the others' norm is in the head.
        assert torch.equal(normed[0], model.norm(maps[3]) if family == "replknet" else maps[3])
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_intermediate_layers_leaves_only_used_parameters(family):
    dims = SMALL_DIMS[family]
    x = torch.randn(2, 3, 64, 64)
    for indices, prune_norm in (([1], False), ([3], False), ([0, 1, 2, 3], True)):
        model = small(family, num_classes=5, drop_rate=0.5).train()
        take = model.prune_intermediate_layers(indices, prune_norm=prune_norm)
        assert take == indices and len(model.stages) == max(indices) + 1
        assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
        features = model.forward_intermediates(x, take, norm=not prune_norm,
                                               intermediates_only=True)
        assert [f.shape[1] for f in features] == [dims[i] for i in indices]
        sum(f.sum() for f in features).backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused
        assert model(x).shape == (2, dims[max(indices)], 2 ** (4 - max(indices)),
                                  2 ** (4 - max(indices)))
        assert model.num_features == model.head_hidden_size == dims[max(indices)]


# --- 2. features_only -------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_features_only_through_timm(family):
    name, dims = TIMM_MODELS[family]
    backbone = timm.create_model(name, features_only=True, out_indices=(1, 3), device="meta")
    assert backbone.feature_info.channels() == [dims[1], dims[3]]
    assert backbone.feature_info.reduction() == [8, 32]
    maps = backbone(torch.empty(2, 3, 96, 128, device="meta"))
    assert [m.shape for m in maps] == [(2, dims[1], 12, 16), (2, dims[3], 3, 4)]
    default = timm.create_model(name, features_only=True, device="meta")
    assert default.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize("family", FAMILIES)
def test_features_only_maps_are_the_stage_maps(family):
    model = small(family, num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        backbone = FeatureGetterNet(model, out_indices=(0, 2)).eval()
        maps = backbone(x)
    assert torch.equal(maps[0], expected[0]) and torch.equal(maps[1], expected[2])
    assert backbone.feature_info.channels() == [SMALL_DIMS[family][i] for i in (0, 2)]
    assert len(model.stages) == 3 and not hasattr(model.head, "weight")


def test_real_features_only_model_through_timm():
    backbone = timm.create_model("unireplknet_a", features_only=True, out_indices=(0, 2)).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape) for m in maps] == [(1, 40, 16, 16), (1, 160, 4, 4)]
    assert all(m.abs().sum() > 0 for m in maps)


# --- 2. fx and torch.export -------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_fx_symbolic_trace(family):
    model = small(family, num_classes=5).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))
    # The large-kernel dispatchers stay one call each, deciding at run time as in eager mode.
    dispatcher = oriented_conv1d_planned if family == "convnext_1d" else depthwise_conv2d
    assert any(node.target is dispatcher for node in traced.graph.nodes)


@pytest.mark.parametrize("family", FAMILIES)
def test_timm_fx_feature_extraction(family):
    model = small(family, num_classes=5).eval()
    extractor = timm.models.create_feature_extractor(model, return_nodes={"head": "logits"})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(extractor(x)["logits"], model(x))


# The oriented-1D family used to fail here: its op read theta's values (and data pointer) in
# forward, which fake tensors cannot give; the tap plan is now made when the module is built or
# loaded.
@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_of_the_eval_model(family):
    if family == "convnext_1d":  # one block per stage: exporting every angle group takes time
        torch.manual_seed(0)
        model = ConvNeXt1D("1dpp", depths=(1, 1, 1, 1), dims=(8, 16, 16, 16), num_classes=5)
    else:
        model = small(family, num_classes=5)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_oriented_tap_plan_is_rebuilt_when_a_meta_built_model_is_loaded():
    source = small("convnext_1d", num_classes=3).eval()
    with torch.device("meta"):
        target = small("convnext_1d", num_classes=3)
    assert "tap_index" not in target.stages[0][0].dwconv1.state_dict()
    target.to_empty(device="cpu")  # leaves every buffer, the tap plan included, uninitialized
    target.load_state_dict(source.state_dict())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(target.eval()(x), source(x))


# --- 2. logits unchanged ----------------------------------------------------------------------

def _fill_deterministically(model):
    """Every weight and buffer set from a formula (not a random number generator)."""
    state = {}
    for i, (name, t) in enumerate(model.state_dict().items()):
        if not t.is_floating_point():
            state[name] = torch.zeros_like(t)
            continue
        v = torch.sin(torch.arange(t.numel(), dtype=torch.float64) * 0.37 + i).reshape(t.shape)
        if name.endswith("running_var"):
            v = 0.5 + v.abs()
        elif name.endswith("theta"):  # oriented-1D angles, in radians
            v = v * 3.14159
        else:
            v = v * 0.3
        state[name] = v.to(t.dtype)
    model.load_state_dict(state)
    return model


def _reference_input():
    values = torch.sin(torch.arange(2 * 3 * 64 * 64, dtype=torch.float64) * 0.01)
    return values.reshape(2, 3, 64, 64)


def _reference_model(name):
    """The configurations whose outputs were recorded before the timm API was added."""
    if name == "convnext":
        model = ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 16, 16, 24), num_classes=5,
                         layer_scale_init_value=0.5)
    elif name == "slak":
        model = SLaK(depths=(1, 1, 2, 1), dims=(8, 8, 16, 16), kernel_size=[13, 11, 9, 7, 3],
                     Decom=True, num_classes=5, layer_scale_init_value=0.5)
    elif name.startswith("convnext1d_"):
        model = ConvNeXt1D(name.split("_")[1], depths=(1, 2, 1, 1), dims=(8, 16, 16, 16),
                           num_classes=5, layer_scale_init_value=0.5)
    elif name.startswith("replknet"):
        backbone = name.endswith("backbone")
        model = RepLKNet(large_kernel_sizes=(13, 11, 9, 7), layers=(1, 1, 2, 1),
                         channels=(8, 16, 16, 24), num_classes=None if backbone else 5,
                         out_indices=(1, 3) if backbone else None,
                         norm_intermediate_features=backbone)
    else:
        backbone = name.endswith("backbone")
        model = UniRepLKNet(depths=(1, 1, 2, 1), dims=(16, 32, 32, 48),
                            kernel_sizes=((17,), (15,), (11, 3), (7,)),
                            num_classes=None if backbone else 5,
                            out_indices=(0, 2, 3) if backbone else None)
    return _fill_deterministically(model.double()).eval()


# float64 logits (classifiers) and [sum, sum of |x|] of each map (upstream backbone forms),
# recorded with the code before the timm API (commit f43e725), with the deterministic weights of
# _fill_deterministically and the input of _reference_input: no random number generator is
# involved, so the values hold for any torch version.
REFERENCE = {
    "convnext": [
        [0.9440748315545768, -0.7307130639062857, 1.3777689561671072, -0.6138518326583391,
         0.4874394729412723],
        [0.9438492622071891, -0.7304147644555649, 1.3774842888508043, -0.6136632130035061,
         0.4874015092129794],
    ],
    "slak": [
        [0.2858926286456236, 0.6045397797899192, 0.8445278865951599, 0.9740093826365532,
         0.975597990389446],
        [0.2857446764869638, 0.6043945909872289, 0.8444044024865941, 0.9739237129648314,
         0.9755613116240455],
    ],
    "convnext1d_1d": [
        [0.19252010181266457, 0.49133486528428805, 0.7264991121129587, 0.8667984293855096,
         0.8934061028569724],
        [0.19247316083168156, 0.49128608100747784, 0.7264548489394109, 0.8667644618909663,
         0.8933868624423988],
    ],
    "convnext1d_1dpp": [
        [0.7170430999183327, 0.8384575885287714, 0.849238510717444, 0.7483415206417985,
         0.5494117233501055],
        [0.717045534164858, 0.8384545990828709, 0.8492304875823733, 0.748329510516143,
         0.549397293075434],
    ],
    "convnext1d_2dpp": [
        [0.1721003683982885, 0.28819974183956787, 0.3677822409675718, 0.4007499250562067,
         0.38290133271089294],
        [0.17237114717992455, 0.28838447614791185, 0.3678568303559067, 0.40070463858935707,
         0.38274207846349323],
    ],
    "replknet": [
        [-0.3942176690678475, 1.2219566298594342, -0.7601304585212452, 1.1402071831597471,
         -0.14575507365075702],
        [-0.3942176683173957, 1.2219566281692973, -0.7601304563807434, 1.1402071811885883,
         -0.14575507241962193],
    ],
    "replknet_backbone": [
        [-21.434121065230062, 416.1354462706905],
        [18.131104805229757, 41.5701999738938],
    ],
    "unireplknet": [
        [1.167268516435343, 2.048161370666773, 0.4623808420751402, -1.8355048077004146,
         -2.2968012912216778],
        [1.1673271696031517, 2.0490696067250487, 0.46316299580076115, -1.8356889586067835,
         -2.297753924141662],
    ],
    "unireplknet_backbone": [
        [694.3302054545761, 2130.0641887654906],
        [60.5721809327577, 245.0472884272454],
        [30.582000644336095, 105.62559162152515],
    ],
}


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_outputs_equal_those_recorded_before_the_timm_api(name):
    model = _reference_model(name)
    with torch.no_grad():
        out = model(_reference_input())
    expected = torch.tensor(REFERENCE[name], dtype=torch.float64)
    if isinstance(out, list):
        got = torch.tensor([[t.sum().item(), t.abs().sum().item()] for t in out],
                           dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-6)
    else:
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-12)
