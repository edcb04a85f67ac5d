"""Layers shared by every family.

All depthwise convolutions with large kernels go through :func:`depthwise_conv2d` (or the
:class:`DepthwiseConv2d` module that calls it), so the implementation behind them is chosen in one
place: torch's convolution or lknets' CUDA kernel (``kernels/``), see :func:`set_lk_impl`.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_

__all__ = ["DropPath", "trunc_normal_", "LayerNorm2d", "DepthwiseConv2d", "depthwise_conv2d",
           "to_2tuple", "drop_path_rates", "set_lk_impl", "get_lk_impl", "LK_IMPLS",
           "oriented_kernel_runs"]

IntOrPair = Union[int, Tuple[int, int]]


def to_2tuple(value: IntOrPair) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> List[float]:
    """Stochastic-depth rate of each block, rising linearly from 0 to ``drop_path_rate``.

    Plain Python (not torch.linspace) so models can be built on the meta device.
    """
    if num_blocks == 1:
        return [0.0]
    return [drop_path_rate * i / (num_blocks - 1) for i in range(num_blocks)]


LK_IMPLS = ("auto", "cuda", "torch")
_LEGACY_ENV = "LARGE_KERNEL_CONV_IMPL"
_lk_impl: Optional[str] = None
_kernel_fn: Optional[Callable[..., torch.Tensor]] = None
_kernel_state: Optional[bool] = None


def set_lk_impl(name: str) -> None:
    """Choose the large-kernel depthwise conv: ``auto``, ``cuda`` or ``torch``.

    ``auto`` (default) runs lknets' kernel on CUDA inputs for the kernel sizes where it measured
    faster than torch (benchmarks/RESULTS.md) and falls back to torch elsewhere, or when the
    extension can't be built or loaded. ``cuda`` runs lknets' kernel for every CUDA input and fails
    loudly if the extension is missing. ``torch`` always uses ``F.conv2d``. CPU inputs always use
    torch.
    """
    global _lk_impl
    if name not in LK_IMPLS:
        raise ValueError(f"unknown large-kernel conv implementation {name!r}; choose one of {LK_IMPLS}")
    _lk_impl = name


def get_lk_impl() -> str:
    """The current choice; the first call honours upstream's ``LARGE_KERNEL_CONV_IMPL`` variable."""
    global _lk_impl
    if _lk_impl is None:
        legacy = os.environ.get(_LEGACY_ENV)
        if legacy is None:
            _lk_impl = "auto"
        else:
            _lk_impl = legacy if legacy in LK_IMPLS else "cuda"
            warnings.warn(f"{_LEGACY_ENV}={legacy!r} is upstream's switch to its iGEMM extension; lknets "
                          f"ships its own kernel and reads it as --lk_impl {_lk_impl} (prefer "
                          "--lk_impl or models.layers.set_lk_impl)", stacklevel=2)
    return _lk_impl


def _kernel_wins(x: torch.Tensor, kh: int, kw: int, dilation: Tuple[int, int] = (1, 1)) -> bool:
    """Where lknets' kernel measured faster than torch's path for the same input, training (forward
    and both gradients) and inference alike (benchmarks/RESULTS.md, bf16/fp16/fp32).

    Every kernel from 3x3 up (input dtype, or the autocast dtype; bf16: RepLKNet's 5x5 branches
    2.2-4.8x, UniRepLKNet's 3x3 blocks 2.1-2.8x; fp32 on the tensor cores as 3xTF32: 5x5 at 56x56
    2.3x, 3x3 1.9x), except square 3x3 and 5x5 in fp16, where torch takes cuDNN's depthwise kernels
    and wins on some maps; kernels of at most 49 taps on channels_last input (7x7, and 1-D
    kernels up to 1x49 / 49x1) stay on cuDNN, which won on the 7x7 ones (the 1-D ones there
    were not measured separately).
    """
    autocast = torch.is_autocast_enabled("cuda")
    dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
    if kh * kw < 9:
        return False
    if dilation != (1, 1):
        return _dilated_kernel_wins(x, kh, kw, dilation)
    if dtype == torch.float16 and kh == kw and kh <= 5:
        return False
    return not (kh * kw <= 49 and x.is_contiguous(memory_format=torch.channels_last))


