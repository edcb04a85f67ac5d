"""Distributed set-up, logging, schedules, AMP scaling and checkpoints for lknets."""
from __future__ import annotations

import argparse
import builtins
import contextlib
import datetime
import glob
import json
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
import urllib.parse
from collections import OrderedDict, defaultdict, deque
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist


class UserError(Exception):
    """A problem with the user's input; command-line entry points report it through exit_status.

    Data are read in DataLoader worker processes, and torch re-raises a worker's exception in the
    main process as ``type(exc)("Caught <Name> in DataLoader worker process N.\nOriginal
    Traceback ...")``, a text that ends with the exception's own line ``<module>.<Name>:
    <message>``. Keeping only <message> gives the user the same single "error: ..." line with
    and without workers (an undecodable image, an audio file at the wrong sample rate).
    """

    def __init__(self, message: str = "", *args: Any) -> None:
        name = type(self).__name__
        if message.startswith(f"Caught {name} ") and "\nOriginal Traceback" in message:
            message = message.rstrip().rsplit("\n", 1)[-1].split(f"{name}: ", 1)[-1]
        super().__init__(message, *args)


def exit_status(command: Callable[[], Any]) -> int:
    """Runs a command-line entry point's work: 0 when it returns, 2 after printing a UserError as
    one ``error: ...`` line on stderr (other exceptions propagate with their traceback)."""
    try:
        command()
    except UserError as err:
        # Not print(): setup_for_distributed silences it on all ranks but the first, and the
        # rank that reports a stopped peer may be any of them.
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        # An error re-raised from a DataLoader worker (an undecodable image) sits in a reference
        # cycle with its traceback, whose frames hold the loader's iterator: left to the garbage
        # collector, its worker processes are shut down only after a 5 s join timeout each.
        # Dropping the traceback frees the iterator, and its workers, now.
        err.__traceback__ = None
        return 2
    return 0


_TRUE = {"true", "t", "yes", "y", "1", "on"}
_FALSE = {"false", "f", "no", "n", "0", "off"}


