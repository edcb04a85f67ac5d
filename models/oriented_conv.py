"""Depthwise oriented 1D convolution (Kirchmeyer & Deng, ICCV 2023).

Channel c convolves with a 1 x S kernel laid along the angle ``theta[c]``. Tap positions follow
princeton-vl/Oriented1D's kernels exactly: with ``pad = S // 2`` and ``k = s - pad``, tap ``s``
reads the input at row offset ``trunc(-sin(theta) * k)`` and column offset ``trunc(cos(theta) * k)``,
both computed in float32 and truncated toward zero (so at 45 degrees several taps can land on the
same pixel), with zero padding and stride ``st``: ``y[p, q] = sum_s w[s] x[p*st + dh_s, q*st + dw_s]``.

Two implementations compute that sum; kernels/plan.py (``oriented_runs_lknets``) picks one.
On CUDA, lknets' oriented kernel (``kernels.oriented_conv1d``) gathers the S taps of every output
in one launch for all channels, from tap offsets planned once per module. Elsewhere (CPU, or
``--lk_impl torch``), channels with the same tap pattern (upstream's angle groups are contiguous
runs of channels) are convolved with one *sparse 2D kernel* of size (2*max|dh|+1, 2*max|dw|+1)
that holds the 1D taps at their offsets (taps on the same pixel add up): the same sum, exact up
to float rounding, with autograd's exact gradients; its stride-1 convs go through
:func:`models.layers.depthwise_conv2d`. Sizes not divisible by the stride give ceil(H / st)
outputs, as zero-padding to a multiple would (upstream's ``forward_safe``).
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.plan import oriented_runs_lknets

from .layers import depthwise_conv2d

__all__ = ["OrientedConv1d", "oriented_conv1d", "tap_offsets", "channel_angles"]


def channel_angles(channels: int, num_directions: int = 8, layer_offset: float = 0.0) -> List[float]:
    """Upstream's per-channel angles: contiguous groups of ~C/N channels share ``n / N * pi``.

    Channel c is in group ``n = (N * (c + 1) - 1) // C``; ``layer_offset`` (a fraction of pi,
    0.5 on odd blocks when the layer cycle is on) rotates every angle, modulo pi.
    """
    return [math.pi * (((num_directions * (c + 1) - 1) // channels / num_directions + layer_offset)
                       % 1) for c in range(channels)]


def tap_offsets(theta: torch.Tensor, kernel_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(C, S) int64 row and column offsets of every tap, exactly as upstream computes them.

    Upstream stores ``sin(theta)`` in a float and multiplies it by the int ``s - pad`` in float32
    before the C cast truncates toward zero; float64 sin rounded to float32 reproduces that.
    """
    theta = theta.detach().to("cpu", torch.float64).reshape(-1)
    k = torch.arange(kernel_size, dtype=torch.float32, device="cpu") - kernel_size // 2
    sin = theta.sin().float()[:, None]
    cos = theta.cos().float()[:, None]
    return torch.trunc(-sin * k).long(), torch.trunc(cos * k).long()


class _Group(NamedTuple):
    """A run of channels ``start:stop`` sharing one tap pattern, as a sparse 2D kernel of
    ``(2 * radius[0] + 1) x (2 * radius[1] + 1)`` taps. (A NamedTuple: fx can record it as an
    argument.)"""

    start: int
    stop: int
    radius: Tuple[int, int]


def _plan(theta: torch.Tensor, kernel_size: int
          ) -> Tuple[List[_Group], torch.Tensor, torch.Tensor]:
    """The channel groups of ``theta``; per channel, the flat index of each of its S taps in its
    group's sparse kernel ((C, S) int64); and every tap's (row, column) offset as the CUDA
    kernel reads them ((S, C, 2) int32). On the CPU; reads theta's values (a host sync)."""
    dh, dw = tap_offsets(theta, kernel_size)
    offsets = torch.stack([dh.t(), dw.t()], dim=2).to(torch.int32).contiguous()
    pattern = torch.cat([dh, dw], dim=1)
    change = (pattern[1:] != pattern[:-1]).any(dim=1).nonzero().flatten() + 1
    bounds = [0] + change.tolist() + [pattern.shape[0]]
    groups = []
    positions = torch.empty_like(dh)
    for start, stop in zip(bounds[:-1], bounds[1:]):
        gh, gw = dh[start], dw[start]
        rh, rw = int(gh.abs().max()), int(gw.abs().max())
        positions[start:stop] = (gh + rh) * (2 * rw + 1) + gw + rw
        groups.append(_Group(start, stop, (rh, rw)))
    return groups, positions, offsets


