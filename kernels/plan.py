"""The one place that decides which depthwise-conv implementation runs.

Every decision is a pure function of what a call looks like (shape, dtype, layout, kernel,
dilation, direction) and of :class:`Settings`, which are read once from the command line or the
environment. Models call :func:`planned_depthwise_conv2d` or ask :func:`oriented_runs_lknets`
and know no benchmark numbers; the op (kernels/ops.py) asks :func:`formulation` for each launch
and the CUDA extension runs exactly that formulation, refusing a shape it cannot take (no silent
fallback), so ``plan_conv(...)`` tells what runs and tests can assert it.

Three levels of decision, each measured (benchmarks/RESULTS.md; kernels/DESIGN.md explains the
kernels):

1. torch's ``F.conv2d`` or lknets' kernel (``--lk_impl auto|cuda|torch``; :func:`lknets_wins`);
2. for a dilated conv on lknets' kernel, interleaved sub-grids or the dense zero-filled kernel
   (:func:`dilation_mode`), and for tall kernels the H/W-transposed views (:func:`transposed`);
3. the tensor-core formulation of each launch, forward / input gradient / weight gradient
   (:func:`formulation`): the plane GEMM up to 64 pixels, the small-plane GEMM up to 16x16, the
   fp32 mid-plane GEMM for 17 to 64 columns, the row-Toeplitz GEMM for everything else; the
   direct CUDA-core kernels only when forced.

4. for an oriented 1D conv on lknets' kernel, the shared-memory ``plane`` kernels (stride 1,
   NCHW planes that fit) or the ``gather`` kernels (:func:`oriented_formulation`).

``python tools/show_plan.py --model NAME`` prints the plan of every depthwise conv of a model.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch

__all__ = ["IMPLS", "FORMULATIONS", "DIRECTIONS", "Settings", "settings", "configure", "using",
           "set_lk_impl", "get_lk_impl", "ConvPlan", "Launch", "plan_conv", "formulation",
           "supports", "launch_of", "transposed", "dilation_mode", "lknets_wins", "extension_ready",
           "oriented_runs_lknets", "oriented_formulation", "oriented_plane_takes",
           "oriented_plane_can_run", "planned_depthwise_conv2d"]

IMPLS = ("auto", "cuda", "torch")
# Numbered as the Formulation enum of kernels/csrc/dwconv.h: the index is what the op passes.
FORMULATIONS = ("direct", "plane", "small", "mid", "rows")
DIRECTIONS = ("forward", "input_grad", "weight_grad")
DILATION_MODES = ("auto", "subgrids", "dense")
ORIENTED_FORMULATIONS = ("gather", "plane")
_LEGACY_IMPL_ENV = "LARGE_KERNEL_CONV_IMPL"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the user chose. ``impl``: ``--lk_impl``. ``forced``: direction -> formulation name
    (benchmarks, tests; ``LKNETS_DWCONV_ALGO=NAME`` forces every direction). ``dilation``:
    ``auto``, or ``subgrids`` / ``dense`` forced (``LKNETS_DWCONV_DILATION``).
    ``oriented``: ``auto``, or ``gather`` / ``plane`` forced for every oriented launch
    (``LKNETS_ORIENTED_ALGO``)."""

    impl: str = "auto"
    forced: Tuple[Tuple[str, str], ...] = ()
    dilation: str = "auto"
    oriented: str = "auto"

    def forced_for(self, direction: str) -> Optional[str]:
        return dict(self.forced).get(direction)


def _from_environment() -> Settings:
    impl = "auto"
    legacy = os.environ.get(_LEGACY_IMPL_ENV)
    if legacy is not None:
        impl = legacy if legacy in IMPLS else "cuda"
        warnings.warn(f"{_LEGACY_IMPL_ENV}={legacy!r} is upstream's switch to its iGEMM extension; "
                      f"lknets ships its own kernel and reads it as --lk_impl {impl} (prefer "
                      "--lk_impl or kernels.plan.set_lk_impl)", stacklevel=3)
    forced = os.environ.get("LKNETS_DWCONV_ALGO")
    dilation = os.environ.get("LKNETS_DWCONV_DILATION", "auto")
    oriented = os.environ.get("LKNETS_ORIENTED_ALGO", "auto")
    return _validated(Settings(impl, _forcing(forced) if forced else (), dilation, oriented))