def str2bool(value: Any) -> bool:
    """argparse type for upstream's boolean flags (``--model_ema true``)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise argparse.ArgumentTypeError(
        f"expected a boolean (true/false, yes/no, 1/0), got {value!r}")


# --------------------------------------------------------------------------- distributed

def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist_avail_and_initialized():
        dist.barrier()


def setup_for_distributed(is_master: bool) -> None:
    """Silence print() on every rank but the first (``print(..., force=True)`` still prints)."""
    builtin_print = builtins.print

    def print_on_master(*args: Any, **kwargs: Any) -> None:
        force = kwargs.pop("force", False)
        if is_master or force:
            builtin_print(*args, **kwargs)

    builtins.print = print_on_master


def _distributed_env(args: argparse.Namespace) -> Optional[Tuple[int, int, int]]:
    """(rank, world_size, local_rank) from the launcher's environment, or None for one process."""
    env = os.environ
    if args.dist_on_itp:
        return (int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                int(env["OMPI_COMM_WORLD_LOCAL_RANK"]))
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun and torch.distributed.launch
        local_rank = int(env.get("LOCAL_RANK", args.local_rank if args.local_rank >= 0 else 0))
        return int(env["RANK"]), int(env["WORLD_SIZE"]), local_rank
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Join the process group the launcher describes; sets args.distributed/rank/world_size/gpu."""
    found = _distributed_env(args)
    if found is None:
        if args.world_size != 1:
            raise UserError(f"--world_size {args.world_size} but no launcher started this "
                            "process; run it with torchrun --nproc_per_node=N (or "
                            "torch.distributed.launch, SLURM) and leave --world_size out")
        args.distributed, args.rank, args.world_size, args.gpu = False, 0, 1, 0
        return
    rank, world_size, args.gpu = found
    if args.world_size not in (1, world_size):
        raise UserError(f"--world_size {args.world_size} does not match the {world_size} "
                        "processes the launcher started")
    args.rank, args.world_size = rank, world_size
    args.distributed = True
    use_cuda = str(args.device).startswith("cuda")
    if use_cuda:
        if args.gpu >= torch.cuda.device_count():
            raise UserError(f"local rank {args.gpu} needs GPU {args.gpu} but only "
                            f"{torch.cuda.device_count()} are visible; start at most that many "
                            "processes per node")
        torch.cuda.set_device(args.gpu)
    backend = "nccl" if use_cuda else "gloo"
    print(f"| distributed init (rank {args.rank} of {args.world_size}, {backend}): "
          f"{args.dist_url}", flush=True)
    # Without a bound, a collective whose peer stopped or hangs waits forever (gloo) or for the
    # backend's default; with one, it fails and peer_failures_reported names it.
    dist.init_process_group(backend=backend, init_method=args.dist_url,
                            world_size=args.world_size, rank=args.rank,
                            timeout=datetime.timedelta(minutes=args.dist_timeout))
    barrier()
    setup_for_distributed(args.rank == 0)


# gloo fails a collective with a plain RuntimeError whose text starts with the source location,
# e.g. "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 6000ms for recv ...".
_GLOO_ERROR_RE = re.compile(r"^\[[^\]]*/gloo/[^\]]*\]\s*")


@contextlib.contextmanager
def peer_failures_reported(args: argparse.Namespace) -> Iterator[None]:
    """Re-raise a collective that failed because another process stopped or hangs (after
    --dist_timeout, or at once when the peer's connection closed) as a UserError naming this
    rank; every other exception, programming errors included, passes through unchanged.

    NCCL's watchdog aborts the process itself when a collective times out, so under NCCL the
    watchdog's log is what reports it. A run that finishes leaves the process group once every
    rank has finished: left open, the group's threads are torn down at interpreter exit, which
    at times aborted a rank after a finished run ("terminate called without an active
    exception", 1 of 4 CI runs of a 2-process gloo test).
    """
    try:
        yield
    except RuntimeError as err:
        lines = str(err).strip().splitlines()
        reason = lines[0] if lines else type(err).__name__
        gloo = _GLOO_ERROR_RE.match(reason)
        if not is_dist_avail_and_initialized() or not (gloo or isinstance(err, dist.DistError)):
            raise
        if gloo:
            reason = reason[gloo.end():]
        raise UserError(f"rank {args.rank}: a collective did not complete within --dist_timeout "
                        f"{args.dist_timeout:g} min (another process stopped or hangs): "
                        f"{reason}") from err
    else:
        if is_dist_avail_and_initialized():
            dist.barrier()
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def epoch_seed(base_seed: int, epoch: int) -> int:
    """Seed for one epoch on this rank: a run resumed at ``epoch`` replays the same randomness."""
    return base_seed + get_rank() + 100_003 * epoch


# --------------------------------------------------------------------------- logging

class SmoothedValue:
    """A window-smoothed series with its global average."""

    def __init__(self, window_size: int = 20, fmt: Optional[str] = None) -> None:
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.4f} ({global_avg:.4f})"

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), t[1].item()

    @property
    def median(self) -> float:
        return float(np.median(list(self.deque))) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return float(np.mean(list(self.deque))) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """Collects meters and prints progress lines with iteration, meters, time and ETA."""

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs: Any) -> None:
        for name, value in kwargs.items():
            if value is None:
                continue
            self.meters[name].update(float(value))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "",
                  total: Optional[int] = None,
                  before_print: Optional[Callable[[], None]] = None) -> Iterator:
        """Yield from ``iterable``, printing a progress line after every ``print_freq``-th item
        and the last; ``before_print`` runs first (to bring meters held back up to date)."""
        total = len(iterable) if total is None else total
        width = len(str(total))
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                if before_print is not None:
                    before_print()
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f"[{i:>{width}}/{total}]", f"eta: {eta}", str(self),
                         f"time: {iter_time}", f"data: {data_time}"]
                if torch.cuda.is_available():
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f}MB")
                print(self.delimiter.join(p for p in parts if p), flush=True)
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start))
        print(f"{header} Total time: {elapsed} ({(time.time() - start) / max(total, 1):.4f} s / it)",
              flush=True)


class TensorboardLogger:
    """Scalars for TensorBoard (tensorboardX, or torch's writer where tensorboardX is absent)."""

    def __init__(self, log_dir: str, purge_step: Optional[int] = None) -> None:
        """``purge_step``: TensorBoard hides the events of earlier writers in ``log_dir`` from
        this step on (those of a killed run past the point a resumed run restarts from)."""
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            from torch.utils.tensorboard import SummaryWriter
        os.makedirs(log_dir, exist_ok=True)
        self.writer = SummaryWriter(log_dir, purge_step=purge_step)
        self.step = 0

    def set_step(self, step: Optional[int] = None) -> None:
        self.step = self.step + 1 if step is None else step

    def update(self, head: str = "scalar", step: Optional[int] = None, **kwargs: Any) -> None:
        for name, value in kwargs.items():
            if value is None:
                continue
            self.writer.add_scalar(f"{head}/{name}", value, self.step if step is None else step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def append_json_log(output_dir: str, stats: Dict[str, Any]) -> None:
    with open(os.path.join(output_dir, "log.txt"), "a") as f:
        f.write(json.dumps(stats) + "\n")


def trim_json_log(output_dir: str, start_epoch: int) -> List[Dict[str, Any]]:
    """Keep only the log.txt lines of epochs before ``start_epoch`` (rewritten atomically);
    returns them."""
    path = os.path.join(output_dir, "log.txt")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    kept = [row for row in rows if row.get("epoch", -1) < start_epoch]
    if len(kept) != len(rows):
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        os.replace(tmp, path)
    return kept


# --------------------------------------------------------------------------- schedules, AMP

def cosine_scheduler(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                     warmup_epochs: int = 0, start_warmup_value: float = 0.0,
                     warmup_steps: int = -1) -> np.ndarray:
    """Per-iteration values: linear warmup, then cosine from base_value to final_value."""
    total = epochs * niter_per_ep
    warmup_iters = warmup_steps if warmup_steps > 0 else warmup_epochs * niter_per_ep
    warmup_iters = min(warmup_iters, total)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=False) \
        if warmup_iters > 0 else np.array([])
    iters = np.arange(total - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cosine))


def get_grad_norm(parameters: Iterable[torch.nn.Parameter], norm_type: float = 2.0) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.norm(torch.stack([torch.norm(g.detach(), norm_type) for g in grads]), norm_type)


class LossScaler:
    """Backward + optional grad clipping + optimizer step, with a GradScaler for fp16 AMP.

    bf16 and fp32 need no scaling, so the scaler is disabled for them. Returns the grad norm of
    the update (None on accumulation micro-steps).
    """

    state_dict_key = "amp_scaler"

    def __init__(self, enabled: bool, device_type: str) -> None:
        self._scaler = torch.amp.GradScaler(device_type, enabled=enabled)

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                 clip_grad: Optional[float] = None,
                 parameters: Optional[Iterable[torch.nn.Parameter]] = None,
                 update_grad: bool = True) -> Optional[torch.Tensor]:
        self._scaler.scale(loss).backward()
        if not update_grad:
            return None
        self._scaler.unscale_(optimizer)
        params = [p for p in parameters] if parameters is not None else []
        if clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            norm = get_grad_norm(params)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self) -> Dict[str, Any]:
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._scaler.load_state_dict(state_dict)