def _dilated_kernel_wins(x: torch.Tensor, kh: int, kw: int, dilation: Tuple[int, int]) -> bool:
    """Dilated convs (UniRepLKNet's branches; benchmarks/dilated_branches.py, RESULTS.md) take
    lknets' kernel under torch.compile only: per conv it was faster (bf16 f+b, 7x7 d2 at 14x14
    0.684 -> 0.085 ms), but eagerly the sub-grid copies or the kernel's expansion are extra
    launches, and UniRepLKNet-T trained at 0.73x of torch's rate with them. On NCHW planes above
    16x16 that the dilation does not divide, 3x3 kernels stay on cuDNN, which wins there (the
    sub-grids need zero-filling).
    """
    if not torch.compiler.is_compiling():
        return False
    h, w = x.shape[-2:]
    nchw = x.is_contiguous()
    return not (nchw and kh * kw <= 9 and h * w > 256 and (h % dilation[0] or w % dilation[1]))


@torch.compiler.assume_constant_result
def _kernels_ready(strict: bool) -> bool:
    """Loads (or JIT-builds, once) the extension; a constant for torch.compile."""
    global _kernel_fn, _kernel_state
    if _kernel_state is None or (strict and not _kernel_state):
        import kernels
        try:
            kernels.load_extension()
            _kernel_fn, _kernel_state = kernels.depthwise_conv2d, True
        except RuntimeError as exc:
            _kernel_state = False
            if strict:
                raise
            warnings.warn(f"{exc}; large-kernel convs use torch's implementation", stacklevel=2)
    return _kernel_state


def depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                     padding: Optional[IntOrPair] = None, dilation: IntOrPair = 1) -> torch.Tensor:
    """Depthwise, stride-1 cross-correlation of ``x`` (N, C, H, W) with ``weight`` (C, 1, kh, kw).

    ``padding`` defaults to ``dilation * (k // 2)``, which keeps H and W for odd kernels. The
    implementation follows :func:`set_lk_impl`; lknets' kernel takes a dilated conv when the
    padding is a multiple of the dilation ('same' padding is).
    """
    kh, kw = weight.shape[-2:]
    dh, dw = to_2tuple(dilation)
    pad = (dh * (kh // 2), dw * (kw // 2)) if padding is None else to_2tuple(padding)
    impl = get_lk_impl()
    if (x.is_cuda and impl != "torch" and pad[0] % dh == 0 and pad[1] % dw == 0
            and (impl == "cuda" or _kernel_wins(x, kh, kw, (dh, dw)))):
        if _kernels_ready(impl == "cuda"):
            return _kernel_fn(x, weight, bias, pad, (dh, dw))
    return F.conv2d(x, weight, bias, 1, pad, (dh, dw), weight.shape[0])


def oriented_kernel_runs(x: torch.Tensor) -> bool:
    """Whether an oriented 1D conv of ``x`` runs on lknets' oriented kernel: every CUDA input
    unless ``--lk_impl torch`` (or the extension is missing under ``auto``). Against torch's
    path, a sparse 2D conv per angle group, it measured faster on every shape it was timed on
    (benchmarks/oriented.py, benchmarks/RESULTS.md)."""
    impl = get_lk_impl()
    return x.is_cuda and impl != "torch" and _kernels_ready(impl == "cuda")


# The dispatch above reads the input's device and the --lk_impl choice, which fx symbolic
# tracing cannot see (it traces with shapeless, deviceless proxies). fx records each call as one
# node instead, so a traced graph still dispatches when it runs; torch.export and torch.compile
# trace real (fake) tensors and go through the dispatch as usual.
torch.fx.wrap("depthwise_conv2d")


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise stride-1 conv with 'same' padding; parameters and state_dict keys of nn.Conv2d.

    A drop-in for upstream's ``DepthWiseConv2dImplicitGEMM(channels, kernel, bias)``, and, with
    ``dilation``, for the ``nn.Conv2d`` of UniRepLKNet's dilated branches.
    """

    def __init__(self, channels: int, kernel_size: IntOrPair, bias: bool = False,
                 dilation: int = 1) -> None:
        kh, kw = to_2tuple(kernel_size)
        super().__init__(channels, channels, (kh, kw), stride=1,
                         padding=(dilation * (kh // 2), dilation * (kw // 2)), dilation=dilation,
                         groups=channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias, self.padding, self.dilation)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dimension of an NCHW tensor (ConvNeXt's channels_first LN).

    Parameters are ``weight`` and ``bias`` of shape (C,), as in upstream's hand-written module.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)