def _forcing(name: str) -> Tuple[Tuple[str, str], ...]:
    return tuple((direction, name) for direction in DIRECTIONS)


def _validated(s: Settings) -> Settings:
    if s.impl not in IMPLS:
        raise ValueError(f"unknown large-kernel conv implementation {s.impl!r}; choose one of "
                         f"{IMPLS}")
    for direction, name in s.forced:
        if direction not in DIRECTIONS or name not in FORMULATIONS:
            raise ValueError(f"cannot force formulation {name!r} for {direction!r}; formulations: "
                             f"{FORMULATIONS}, directions: {DIRECTIONS}")
    if s.dilation not in DILATION_MODES:
        raise ValueError(f"unknown dilation mode {s.dilation!r}; choose one of {DILATION_MODES}")
    if s.oriented not in ("auto",) + ORIENTED_FORMULATIONS:
        raise ValueError(f"unknown oriented formulation {s.oriented!r}; choose one of "
                         f"{('auto',) + ORIENTED_FORMULATIONS}")
    return s


_settings: Optional[Settings] = None


def settings() -> Settings:
    """The current settings; the environment is read on the first call only."""
    global _settings
    if _settings is None:
        _settings = _from_environment()
    return _settings


def configure(impl: Optional[str] = None, formulation: Optional[str] = None,
              dilation: Optional[str] = None, oriented: Optional[str] = None,
              **per_direction: str) -> Settings:
    """Change the settings; returns the previous ones. ``formulation`` forces one formulation in
    every direction (``"auto"`` lifts forcing); ``forward=``/``input_grad=``/``weight_grad=``
    force one direction; ``oriented`` forces the oriented kernels' formulation."""
    global _settings
    previous = settings()
    forced = dict(previous.forced)
    if formulation is not None:
        forced = {} if formulation == "auto" else dict(_forcing(formulation))
    forced.update(per_direction)
    _settings = _validated(Settings(previous.impl if impl is None else impl,
                                    tuple(sorted(forced.items())),
                                    previous.dilation if dilation is None else dilation,
                                    previous.oriented if oriented is None else oriented))
    return previous


@contextlib.contextmanager
def using(**changes: str) -> Iterator[Settings]:
    """``with using(formulation="mid"): ...``: :func:`configure` for the block, then restore."""
    global _settings
    previous = configure(**changes)
    try:
        yield settings()
    finally:
        _settings = previous


def set_lk_impl(name: str) -> None:
    """``--lk_impl``: ``auto`` (default) runs lknets' kernel on CUDA inputs where it measured
    faster than torch (:func:`lknets_wins`) and torch's elsewhere, or everywhere when the
    extension can't be built or loaded (with a warning); ``cuda`` runs lknets' kernel for every
    CUDA input and fails loudly without the extension; ``torch`` always runs ``F.conv2d``. CPU
    inputs always run torch's convolution."""
    configure(impl=name)


def get_lk_impl() -> str:
    return settings().impl


# -- 1. torch's conv or lknets' kernel -------------------------------------------------------------

