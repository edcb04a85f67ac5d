"""Train one epoch and evaluate."""
from __future__ import annotations

import abc
import contextlib
import math
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from timm.data import Mixup
from torch.nn.parallel import DistributedDataParallel

import utils
from datasets import IGNORED_TARGET
from sparse import Masking


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """Autocast context for --use_amp (``amp_dtype`` None = full precision)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


class InputCriterion(abc.ABC):
    """A training loss that also sees the (mixed) input batch, e.g. to run a teacher on it
    (``distill.DistillationLoss``), and reports the terms it is the sum of.

    train_one_epoch calls it as ``criterion(samples, outputs, targets)`` where a plain loss is
    called as ``criterion(outputs, targets)``, and logs each term beside the loss (progress
    lines, TensorBoard, the epoch's averages as ``train_<term>``).
    """

    @abc.abstractmethod
    def __call__(self, inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor
                 ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """(loss, {term name: scalar tensor}), the terms summing to the loss."""


def _ddp_module(model: torch.nn.Module) -> Optional[DistributedDataParallel]:
    """The DistributedDataParallel wrapper of ``model``, also under torch.compile's
    OptimizedModule (main.py compiles the DDP model), or None for a plain module."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, DistributedDataParallel) else None


class _StepRecords:
    """Per-iteration training metrics, held on the device until the next progress line.

    Reading a CUDA tensor on the host (``.item()``) waits for every kernel queued so far; doing
    it for each micro-batch would stall the GPU's queue every iteration. The records are copied
    to the host in one transfer by ``flush()``, right before MetricLogger prints a progress line
    and at the end of the epoch, and then reach the meters and TensorBoard as the same floats,
    in the same order and with the same steps as if they had been read at once.
    """

    def __init__(self, metric_logger: utils.MetricLogger,
                 log_writer: Optional[utils.TensorboardLogger], epoch: int) -> None:
        self.metric_logger = metric_logger
        self.log_writer = log_writer
        self.epoch = epoch
        self.records: List[Dict[str, Any]] = []
        self.tensors: List[torch.Tensor] = []

    def _hold(self, value: Optional[torch.Tensor]) -> Optional[int]:
        if value is None:
            return None
        # float64 holds every floating dtype's values exactly: the floats logged are those that
        # .item() on the original tensor would have given.
        self.tensors.append(value.detach().double().reshape(()))
        return len(self.tensors) - 1

    def add(self, data_iter_step: int, update: int, loss: torch.Tensor,
            class_acc: Optional[torch.Tensor], grad_norm: Optional[torch.Tensor],
            optimizer: torch.optim.Optimizer, log_step: Optional[int],
            terms: Dict[str, torch.Tensor]) -> None:
        """Record one iteration; ``log_step`` is its TensorBoard step (None: not written),
        ``terms`` the loss terms of an InputCriterion (logged like the loss)."""
        lrs = [g["lr"] for g in optimizer.param_groups]
        weight_decay = max((g["weight_decay"] for g in optimizer.param_groups), default=0.0)
        self.records.append({
            "data_iter_step": data_iter_step, "update": update, "log_step": log_step,
            "loss": self._hold(loss), "class_acc": self._hold(class_acc),
            "grad_norm": self._hold(grad_norm), "lr": max(lrs), "min_lr": min(lrs),
            "weight_decay": weight_decay,
            "terms": {name: self._hold(value) for name, value in terms.items()}})

    def flush(self) -> None:
        """Copy the held values to the host and log them; raise UserError at the first
        non-finite loss."""
        if not self.records:
            return
        # A grad norm without gradients is a CPU zero; everything else is on the loss's device.
        device = self.tensors[0].device
        values = torch.stack([t.to(device) for t in self.tensors]).tolist()
        records, self.records, self.tensors = self.records, [], []
        for rec in records:
            loss, class_acc, grad_norm = (None if rec[name] is None else values[rec[name]]
                                          for name in ("loss", "class_acc", "grad_norm"))
            terms = {name: values[index] for name, index in rec["terms"].items()}
            if not math.isfinite(loss):
                raise utils.UserError(
                    f"loss is {loss} at epoch {self.epoch}, iteration {rec['data_iter_step']} "
                    f"(update {rec['update']}); stopping. Lower --lr, set --clip_grad, or try "
                    "--amp_dtype bfloat16")
            self.metric_logger.update(loss=loss, class_acc=class_acc, lr=rec["lr"],
                                      min_lr=rec["min_lr"], weight_decay=rec["weight_decay"],
                                      grad_norm=grad_norm, **terms)
            if self.log_writer is not None and rec["log_step"] is not None:
                self.log_writer.update(head="loss", step=rec["log_step"], loss=loss,
                                       class_acc=class_acc, **terms)
                self.log_writer.update(head="opt", step=rec["log_step"], lr=rec["lr"],
                                       min_lr=rec["min_lr"], weight_decay=rec["weight_decay"],
                                       grad_norm=grad_norm)


def _wait_for_device(device: torch.device) -> None:
    """Let queued CUDA work finish, so a wall-clock reading covers it (twice an epoch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one_epoch(model: torch.nn.Module, criterion: Union[torch.nn.Module, InputCriterion],
                    data_loader: Iterable, optimizer: torch.optim.Optimizer,
                    device: torch.device, epoch: int,
                    loss_scaler: utils.LossScaler, max_norm: Optional[float] = None,
                    model_ema=None, mixup_fn: Optional[Mixup] = None,
                    log_writer: Optional[utils.TensorboardLogger] = None, start_steps: int = 0,
                    lr_schedule_values: Optional[np.ndarray] = None,
                    wd_schedule_values: Optional[np.ndarray] = None,
                    num_training_steps_per_epoch: int = 0, update_freq: int = 1,
                    amp_dtype: Optional[torch.dtype] = None, print_freq: int = 10,
                    masking: Optional[Masking] = None) -> Dict[str, float]:
    """One pass over ``data_loader`` with gradient accumulation over ``update_freq`` micro-batches.

    ``criterion(outputs, targets)`` gives the loss, or for an InputCriterion
    ``criterion(samples, outputs, targets)`` the loss and its terms.

    lr and weight decay follow the per-update schedules (lr times each group's ``lr_scale``).
    With ``masking`` (SLaK sparse training) the masks are re-applied, and every ``-u`` updates
    pruned and regrown, after each optimizer update, whether or not AMP made it.
    Under DDP the gradients are all-reduced once per update, not per micro-batch; the metrics
    stay on the device until a progress line is printed (every ``print_freq`` iterations and
    at the last).
    """
    model.train(True)
    metric_logger = utils.MetricLogger()
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metric_logger.add_meter("min_lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    records = _StepRecords(metric_logger, log_writer, epoch)
    # Under DDP every backward all-reduces the gradients; accumulation micro-steps run inside
    # no_sync() so that happens once per update, on the summed gradients of all micro-batches.
    ddp = _ddp_module(model)
    optimizer.zero_grad()
    params = [p for p in model.parameters() if p.requires_grad]
    total = num_training_steps_per_epoch * update_freq
    # Throughput is timed over the second half of the epoch. That skips the warm-up iterations
    # (cudnn autotuning, allocator growth, compiling), and the batches the loader's workers queued
    # meanwhile: when loading is the bottleneck they arrive at the GPU's pace, not the loader's,
    # and counting them overstated a loader-bound rate. By mid-epoch the queue is as full (GPU
    # bound) or as empty (loader bound) as at its end.
    timed_from = total // 2
    timed_start, timed_images = None, 0

    # A non-finite loss is found when the records are flushed, at the next progress line: the
    # message still names the first such iteration, but training (optimizer steps included) may
    # have gone on for up to print_freq - 1 more iterations. Nothing is saved before the epoch
    # ends, so no such weights reach a checkpoint.
    for data_iter_step, (samples, targets) in enumerate(
            metric_logger.log_every(data_loader, print_freq, header, total=total,
                                    before_print=records.flush)):
        step = data_iter_step // update_freq
        if step >= num_training_steps_per_epoch:
            break
        if data_iter_step == timed_from:
            _wait_for_device(device)
            timed_start = time.perf_counter()
        if timed_start is not None:
            timed_images += samples.shape[0]
        it = start_steps + step
        if data_iter_step % update_freq == 0:
            for group in optimizer.param_groups:
                if lr_schedule_values is not None:
                    group["lr"] = lr_schedule_values[it] * group.get("lr_scale", 1.0)
                if wd_schedule_values is not None and group["weight_decay"] > 0:
                    group["weight_decay"] = wd_schedule_values[it]

        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            # Clips (B, C, T, H, W) are mixed as (B, C * T, H, W) images, before the video
            # adapter's reshape (models/video.py), as upstream.
            mixed, targets = mixup_fn(samples.flatten(1, 2) if samples.dim() == 5 else samples,
                                      targets)
            samples = mixed.view_as(samples)

        update_grad = (data_iter_step + 1) % update_freq == 0
        # DDP decides in the forward whether the backward reduces, so both run in no_sync().
        with (ddp.no_sync() if ddp is not None and not update_grad
              else contextlib.nullcontext()):
            with autocast(device, amp_dtype):
                output = model(samples)
                if isinstance(criterion, InputCriterion):
                    loss, terms = criterion(samples, output, targets)
                else:
                    loss, terms = criterion(output, targets), {}
            grad_norm = loss_scaler(loss / update_freq, optimizer, clip_grad=max_norm,
                                    parameters=params, update_grad=update_grad)
        if update_grad:
            if masking is not None and masking.step():
                print(masking.density_report())
            optimizer.zero_grad()  # after masking.step(): gradient growth reads the gradients
            if model_ema is not None:
                model_ema.update(model)
                if masking is not None:
                    masking.update_ema(model_ema.module)

        class_acc = None
        if mixup_fn is None and not targets.is_floating_point():  # not forecasts
            class_acc = (output.argmax(dim=-1) == targets).float().mean()
        log_step = None
        if log_writer is not None and update_grad:
            log_step = log_writer.step
            log_writer.set_step()
        records.add(data_iter_step, it, loss, class_acc, grad_norm, optimizer, log_step, terms)

    records.flush()
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    stats = {name: meter.global_avg for name, meter in metric_logger.meters.items()}
    if timed_start is not None and timed_images > 0:
        _wait_for_device(device)
        # All processes run in lockstep under DDP, so one process's rate times their number.
        rate = timed_images * utils.get_world_size() / (time.perf_counter() - timed_start)
        stats["images_per_sec"] = rate
        print(f"Training throughput: {rate:.1f} images/s")
    return stats


@torch.no_grad()
def evaluate(data_loader: Iterable, model: torch.nn.Module, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, header: str = "Test:") -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) over the whole loader, summed exactly across ranks.

    Samples whose target is IGNORED_TARGET (stand-ins for undecodable images) count nowhere.
    Per-batch sums stay on the device until a progress line is printed, as in training.
    """
    criterion = torch.nn.CrossEntropyLoss(reduction="sum", ignore_index=IGNORED_TARGET)
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, @1, @5, samples
    pending: List[torch.Tensor] = []
    metric_logger = utils.MetricLogger()

    def flush() -> None:
        for loss_sum, correct1, correct5, count in torch.stack(pending).tolist():
            count = max(count, 1.0)
            metric_logger.update(loss=loss_sum / count, acc1=100.0 * correct1 / count,
                                 acc5=100.0 * correct5 / count)
        pending.clear()

    for images, target in metric_logger.log_every(data_loader, 10, header, before_print=flush):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        scored = target != IGNORED_TARGET
        hits = output.topk(min(5, output.shape[1]), dim=1).indices.eq(target[:, None])
        hits = hits & scored[:, None]
        batch_sums = torch.stack([criterion(output, target), hits[:, 0].sum(),
                                  hits.any(dim=1).sum(), scored.sum()]).double()
        totals += batch_sums
        pending.append(batch_sums)
    if utils.is_dist_avail_and_initialized():
        torch.distributed.all_reduce(totals)
    loss_sum, correct1, correct5, count = totals.tolist()
    count = max(count, 1.0)
    stats = {"loss": loss_sum / count, "acc1": 100.0 * correct1 / count,
             "acc5": 100.0 * correct5 / count}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} "
          f"({int(count)} images)")
    return stats