# --------------------------------------------------------------------------- checkpoints

_CKPT_RE = re.compile(r"checkpoint-(\d+)\.pth$")


# Signals a scheduler sends to stop or requeue a job (SLURM's time-limit and pre-emption
# signals, submitit's requeue). They are held while a checkpoint is written.
_STOP_SIGNALS = {getattr(signal, name) for name in ("SIGTERM", "SIGUSR1", "SIGUSR2")
                 if hasattr(signal, name)}


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Hold stop/requeue signals until the block ends, then hand them to their handlers.

    A requeue handler that exits in the middle of torch.save would leave the job failed instead
    of requeued; this way it acts right after the checkpoint is complete. (Python runs signal
    handlers in the main thread between bytecodes, so swapping the handlers is enough.)
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: List[Tuple[int, Any]] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append((signum, frame)))
                for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum, frame in pending:
            handler = previous[signum]
            if callable(handler):
                handler(signum, frame)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save through a temporary file and a rename, so a crash never leaves half a file;
    a stop or requeue signal arriving meanwhile takes effect once the file is complete."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with _stop_signals_deferred():
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:  # disk full, quota, permissions: the old file was not touched
            raise UserError(f"cannot write {path}: {err.strerror or err}; nothing was replaced "
                            f"(the files already in {directory} are intact)") from err
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


