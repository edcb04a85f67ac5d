"""The shared re-parameterization vocabulary (models/reparam.py), checked against torch convs."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from models import reparameterize_model
from models.layers import DepthwiseConv2d
from models.reparam import (ConvBN, depthwise_conv_from, dilate_kernel, fuse_bn, linear_from,
                            merge_kernels, pad_kernel_to)

DTYPE = torch.float64


def random_bn(channels: int, dtype=DTYPE) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels).to(dtype).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("groups,conv_bias", [(1, False), (1, True), (6, False), (6, True)])
def test_fuse_bn_equals_conv_then_bn(groups, conv_bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=groups, bias=conv_bias).to(DTYPE)
    bn = random_bn(6)
    x = torch.randn(2, 6, 9, 9, dtype=DTYPE)
    kernel, bias = fuse_bn(conv.weight, bn, conv.bias)
    fused = F.conv2d(x, kernel, bias, padding=1, groups=groups)
    assert kernel.dtype == DTYPE
    assert rel_err(fused, bn(conv(x))) < 1e-13


def test_fuse_bn_into_linear_weight():
    torch.manual_seed(0)
    linear = nn.Linear(5, 4).to(DTYPE)
    bn = random_bn(4)
    x = torch.randn(3, 5, dtype=DTYPE)
    weight, bias = fuse_bn(linear.weight, bn, linear.bias)
    expected = bn(linear(x)[:, :, None, None])[:, :, 0, 0]
    assert rel_err(F.linear(x, weight, bias), expected) < 1e-13


@pytest.mark.parametrize("k,r", [(3, 2), (3, 5), (5, 3), (7, 2), (2, 3)])
def test_dilate_kernel_equals_dilated_conv(k, r):
    torch.manual_seed(0)
    w = torch.randn(4, 1, k, k, dtype=DTYPE)
    dense = dilate_kernel(w, r)
    assert dense.shape[-2:] == (r * (k - 1) + 1,) * 2
    assert dense.dtype == DTYPE
    x = torch.randn(1, 4, 20, 20, dtype=DTYPE)
    expected = F.conv2d(x, w, dilation=r, groups=4)
    assert rel_err(F.conv2d(x, dense, groups=4), expected) < 1e-14


def test_dilate_kernel_rate_one_is_identity_and_dense_kernels_work():
    w = torch.randn(3, 2, 3, 3, dtype=DTYPE)
    assert dilate_kernel(w, 1) is w
    x = torch.randn(1, 2, 12, 12, dtype=DTYPE)
    assert rel_err(F.conv2d(x, dilate_kernel(w, 2)), F.conv2d(x, w, dilation=2)) < 1e-14


def test_pad_kernel_to_keeps_the_kernel_centred():
    torch.manual_seed(0)
    w = torch.randn(4, 1, 3, 5, dtype=DTYPE)
    big = pad_kernel_to(w, (7, 9))
    assert big.shape == (4, 1, 7, 9)
    x = torch.randn(2, 4, 11, 13, dtype=DTYPE)
    small_out = F.conv2d(x, w, padding=(1, 2), groups=4)
    assert rel_err(F.conv2d(x, big, padding=(3, 4), groups=4), small_out) < 1e-14


@pytest.mark.parametrize("size", [(4, 5), (1, 5), (6, 6)])
def test_pad_kernel_to_rejects_sizes_it_cannot_centre(size):
    with pytest.raises(ValueError, match="cannot centre"):
        pad_kernel_to(torch.zeros(1, 1, 3, 3), size)


def test_merge_kernels_sums_parallel_same_padded_branches():
    torch.manual_seed(0)
    big, small = torch.randn(4, 1, 9, 9, dtype=DTYPE), torch.randn(4, 1, 3, 3, dtype=DTYPE)
    b1, b2 = torch.randn(4, dtype=DTYPE), torch.randn(4, dtype=DTYPE)
    x = torch.randn(2, 4, 16, 16, dtype=DTYPE)
    expected = (F.conv2d(x, big, b1, padding=4, groups=4)
                + F.conv2d(x, small, b2, padding=3, dilation=3, groups=4))
    kernel, bias = merge_kernels(big, b1, small, b2, dilation=3)
    assert rel_err(F.conv2d(x, kernel, bias, padding=4, groups=4), expected) < 1e-14


def test_convbn_routes_depthwise_same_convs_to_the_shared_entry_point():
    assert type(ConvBN(8, 8, 31, groups=8).conv) is DepthwiseConv2d
    assert type(ConvBN(8, 8, 3, stride=2, groups=8).conv) is nn.Conv2d
    assert type(ConvBN(8, 16, 1).conv) is nn.Conv2d
    block = ConvBN(4, 8, 3, relu=True)
    assert list(block._modules) == ["conv", "bn", "nonlinear"]
    assert sorted(k for k in block.state_dict() if not k.startswith("bn.")) == ["conv.weight"]


@pytest.mark.parametrize("groups", [1, 4])
def test_convbn_fused_kernel_bias_matches_its_eval_output(groups):
    torch.manual_seed(0)
    block = ConvBN(4, 4, 5, groups=groups).to(DTYPE).eval()
    block.bn = random_bn(4)
    x = torch.randn(2, 4, 10, 10, dtype=DTYPE)
    kernel, bias = block.fused_kernel_bias()
    assert rel_err(F.conv2d(x, kernel, bias, padding=2, groups=groups), block(x)) < 1e-13
    plain = ConvBN(4, 4, 3, bn=False)
    kernel, bias = plain.fused_kernel_bias()
    assert kernel is plain.conv.weight and torch.equal(bias, torch.zeros(4))


def test_depthwise_conv_from_and_linear_from_keep_dtype_device_and_values():
    kernel, bias = torch.randn(6, 1, 7, 7, dtype=DTYPE), torch.randn(6, dtype=DTYPE)
    conv = depthwise_conv_from(kernel, bias)
    assert isinstance(conv, DepthwiseConv2d) and conv.kernel_size == (7, 7)
    assert conv.weight.dtype == DTYPE and torch.equal(conv.weight, kernel)
    assert torch.equal(conv.bias, bias) and conv.weight.requires_grad
    linear = linear_from(torch.randn(3, 5, dtype=DTYPE), torch.ones(3, dtype=DTYPE))
    assert (linear.in_features, linear.out_features) == (5, 3)
    assert linear.weight.dtype == DTYPE and torch.equal(linear.bias, torch.ones(3, dtype=DTYPE))
    meta = depthwise_conv_from(torch.empty(4, 1, 5, 5, device="meta"),
                               torch.empty(4, device="meta"))
    assert meta.weight.is_meta and meta.bias.is_meta


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine terms, and every layer scale and GRN
    parameter a value of order one, so that each re-param fold changes the function visibly.
    (Shared with the family tests.)"""
    gen = torch.Generator().manual_seed(seed)

    def fill(t: torch.Tensor, low: float, high: float) -> None:
        t.copy_(torch.rand(t.shape, generator=gen, dtype=torch.float64) * (high - low) + low)

    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            fill(module.weight, 0.5, 1.5)
            fill(module.bias, -0.5, 0.5)
            fill(module.running_mean, -0.5, 0.5)
            fill(module.running_var, 0.5, 2.0)
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma" and param.dim() == 1:  # layer scale
            fill(param, 0.3, 1.0)
        elif leaf in ("gamma", "beta"):  # GRN
            fill(param, -0.5, 0.5)
    return model