def _sparse_kernel(weight: torch.Tensor, positions: torch.Tensor, group: _Group,
                   resid: bool) -> torch.Tensor:
    """(n, 1, 2rh+1, 2rw+1) kernel with the 1D taps of ``weight`` (n, 1, 1, S) at ``positions``
    (S,). Shapes come from the plan, not from tensors, so fx and torch.export trace it."""
    rh, rw = group.radius
    kh, kw = 2 * rh + 1, 2 * rw + 1
    n = group.stop - group.start
    taps = weight.reshape(n, -1)
    taps = _with_identity(taps) if resid else taps
    return taps.new_zeros(n, kh * kw).index_add(1, positions, taps).reshape(n, 1, kh, kw)


def _with_identity(taps: torch.Tensor) -> torch.Tensor:
    """(C, S) taps with 1 added to the centre tap (offset (0, 0)): upstream's residual form
    ``x + conv(x)``. Concatenation rather than an in-place add, which fx cannot record."""
    centre = taps.shape[1] // 2
    return torch.cat([taps[:, :centre], taps[:, centre:centre + 1] + 1, taps[:, centre + 1:]], 1)


def oriented_conv1d_planned(x: torch.Tensor, weight: torch.Tensor,
                            bias: Optional[torch.Tensor], groups: Sequence[_Group],
                            positions: torch.Tensor, offsets: torch.Tensor, stride: int,
                            resid: bool, nhwc: bool) -> torch.Tensor:
    """The oriented conv of a planned theta (``positions`` and ``offsets`` from :func:`_plan`);
    no tensor data is read."""
    if oriented_runs_lknets(x):
        import kernels
        taps = weight.reshape(weight.shape[0], -1)
        taps = _with_identity(taps) if resid else taps
        y = kernels.oriented_conv1d(x.permute(0, 3, 1, 2) if nhwc else x, taps.t(), offsets,
                                    bias, stride)
        return y.permute(0, 2, 3, 1) if nhwc else y
    if nhwc:
        x = x.permute(0, 3, 1, 2)
    outputs = []
    for group in groups:
        sl = slice(group.start, group.stop)
        xs = x if len(groups) == 1 else x[:, sl]
        kernel = _sparse_kernel(weight[sl], positions[group.start], group, resid)
        b = None if bias is None else bias[sl]
        if stride == 1:
            outputs.append(depthwise_conv2d(xs, kernel, b, padding=group.radius))
        else:
            # Zero-pad explicitly rather than through conv2d's padding: PyTorch's CPU float32
            # weight gradient of a padded single-channel conv returns garbage for some shapes
            # (e.g. a 31x1 kernel at stride 2 on a 29x30 input, torch 2.15).
            rh, rw = group.radius
            outputs.append(F.conv2d(F.pad(xs, (rw, rw, rh, rh)), kernel, b, stride, 0, 1,
                                    group.stop - group.start))
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    return y.permute(0, 2, 3, 1) if nhwc else y


# The choice of implementation reads the input's device, which fx symbolic tracing cannot see:
# fx records each oriented conv as one node, which dispatches when the traced graph runs.
torch.fx.wrap("oriented_conv1d_planned")