_TMP_RE = re.compile(r"\.tmp\.(\d+)$")


def remove_stale_temp_files(directory: str) -> List[str]:
    """Delete the ``*.tmp.<pid>`` files that atomic writers killed mid-write left in directory
    (those of processes still alive on this machine are kept); returns the removed paths."""
    removed = []
    for path in glob.glob(os.path.join(glob.escape(directory), "*.tmp.*")):
        match = _TMP_RE.search(path)
        if match is None or not os.path.isfile(path):
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _process_alive(pid):
            continue
        os.remove(path)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _numpy_scalar_globals() -> List[Any]:
    """What a pickled numpy scalar needs: the scalar constructor (under numpy 2's name and the
    numpy 1 name older files carry), np.dtype and its per-type classes. They only rebuild a
    number from its dtype and bytes."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtype_classes = [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None))
                     if n.endswith("DType")]
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, *dtype_classes]


# The non-tensor types our checkpoints and the upstream releases (ConvNeXt, RepLKNet,
# UniRepLKNet, SLaK, Oriented1D) hold: the run's argparse Namespace under 'args', and numpy
# float64 scalars in the optimizer's param groups (the per-iteration lr / weight decay come from
# numpy schedules). Everything else in them is tensors and plain containers, which torch's
# weights-only unpickler reads.
CHECKPOINT_SAFE_GLOBALS = [argparse.Namespace, *_numpy_scalar_globals()]
TRUST_HINT = "pass --trust_checkpoint true only if you trust where the file came from"


def _download_checkpoint(url: str) -> str:
    """The local copy of a checkpoint URL in torch's hub cache, downloaded once (a '-<hex>.'
    in the file name is checked as a SHA-256 prefix, as torch.hub does)."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        match = torch.hub.HASH_REGEX.search(name)
        try:
            torch.hub.download_url_to_file(url, cached, match.group(1) if match else None)
        except Exception as err:
            raise UserError(f"cannot download checkpoint {url}: {err}") from err
    return cached