@torch.no_grad()
def evaluate_forecast(data_loader: Iterable, model: torch.nn.Module, device: torch.device,
                      amp_dtype: Optional[torch.dtype] = None,
                      header: str = "Test:") -> Dict[str, float]:
    """MSE and MAE of the forecasts over the whole loader (summed exactly across ranks), next to
    the naive forecast that repeats each window's last value. ``loss`` is the MSE."""
    from modalities.timeseries import naive_last_value
    model.eval()
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # se, ae, naive se, naive ae, n
    metric_logger = utils.MetricLogger()
    for series, target in metric_logger.log_every(data_loader, 10, header):
        series = series.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            forecast = model(series)
        error = forecast.float() - target
        naive = naive_last_value(series, target.shape[1]) - target
        totals += torch.stack([error.square().sum(), error.abs().sum(), naive.square().sum(),
                               naive.abs().sum(), torch.tensor(target.numel(), device=device)
                               ]).double()
    if utils.is_dist_avail_and_initialized():
        torch.distributed.all_reduce(totals)
    se, ae, naive_se, naive_ae, count = totals.tolist()
    count = max(count, 1.0)
    stats = {"loss": se / count, "mse": se / count, "mae": ae / count,
             "naive_mse": naive_se / count, "naive_mae": naive_ae / count}
    print(f"* MSE {stats['mse']:.4f} MAE {stats['mae']:.4f} (naive last value: MSE "
          f"{stats['naive_mse']:.4f} MAE {stats['naive_mae']:.4f}; {int(count)} values)")
    return stats