def key_shapes(model: nn.Module) -> dict:
    """{state_dict key: shape} as in the committed upstream snapshots. (Shared.)"""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def reparam_equivalence(model: nn.Module, dtype, in_chans: int = 3, size: int = 64):
    """Logits of a perturbed ``model`` in eval mode before and after reparameterize_model, on one
    random batch: (before, after, model, x). (Shared with the family tests.)"""
    torch.manual_seed(0)
    model = perturb_(model).to(dtype).eval()
    x = torch.randn(2, in_chans, size, size, dtype=dtype)
    with torch.no_grad():
        before = model(x)
        reparameterize_model(model)
        after = model(x)
    return before, after, model, x


def assert_param_counts(name: str, upstream: dict, params_m: dict) -> None:
    """Training and deploy parameter counts of ``name`` equal upstream's, exactly and in M."""
    with torch.device("meta"):
        train = models.create_model(name)
        deploy = models.create_model(name, deploy=True)
    n_train = sum(p.numel() for p in train.parameters())
    n_deploy = sum(p.numel() for p in deploy.parameters())
    assert [n_train, n_deploy] == upstream[name]["params"]
    assert (round(n_train / 1e6, 2), round(n_deploy / 1e6, 2)) == params_m[name]


def assert_keys_equal_upstream(name: str, upstream: dict,
                               deploy_builds=({"deploy": True},)) -> None:
    """The training build and each deploy build of ``name`` have upstream's state_dict keys and
    shapes; the training build, re-parameterized, has the deploy keys and loads strictly (keys and
    shapes) into the last deploy build. (Shared with the family tests.)"""
    with torch.device("meta"):
        train = models.create_model(name)
        assert key_shapes(train) == upstream[name]["train"]
        deploys = [models.create_model(name, **kwargs) for kwargs in deploy_builds]
        for deploy in deploys:
            assert key_shapes(deploy) == upstream[name]["deploy"]
        reparameterize_model(train)
        assert key_shapes(train) == upstream[name]["deploy"]
        deploys[-1].load_state_dict(train.state_dict(), strict=True, assign=True)


def assert_checkpointing_keeps_gradients(plain: nn.Module, ckpt: nn.Module) -> None:
    """``ckpt`` (activation checkpointing on), loaded with ``plain``'s weights, gives the same
    float64 gradients for one random batch. (Shared with the family tests.)"""
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-12), name
