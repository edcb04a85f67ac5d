"""lknets' depthwise-conv CUDA extension: build helpers and dispatch (CPU), numerics (GPU).

GPU tests compare every direction with a float64 reference on the same (rounded) inputs, on fresh
random data, with the caching allocator's free memory poisoned with NaN before each op so that an
unwritten output element cannot pass.
"""
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _build, plan
from models import layers

gpu = pytest.mark.gpu
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


# ----------------------------------------------------------------------------- CPU-side behaviour

def test_build_helpers_find_a_real_toolkit_or_explain():
    home = _build.find_cuda_home()
    if home is None:
        assert "CUDA" in _build.no_toolkit_message()
    else:
        assert os.path.isfile(os.path.join(home, "bin", "nvcc"))
        assert os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
    flags = _build.compile_flags()
    assert "-O3" in flags["nvcc"] and "-O3" in flags["cxx"]
    # setup.py and the JIT build compile the same list: every translation unit in kernels/csrc.
    units = sorted(f for f in os.listdir(_build.CSRC) if f.endswith((".cu", ".cpp")))
    assert sorted(os.path.basename(s) for s in _build.SOURCES) == units


def test_fake_impls_give_output_shapes_and_layouts():
    x = torch.empty(2, 3, 9, 11, device="meta")
    w = torch.empty(3, 1, 5, 3, device="meta")
    assert torch.ops.lknets.dwconv2d(x, w, None, 2, 1).shape == (2, 3, 9, 11)
    assert torch.ops.lknets.dwconv2d(x, w, None, 0, 0).shape == (2, 3, 5, 9)
    xl = x.to(memory_format=torch.channels_last)
    assert torch.ops.lknets.dwconv2d(xl, w, None, 2, 1).is_contiguous(
        memory_format=torch.channels_last)
    dy = torch.empty(2, 3, 5, 9, device="meta")
    assert torch.ops.lknets.dwconv2d_input_grad(dy, w, 0, 0).shape == (2, 3, 9, 11)
    assert torch.ops.lknets.dwconv2d_weight_grad(x, dy, 5, 3, 0, 0).shape == (3, 1, 5, 3)


