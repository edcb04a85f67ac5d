"""Train one epoch and evaluate."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Dict, Iterable, Optional

import numpy as np
import torch
from timm.data import Mixup

import utils
from sparse import Masking


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """Autocast context for --use_amp (``amp_dtype`` None = full precision)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, device: torch.device, epoch: int,
                    loss_scaler: utils.LossScaler, max_norm: Optional[float] = None,
                    model_ema=None, mixup_fn: Optional[Mixup] = None,
                    log_writer: Optional[utils.TensorboardLogger] = None, start_steps: int = 0,
                    lr_schedule_values: Optional[np.ndarray] = None,
                    wd_schedule_values: Optional[np.ndarray] = None,
                    num_training_steps_per_epoch: int = 0, update_freq: int = 1,
                    amp_dtype: Optional[torch.dtype] = None, print_freq: int = 10,
                    masking: Optional[Masking] = None) -> Dict[str, float]:
    """One pass over ``data_loader`` with gradient accumulation over ``update_freq`` micro-batches.

    lr and weight decay follow the per-update schedules (lr times each group's ``lr_scale``).
    With ``masking`` (SLaK sparse training) the masks are re-applied, and every ``-u`` updates
    pruned and regrown, after each optimizer update, whether or not AMP made it.
    """
    model.train(True)
    metric_logger = utils.MetricLogger()
    metric_logger.add_meter("lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    metric_logger.add_meter("min_lr", utils.SmoothedValue(window_size=1, fmt="{value:.6f}"))
    header = f"Epoch: [{epoch}]"
    optimizer.zero_grad()
    params = [p for p in model.parameters() if p.requires_grad]
    total = num_training_steps_per_epoch * update_freq
    # Throughput is timed after a few warm-up iterations (cudnn autotuning, allocator growth).
    timed_from = min(5, total // 2)
    timed_start, timed_images = None, 0

    for data_iter_step, (samples, targets) in enumerate(
            metric_logger.log_every(data_loader, print_freq, header, total=total)):
        step = data_iter_step // update_freq
        if step >= num_training_steps_per_epoch:
            break
        if data_iter_step == timed_from:
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
            samples, targets = mixup_fn(samples, targets)

        with autocast(device, amp_dtype):
            output = model(samples)
            loss = criterion(output, targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise utils.UserError(
                f"loss is {loss_value} at epoch {epoch}, iteration {data_iter_step} (update {it}); "
                "stopping. Lower --lr, set --clip_grad, or try --amp_dtype bfloat16")

        update_grad = (data_iter_step + 1) % update_freq == 0
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

        if device.type == "cuda":
            torch.cuda.synchronize()
        class_acc = None
        if mixup_fn is None:
            class_acc = (output.argmax(dim=-1) == targets).float().mean().item()
        lrs = [g["lr"] for g in optimizer.param_groups]
        weight_decay = max((g["weight_decay"] for g in optimizer.param_groups), default=0.0)
        metric_logger.update(loss=loss_value, class_acc=class_acc, lr=max(lrs), min_lr=min(lrs),
                             weight_decay=weight_decay,
                             grad_norm=grad_norm.item() if grad_norm is not None else None)
        if log_writer is not None and update_grad:
            log_writer.update(head="loss", loss=loss_value, class_acc=class_acc)
            log_writer.update(head="opt", lr=max(lrs), min_lr=min(lrs), weight_decay=weight_decay,
                              grad_norm=grad_norm)
            log_writer.set_step()

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    stats = {name: meter.global_avg for name, meter in metric_logger.meters.items()}
    if timed_start is not None and timed_images > 0:
        # All processes run in lockstep under DDP, so one process's rate times their number.
        rate = timed_images * utils.get_world_size() / (time.perf_counter() - timed_start)
        stats["images_per_sec"] = rate
        print(f"Training throughput: {rate:.1f} images/s")
    return stats


@torch.no_grad()
def evaluate(data_loader: Iterable, model: torch.nn.Module, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None, header: str = "Test:") -> Dict[str, float]:
    """Loss, top-1 and top-5 accuracy (%) over the whole loader, summed exactly across ranks."""
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, correct@1, correct@5, samples
    metric_logger = utils.MetricLogger()
    for images, target in metric_logger.log_every(data_loader, 10, header):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            output = model(images)
        output = output.float()
        topk = output.topk(min(5, output.shape[1]), dim=1).indices
        hits = topk.eq(target[:, None])
        batch = images.shape[0]
        loss_sum = criterion(output, target).item()
        correct1, correct5 = hits[:, 0].sum().item(), hits.any(dim=1).sum().item()
        totals += torch.tensor([loss_sum, correct1, correct5, batch], dtype=torch.float64)
        metric_logger.update(loss=loss_sum / batch, acc1=100.0 * correct1 / batch,
                             acc5=100.0 * correct5 / batch)
    if utils.is_dist_avail_and_initialized():
        totals = totals.to(device)
        torch.distributed.all_reduce(totals)
        totals = totals.cpu()
    loss_sum, correct1, correct5, count = totals.tolist()
    count = max(count, 1.0)
    stats = {"loss": loss_sum / count, "acc1": 100.0 * correct1 / count,
             "acc5": 100.0 * correct5 / count}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} "
          f"({int(count)} images)")
    return stats