def lknets_wins(dtype: torch.dtype, kernel: Tuple[int, int], dilation: Tuple[int, int],
                plane: Tuple[int, int], channels_last: bool, contiguous: bool,
                compiling: bool) -> bool:
    """Where lknets' kernel measured faster than torch's path for the same input, training
    (forward and both gradients) and inference alike (bf16/fp16/fp32, H100 and H200).

    Undilated: every kernel from 3x3 up (bf16: RepLKNet's 5x5 branches 2.2-4.8x, UniRepLKNet's
    3x3 blocks 2.1-2.8x; fp32 as 3xTF32: 5x5 at 56x56 2.3x, 3x3 1.9x), except square 3x3 and 5x5
    in fp16, where torch takes cuDNN's depthwise kernels and wins on some maps, and kernels of at
    most 49 taps on channels_last input (7x7, 1-D kernels up to 1x49), where cuDNN won on 7x7.

    Dilated (UniRepLKNet's branches): under torch.compile only. Per conv ours was faster (bf16
    f+b, 7x7 d2 at 14x14 0.684 -> 0.085 ms), but eagerly the sub-grid copies or the kernel's
    expansion are extra launches and UniRepLKNet-T trained at 0.73x of torch's rate with them.
    3x3 kernels on NCHW planes above 16x16 that the dilation does not divide stay on cuDNN (the
    sub-grids would need zero-filling).
    """
    kh, kw = kernel
    if kh * kw < 9:
        return False
    if dilation != (1, 1):
        h, w = plane
        return compiling and not (contiguous and kh * kw <= 9 and h * w > 256
                                  and (h % dilation[0] or w % dilation[1]))
    if dtype == torch.float16 and kh == kw and kh <= 5:
        return False
    return not (kh * kw <= 49 and channels_last)


_extension: Dict[str, bool] = {}


@torch.compiler.assume_constant_result
def extension_ready(strict: bool) -> bool:
    """Whether the CUDA extension loads (JIT-building it once if needed); a constant for
    torch.compile. Not ``strict``: a failure warns once and the plan runs torch's convs."""
    if _extension.get("ready") is None or (strict and not _extension["ready"]):
        from .ops import load_extension
        try:
            load_extension()
            _extension["ready"] = True
        except RuntimeError as exc:
            _extension["ready"] = False
            if strict:
                raise
            warnings.warn(f"{exc}; large-kernel convs use torch's implementation", stacklevel=2)
    return _extension["ready"]


def _wants_lknets(on_cuda: bool, wins: bool, impl: str) -> bool:
    """``--lk_impl`` applied: never off the GPU or under ``torch``, always under ``cuda``, where
    it measured faster (``wins``) under ``auto``."""
    return on_cuda and impl != "torch" and (impl == "cuda" or wins)


def _runs_lknets(x: torch.Tensor, wins: bool) -> bool:
    impl = settings().impl
    return _wants_lknets(x.is_cuda, wins, impl) and extension_ready(impl == "cuda")


def oriented_runs_lknets(x: torch.Tensor) -> bool:
    """Whether an oriented 1D conv of ``x`` runs on lknets' oriented kernel: every CUDA input
    unless ``--lk_impl torch`` (or the extension is missing under ``auto``). Against torch's
    path, a sparse 2D conv per angle group, it measured faster on every shape it was timed on
    (benchmarks/oriented.py)."""
    return _runs_lknets(x, True)


# Mirrors kernels/csrc/oriented.h and oriented_plane.cu (plane_geometry, smem_bytes).
_PLANE_PIXELS, _MAX_PLANES, _PLANE_SMEM_LIMIT, _PLANE_ROWS, _TAP_BYTES = 1024, 16, 64 * 1024, 4, 16
# The plane kernels measured faster than the gather kernels from this plane size up (H100, bf16
# and fp32, S 31: 56 x 56 forward 0.316 vs 0.384 ms; 28 x 28 and smaller slower), see
# benchmarks/oriented.py.
_PLANE_MIN_PIXELS = 56 * 56