def read_checkpoint(path: str, trust: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` of a local file on the CPU, weights-only unless ``trust``.

    A weights-only load never runs code from the file: a pickle that names any function or
    class outside tensors, plain containers and CHECKPOINT_SAFE_GLOBALS is refused with a
    UserError naming what it asked for. ``mmap`` maps tensor data instead of reading it (for a
    cheap look at a checkpoint's metadata). Other failures propagate.
    """
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    try:
        with torch.serialization.safe_globals(CHECKPOINT_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise
        allowed = {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}"
                   for g in CHECKPOINT_SAFE_GLOBALS}
        try:
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                      if g not in allowed]
        except Exception:  # not a zip checkpoint: fall back to torch's own wording
            unsafe = []
        what = ", ".join(unsafe) if unsafe else str(err).splitlines()[-1].strip()
        raise UserError(f"refusing to load checkpoint {path}: it holds {what}, which a "
                        "weights-only load does not allow (unpickling it could run code); "
                        f"{TRUST_HINT}") from None


def load_checkpoint_file(path: str, trust: bool = False) -> Dict[str, Any]:
    """Read a checkpoint (ours or an upstream release; a local path or an http(s) URL) or raise
    UserError naming the file. Weights-only unless ``trust`` (see read_checkpoint)."""
    if path.startswith("https://") or path.startswith("http://"):
        path = _download_checkpoint(path)
    elif not os.path.isfile(path):
        raise UserError(f"checkpoint file not found: {path}")
    try:
        ckpt = read_checkpoint(path, trust)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path} (truncated or not a torch file): "
                        f"{type(err).__name__}: {err}") from err
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict")
    return ckpt


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(
        isinstance(v, torch.Tensor) for v in obj.values())


def extract_state_dict(ckpt: Dict[str, Any], model_key: str = "model|module|state_dict",
                       prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """The model weights in a checkpoint: the first of ``model_key`` ('|'-separated) present, or
    the dict itself when it is a raw state dict; 'module.' (DDP) and ``prefix`` are stripped."""
    state = None
    for key in model_key.split("|"):
        if key in ckpt and _is_state_dict(ckpt[key]):
            state = ckpt[key]
            break
    if state is None:
        if not _is_state_dict(ckpt):
            holders = [key for key, value in ckpt.items() if _is_state_dict(value)]
            tip = f"; weights are under {holders}: pass --model_key {holders[0]}" if holders else ""
            raise UserError(f"no model weights in checkpoint: looked for {model_key.split('|')}; "
                            f"top-level keys are {sorted(ckpt)[:10]}{tip}")
        state = ckpt
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if prefix and key.startswith(prefix):
            key = key[len(prefix):]
        out[key] = value
    return out


def state_dict_mismatch(model: torch.nn.Module, state: Dict[str, torch.Tensor]
                        ) -> Tuple[List[str], List[str], List[str]]:
    """(missing keys, unexpected keys, 'key: ckpt shape vs model shape' lines)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    return missing, unexpected, shapes


def describe_mismatch(missing: List[str], unexpected: List[str], shapes: List[str],
                      limit: int = 5) -> str:
    parts = []
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("shape mismatches", shapes)):
        if items:
            more = f", ... (+{len(items) - limit})" if len(items) > limit else ""
            parts.append(f"{len(items)} {title}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)


def load_state_dict_strict(model: torch.nn.Module, state: Dict[str, torch.Tensor],
                           source: str, model_name: str,
                           mismatch_hint: Optional[Callable[[Dict[str, torch.Tensor]], str]] = None
                           ) -> None:
    """Load every weight of ``state`` into ``model`` or raise a UserError listing the differences
    (plus ``mismatch_hint(state)`` when it has advice)."""
    missing, unexpected, shapes = state_dict_mismatch(model, state)
    if missing or unexpected or shapes:
        hint = mismatch_hint(state) if mismatch_hint is not None else ""
        raise UserError(f"{source} does not fit model {model_name}: "
                        f"{describe_mismatch(missing, unexpected, shapes)}"
                        + (f". {hint}" if hint else ""))
    model.load_state_dict(state)


def checkpoint_epochs(output_dir: str) -> List[int]:
    """Epoch numbers in the names of the periodic checkpoints in output_dir, newest first
    (whatever the files hold: see is_run_checkpoint)."""
    epochs = []
    for path in glob.glob(os.path.join(glob.escape(output_dir), "checkpoint-*.pth")):
        match = _CKPT_RE.search(os.path.basename(path))
        if match:
            epochs.append(int(match.group(1)))
    return sorted(epochs, reverse=True)


def checkpoint_path(output_dir: str, epoch: int, tag: Optional[str] = None) -> str:
    return os.path.join(output_dir, f"checkpoint-{tag if tag else epoch}.pth")


def is_run_checkpoint(path: str, epoch: int, model_name: str) -> bool:
    """Whether ``path`` is a readable training checkpoint of ``model_name`` at ``epoch``.

    Only such files count towards --save_ckpt_num and are ever deleted: a foreign, corrupt or
    unsafe file that happens to be named checkpoint-N.pth is left alone. Tensor data is mapped,
    not read, so the check costs about the size of the pickled metadata.
    """
    try:
        ckpt = read_checkpoint(path, mmap=True)
    except Exception:
        return False
    if not isinstance(ckpt, dict) or ckpt.get("epoch") != epoch or "model" not in ckpt:
        return False
    run_args = ckpt.get("args")
    return getattr(run_args, "model", model_name) == model_name


def save_model(args: argparse.Namespace, epoch: int, model_without_ddp: torch.nn.Module,
               optimizer: torch.optim.Optimizer, loss_scaler: LossScaler,
               model_ema: Any = None, extra: Optional[Dict[str, Any]] = None,
               tag: Optional[str] = None) -> Optional[str]:
    """Write ``checkpoint-{epoch}.pth`` (or ``checkpoint-{tag}.pth``, e.g. 'best') on the main
    process. Every checkpoint records its epoch, so a run resumes from any of them.

    After a periodic save, older periodic checkpoints of this run beyond the newest
    ``--save_ckpt_num`` are deleted; files of later epochs (a run resumed from an earlier one)
    are kept until this run overwrites them.
    """
    if not is_main_process():
        return None
    path = checkpoint_path(args.output_dir, epoch, tag)
    state = {"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
             "epoch": epoch, "scaler": loss_scaler.state_dict(), "args": args}
    if model_ema is not None:
        state["model_ema"] = model_ema.module.state_dict()
    if extra:
        state.update(extra)
    atomic_save(state, path)
    if tag is None and args.save_ckpt_num > 0:
        older = [e for e in checkpoint_epochs(args.output_dir) if e < epoch and
                 is_run_checkpoint(checkpoint_path(args.output_dir, e), e, args.model)]
        for old in older[args.save_ckpt_num - 1:]:
            os.remove(checkpoint_path(args.output_dir, old))
    return path


def _resume_from_output_dir(args: argparse.Namespace) -> Tuple[Optional[Dict[str, Any]], str]:
    """The newest readable periodic checkpoint in --output_dir and its path ((None, '') when
    there is none); unreadable ones are skipped with a warning, and a folder holding only
    unreadable ones is an error that says what to do (never a silent restart from scratch)."""
    failures = []
    for epoch in checkpoint_epochs(args.output_dir):
        path = checkpoint_path(args.output_dir, epoch)
        try:
            ckpt = load_checkpoint_file(path, args.trust_checkpoint)
        except UserError as err:
            print(f"WARNING: skipping {path} for auto-resume: {err}")
            failures.append(os.path.basename(path))
            continue
        if failures:
            print(f"Resuming from {path}, the newest readable checkpoint")
        return ckpt, path
    if failures:
        raise UserError(
            f"{args.output_dir} holds checkpoints but none is readable ({', '.join(failures)}); "
            "resume from a good file with --resume FILE, or start over in another "
            "--output_dir (or move those files away, or pass --auto_resume false)")
    return None, ""


def auto_load_model(args: argparse.Namespace, model_without_ddp: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer], loss_scaler: Optional[LossScaler],
                    model_ema: Any = None,
                    mismatch_hint: Optional[Callable[[Dict[str, torch.Tensor]], str]] = None
                    ) -> Optional[Dict[str, Any]]:
    """Resume from --resume, or (only when --resume is empty and --auto_resume is on) from the
    newest readable checkpoint in --output_dir.

    Restores model (strict), optimizer, scaler, epoch (args.start_epoch) and EMA. A checkpoint
    without an epoch (a released file) loads its weights only, with a warning; one whose epoch
    is not a number (upstream's 'best') is refused for training. ``mismatch_hint(state)`` may
    add advice to the error when the weights do not fit. Returns the loaded checkpoint dict
    (callers restore their own extra entries from it) or None.
    """
    barrier()  # another rank may still be writing the checkpoint we are about to read
    if args.resume:
        ckpt, path = load_checkpoint_file(args.resume, args.trust_checkpoint), args.resume
    elif args.auto_resume and args.output_dir:
        ckpt, path = _resume_from_output_dir(args)
    else:
        ckpt, path = None, ""
    if ckpt is None:
        return None
    epoch = ckpt.get("epoch")
    if epoch is not None and not isinstance(epoch, int) and not args.eval:
        raise UserError(
            f"{path} records its epoch as {epoch!r}, not a number, so training cannot resume "
            "from it; resume from a checkpoint-N.pth, or start a new run from its weights "
            f"with --finetune {path}")
    print(f"Resume checkpoint {path}")
    state = extract_state_dict(ckpt)
    load_state_dict_strict(model_without_ddp, state, f"checkpoint {path}", args.model,
                           mismatch_hint)
    if model_ema is not None:
        ema_state = ckpt.get("model_ema")
        if ema_state is None:
            print(f"WARNING: {path} has no 'model_ema'; the EMA starts from the model weights")
            ema_state = state
        load_state_dict_strict(model_ema.module, ema_state, f"EMA in {path}", args.model)
    if isinstance(epoch, int):
        args.start_epoch = epoch + 1
        if optimizer is not None and "optimizer" in ckpt:
            optimizer.load_state_dict(ckpt["optimizer"])
        if loss_scaler is not None and ckpt.get("scaler"):
            loss_scaler.load_state_dict(ckpt["scaler"])
    elif not args.eval:
        print(f"WARNING: {path} records no epoch: its weights are loaded, training starts at "
              f"epoch {args.start_epoch} with a fresh optimizer (--finetune does the same "
              "without this warning)")
    ckpt["_path"] = path
    return ckpt


def _prefix_suggestions(state: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> List[str]:
    """Prefixes that, stripped from the checkpoint's keys, would make them the model's keys
    (e.g. 'backbone.' of a detection checkpoint)."""
    found = []
    for key in state:
        for own_key in own:
            if key.endswith("." + own_key) and state[key].shape == own[own_key].shape:
                prefix = key[: -len(own_key)]
                if prefix not in found:
                    found.append(prefix)
                break
        if len(found) == 3:
            break
    return found


def _finetune_advice(ckpt: Dict[str, Any], state: Dict[str, torch.Tensor],
                     own: Dict[str, torch.Tensor], args: argparse.Namespace) -> str:
    tips = [f"--model_prefix {p}" for p in _prefix_suggestions(state, own)]
    tips += [f"--model_key {key}" for key, value in ckpt.items()
             if _is_state_dict(value) and key not in args.model_key.split("|")]
    return f"try {' or '.join(tips)}" if tips else (
        "is it a checkpoint of another model? Check --model, --model_key and --model_prefix")


def load_finetune(args: argparse.Namespace, model: torch.nn.Module,
                  mismatch_hint: Optional[Callable[[Dict[str, torch.Tensor]], str]] = None) -> None:
    """--finetune: non-strict load of pre-trained weights; a head whose shape differs is dropped.

    A checkpoint that initializes fewer than half of the model's weights is refused: loading
    it would train from (nearly) random weights while the user believes otherwise.
    """
    ckpt = load_checkpoint_file(args.finetune, args.trust_checkpoint)
    state = extract_state_dict(ckpt, args.model_key, args.model_prefix)
    own = model.state_dict()
    for key in [k for k in state if k.startswith("head.")]:
        if key in own and state[key].shape != own[key].shape:
            print(f"Removing key {key} from pretrained checkpoint "
                  f"(shape {tuple(state[key].shape)} vs model {tuple(own[key].shape)})")
            del state[key]
    missing, unexpected, shapes = state_dict_mismatch(model, state)
    if shapes:
        hint = mismatch_hint(state) if mismatch_hint is not None else ""
        raise UserError(f"--finetune {args.finetune} does not fit model {args.model}: "
                        f"{describe_mismatch([], [], shapes)}" + (f". {hint}" if hint else ""))
    if len(own) - len(missing) < len(own) / 2:
        hint = (mismatch_hint(state) if mismatch_hint is not None else "") or \
            _finetune_advice(ckpt, state, own, args)
        raise UserError(
            f"--finetune {args.finetune} fits only {len(own) - len(missing)} of the "
            f"{len(own)} weights of {args.model} (model keys: {', '.join(list(own)[:3])}, ...; "
            f"checkpoint keys: {', '.join(list(state)[:3])}, ...); {hint}")
    model.load_state_dict(state, strict=False)
    print(f"Loaded --finetune {args.finetune}")
    if missing:
        print(f"Weights of {args.model} not initialized from the checkpoint: {missing}")
    if unexpected:
        print(f"Weights from the checkpoint not used in {args.model}: {unexpected}")