def test_bad_arguments_raise_clear_errors():
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match=r"weight \(C, 1, kh, kw\)"):
        kernels.depthwise_conv2d(x, torch.randn(3, 1, 3, 3))
    with pytest.raises(TypeError, match="must match"):
        kernels.depthwise_conv2d(x, torch.randn(4, 1, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"kernel 9x9 with dilation \(1, 1\) and padding \(0, 0\) does not fit the input "
                                         r"\(1, 4, 8, 8\)"):
        kernels.depthwise_conv2d(x, torch.randn(4, 1, 9, 9), padding=0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        kernels.depthwise_conv2d(x, torch.randn(4, 1, 3, 3), padding=(-1, 1))
    with pytest.raises(ValueError, match="within 1..63, got 65x3"):
        kernels.depthwise_conv2d(x, torch.randn(4, 1, 65, 3))
    with pytest.raises(ValueError, match="choose one of"):
        plan.set_lk_impl("cutlass")


@pytest.mark.parametrize("shape,k,dilation,pad", [
    ((2, 3, 13, 11), (3, 3), (2, 3), None),
    ((2, 3, 14, 14), (3, 3), (5, 5), None),   # UniRepLKNet's k3 d5 branch at 14x14
    ((1, 2, 7, 7), (3, 3), (4, 4), None),     # sub-grids of 2x2 and 1x1 pixels
    ((2, 3, 12, 9), (7, 5), (2, 1), (2, 4)),  # explicit padding: smaller output
    ((1, 2, 10, 10), (4, 2), (3, 2), (3, 2)),  # even kernel: output larger than the input
])
def test_subgrids_make_a_dilated_conv_undilated(shape, k, dilation, pad):
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(shape[1], 1, *k, dtype=torch.float64)
    dh, dw = dilation
    pad = (dh * (k[0] // 2), dw * (k[1] // 2)) if pad is None else pad
    subgrids = kernels.split_subgrids(x, dilation)
    assert subgrids.shape == (shape[0] * dh * dw, shape[1], -(-shape[2] // dh), -(-shape[3] // dw))
    torch.testing.assert_close(kernels.merge_subgrids(subgrids, dilation, *shape[2:]), x)
    expected = F.conv2d(x, w, None, 1, pad, dilation, shape[1])
    undilated = F.conv2d(subgrids, w, None, 1, (pad[0] // dh, pad[1] // dw), 1, shape[1])
    torch.testing.assert_close(kernels.merge_subgrids(undilated, dilation, *expected.shape[2:]),
                               expected, rtol=1e-12, atol=1e-12)
    # The op's own shape logic, through its fake implementation.
    y = kernels.depthwise_conv2d(x.to("meta"), w.to("meta"), None, pad, dilation)
    assert y.shape == expected.shape


def test_dense_dilated_kernel_passes_gradients_to_its_taps():
    x = torch.randn(2, 3, 15, 13, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 3, 5, dtype=torch.float64, requires_grad=True)
    dense = kernels.dilate_kernel(w, (4, 2))
    assert dense.shape == (3, 1, 9, 9) and kernels.dilate_kernel(w, 1) is w
    y, y_ref = F.conv2d(x, dense, None, 1, 4, 1, 3), F.conv2d(x, w, None, 1, 4, (4, 2), 3)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, [x, w], dy), torch.autograd.grad(y_ref, [x, w], dy)):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_dilation_must_divide_the_padding():
    x, w = torch.randn(1, 4, 12, 12), torch.randn(4, 1, 3, 3)
    with pytest.raises(ValueError, match=r"dilation \(2, 2\) must be >= 1 and divide the padding "
                                         r"\(3, 2\)"):
        kernels.depthwise_conv2d(x, w, padding=(3, 2), dilation=2)
    with pytest.raises(ValueError, match=r"dilation \(6, 6\) and padding \(0, 0\) does not fit"):
        kernels.depthwise_conv2d(x, w, padding=0, dilation=6)


def test_dilated_convs_off_the_kernel_fall_back_to_torch():
    # CPU input, and a padding the sub-grids cannot express: both are torch's dilated conv.
    x, w = torch.randn(2, 4, 11, 11), torch.randn(4, 1, 3, 3)
    conv = layers.DepthwiseConv2d(4, 3, dilation=3)
    assert conv.padding == (3, 3) and conv.dilation == (3, 3)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, None, 1, 3, 3, 4))
    torch.testing.assert_close(layers.depthwise_conv2d(x, w, None, (2, 2), 3),
                               F.conv2d(x, w, None, 1, 2, 3, 4))


def test_implicit_gemm_module_is_a_conv2d_drop_in():
    m = kernels.DepthwiseConv2dImplicitGEMM(8, 13, bias=True)
    assert list(m.state_dict()) == ["weight", "bias"]
    assert m.weight.shape == (8, 1, 13, 13) and m.padding == (6, 6) and m.groups == 8
    x = torch.randn(2, 8, 10, 10)
    ref = F.conv2d(x, m.weight, m.bias, 1, 6, 1, 8)
    torch.testing.assert_close(m(x), ref)


def test_dispatch_uses_torch_on_cpu_and_honours_legacy_env(monkeypatch):
    monkeypatch.setattr(plan, "_settings", None)
    monkeypatch.setenv("LARGE_KERNEL_CONV_IMPL", "/opt/cutlass/examples/19_large_depthwise_conv2d")
    with pytest.warns(UserWarning, match="LARGE_KERNEL_CONV_IMPL"):
        assert plan.get_lk_impl() == "cuda"
    x, w = torch.randn(1, 3, 9, 9), torch.randn(3, 1, 7, 5)
    # CPU inputs never reach the extension, whatever the choice.
    torch.testing.assert_close(layers.depthwise_conv2d(x, w), F.conv2d(x, w, None, 1, (3, 2), 1, 3))
    monkeypatch.setattr(plan, "_settings", None)
    monkeypatch.delenv("LARGE_KERNEL_CONV_IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan.get_lk_impl() == "auto"
    plan.set_lk_impl("torch")
    assert plan.get_lk_impl() == "torch"


def test_settings_are_read_once_and_restored(monkeypatch):
    monkeypatch.setattr(plan, "_settings", None)
    monkeypatch.setenv("LKNETS_DWCONV_ALGO", "rows")
    monkeypatch.setenv("LKNETS_DWCONV_DILATION", "dense")
    assert plan.settings().forced_for("weight_grad") == "rows"
    monkeypatch.setenv("LKNETS_DWCONV_ALGO", "small")  # read once: no effect now
    assert plan.settings().forced_for("forward") == "rows"
    with plan.using(formulation="auto", weight_grad="direct", dilation="subgrids"):
        assert plan.settings().forced == (("weight_grad", "direct"),)
        assert plan.dilation_mode((56, 56)) == "subgrids"
    assert plan.settings().forced_for("input_grad") == "rows"
    assert plan.dilation_mode((7, 7)) == "dense"
    monkeypatch.setattr(plan, "_settings", None)
    monkeypatch.setenv("LKNETS_DWCONV_ALGO", "gemm")
    with pytest.raises(ValueError, match="cannot force formulation 'gemm'"):
        plan.settings()
    monkeypatch.delenv("LKNETS_DWCONV_ALGO")
    monkeypatch.setattr(plan, "_settings", None)
    with pytest.raises(ValueError, match="unknown dilation mode 'sparse'"):
        plan.configure(dilation="sparse")


@pytest.mark.parametrize("dtype,k,layout,size,expected", [
    (torch.bfloat16, 5, "nchw", 14, True),   # RepLKNet's 5x5 branch: ours from 3x3
    (torch.float16, 5, "nchw", 14, False),   # fp16 square 3x3/5x5: cuDNN's kernels
    (torch.float16, 3, "nchw", 56, False),
    (torch.float16, 7, "nchw", 14, True),
    (torch.float32, 5, "nchw", 14, True),    # fp32 (3xTF32) from 3x3, any map
    (torch.float32, 3, "nchw", 56, True),
    (torch.float32, 27, "nchw", 17, True),
    (torch.bfloat16, 3, "nchw", 14, True),   # UniRepLKNet's 3x3 blocks too
    (torch.bfloat16, 2, "nchw", 14, False),
    (torch.float32, 2, "nchw", 14, False),
    (torch.bfloat16, 3, "channels_last", 14, False),
    (torch.bfloat16, 7, "channels_last", 14, False),  # cuDNN's channels_last kernels win
    (torch.float32, 7, "channels_last", 56, False),
    (torch.bfloat16, 13, "channels_last", 14, True),
])
def test_auto_dispatch_rule(dtype, k, layout, size, expected):
    cl = layout == "channels_last"
    assert plan.lknets_wins(dtype, (k, k), (1, 1), (size, size), cl, not cl, False) is expected
    assert (plan.plan_conv((2, 8, size, size), (k, k), dtype, cl).impl == "lknets") is expected
    assert plan.plan_conv((2, 8, size, size), (k, k), dtype, cl, on_cuda=False).impl == "torch"


@pytest.mark.parametrize("layout,size,k,dilation,expected", [
    ("nchw", 28, 7, 2, True),
    ("nchw", 28, 3, 4, True),            # 7x7 sub-grids
    ("nchw", 28, 3, 3, False),           # zero-filled 10x10 sub-grids: cuDNN wins
    ("nchw", 28, 3, 5, False),
    ("channels_last", 28, 3, 3, True),   # cuDNN's channels_last dilated convs are slow
    ("nchw", 14, 3, 5, True),            # dense zero-filled kernel on the small-plane GEMM
])
def test_dilated_dispatch_rule(layout, size, k, dilation, expected):
    cl = layout == "channels_last"
    args = (torch.bfloat16, (k, k), (dilation, dilation), (size, size), cl, not cl)
    # Eagerly the extra copies cost more host time than the kernel saves: always torch.
    assert plan.lknets_wins(*args, compiling=False) is False
    assert plan.lknets_wins(*args, compiling=True) is expected


# What runs for the large kernels of each family (batch 64, 'same' padding): the plan as a table
# a reader can check against kernels/plan.py's rules.
@pytest.mark.parametrize("shape,k,dtype,layout,dilation,expected", [
    ((64, 128, 56, 56), (31, 31), torch.bfloat16, "nchw", (1, 1), "lknets rows/rows/rows"),
    ((64, 256, 28, 28), (29, 29), torch.float32, "nchw", (1, 1), "lknets mid/mid/mid"),
    ((64, 512, 14, 14), (27, 27), torch.bfloat16, "nchw", (1, 1), "lknets small/small/small"),
    ((64, 1024, 7, 7), (13, 13), torch.bfloat16, "nchw", (1, 1), "lknets plane/plane/plane"),
    ((64, 1024, 7, 7), (13, 13), torch.float32, "channels_last", (1, 1),
     "lknets small/small/small"),
    ((64, 96, 56, 56), (51, 5), torch.bfloat16, "nchw", (1, 1),
     "lknets rows/rows/rows (transposed)"),
    ((64, 384, 14, 14), (47, 5), torch.bfloat16, "nchw", (1, 1), "lknets small/small/small"),
    ((64, 384, 14, 14), (47, 5), torch.bfloat16, "channels_last", (1, 1),
     "lknets small/small/small (transposed)"),
    ((64, 96, 56, 56), (31, 1), torch.float32, "nchw", (1, 1),
     "lknets rows/rows/rows (transposed)"),
    ((64, 80, 56, 56), (5, 5), torch.float16, "nchw", (1, 1), "torch"),
    ((64, 80, 56, 56), (7, 7), torch.bfloat16, "channels_last", (1, 1), "torch"),
    ((64, 160, 28, 28), (7, 7), torch.float32, "nchw", (2, 2), "torch"),  # eager: torch
])
def test_plan_of_family_shapes(shape, k, dtype, layout, dilation, expected):
    got = plan.plan_conv(shape, k, dtype, layout == "channels_last", dilation)
    assert str(got) == expected


def test_plan_of_dilated_branches_under_compile():
    compiled = plan.plan_conv((64, 160, 28, 28), (7, 7), torch.bfloat16, dilation=(2, 2),
                              compiling=True)
    assert compiled == plan.ConvPlan("lknets", "subgrids", False, "small", "small", "small")
    dense = plan.plan_conv((64, 320, 14, 14), (3, 3), torch.bfloat16, dilation=(5, 5),
                           compiling=True)
    assert str(dense) == "lknets small/small/small (dense)"
    with plan.using(impl="torch"):
        assert plan.plan_conv((64, 160, 28, 28), (7, 7), torch.bfloat16, dilation=(2, 2),
                              compiling=True).impl == "torch"
    with plan.using(impl="cuda"):
        assert plan.plan_conv((64, 80, 56, 56), (5, 5), torch.float16).impl == "lknets"
        assert plan.plan_conv((64, 80, 56, 56), (5, 5), torch.float16,
                              extension=False).impl == "torch"


def test_forcing_a_formulation_that_cannot_take_the_shape_is_an_error():
    with plan.using(formulation="mid"):
        # fp32 28x28: the mid-plane GEMM takes every direction
        assert str(plan.plan_conv((8, 4, 28, 28), (13, 13), torch.float32)) == "lknets mid/mid/mid"
        with pytest.raises(ValueError, match="forced formulation 'mid' cannot take the forward"):
            plan.plan_conv((8, 4, 28, 28), (13, 13), torch.bfloat16)  # fp32 only
    with plan.using(forward="plane"), pytest.raises(ValueError, match="'plane' cannot take"):
        plan.plan_conv((8, 4, 14, 14), (13, 13), torch.bfloat16)  # over 64 pixels
    with plan.using(weight_grad="plane"):
        got = plan.plan_conv((8, 4, 8, 8), (13, 13), torch.float32, channels_last=True)
    assert (got.forward, got.weight_grad) == ("small", "plane")


def test_formulations_are_numbered_as_the_extension_numbers_them():
    header = open(os.path.join(_build.CSRC, "dwconv.h")).read()
    enum = header[header.index("enum class Formulation"):].split("}")[0]
    names = [part.split("=")[0].strip()[1:].lower() for part in enum.split("{")[1].split(",")]
    numbers = [int(part.split("=")[1]) for part in enum.split("{")[1].split(",")]
    assert names == list(plan.FORMULATIONS) and numbers == list(range(len(names)))


def test_show_plan_prints_every_depthwise_conv_of_a_model(capsys):
    from tools import show_plan
    show_plan.main(["--model", "RepLKNet-31B", "--input_size", "64", "--dtype", "fp32"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (")]
    # The stem's 3x3, then 31x31/29x29/27x27/13x13 and their 5x5 branches at the four stages.
    assert len(rows) == 9 and all("lknets" in row for row in rows)
    assert rows[1] == "| (128, 16, 16) | 31x31 | dilation 1 | 2 | lknets small/small/small |"
    assert rows[6].endswith("| 18 | lknets plane/plane/plane |")
    show_plan.main(["--model", "convnext_tiny", "--variant", "1d", "--input_size", "64",
                    "--lk_impl", "torch"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| (")]
    assert rows[0] == "| (64, 64, 64) | oriented 1x31 | stride 2 | 1 | torch (sparse 2D) |"


# Builds models and runs them on the CPU after importing kernels, recording every attempt to
# compile (torch's JIT extension loader, any nvcc/ninja process) or to load the extension.
_OBSERVE_IMPORT = """
import subprocess, sys
import torch.utils.cpp_extension as cpp_extension
attempts = []
cpp_extension.load = lambda *a, **k: attempts.append(("cpp_extension.load", a))
popen = subprocess.Popen
def watched(args, *a, **k):
    if any(tool in str(args) for tool in ("nvcc", "ninja", "c++", "gcc")):
        attempts.append(("process", args))
    return popen(args, *a, **k)
subprocess.Popen = watched
import torch, kernels, models
for name in ("convnext_atto", "convnext_tiny_1d", "unireplknet_a"):
    models.create_model(name, num_classes=3)(torch.randn(1, 3, 64, 64))
x, w = torch.randn(1, 4, 9, 9), torch.randn(4, 1, 5, 5)
torch.testing.assert_close(kernels.depthwise_conv2d(x, w), torch.nn.functional.conv2d(x, w, None, 1, 2, 1, 4))
assert kernels.ops._state == {"loaded": False, "error": None}, kernels.ops._state
assert "kernels._C" not in sys.modules
assert not attempts, attempts
print("nothing compiled")
"""


def test_importing_kernels_compiles_nothing():
    """Importing kernels and models, building models and running them on the CPU neither
    compiles nor loads the extension (it is compiled on the first call on a GPU)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _OBSERVE_IMPORT], cwd=root, capture_output=True,
                          text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert done.returncode == 0 and "nothing compiled" in done.stdout, done.stderr[-3000:]


# ------------------------------------------------------------------------------------ GPU numerics

def _poison():
    """Fill the allocator's cached free blocks with NaN, so outputs reusing them start poisoned."""
    if torch.cuda.is_available():
        junk = torch.full((16 * 1024 * 1024,), float("nan"), device="cuda")
        del junk


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a = a.double()
    assert torch.isfinite(a).all(), "output has NaN/Inf (unwritten or overflowed)"
    return ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _make(shape, dtype, layout, device="cuda"):
    n, c, h, w = shape
    if layout == "noncontig":
        big = torch.randn(n, c, h + 3, w + 5, device=device, dtype=dtype)
        return big[:, :, 1:h + 1, 2:w + 2]
    t = torch.randn(shape, device=device, dtype=dtype)
    return t.to(memory_format=torch.channels_last) if layout == "channels_last" else t


def _reference(x, w, b, pad, dy, dilation=1):
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_()
    bd = b.detach().double().requires_grad_() if b is not None else None
    y = F.conv2d(xd, wd, bd, 1, pad, dilation, x.shape[1])
    grads = torch.autograd.grad(y, [xd, wd] + ([bd] if bd is not None else []), dy.double())
    return y.detach(), grads


def _check_all_directions(shape, k, dtype, layout, pad=None, bias=True, dilation=(1, 1)):
    kh, kw = k
    pad = (dilation[0] * (kh // 2), dilation[1] * (kw // 2)) if pad is None else pad
    x = _make(shape, dtype, layout).requires_grad_()
    w = (torch.randn(shape[1], 1, kh, kw, device="cuda") / (kh * kw) ** 0.5).to(dtype)
    w.requires_grad_()
    b = torch.randn(shape[1], device="cuda", dtype=dtype).requires_grad_() if bias else None
    _poison()
    y = kernels.depthwise_conv2d(x, w, b, pad, dilation)
    dy = _make(tuple(y.shape), dtype, layout)
    y_ref, g_ref = _reference(x, w, b, pad, dy, dilation)
    assert y.dtype == dtype and y.shape == y_ref.shape
    if layout == "channels_last" and dilation == (1, 1):
        assert y.is_contiguous(memory_format=torch.channels_last)
    _poison()
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), dy)
    assert grads[1].dtype == dtype
    tol = TOL[dtype]
    errs = [_rel(y, y_ref)] + [_rel(g, r) for g, r in zip(grads, g_ref)]
    assert max(errs) < tol, f"rel errors (y, dx, dw[, db]) {errs} over {tol}"
    return errs


SHAPES = [
    ((3, 7, 13, 13), (3, 3)),
    ((3, 7, 13, 13), (13, 13)),
    ((3, 7, 13, 13), (31, 31)),      # kernel larger than the image
    ((2, 5, 57, 61), (31, 31)),
    ((2, 5, 57, 61), (51, 5)),
    ((2, 5, 57, 61), (5, 51)),
    ((2, 6, 29, 31), (1, 31)),
    ((2, 6, 29, 31), (31, 1)),
    ((1, 3, 20, 17), (63, 63)),
    ((2, 4, 11, 9), (4, 6)),         # even kernel: output one larger than the input
    ((5, 16, 14, 14), (27, 27)),
    ((4, 24, 7, 7), (13, 13)),
    ((2, 8, 96, 70), (29, 29)),      # more than one tile per plane
]


@gpu
@pytest.mark.parametrize("shape,k", SHAPES, ids=[f"{s}-{k[0]}x{k[1]}" for s, k in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_all_directions_match_float64(shape, k, dtype):
    torch.manual_seed(hash((shape, k)) % 1000)
    _check_all_directions(shape, k, dtype, "nchw")


# Shapes around the formulation boundaries (each test forces a formulation in the directions whose
# launch it takes, kernels/plan.py; the extension runs exactly that). The plane GEMM (default up
# to 8x8) takes planes of up to 64 pixels in blocks of 64 images; contiguous planes whose image stride is a multiple of 16 bytes
# are staged with 16-byte copies from the 16-byte boundary before each plane (the shift differs per
# channel), others element by element; the small-plane GEMM (default up to 16x16) on planes of up
# to 16x16 in forward blocks of 32 images and weight-grad steps of 32 or 64 (fp32: 3xTF32, staged
# element by element, weight-grad steps of 32); the mid-plane GEMM (fp32 only, default for 17 to 32
# columns) in forward blocks of 16 images and up to 16 output rows, weight-grad blocks of 8 images,
# rows staged with 16-byte copies when whole 16-byte chunks make up a row, else element by element;
# the row-Toeplitz GEMM (default beyond) tiles outputs in blocks of up to 64 x 64, skips band tiles
# and padding rows, and reads H/W-transposed views with vectors down their columns (fp32 everywhere
# as 3xTF32).
ALGO_SHAPES = [
    ((70, 5, 16, 16), (13, 13)),     # largest small-plane GEMM plane, three image blocks
    ((3, 6, 17, 15), (13, 13)),      # just over the small-plane GEMM's limit
    ((2, 4, 33, 33), (31, 31)),      # row-Toeplitz by default
    ((2, 3, 40, 37), (7, 7)),        # many column blocks, clipped input-row ranges
    ((65, 3, 7, 7), (13, 13)),
    ((2, 3, 12, 30), (3, 29)),
    ((9, 3, 130, 67), (5, 63)),      # three row tiles and two column tiles, images split in blocks
    ((3, 2, 21, 100), (1, 31)),
    ((3, 4, 40, 24), (29, 3)),       # H/W-transposed view: 8-element vectors down its columns
    ((2, 3, 26, 18), (9, 5)),        # the same with 2-element vectors
    ((4, 5, 14, 11), (13, 3)),       # small plane, tall kernel (not transposed on small planes)
    ((5, 3, 14, 12), (47, 5)),       # kernel rows past the plane's reach: zero weight gradient
    ((66, 4, 9, 16), (27, 27)),      # small plane, kernel larger than the image, two image blocks
    ((67, 8, 7, 7), (13, 13)),       # plane GEMM: 16-byte staging, every shift, two image blocks
    ((5, 3, 8, 8), (3, 3)),          # plane GEMM: 64-pixel planes
    ((2, 16, 1, 50), (1, 31)),       # plane GEMM: one-row planes, shifts 0 / 2 / 4 / 6
    ((4, 8, 6, 9), (5, 3)),          # plane GEMM: H/W-transposed view, staged element by element
    ((18, 5, 28, 28), (29, 29)),     # mid-plane GEMM: two image blocks, two row blocks
    ((3, 4, 24, 24), (27, 27)),      # mid-plane GEMM: three 8-column chunks
    ((2, 3, 21, 17), (7, 5)),        # mid-plane GEMM: odd width, band of one chunk pair
    ((5, 3, 40, 32), (9, 31)),       # mid-plane GEMM: 32 columns, three row blocks
    ((9, 2, 30, 26), (63, 63)),      # mid-plane GEMM: kernel larger than the plane
    ((10, 3, 45, 56), (31, 31)),     # mid-plane GEMM, wide forward: two image blocks, odd Ho
    ((3, 4, 20, 37), (7, 21)),       # wide forward: odd width (element by element), 5 chunks
    ((2, 3, 33, 64), (5, 47)),       # wide forward: 8 chunks, chunk pairs up to 3 apart
]


def _strides(shape, layout):
    n, c, h, w = shape
    if layout == "channels_last":
        return (c * h * w, 1, w * c, c)
    if layout == "noncontig":  # _make's view of a (h + 3) x (w + 5) plane
        return (c * (h + 3) * (w + 5), (h + 3) * (w + 5), w + 5, 1)
    return (c * h * w, h * w, w, 1)


def _forcing(algo, shape, k, dtype, layout="nchw", pad=None):
    """direction -> ``algo`` for each direction whose launch ``algo`` takes (the output
    gradient in the input's layout, as _check_all_directions makes it)."""
    pad = (k[0] // 2, k[1] // 2) if pad is None else pad
    out = (shape[0], shape[1], shape[2] + 2 * pad[0] - k[0] + 1, shape[3] + 2 * pad[1] - k[1] + 1)
    forcing = {}
    for direction in plan.DIRECTIONS:
        src = out if direction == "input_grad" else shape
        launch, _ = plan.launch_of(direction, src, _strides(src, layout), k, pad)
        if plan.supports(algo, direction, dtype, launch):
            forcing[direction] = algo
    return forcing


def _forced_cases(cases, algos, dtypes, layout="nchw"):
    """pytest params (case..., dtype, forcing) for every formulation that takes at least one
    direction of the case, with the forced directions in the id."""
    params = []
    for case in cases:
        shape, k = case[0], case[1]
        for dtype in dtypes:
            for algo in algos:
                forcing = _forcing(algo, shape, k, dtype, layout)
                if forcing:
                    short = "".join(d[0] for d in forcing)  # f, i, w
                    params.append(pytest.param(*case, dtype, forcing, id=(
                        f"{shape}-{k[0]}x{k[1]}-{str(dtype)[6:]}-{algo}:{short}")))
    return params


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _ran(forcing, shape, k, dtype, layout="nchw"):
    """Assert that the plan of the conv runs each forced formulation."""
    with plan.using(impl="cuda"):  # as kernels.depthwise_conv2d: lknets' kernel whatever wins
        got = plan.plan_conv(shape, k, dtype, layout == "channels_last")
    for direction, algo in forcing.items():
        assert getattr(got, direction) == algo, (direction, got)


DILATED = [
    ((3, 7, 28, 28), (7, 7), (2, 2)),    # UniRepLKNet's branches at stage 2 to 4
    ((3, 7, 14, 14), (3, 3), (5, 5)),
    ((4, 6, 7, 7), (3, 3), (4, 4)),
    ((2, 5, 13, 11), (5, 3), (2, 3)),
    ((2, 3, 30, 44), (9, 9), (3, 3)),
]


@gpu
@pytest.mark.parametrize("shape,k,dilation", DILATED, ids=[f"{s}-{k[0]}x{k[1]}-d{d[0]}x{d[1]}"
                                                           for s, k, d in DILATED])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "noncontig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("how", ["subgrids", "dense"])
def test_dilated_convs_match_float64(shape, k, dilation, layout, dtype, how):
    torch.manual_seed(hash((shape, k, dilation)) % 1000)
    with plan.using(dilation=how):
        _check_all_directions(shape, k, dtype, layout, dilation=dilation)


@gpu
@pytest.mark.parametrize("shape,k,dtype,forcing",
                         _forced_cases(ALGO_SHAPES, plan.FORMULATIONS, DTYPES))
def test_every_formulation_matches_float64(shape, k, dtype, forcing):
    torch.manual_seed(hash((shape, k)) % 1000)
    with plan.using(**forcing):
        _ran(forcing, shape, k, dtype)
        _check_all_directions(shape, k, dtype, "nchw")


def test_forced_cases_cover_every_formulation_and_direction():
    covered = {(p.values[3][d], d) for p in _forced_cases(ALGO_SHAPES, plan.FORMULATIONS, DTYPES)
               for d in p.values[3]}
    assert covered == {(a, d) for a in plan.FORMULATIONS for d in plan.DIRECTIONS}


LAYOUT_SHAPES = [((4, 6, 14, 13), (13, 13)), ((4, 8, 7, 7), (13, 13)), ((3, 5, 22, 19), (13, 13)),
                 ((3, 4, 20, 44), (13, 13))]


@gpu
@pytest.mark.parametrize("layout", ["channels_last", "noncontig"])
@pytest.mark.parametrize("shape,k,dtype,forcing", _forced_cases(
    LAYOUT_SHAPES, plan.FORMULATIONS, [torch.float32, torch.bfloat16]))
def test_every_formulation_reads_any_layout(shape, k, dtype, forcing, layout):
    forcing = {d: a for d, a in forcing.items()
               if d in _forcing(a, shape, k, dtype, layout)}
    with plan.using(**forcing):
        _check_all_directions(shape, k, dtype, layout)


@gpu
@pytest.mark.parametrize("algo", ["direct", "plane", "rows", "small"])
@pytest.mark.parametrize("k", [(13, 13), (13, 5)], ids=["13x13", "13x5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_weight_is_read_through_its_strides(k, algo, dtype):
    # The kernels read the weight in place (the input gradient's rotation and the tall kernels'
    # transposed view are strides), so a strided view of a larger tensor must work as given.
    with plan.using(formulation=algo):
        _weight_views_work(k, dtype)


def _weight_views_work(k, dtype):
    kh, kw = k
    x = torch.randn(3, 8, 7, 7, device="cuda", dtype=dtype, requires_grad=True)
    w = (torch.randn(8, 1, kh + 2, kw + 4, device="cuda") / 13).to(dtype)
    w = w[:, :, 1:kh + 1, 3:kw + 3].requires_grad_()
    assert not w.is_contiguous()
    y = kernels.depthwise_conv2d(x, w)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, w], dy)
    y_ref, g_ref = _reference(x, w, None, (kh // 2, kw // 2), dy)
    errs = [_rel(y, y_ref)] + [_rel(g, r) for g, r in zip(grads, g_ref)]
    assert max(errs) < TOL[dtype], errs


@gpu
@pytest.mark.parametrize("algo", ["plane", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_neighbouring_planes_do_not_leak(algo, dtype):
    # The plane GEMM's 16-byte staging copies parts of the neighbouring channels' planes along;
    # an inf there must not turn this channel's outputs or weight gradient into NaN.
    with plan.using(formulation=algo):
        _neighbours_stay_finite(dtype)


def _neighbours_stay_finite(dtype):
    x = torch.randn(3, 8, 7, 7, device="cuda", dtype=dtype)
    w = torch.randn(8, 1, 13, 13, device="cuda", dtype=dtype) / 13
    x[:, 3] = float("inf")
    dy = torch.randn_like(x)
    dy[:, 5] = float("inf")
    y = kernels.depthwise_conv2d(x, w)
    dw = torch.ops.lknets.dwconv2d_weight_grad(x, dy, 13, 13, 6, 6)
    keep = [c for c in range(8) if c not in (3, 5)]
    y_ref, (_, dw_ref) = _reference(x[:, keep], w[keep], None, (6, 6), dy[:, keep])
    assert _rel(y[:, keep], y_ref) < TOL[dtype]
    assert _rel(dw[keep], dw_ref) < TOL[dtype]


def _padding_cases():
    # small: planes of <= 16x16; mid (fp32): with padding 0 an input of 21 and an output of 15
    # columns; each formulation forced in the directions whose launch it takes.
    params = []
    for algo, shape in (("rows", (2, 5, 17, 15)), ("small", (2, 5, 9, 8)),
                        ("mid", (2, 5, 17, 21))):
        for pad in ((0, 0), (2, 7), (9, 9)):
            for dtype in (torch.float16, torch.float32):
                forcing = _forcing(algo, shape, (7, 7), dtype, pad=pad)
                if forcing:
                    params.append(pytest.param(shape, pad, dtype, forcing, id=(
                        f"{algo}:{''.join(d[0] for d in forcing)}-pad{pad[0]}x{pad[1]}-"
                        f"{str(dtype)[6:]}")))
    return params


@gpu
@pytest.mark.parametrize("shape,pad,dtype,forcing", _padding_cases())
def test_tensor_core_explicit_padding(shape, pad, dtype, forcing):
    with plan.using(**forcing):
        _check_all_directions(shape, (7, 7), dtype, "nchw", pad=pad, bias=False)


@gpu
@pytest.mark.parametrize("pad", [(0, 0), (1, 3), (4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_plane_gemm_explicit_padding(pad, dtype):
    # Output planes of 2, 24 and 54 pixels; the input gradient runs with padding 4 - pad.
    with plan.using(formulation="plane"):
        _check_all_directions((3, 8, 5, 6), (5, 5), dtype, "nchw", pad=pad, bias=False)


@gpu
@pytest.mark.parametrize("layout", ["channels_last", "noncontig"])
@pytest.mark.parametrize("k", [(31, 31), (51, 5), (13, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layouts_match_float64(layout, k, dtype):
    _check_all_directions((3, 7, 23, 19), k, dtype, layout)


@gpu
@pytest.mark.parametrize("pad", [(0, 0), (2, 7), (9, 9)])
def test_explicit_padding(pad):
    with plan.using(formulation="direct"):
        _check_all_directions((2, 5, 17, 15), (7, 7), torch.float32, "nchw", pad=pad, bias=False)


@gpu
@pytest.mark.parametrize("size,k,dtype,algo", [(28, 29, torch.bfloat16, "auto"),  # row-Toeplitz GEMM
                                               (14, 27, torch.bfloat16, "auto"),  # small-plane GEMM
                                               (14, 27, torch.float32, "auto"),   # 3xTF32 small
                                               (28, 29, torch.float32, "auto"),   # 3xTF32 mid
                                               (56, 31, torch.float32, "auto"),   # 3xTF32 rows
                                               (28, 29, torch.float32, "direct")],
                         ids=["rows", "small", "small-fp32", "mid-fp32", "rows-fp32", "direct"])
def test_weight_grad_is_deterministic(size, k, dtype, algo, request):
    expected = {"rows": "rows", "small": "small", "small-fp32": "small", "mid-fp32": "mid",
                "rows-fp32": "rows", "direct": "direct"}[request.node.callspec.id]
    with plan.using(formulation=algo):
        assert plan.plan_conv((80, 32, size, size), (k, k), dtype).weight_grad == expected
        x = torch.randn(80, 32, size, size, device="cuda", dtype=dtype)
        dy = torch.randn_like(x)
        first = torch.ops.lknets.dwconv2d_weight_grad(x, dy, k, k, k // 2, k // 2)
        for _ in range(3):
            again = torch.ops.lknets.dwconv2d_weight_grad(x, dy, k, k, k // 2, k // 2)
            assert torch.equal(again, first)


@gpu
def test_extension_rejects_unsupported_dtypes():
    # Shape errors are caught in Python (test_bad_arguments_raise_clear_errors): on the H100
    # machine's build, TORCH_CHECK messages that format integers crashed the process instead of
    # raising (see kernels/csrc/ops.cpp); the dtype check's message has none and raises.
    with pytest.raises(RuntimeError, match="dtype Double is not supported"):
        double = dict(device="cuda", dtype=torch.float64)
        kernels.load_extension().forward(torch.randn(1, 2, 5, 5, **double),
                                         torch.randn(2, 1, 3, 3, **double), None, 1, 1, 0, False)


@gpu
def test_extension_refuses_a_formulation_that_cannot_take_the_shape():
    x = torch.randn(2, 4, 20, 20, device="cuda")
    w = torch.randn(4, 1, 5, 5, device="cuda")
    plane = plan.FORMULATIONS.index("plane")  # planes of up to 64 pixels
    with pytest.raises(RuntimeError, match="planned formulation cannot take this shape"):
        kernels.load_extension().forward(x, w, None, 2, 2, plane, False)
    with pytest.raises(RuntimeError, match="planned formulation cannot take this shape"):
        kernels.load_extension().weight_grad(x, x, 5, 5, 2, 2, plane, False)


@pytest.mark.skipif(not kernels.is_built(), reason="needs the built extension (make test builds it)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["fp32", "fp16", "bf16"])
def test_plan_mirrors_what_the_extension_supports(dtype):
    # plan.supports mirrors the kernels' own limits (shared memory, columns, band reach): every
    # formulation, both kinds of launch, over planes, kernels and paddings across the boundaries.
    # The extension's answer needs no GPU (it is computed on meta tensors).
    ops = kernels.load_extension(jit=False)
    checked = 0
    for h in (1, 7, 8, 9, 16, 17, 24, 31, 32, 33, 48, 64, 65, 96):
        for w in (1, 8, 15, 16, 17, 21, 32, 33, 40, 56, 64, 65):
            for kh, kw in ((3, 3), (13, 13), (31, 31), (63, 63), (5, 51), (51, 5), (1, 31)):
                for ph, pw in ((kh // 2, kw // 2), (0, 0), (kh - 1, kw - 1), (kh + 2, kw + 3)):
                    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
                    if ho < 1 or wo < 1:
                        continue
                    launch = plan.Launch(4, 3, h, w, ho, wo, kh, kw, ph, pw, (3 * h * w, h * w, w, 1))
                    for index, name in enumerate(plan.FORMULATIONS):
                        for direction in ("forward", "weight_grad"):
                            ours = plan.supports(name, direction, dtype, launch)
                            theirs = ops.supports(index, direction == "weight_grad", dtype,
                                                  [4, 3, h, w, ho, wo, kh, kw, ph, pw])
                            assert ours == theirs, (name, direction, launch)
                            checked += 1
    assert checked > 10000


@gpu
def test_autocast_casts_to_the_autocast_dtype():
    x = torch.randn(2, 8, 20, 20, device="cuda", requires_grad=True)
    w = torch.randn(8, 1, 13, 13, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = kernels.depthwise_conv2d(x, w)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    y_ref = F.conv2d(x.detach().bfloat16().double(), w.detach().bfloat16().double(), None, 1, 6,
                     1, 8)
    assert _rel(y, y_ref) < 1e-2


@gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_has_no_graph_break(backend):
    conv = layers.DepthwiseConv2d(8, 31, bias=True).cuda()
    previous = plan.configure(impl="cuda")
    try:
        def step(x):
            return (conv(x) * 2).sum()

        compiled = torch.compile(step, fullgraph=True, backend=backend)
        x = torch.randn(2, 8, 24, 24, device="cuda", requires_grad=True)
        loss = compiled(x)
        loss.backward()
        gx = x.grad.clone()
        x.grad = None
        step(x).backward()
        torch.testing.assert_close(gx, x.grad)
    finally:
        plan.configure(impl=previous.impl)


@gpu
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_eager_path_equals_the_custom_op(bias):
    # Eager calls skip the custom op's dispatch (kernels/ops.py); both must give the same bits.
    x = torch.randn(3, 6, 14, 13, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(6, 1, 13, 13, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(6, device="cuda", dtype=torch.bfloat16, requires_grad=True) if bias else None
    inputs = [x, w] + ([b] if bias else [])
    y = kernels.depthwise_conv2d(x, w, b)
    assert y.grad_fn.name() == "_EagerDwconv2dBackward"
    y_op = torch.ops.lknets.dwconv2d(x, w, b, 6, 6)
    dy = torch.randn_like(y)
    assert torch.equal(y, y_op)
    for g, g_op in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(y_op, inputs, dy)):
        assert torch.equal(g, g_op)


@gpu
def test_cuda_graph_capture_and_replay():
    conv = kernels.DepthwiseConv2dImplicitGEMM(16, 31, bias=True).cuda()
    static_x = torch.randn(4, 16, 28, 28, device="cuda", requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            conv(static_x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    conv.zero_grad(set_to_none=False)
    with torch.cuda.graph(graph):
        static_y = conv(static_x)
        static_y.sum().backward()
    new_x = torch.randn_like(static_x)
    static_x.data.copy_(new_x)
    conv.weight.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref = F.conv2d(new_x, conv.weight, conv.bias, 1, 15, 1, 16)
    torch.testing.assert_close(static_y, ref, rtol=1e-4, atol=1e-4)


def _model_run(model, x, impl):
    plan.set_lk_impl(impl)
    model.to(x.dtype).zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = model(x)
    out.pow(2).mean().backward()
    grads = {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().double(), grads


def _model_errors(run, ref):
    """Errors of one fp32 run against the float64 run: output, all gradients as one vector, and
    each large depthwise kernel's gradient at the scale of the whole gradient (parameters whose
    true gradient is about 0, such as a bias before a BN, hold only rounding noise)."""
    (y, g), (y_ref, g_ref) = run, ref
    assert set(g) == set(g_ref)
    flat_ref = torch.cat([g_ref[n].flatten() for n in sorted(g_ref)])
    flat = torch.cat([g[n].flatten() for n in sorted(g_ref)])
    large = [n for n in g_ref if g_ref[n].dim() == 4 and g_ref[n].shape[0] > 1
             and g_ref[n].shape[1] == 1 and min(g_ref[n].shape[-2:]) > 1
             and g_ref[n].shape[-1] * g_ref[n].shape[-2] >= 49]
    assert large, "the model has no large depthwise kernel"
    scale = flat_ref.norm()
    return ([_rel(y, y_ref), _rel(flat, flat_ref)]
            + [((g[n] - g_ref[n]).norm() / scale).item() for n in large])


def _model_case(name, size):
    # Both fp32 paths are compared with the model in float64 (torch path): at batch 2 in training
    # mode these deep BN networks amplify rounding (RepLKNet-31B: torch's own fp32 gradients are
    # about 1e-2 off float64 on the H100), so lknets' kernels must be as close as torch's are, not
    # bitwise equal to them.
    from models import create_model
    torch.manual_seed(0)
    model = create_model(name).cuda().train()
    x = torch.randn(2, 3, size, size, device="cuda")
    ref = _model_run(model, x.double(), "torch")
    torch_errs = _model_errors(_model_run(model, x, "torch"), ref)
    ours_errs = _model_errors(_model_run(model, x, "cuda"), ref)
    plan.set_lk_impl("auto")
    model.float()
    for ours, theirs in zip(ours_errs, torch_errs):
        assert ours <= 2 * theirs + 1e-6, (ours_errs, torch_errs)


@pytest.fixture
def without_tf32():
    # The float64 comparison needs torch's fp32 convs and matmuls in full fp32; the flags are
    # process-wide, so they are put back for the tests that follow.
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@gpu
@pytest.mark.parametrize("name", ["RepLKNet-31B", "unireplknet_t", "SLaK_tiny"])
def test_whole_model_matches_torch_path(name, without_tf32):
    _model_case(name, 224)