def oriented_plane_takes(shape: Tuple[int, int, int, int], taps: int, dtype: torch.dtype) -> bool:
    """Whether the plane kernels (forward and input gradient) take a stride-1 oriented conv of
    NCHW tensors of ``shape``: the block's staged planes (the images of one channel it takes,
    each with a zero halo of min(S // 2, side - 1)) and its tap table fit the shared memory it
    may use (the extension's ``oriented_plane_takes`` says the same; tests compare them)."""
    n, _, h, w = shape
    element = torch.empty((), dtype=dtype).element_size()
    hp = h + 2 * min(taps // 2, max(h - 1, 0))
    wp = w + 2 * min(taps // 2, max(w - 1, 0))
    head = -(-taps * (_TAP_BYTES + (8 if dtype == torch.float64 else 4)) // 16) * 16

    def smem(planes: int) -> int:
        return head + (planes * hp + _PLANE_ROWS) * wp * element

    planes = max(1, min(_PLANE_PIXELS // max(h * w, 1), _MAX_PLANES, max(n, 1)))
    while planes > 1 and smem(planes) > _PLANE_SMEM_LIMIT:
        planes -= 1
    return smem(planes) <= _PLANE_SMEM_LIMIT


def oriented_plane_can_run(direction: str, shape: Tuple[int, int, int, int], taps: int,
                           dtype: torch.dtype, stride: int, channels_last: bool) -> bool:
    """Whether the plane kernels can take this launch (whether or not the plan picks them):
    a forward or input gradient at stride 1 on NCHW planes they can stage."""
    return (direction != "weight_grad" and stride == 1 and not channels_last
            and oriented_plane_takes(shape, taps, dtype))


@functools.lru_cache(maxsize=1024)
def _oriented_plan(direction: str, shape: Tuple[int, int, int, int], taps: int,
                   dtype: torch.dtype, stride: int, channels_last: bool, forced: str) -> str:
    takes = oriented_plane_can_run(direction, shape, taps, dtype, stride, channels_last)
    if forced == "plane" and not takes:
        raise ValueError(f"the forced oriented formulation 'plane' cannot take the {direction} "
                         f"launch of a {'channels_last' if channels_last else 'NCHW'} {shape} "
                         f"{dtype} input, stride {stride}, {taps} taps (it takes the forward and "
                         "input gradient at stride 1 on NCHW planes that fit shared memory); "
                         "lift the forcing (kernels.plan.configure(oriented='auto'))")
    if forced == "auto":
        return "plane" if takes and shape[2] * shape[3] >= _PLANE_MIN_PIXELS else "gather"
    return forced


def oriented_formulation(direction: str, shape: Tuple[int, int, int, int], taps: int,
                         dtype: torch.dtype, stride: int, channels_last: bool) -> str:
    """``plane`` or ``gather`` for one launch of the oriented op; ``shape`` is the full-resolution
    tensor's (x, or the input gradient). The plane kernels stage whole planes in shared memory
    and read every tap from there (forward and input gradient, stride 1, NCHW); the gather
    kernels read taps from global memory and take everything else (the weight gradient,
    stride 2, channels_last, planes too large to stage)."""
    return _oriented_plan(direction, tuple(int(v) for v in shape), int(taps), dtype, int(stride),
                          channels_last, settings().oriented)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return x.dtype


# The helpers below are shared with kernels/ops.py (which imports this module, not the reverse).
def _pair(value) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


Pair = Tuple[int, int]


def _same_padding(kernel: Pair, padding, dilation) -> Tuple[Pair, Pair]:
    """(padding, dilation) as pairs; padding defaults to ``dilation * (k // 2)``, 'same' for
    odd kernels."""
    dh, dw = _pair(dilation)
    if padding is None:
        return (dh * (kernel[0] // 2), dw * (kernel[1] // 2)), (dh, dw)
    return _pair(padding), (dh, dw)


def _channels_last(x: torch.Tensor) -> bool:
    """Strictly channels_last: not also NCHW-contiguous (C = 1, 1x1 planes)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def planned_depthwise_conv2d(x: torch.Tensor, weight: torch.Tensor,
                             bias: Optional[torch.Tensor] = None, padding=None,
                             dilation=1) -> torch.Tensor:
    """The depthwise stride-1 conv as planned: torch's ``F.conv2d`` or lknets' kernel
    (``kernels.depthwise_conv2d``), by the settings and :func:`lknets_wins`. ``padding``
    defaults to ``dilation * (k // 2)``; lknets' kernel takes a dilated conv when the padding is
    a multiple of the dilation ('same' padding is)."""
    kh, kw = weight.shape[-2:]
    pad, (dh, dw) = _same_padding((kh, kw), padding, dilation)
    if pad[0] % dh == 0 and pad[1] % dw == 0 and _runs_lknets(x, lknets_wins(
            _autocast_dtype(x), (kh, kw), (dh, dw), tuple(x.shape[-2:]),
            _channels_last(x), x.is_contiguous(), torch.compiler.is_compiling())):
        from .ops import depthwise_conv2d as lknets_conv
        return lknets_conv(x, weight, bias, pad, (dh, dw))
    return torch.nn.functional.conv2d(x, weight, bias, 1, pad, (dh, dw), weight.shape[0])


# -- 2. dilation and orientation ------------------------------------------------------------------

def dilation_mode(plane: Tuple[int, int]) -> str:
    """A dilated conv on lknets' kernel runs as the undilated conv of its d x d interleaved
    sub-grids (``subgrids``: a batch d*d times larger through the k x k taps only, plus copies
    out and back) or with its kernel expanded to the dense zero-filled extent (``dense``: no
    copies, the zero taps computed). Sub-grids for planes over 16x16, the small-plane GEMM's
    range, where they measured faster (benchmarks/dilated_branches.py)."""
    forced = settings().dilation
    if forced != "auto":
        return forced
    return "subgrids" if plane[0] * plane[1] > 256 else "dense"


def transposed(kernel: Tuple[int, int], plane: Tuple[int, int], row_stride: int) -> bool:
    """Whether a launch runs on the H/W-transposed views (a stride swap, not a copy) of its
    input, output and kernel: tall kernels (kh > kw), whose kernel rows the row-Toeplitz GEMM
    multiplies one by one (few, wide rows are its fast orientation). Not on planes of up to
    16x16 with contiguous rows (``row_stride`` 1): there the plane and small-plane GEMMs multiply
    whole-row Toeplitz tiles and the transposed view's strided accesses cost more than its fewer
    rows save (SLaK 47x5 at 14x14, NCHW forward 0.120 -> 0.082 ms fp32, 0.103 -> 0.043 bf16);
    channels_last planes are strided either way and fewer rows win (f+b 0.520 vs 0.583 ms)."""
    kh, kw = kernel
    small_plane = plane[0] <= 16 and plane[1] <= 16
    return kw < kh and not (small_plane and row_stride == 1)


# -- 3. the formulation of one launch --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch as the extension sees it, after any transposition: input (N, C, H, W) to
    output (Ho, Wo) through a kh x kw kernel with padding (may be negative for the input
    gradient), the input's strides."""

    N: int
    C: int
    H: int
    W: int
    Ho: int
    Wo: int
    kh: int
    kw: int
    pad_h: int
    pad_w: int
    in_strides: Tuple[int, int, int, int]


_SMEM_LIMIT = 160 * 1024


def _mid_forward_fits(s: Launch) -> bool:
    # Mirrors dwconv_mid.cu: 17 to 64 columns in 8-column chunks, chunk pairs up to 3 apart,
    # shared memory within the limit (16 images x staged rows up to 4 chunks, 8 images x a
    # window of 2 * warps + kh - 1 rows beyond).
    cols = max(s.W, s.Wo)
    chunks = -(-cols // 8)
    reach = max(s.pad_w, s.kw - 1 - s.pad_w)
    band = min(chunks - 1, max(1, (reach + 7) // 8))
    if not (16 < cols <= 64 and band <= 3):
        return False
    blocks = -(-s.Ho // 16)
    warps = -(-s.Ho // (2 * blocks))
    table = 8 * s.kh * 64
    if chunks > 4:
        smem = table + 4 * (2 * warps + s.kh - 1) * 8 * 68
    else:
        smem = table + 4 * min(s.H, 2 * warps + s.kh - 1) * 16 * 36
    return smem <= _SMEM_LIMIT


def _mid_weight_grad_fits(s: Launch) -> bool:
    # Mirrors dwconv_mid.cu: 17 to 32 columns, both planes of 8 images staged.
    fits = s.W <= 32 and s.Wo <= 32 and max(s.W, s.Wo) > 16
    return fits and 4 * ((s.Ho + s.H) * 8 * 40 + 8 * 32 * 40) <= _SMEM_LIMIT


def supports(name: str, direction: str, dtype: torch.dtype, s: Launch) -> bool:
    """Whether formulation ``name`` can take launch ``s`` (the extension checks the same and
    refuses otherwise; tests/test_kernels.py asserts both agree)."""
    weight_grad = direction == "weight_grad"
    if name in ("direct", "rows"):
        return True
    if name == "small":
        return max(s.H, s.W, s.Ho, s.Wo) <= 16
    if name == "plane":
        tiny = s.H * s.W <= 64 and s.Ho * s.Wo <= 64
        return tiny and (weight_grad or (s.H + s.Ho - 1) * (s.W + s.Wo - 1) <= 1024)
    if name == "mid":
        return dtype == torch.float32 and (_mid_weight_grad_fits(s) if weight_grad
                                           else _mid_forward_fits(s))
    raise ValueError(f"unknown formulation {name!r}; formulations: {FORMULATIONS}")


def _auto_formulation(direction: str, dtype: torch.dtype, s: Launch) -> str:
    # Where each measured fastest (kernels/DESIGN.md): the plane GEMM up to 64 pixels, the
    # small-plane GEMM up to 16x16, the row-Toeplitz GEMM beyond, except that fp32 runs the
    # mid-plane GEMM where it takes the shape (RepLKNet-31B f+b stage 1 5.36 -> 3.73 ms, stage 2
    # 2.27 -> 1.00). fp32 stages rows whose elements are strided one by one: up to 64 pixels the
    # small-plane GEMM does that faster than the plane GEMM (channels_last, RepLKNet-31B stage 4
    # f+b 0.258 vs 0.315 ms), and the transposed views of NCHW planes (rows strided, columns
    # contiguous) stay off the mid-plane GEMM: the row-Toeplitz GEMM reads them in vectors down
    # their columns (forward 31x1 at 56x56, 0.186 vs 0.636 ms).
    rows_strided = dtype == torch.float32 and s.in_strides[3] != 1
    if not rows_strided and supports("plane", direction, dtype, s):
        return "plane"
    if supports("mid", direction, dtype, s) and not (rows_strided and s.in_strides[2] == 1):
        return "mid"
    return "small" if supports("small", direction, dtype, s) else "rows"


def _formulation(direction: str, dtype: torch.dtype, s: Launch, current: Settings) -> str:
    forced = current.forced_for(direction)
    if forced is None:
        return _auto_formulation(direction, dtype, s)
    if not supports(forced, direction, dtype, s):
        raise ValueError(f"the forced formulation {forced!r} cannot take the {direction} launch "
                         f"{s} in {dtype}; lift the forcing (kernels.plan.configure("
                         "formulation='auto')) or choose one that takes it "
                         "(kernels.plan.supports)")
    return forced


def launch_of(direction: str, x_shape: Tuple[int, ...], x_strides: Tuple[int, ...],
              kernel: Tuple[int, int], padding: Tuple[int, int]) -> Tuple[Launch, bool]:
    """The launch of ``direction`` for a conv whose input (forward, weight gradient) or output
    gradient (input gradient) has ``x_shape``/``x_strides``, and whether it is transposed. The
    input gradient is the forward of the output gradient with the kernel rotated and padding
    ``k - 1 - pad``."""
    n, c, h, w = (int(v) for v in x_shape)
    kh, kw = kernel
    ph, pw = padding
    if direction == "input_grad":
        ph, pw = kh - 1 - ph, kw - 1 - pw
    strides = tuple(int(v) for v in x_strides)
    swap = transposed(kernel, (h, w), strides[3])
    if swap:
        h, w, kh, kw, ph, pw = w, h, kw, kh, pw, ph
        strides = (strides[0], strides[1], strides[3], strides[2])
    launch = Launch(n, c, h, w, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1, kh, kw, ph, pw, strides)
    return launch, swap


@functools.lru_cache(maxsize=4096)
def _launch_plan(direction: str, dtype: torch.dtype, shape: Tuple[int, ...],
                 strides: Tuple[int, ...], kernel: Tuple[int, int], padding: Tuple[int, int],
                 current: Settings) -> Tuple[int, bool]:
    launch, swap = launch_of(direction, shape, strides, kernel, padding)
    return FORMULATIONS.index(_formulation(direction, dtype, launch, current)), swap


def formulation(direction: str, x: torch.Tensor, kernel: Tuple[int, int],
                padding: Tuple[int, int]) -> Tuple[int, bool]:
    """(formulation index, transposed) for one launch of the op; ``x`` is the tensor the launch
    reads as its input (x, or the output gradient for ``input_grad``). Cached per call shape
    (host time matters: it runs for every launch)."""
    return _launch_plan(direction, x.dtype, tuple(x.shape), x.stride(), kernel, padding,
                        settings())


# -- the whole plan of one conv --------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ConvPlan:
    """What runs for one depthwise conv: ``impl`` ``lknets`` or ``torch``; for lknets, how a
    dilated conv runs (``dilation``: ``none``, ``subgrids``, ``dense``), whether the launches
    use transposed views, and the formulation of each direction."""

    impl: str
    dilation: str = "none"
    transposed: bool = False
    forward: str = ""
    input_grad: str = ""
    weight_grad: str = ""

    def __str__(self) -> str:
        if self.impl == "torch":
            return "torch"
        extras = [self.dilation] if self.dilation != "none" else []
        extras += ["transposed"] if self.transposed else []
        suffix = f" ({', '.join(extras)})" if extras else ""
        return f"lknets {self.forward}/{self.input_grad}/{self.weight_grad}{suffix}"


def plan_conv(shape: Tuple[int, int, int, int], kernel: Tuple[int, int], dtype: torch.dtype,
              channels_last: bool = False, dilation: Tuple[int, int] = (1, 1),
              compiling: bool = False, on_cuda: bool = True,
              extension: bool = True) -> ConvPlan:
    """The plan of a 'same' depthwise conv of an input ``shape`` (N, C, H, W) in ``dtype`` (the
    autocast dtype where one applies), NCHW-contiguous or ``channels_last``, under the current
    settings, as :func:`planned_depthwise_conv2d` would run it (``extension``: whether the CUDA
    extension loads). The gradients are planned for an output gradient in the output's layout."""
    n, c, h, w = shape
    kh, kw = kernel
    dh, dw = dilation
    current = settings()
    wins = lknets_wins(dtype, kernel, dilation, (h, w), channels_last, not channels_last,
                       compiling)
    if not (_wants_lknets(on_cuda, wins, current.impl) and extension):
        return ConvPlan("torch")
    mode, pad = "none", (kh // 2, kw // 2)
    if (dh, dw) != (1, 1):
        mode = dilation_mode((h, w))
        if mode == "subgrids":
            n, h, w = n * dh * dw, -(-h // dh), -(-w // dw)
            channels_last = False  # the sub-grids are NCHW copies
        else:
            kh, kw, pad = dh * (kh - 1) + 1, dw * (kw - 1) + 1, (dh * pad[0], dw * pad[1])
    strides = (c * h * w, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)
    names = {}
    swapped = False
    for direction in DIRECTIONS:
        launch, swap = launch_of(direction, (n, c, h, w), strides, (kh, kw), pad)
        names[direction] = _formulation(direction, dtype, launch, current)
        swapped = swapped or swap
    return ConvPlan("lknets", mode, swapped, **names)
