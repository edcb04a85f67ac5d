"""Parameter groups: weight-decay exclusions, layer-wise lr decay, fine-tune loading."""
import argparse

import pytest
import torch

import main as lk_main
import models
import utils
from optim_factory import create_optimizer, get_parameter_groups, layer_scales


def parse(*flags):
    return lk_main.get_args_parser().parse_args(["--model", "convnext_atto", *flags])


def names_by_group(optimizer):
    return {g["group_name"]: set(g["param_names"]) for g in optimizer.param_groups}


def test_no_weight_decay_for_1d_params_and_biases():
    model = models.create_model("convnext_atto", num_classes=10)
    groups = {g["group_name"]: g for g in get_parameter_groups(model, 0.05)}
    params = dict(model.named_parameters())
    no_decay = set(groups["no_decay"]["param_names"])
    assert no_decay == {n for n, p in params.items() if p.ndim == 1 or n.endswith(".bias")}
    assert "stages.1.0.gamma" in no_decay and "norm.weight" in no_decay
    assert groups["decay"]["param_names"][0] == "downsample_layers.0.0.weight"
    assert "head.weight" in groups["decay"]["param_names"]
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.05


def test_model_no_weight_decay_names_are_honoured():
    model = models.create_model("convnext_atto", num_classes=10)
    model.no_weight_decay = lambda: {"head.weight"}
    optimizer = create_optimizer(parse("--weight_decay", "0.1"), model)
    assert "head.weight" in names_by_group(optimizer)["no_decay"]


def test_layer_decay_ids_and_scales_for_convnext():
    model = models.create_model("convnext_atto", num_classes=10)
    optimizer = create_optimizer(parse("--layer_decay", "0.7"), model)
    scale_of = {}
    for group in optimizer.param_groups:
        for name in group["param_names"]:
            scale_of[name] = group["lr_scale"]
    expected_ids = {
        "downsample_layers.0.0.weight": 0, "stages.0.1.pwconv1.weight": 1,
        "downsample_layers.1.1.weight": 2, "stages.1.0.gamma": 2,
        "downsample_layers.2.0.bias": 3, "stages.2.0.dwconv.weight": 3,
        "stages.2.4.pwconv2.weight": 4, "stages.2.5.norm.bias": 4,
        "downsample_layers.3.1.weight": 12, "stages.3.1.gamma": 12,
        "norm.weight": 13, "head.bias": 13,
    }
    for name, layer_id in expected_ids.items():
        assert scale_of[name] == pytest.approx(0.7 ** (13 - layer_id)), name
    assert len(scale_of) == len(list(model.parameters()))
    assert layer_scales(0.5, 12)[0] == 0.5 ** 13 and layer_scales(0.5, 12)[13] == 1.0


def test_engine_applies_the_lr_scale_of_each_group():
    import engine

    model = models.create_model("convnext_atto", num_classes=10)
    optimizer = create_optimizer(parse("--layer_decay", "0.5"), model)
    data = [(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))]
    engine.train_one_epoch(model, torch.nn.CrossEntropyLoss(), data, optimizer, torch.device("cpu"),
                           0, utils.LossScaler(False, "cpu"), lr_schedule_values=[0.01],
                           wd_schedule_values=[0.02], num_training_steps_per_epoch=1)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.01 * group["lr_scale"])
        assert group["weight_decay"] == (0.02 if group["group_name"].endswith("_decay")
                                         and "no_decay" not in group["group_name"] else 0.0)


def test_finetune_drops_mismatched_head_and_strips_prefixes(tmp_path, capsys):
    source = models.create_model("convnext_atto", num_classes=1000)
    state = {"module.backbone." + k: v for k, v in source.state_dict().items()}
    path = tmp_path / "pretrained.pth"
    torch.save({"model_ema": state, "epoch": 7}, path)
    args = parse("--finetune", str(path), "--model_key", "model|model_ema",
                 "--model_prefix", "backbone.")
    target = models.create_model("convnext_atto", num_classes=10)
    head_before = target.head.weight.clone()
    utils.load_finetune(args, target)
    out = capsys.readouterr().out
    assert "Removing key head.weight" in out and "head.bias" in out
    assert torch.equal(target.head.weight, head_before)
    for key, value in source.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(target.state_dict()[key], value), key


def test_finetune_raw_state_dict(tmp_path):
    source = models.create_model("convnext_atto", num_classes=10)
    path = tmp_path / "raw.pth"
    torch.save(source.state_dict(), path)
    target = models.create_model("convnext_atto", num_classes=10)
    utils.load_finetune(parse("--finetune", str(path)), target)
    assert torch.equal(target.head.weight, source.head.weight)


def test_registry_and_timm_agree():
    import timm

    assert "convnext_atto" in models.list_models()
    assert models.list_models("convnext_*", family="convnext")[0] == "convnext_atto"
    # timm has a convnext_atto of its own, which lknets' does not shadow.
    assert models.timm_name("convnext_atto") == "lknets_convnext_atto"
    model = timm.create_model("lknets_convnext_atto", num_classes=7)
    assert type(model).__module__ == "models.convnext"
    assert model.head.out_features == 7
    assert isinstance(models.get_family("convnext_atto").layer_id_for("head.weight"), int)
    with pytest.raises(ValueError, match="does not download"):
        timm.create_model("lknets_convnext_atto", pretrained=True)


def test_convnext_tiny_matches_upstream_size():
    with torch.device("meta"):
        model = models.create_model("convnext_tiny")
    assert sum(p.numel() for p in model.parameters()) == 28_589_128
    keys = list(model.state_dict())
    assert keys[:4] == ["downsample_layers.0.0.weight", "downsample_layers.0.0.bias",
                        "downsample_layers.0.1.weight", "downsample_layers.0.1.bias"]
    assert "stages.0.0.gamma" in keys and "stages.3.2.pwconv2.weight" in keys
    assert keys[-4:] == ["norm.weight", "norm.bias", "head.weight", "head.bias"]


def test_parser_accepts_upstream_commands():
    args = lk_main.get_args_parser().parse_args(
        "--model convnext_tiny --drop_path 0.1 --batch_size 128 --lr 4e-3 --update_freq 4 "
        "--model_ema true --model_ema_eval true --data_path /imagenet --output_dir /out "
        "--local-rank=3 --use_amp True --layer_decay 0.7 --opt_betas 0.9 0.999".split())
    assert isinstance(args, argparse.Namespace)
    assert args.update_freq == 4 and args.model_ema is True and args.use_amp is True
    assert args.local_rank == 3 and args.opt_betas == [0.9, 0.999]
