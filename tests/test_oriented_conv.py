"""The oriented depthwise 1D conv reproduces upstream's tap positions, forward and backward."""
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from models.oriented_conv import OrientedConv1d, oriented_conv1d, tap_offsets


def reference(x, w, theta, bias=None, stride=1, resid=False):
    """Direct loop over upstream's formula (kernels.cpp fprop), zero padding, ceil(H/stride)."""
    n, c, h, w_ = x.shape
    s_len = w.shape[-1]
    pad = s_len // 2
    out_h, out_w = -(-h // stride), -(-w_ // stride)
    y = torch.zeros(n, c, out_h, out_w, dtype=x.dtype)
    for ch in range(c):
        sin = torch.tensor(math.sin(float(theta[ch])), dtype=torch.float32)
        cos = torch.tensor(math.cos(float(theta[ch])), dtype=torch.float32)
        for s in range(s_len):
            dh = int(float(-sin * (s - pad)))
            dw = int(float(cos * (s - pad)))
            tap = w[ch, 0, 0, s] + (1.0 if resid and s == pad else 0.0)
            for p in range(out_h):
                for q in range(out_w):
                    hh, ww = p * stride + dh, q * stride + dw
                    if 0 <= hh < h and 0 <= ww < w_:
                        y[:, ch, p, q] += x[:, ch, hh, ww] * tap
        if bias is not None:
            y[:, ch] += bias[ch]
    return y


def test_offsets_at_45_degrees_truncate_toward_zero():
    dh, dw = tap_offsets(torch.tensor([math.pi / 4]), 7)
    assert list(zip(dh[0].tolist(), dw[0].tolist())) == [
        (2, -2), (1, -1), (0, 0), (0, 0), (0, 0), (-1, 1), (-2, 2)]


def test_theta_zero_is_a_1xS_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    w = torch.randn(4, 1, 1, 7, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    y = oriented_conv1d(x, w, torch.zeros(4), b)
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=(0, 3), groups=4), rtol=0, atol=1e-12)