def oriented_conv1d(x: torch.Tensor, weight: torch.Tensor, theta: torch.Tensor,
                    bias: Optional[torch.Tensor] = None, stride: int = 1, resid: bool = False,
                    nhwc: bool = False) -> torch.Tensor:
    """Depthwise oriented 1D conv of ``x`` (N, C, H, W), or (N, H, W, C) with ``nhwc``.

    ``weight`` is (C, 1, 1, S) with S odd, ``theta`` (C,) angles in radians, ``bias`` (C,) or
    None. Returns (N, C, ceil(H/stride), ceil(W/stride)) (NHWC if ``nhwc``). ``resid`` adds the
    identity tap (``x + conv(x)`` at stride 1). The channel grouping is computed from theta's
    values on every call (a host sync); :class:`OrientedConv1d` plans once instead.
    """
    channels, _, one, kernel_size = weight.shape
    if one != 1 or kernel_size % 2 == 0:
        raise ValueError(f"weight must be (C, 1, 1, S) with S odd, got {tuple(weight.shape)}")
    in_channels = x.shape[-1] if nhwc else x.shape[1]
    if in_channels != channels or theta.numel() != channels:
        raise ValueError(f"input has {in_channels} channels, weight {channels}, "
                         f"theta {theta.numel()}; they must be equal (depthwise)")
    groups, positions, offsets = _plan(theta, kernel_size)
    return oriented_conv1d_planned(x, weight, bias, groups, positions.to(weight.device),
                                   offsets.to(weight.device), stride, resid, nhwc)


class OrientedConv1d(nn.Conv2d):
    """Depthwise oriented 1D conv module; keys ``weight`` (C, 1, 1, S), ``bias``, ``theta`` (C,).

    A drop-in for upstream's ``DepthwiseOrientedConv1d``: ``theta`` is an ``nn.Parameter`` so
    checkpoints match, but with ``requires_grad=False``: upstream never computes its gradient,
    and freezing it keeps it out of the optimizer's updates.

    The tap plan (channel groups, and the non-persistent buffers ``tap_index`` (positions in
    the sparse kernels) and ``tap_offsets`` (the CUDA kernel's offsets), so that they follow the
    module's device) is made from theta's values when the
    module is built and whenever a state_dict is loaded into it, never in ``forward``: that
    keeps forward free of host syncs and lets fx, torch.export and torch.compile trace it (and
    the meta device build it). Call :meth:`refresh_plan` after changing theta in place.

    Args:
        channels: C (in = out = groups).
        kernel_size: S, odd.
        stride: same in both directions.
        bias: learnable per-channel bias.
        angle: one angle for all channels, or C angles (radians).
        resid: add the identity (``x + conv(x)``), upstream's fused residual.
        nhwc: input and output are (N, H, W, C).
    """

    def __init__(self, channels: int, kernel_size: int, stride: int = 1, bias: bool = True,
                 angle: Union[float, Sequence[float]] = 0.0, resid: bool = False,
                 nhwc: bool = False) -> None:
        if kernel_size % 2 == 0 or kernel_size < 1:
            raise ValueError(f"oriented 1D kernels must have an odd size, got {kernel_size}")
        super().__init__(channels, channels, (1, kernel_size), stride=stride,
                         padding=(0, kernel_size // 2), groups=channels, bias=bias)
        angles = [float(angle)] * channels if isinstance(angle, (int, float)) else list(angle)
        if len(angles) != channels:
            raise ValueError(f"expected 1 or {channels} angles, got {len(angles)}")
        self.theta = nn.Parameter(torch.tensor(angles, dtype=torch.float32),
                                  requires_grad=False)
        self.resid = resid
        self.nhwc = nhwc
        # Planned from the angles on the CPU, so a build on the meta device gets a real plan.
        self._set_plan(torch.tensor(angles, dtype=torch.float32, device="cpu"))

    def extra_repr(self) -> str:
        return super().extra_repr() + f", resid={self.resid}, nhwc={self.nhwc}"

    def _set_plan(self, theta: torch.Tensor) -> None:
        groups, positions, offsets = _plan(theta, self.kernel_size[1])
        self._groups = tuple(groups)
        self.register_buffer("tap_index", positions.to(self.weight.device), persistent=False)
        self.register_buffer("tap_offsets", offsets.to(self.weight.device), persistent=False)

    def refresh_plan(self) -> None:
        """Re-plan from the current theta (a host sync)."""
        self._set_plan(self.theta)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.theta.is_meta:
            self.refresh_plan()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return oriented_conv1d_planned(x, self.weight, self.bias, self._groups, self.tap_index,
                                       self.tap_offsets, self.stride[0], self.resid, self.nhwc)