def test_theta_90_is_the_tap_reversed_Sx1_conv():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    w = torch.randn(4, 1, 1, 7, dtype=torch.float64)
    y = oriented_conv1d(x, w, torch.full((4,), math.pi / 2))
    flipped = w.flip(-1).reshape(4, 1, 7, 1)
    torch.testing.assert_close(y, F.conv2d(x, flipped, padding=(3, 0), groups=4), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("stride,size", [(1, (9, 8)), (2, (8, 8)), (2, (7, 5)), (3, (8, 7))])
def test_matches_the_upstream_loop_formula(stride, size):
    torch.manual_seed(0)
    angles = [math.pi / 8, math.pi / 4, 3 * math.pi / 4, 0.3, math.pi / 2, 0.0]
    theta = torch.tensor(angles, dtype=torch.float32)
    x = torch.randn(2, 6, *size, dtype=torch.float64)
    w = torch.randn(6, 1, 1, 9, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    y = oriented_conv1d(x, w, theta, b, stride=stride)
    assert y.shape[-2:] == (-(-size[0] // stride), -(-size[1] // stride))
    torch.testing.assert_close(y, reference(x, w, theta, b, stride), rtol=0, atol=1e-12)


def test_nhwc_and_fused_residual():
    torch.manual_seed(0)
    theta = torch.tensor([math.pi / 8] * 3 + [5 * math.pi / 8] * 3)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    w = torch.randn(6, 1, 1, 5, dtype=torch.float64)
    y = oriented_conv1d(x.permute(0, 2, 3, 1), w, theta, resid=True, nhwc=True)
    assert y.shape == (2, 7, 7, 6)
    torch.testing.assert_close(y.permute(0, 3, 1, 2), reference(x, w, theta, resid=True),
                               rtol=0, atol=1e-12)


def test_gradcheck_input_weight_bias():
    torch.manual_seed(0)
    theta = torch.tensor([math.pi / 8, math.pi / 4, 3 * math.pi / 4])
    x = torch.randn(1, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 1, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    for stride in (1, 2):
        assert torch.autograd.gradcheck(
            lambda x, w, b: oriented_conv1d(x, w, theta, b, stride=stride), (x, w, b))


def test_backward_keeps_no_per_tap_copies():
    """Only the input (views of it) and the small kernels are saved, not S shifted copies."""
    torch.manual_seed(0)
    conv = OrientedConv1d(16, 31, angle=[i * math.pi / 8 for i in range(8) for _ in range(2)])
    x = torch.randn(2, 16, 32, 32, requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = conv(x)
    assert sum(storages.values()) < 2 * x.numel() * x.element_size()
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


def test_module_keys_frozen_theta_and_plan_refresh():
    torch.manual_seed(0)
    conv = OrientedConv1d(4, 5, angle=0.0)
    assert list(conv.state_dict()) == ["weight", "bias", "theta"]
    assert isinstance(conv.theta, torch.nn.Parameter) and not conv.theta.requires_grad
    x = torch.randn(1, 4, 6, 6)
    y0 = conv(x)
    conv(x).sum().backward()
    assert conv.theta.grad is None and conv.weight.grad is not None
    state = conv.state_dict()
    state["theta"] = torch.full((4,), math.pi / 2)
    conv.load_state_dict(state)
    y90 = conv(x)
    expected = F.conv2d(x, conv.weight.flip(-1).reshape(4, 1, 5, 1), conv.bias, padding=(2, 0),
                        groups=4)
    torch.testing.assert_close(y90, expected)
    assert not torch.allclose(y0, y90)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="odd"):
        OrientedConv1d(4, 6)
    with pytest.raises(ValueError, match="angles"):
        OrientedConv1d(4, 5, angle=[0.0, 1.0])
    with pytest.raises(ValueError, match="channels"):
        oriented_conv1d(torch.randn(1, 3, 4, 4), torch.randn(4, 1, 1, 5), torch.zeros(4))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    conv = OrientedConv1d(16, 31, stride=2, angle=[i * math.pi / 16 for i in range(16)])
    x = torch.randn(2, 16, 29, 30, requires_grad=True)
    y = conv(x)
    y.square().sum().backward()
    conv_cuda = OrientedConv1d(16, 31, stride=2).cuda()
    conv_cuda.load_state_dict(conv.state_dict())
    x_cuda = x.detach().cuda().requires_grad_()
    y_cuda = conv_cuda(x_cuda)
    y_cuda.square().sum().backward()
    torch.testing.assert_close(y_cuda.cpu(), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x_cuda.grad.cpu(), x.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(conv_cuda.weight.grad.cpu(), conv.weight.grad, rtol=1e-3, atol=1e-3)


def test_strided_float32_gradients_match_float64_on_cpu():
    """Regression: torch's CPU conv2d returned garbage weight gradients for the single-channel
    groups of this shape (31-tap vertical kernel, stride 2, 29x30 input) when padding was
    passed to conv2d."""
    torch.manual_seed(0)
    conv = OrientedConv1d(16, 31, stride=2, angle=[i * math.pi / 16 for i in range(16)])
    x = torch.randn(2, 16, 29, 30, requires_grad=True)
    conv(x).square().sum().backward()
    conv64 = OrientedConv1d(16, 31, stride=2).double()
    conv64.load_state_dict(conv.state_dict())
    x64 = x.detach().double().requires_grad_()
    conv64(x64).square().sum().backward()
    torch.testing.assert_close(conv.weight.grad.double(), conv64.weight.grad, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4)


def _run(conv, x, impl):
    """Output, input / weight / bias gradients of ``conv(x)`` with ``--lk_impl impl``, and how
    many times lknets' oriented kernel ran."""
    import kernels
    from kernels import plan
    previous = plan.configure(impl=impl)
    try:
        x = x.detach().requires_grad_()
        conv.zero_grad()
        with mock.patch.object(kernels, "oriented_conv1d", wraps=kernels.oriented_conv1d) as op:
            y = conv(x)
        seed = torch.arange(y.numel(), device=y.device, dtype=torch.float64).cos()
        y.backward(seed.to(y.dtype).reshape(y.shape))
        return y.detach(), x.grad, conv.weight.grad.clone(), conv.bias.grad.clone(), op.call_count
    finally:
        plan.configure(impl=previous.impl)


@pytest.mark.gpu
@pytest.mark.parametrize("stride,size,nhwc,resid", [
    (1, (13, 11), False, False), (1, (12, 9), True, True), (2, (29, 30), False, False),
    (2, (15, 17), True, False), (3, (10, 7), False, False)])
def test_cuda_kernel_equals_the_torch_path_in_float64(stride, size, nhwc, resid):
    """lknets' oriented kernel against the sparse-kernel path, forward and all gradients, on
    upstream's 8 directions (45-degree taps that share pixels included) and odd sizes."""
    torch.manual_seed(0)
    channels = 16
    angles = [math.pi * ((8 * (c + 1) - 1) // channels / 8) for c in range(channels)]
    conv = OrientedConv1d(channels, 15, stride=stride, angle=angles, resid=resid, nhwc=nhwc)
    conv = conv.double().cuda()
    x = torch.randn(3, channels, *size, dtype=torch.float64, device="cuda")
    if nhwc:
        x = x.permute(0, 2, 3, 1).contiguous()
    *ours, kernel_calls = _run(conv, x, "cuda")
    *torchs, no_calls = _run(conv, x, "torch")
    assert (kernel_calls, no_calls) == (1, 0)
    for got, expected in zip(ours, torchs):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_kernel_16_bit_and_float32_against_float64(dtype, channels_last):
    torch.manual_seed(0)
    channels = 24
    angles = [math.pi * ((8 * (c + 1) - 1) // channels / 8) for c in range(channels)]
    conv = OrientedConv1d(channels, 31, angle=angles).cuda()
    x = torch.randn(2, channels, 20, 18, device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y64, gx64, gw64, gb64, _ = _run(conv.double(), x.double(), "torch")
    y, gx, gw, gb, _ = _run(conv.to(dtype), x.to(dtype), "cuda")
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for got, expected in ((y, y64), (gx, gx64), (gw, gw64), (gb, gb64)):
        scale = expected.abs().max()
        assert (got.double() - expected).abs().max() <= tol * scale


@pytest.mark.gpu
def test_cuda_kernel_under_autocast_and_torch_compile():
    torch.manual_seed(0)
    conv = OrientedConv1d(8, 9, angle=[c * math.pi / 8 for c in range(8)]).cuda()
    x = torch.randn(2, 8, 16, 16, device="cuda")
    expected = conv(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = conv(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=2e-2, atol=2e-2)
    compiled = torch.compile(conv, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


def _formulations_run(conv, x, impl, oriented):
    """_run with the oriented formulation forced (``auto`` lifts it), and the formulations the
    plan gave the launches, in call order."""
    import kernels.oriented
    from kernels import plan
    chosen = []

    def record(*args):
        chosen.append(plan.oriented_formulation(*args))
        return chosen[-1]

    with plan.using(oriented=oriented), mock.patch.object(kernels.oriented,
                                                          "oriented_formulation", record):
        return _run(conv, x, impl), chosen


@pytest.mark.gpu
@pytest.mark.parametrize("size,taps,batch", [
    ((13, 11), 15, 3), ((56, 56), 31, 2), ((7, 7), 31, 20), ((14, 9), 31, 5), ((1, 5), 7, 2),
    ((20, 33), 31, 1)])
def test_plane_kernels_equal_the_torch_path_in_float64(size, taps, batch):
    """The shared-memory plane kernels (forward and input gradient, stride 1, NCHW), and the
    gather kernels, against the sparse-kernel path, forward and all gradients: planes smaller
    than the halo, several images per block (7x7 x 20), one row."""
    torch.manual_seed(0)
    channels = 16
    angles = [math.pi * ((8 * (c + 1) - 1) // channels / 8) for c in range(channels)]
    conv = OrientedConv1d(channels, taps, angle=angles).double().cuda()
    x = torch.randn(batch, channels, *size, dtype=torch.float64, device="cuda")
    *torchs, _ = _run(conv, x, "torch")
    (*planes, calls), chosen = _formulations_run(conv, x, "cuda", "plane")
    assert calls == 1 and chosen == ["plane"] * 2
    (*gathers, _), chosen = _formulations_run(conv, x, "cuda", "gather")
    assert chosen == ["gather"] * 2
    for got_plane, got_gather, expected in zip(planes, gathers, torchs):
        torch.testing.assert_close(got_plane, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(got_gather, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
def test_plane_kernels_take_offsets_beyond_the_halo():
    """The op takes any integer offsets: taps farther out than S // 2 but inside the plane read
    global memory, taps beyond the plane read nothing; the plane and gather kernels agree."""
    import kernels
    from kernels import plan
    torch.manual_seed(0)
    n, c, h, w, taps = 3, 5, 12, 10, 5
    x = torch.randn(n, c, h, w, dtype=torch.float64, device="cuda", requires_grad=True)
    weight = torch.randn(taps, c, dtype=torch.float64, device="cuda", requires_grad=True)
    offsets = torch.randint(-13, 14, (taps, c, 2), dtype=torch.int32)
    offsets[0, 0] = torch.tensor([9, -7], dtype=torch.int32)  # past the halo of 2, inside
    offsets = offsets.cuda()
    results = []
    for oriented in ("plane", "gather"):
        with plan.using(oriented=oriented):
            y = kernels.oriented_conv1d(x, weight, offsets)
            grads = torch.autograd.grad(y, (x, weight), y.detach().cos())
        results.append((y.detach(), *grads))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
def test_forcing_the_plane_kernels_where_they_cannot_run_is_an_error():
    from kernels import plan
    conv = OrientedConv1d(8, 9, stride=2, angle=0.3).cuda()
    with plan.using(impl="cuda", oriented="plane"), pytest.raises(ValueError, match="stride 2"):
        conv(torch.randn(1, 8, 16, 16, device="cuda"))


def test_plan_mirrors_which_planes_the_extension_stages():
    """plan.oriented_plane_takes mirrors the extension's shared-memory limit (no GPU needed)."""
    import kernels
    from kernels import plan
    if not kernels.is_built():
        pytest.skip("needs the built extension (make test builds it)")
    ops = kernels.load_extension(jit=False)
    answers = set()
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for n in (1, 3, 64):
            for h, w in ((1, 1), (7, 7), (14, 9), (20, 18), (56, 56), (57, 61), (96, 96),
                         (112, 112), (150, 90), (224, 224)):
                for taps in (1, 7, 31, 63):
                    ours = plan.oriented_plane_takes((n, 4, h, w), taps, dtype)
                    theirs = ops.oriented_plane_takes(n, 4, h, w, taps, dtype)
                    assert ours == theirs, (dtype, n, h, w, taps)
                    answers.add(ours)
    assert answers == {True, False}


def test_throughput_bound_skips_oriented_convs_exactly():
    """benchmarks/throughput.py's ``bound`` passes an oriented conv's input on (every stride-th
    pixel, plus the bias), in both layouts, and leaves the conv untouched afterwards."""
    from benchmarks.throughput import depthwise_convs_skipped
    torch.manual_seed(0)
    conv = OrientedConv1d(8, 9, stride=2, angle=0.4)
    conv_nhwc = OrientedConv1d(8, 9, angle=0.4, nhwc=True)
    x = torch.randn(2, 8, 7, 6)
    expected = conv(x)
    with depthwise_convs_skipped():
        torch.testing.assert_close(conv(x), x[:, :, ::2, ::2] + conv.bias.view(1, -1, 1, 1))
        nhwc = x.permute(0, 2, 3, 1)
        torch.testing.assert_close(conv_nhwc(nhwc), nhwc + conv_nhwc.bias)
    torch.testing.assert_close(conv(x), expected)
