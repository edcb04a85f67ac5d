"""SLaK's dynamic sparse training (``--sparse``), with upstream's flags and semantics.

Every weight matrix and conv kernel (parameters with 2 or 4 dims; with ``--only-L`` only SLaK's
``large_kernel.LoRA*`` strips) gets a binary mask drawn at ``1 - --sparsity`` density
(``--sparse_init``: per-layer ratios from SNIP, ERK or uniform, or the non-zeros of the loaded
weights for ``resume``). After every optimizer step the masked weights are zeroed again; every
``-u`` optimizer steps each layer prunes ``ceil(prune_rate * nonzeros)`` weights of smallest
magnitude and regrows as many (``--growth random|gradient|momentum``), with ``prune_rate``
decaying on a cosine from ``--prune_rate`` to 0.005 over the run.

What differs from VITA-Group/SLaK's ``sparse_core.py`` (its bugs, fixed):

* masks are part of the checkpoint (:meth:`Masking.state_dict`, stored under ``'masks'``) and
  are restored on resume; ``--sparse_init resume`` remains for checkpoints without masks;
* the step is taken after the optimizer step, whoever made it, so AMP (a GradScaler) works; a
  step the GradScaler skipped for inf/nan gradients is detected and not counted;
* mask draws, pruning and regrowth remove and add *exactly* the intended number of weights
  (upstream's random growth is only right in expectation, and its magnitude pruning can remove
  extra still-zero active weights); pruning ranks only active weights;
* masks are broadcast from rank 0 whenever they change (not on every step), so all ranks agree.

Usage (main.py / engine.py)::

    masking = Masking(model_without_ddp, optimizer, args, steps_per_epoch, args.start_epoch,
                      grad_scaler=loss_scaler)
    if 'masks' in checkpoint: masking.load_state_dict(checkpoint['masks'])
    else: masking.init(data_loader_train)
    ...  after each optimizer step (also when the AMP scaler made it):
    if masking.step(): print(masking.density_report())
    if model_ema is not None: masking.update_ema(model_ema.ema)   # after model_ema.update(model)
    ...  checkpoint['masks'] = masking.state_dict()
"""
from __future__ import annotations

import argparse
import copy
import math
from typing import Any, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["add_sparse_args", "Masking", "prune_rate_at"]

MIN_PRUNE_RATE = 0.005  # upstream's CosineDecay eta_min
DENSE_ENOUGH = 0.99  # layers at least this dense after init are left dense (as upstream)


def add_sparse_args(parser: argparse.ArgumentParser) -> None:
    """SLaK's sparse-training flags, spelled as upstream main.py."""
    group = parser.add_argument_group("sparse training (SLaK)")
    group.add_argument("--sparse", action="store_true", help="Enable sparse model. Default: False.")
    group.add_argument("--sparsity", type=float, default=0.4,
                       help="The sparsity of the overall sparse network.")
    group.add_argument("--sparse_init", type=str, default="snip",
                       choices=("snip", "ERK", "uniform", "resume"),
                       help="layer-wise sparsity ratio (resume: keep the non-zeros of the loaded "
                            "weights; only for checkpoints saved without masks)")
    group.add_argument("-u", "--update-frequency", dest="update_frequency", type=int, default=100,
                       help="how many iterations (optimizer steps) to adapt weights")
    group.add_argument("--prune_rate", type=float, default=0.3, help="The pruning rate.")
    group.add_argument("--prune", type=str, default="magnitude", choices=("magnitude",),
                       help="Prune mode.")
    group.add_argument("--growth", type=str, default="random",
                       choices=("random", "gradient", "momentum"), help="Growth mode.")
    group.add_argument("--redistribution", type=str, default="none", choices=("none",),
                       help="Redistribution mode (upstream never redistributes).")
    group.add_argument("--only-L", dest="only_L", action="store_true",
                       help="only sparsify large kernels.")
    group.add_argument("--fix", action="store_true",
                       help="Fix sparse model during training i.e., no weight adaptation.")
    group.add_argument("--verbose", action="store_true",
                       help="Prints per-layer densities after every prune/growth.")


def prune_rate_at(step: int, prune_rate: float, total_steps: int) -> float:
    """Cosine decay of the prune rate from ``prune_rate`` to 0.005 over ``total_steps``."""
    step = min(step, total_steps)
    return MIN_PRUNE_RATE + (prune_rate - MIN_PRUNE_RATE) * (
        1 + math.cos(math.pi * step / max(total_steps, 1))) / 2


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _random_subset_mask(candidates: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask with exactly ``count`` of the True entries of ``candidates`` picked at random."""
    flat = candidates.flatten()
    scores = torch.rand(flat.shape, device=flat.device).masked_fill_(~flat, -1.0)
    chosen = torch.zeros_like(flat)
    if count > 0:
        chosen[scores.topk(count).indices] = True
    return chosen.view_as(candidates)


def _top_mask(scores: torch.Tensor, candidates: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` candidates with the largest ``scores``."""
    flat = scores.flatten().float().masked_fill(~candidates.flatten(), -math.inf)
    chosen = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if count > 0:
        chosen[flat.topk(count).indices] = True
    return chosen.view_as(candidates)


class Masking:
    """Masks of a model's weights for SLaK's dynamic sparse training.

    Args:
        model: the model (not the DDP wrapper); masks are keyed by its parameter names.
        optimizer: the optimizer of ``model`` (for SGD momentum masking and momentum growth).
        args: parsed flags of :func:`add_sparse_args`, plus ``epochs``.
        steps_per_epoch: optimizer steps per epoch (after gradient accumulation).
        start_epoch: first epoch of this run (resume), to continue the prune-rate schedule.
        grad_scaler: the AMP scaler (torch GradScaler or an object holding one in ``_scaler``);
            used to detect optimizer steps it skipped.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
                 steps_per_epoch: int, start_epoch: int = 0, grad_scaler: Any = None) -> None:
        if not 0.0 <= args.sparsity < 1.0:
            raise ValueError(f"--sparsity must be in [0, 1), got {args.sparsity}")
        self.model = model
        self.optimizer = optimizer
        self.density = 1.0 - args.sparsity
        self.sparse_init = args.sparse_init
        self.prune_rate0 = args.prune_rate
        self.growth = args.growth
        self.update_frequency = None if args.fix else args.update_frequency
        self.verbose = args.verbose
        self.total_steps = steps_per_epoch * args.epochs
        self.steps = steps_per_epoch * start_epoch
        self.prune_rate = prune_rate_at(self.steps, self.prune_rate0, self.total_steps)
        self.params = {name: p for name, p in model.named_parameters()
                       if p.dim() in (2, 4) and (not args.only_L or "large_kernel.LoRA" in name)}
        if not self.params:
            raise ValueError("no parameter to sparsify (--only-L keeps only large_kernel.LoRA*)")
        self.masks: Dict[str, torch.Tensor] = {}
        self.grad_scaler = getattr(grad_scaler, "_scaler", grad_scaler)
        self._last_scale = self._scale()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init(self, data: Union[Iterable, Tuple[torch.Tensor, torch.Tensor], None] = None,
             criterion: Optional[nn.Module] = None) -> None:
        """Draw the masks (``--sparse_init``) and zero the masked weights.

        ``data`` (snip only): a loader (its first batch is used) or an ``(images, targets)``
        batch; ``criterion`` defaults to cross-entropy on hard labels, as upstream.
        """
        if self.sparse_init == "resume":
            self.masks = {n: p != 0 for n, p in self.params.items()}
        else:
            densities = {"uniform": self._uniform_densities, "ERK": self._erk_densities,
                         "snip": lambda: self._snip_densities(data, criterion)}
            if self.sparse_init not in densities:
                raise ValueError(f"--sparse_init must be snip, ERK, uniform or resume, "
                                 f"got {self.sparse_init!r}")
            per_layer = densities[self.sparse_init]()
            self.masks = {}
            for name, p in self.params.items():
                count = round(per_layer[name] * p.numel())
                everything = torch.ones(p.shape, dtype=torch.bool, device=p.device)
                self.masks[name] = _random_subset_mask(everything, count)
        for name in [n for n, m in self.masks.items() if m.float().mean() >= DENSE_ENOUGH]:
            del self.masks[name]
        self._broadcast()
        self.apply_mask()

    def _uniform_densities(self) -> Dict[str, float]:
        return {name: self.density for name in self.params}

    def _erk_densities(self) -> Dict[str, float]:
        """Erdos-Renyi-Kernel: density proportional to sum(shape)/prod(shape), capped at 1."""
        dense = set()
        while True:
            raw = {n: sum(p.shape) / p.numel() for n, p in self.params.items() if n not in dense}
            budget = sum(p.numel() * self.density for p in self.params.values())
            budget -= sum(self.params[n].numel() for n in dense)
            epsilon = budget / sum(raw[n] * self.params[n].numel() for n in raw)
            too_dense = {n for n, r in raw.items() if r * epsilon > 1}
            if not too_dense:
                break
            dense |= {n for n, r in raw.items() if r == max(raw.values())}
        return {n: 1.0 if n in dense else raw[n] * epsilon for n in self.params}

    def _snip_densities(self, data, criterion) -> Dict[str, float]:
        """Per-layer densities of a global top-k of |w * dL/dw| on one batch (SNIP)."""
        if data is None:
            raise ValueError("--sparse_init snip needs a batch: Masking.init(data_loader)")
        images, targets = data if isinstance(data, (tuple, list)) else next(iter(data))
        net = copy.deepcopy(self.model)
        device = next(net.parameters()).device
        params = dict(net.named_parameters())
        with torch.enable_grad():
            outputs = net(images.to(device))
            loss = (criterion or F.cross_entropy)(outputs, targets.to(device))
            grads = torch.autograd.grad(loss, [params[n] for n in self.params],
                                        allow_unused=True)
        scores = {n: (params[n] * (g if g is not None else torch.zeros_like(params[n]))).abs()
                  for n, g in zip(self.params, grads)}
        flat = torch.cat([s.flatten() for s in scores.values()])
        keep = int(flat.numel() * self.density)
        threshold = flat.topk(keep).values[-1] if keep > 0 else flat.max()
        return {n: (s > threshold).float().mean().item() for n, s in scores.items()}

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero masked weights (and their SGD momentum, as upstream)."""
        for name, mask in self.masks.items():
            param = self.params[name]
            param.mul_(mask)
            state = self.optimizer.state.get(param, {})
            if state.get("momentum_buffer") is not None:
                state["momentum_buffer"].mul_(mask)

    def step(self) -> bool:
        """Call after every optimizer step. Returns True when the masks were updated."""
        self.apply_mask()
        if self._scaler_skipped_step():
            return False
        self.steps += 1
        self.prune_rate = prune_rate_at(self.steps, self.prune_rate0, self.total_steps)
        if self.update_frequency and self.steps % self.update_frequency == 0:
            self.truncate_weights()
            if self.verbose:
                print(self.density_report(per_layer=True))
            return True
        return False

    def _scale(self) -> Optional[float]:
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return None
        return float(self.grad_scaler.get_scale())

    def _scaler_skipped_step(self) -> bool:
        # GradScaler.update() lowers the scale exactly when it skipped the step for inf/nan grads.
        scale = self._scale()
        skipped = scale is not None and self._last_scale is not None and scale < self._last_scale
        self._last_scale = scale
        return skipped

    @torch.no_grad()
    def truncate_weights(self) -> None:
        """Prune ``ceil(prune_rate * nonzeros)`` smallest active weights per layer, regrow as many."""
        for name, mask in self.masks.items():
            weight = self.params[name]
            active = int(mask.sum())
            count = math.ceil(self.prune_rate * active)
            if count == 0:
                continue
            pruned = mask & ~_top_mask(-weight.abs(), mask, count)
            grown = self._grow(name, ~pruned, count)
            self.masks[name] = pruned | grown
        self._broadcast()
        self.apply_mask()

    def _grow(self, name: str, candidates: torch.Tensor, count: int) -> torch.Tensor:
        weight = self.params[name]
        if self.growth == "random":
            return _random_subset_mask(candidates, count)
        if self.growth == "gradient":
            if weight.grad is None:
                raise RuntimeError(f"gradient growth needs the gradient of {name}")
            return _top_mask(weight.grad.abs(), candidates, count)
        state = self.optimizer.state.get(weight, {})
        if "exp_avg" in state:
            momentum = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + 1e-8)
        elif state.get("momentum_buffer") is not None:
            momentum = state["momentum_buffer"]
        else:
            raise RuntimeError(f"momentum growth needs Adam(W) or SGD momentum state for {name}")
        return _top_mask(momentum.abs(), candidates, count)

    @torch.no_grad()
    def update_ema(self, ema_model: nn.Module) -> None:
        """Keep an EMA copy sparse like the model (upstream's masked EMA update).

        Call after the EMA update: masked entries become 0; active entries whose EMA is still 0
        (just regrown) take the model's current value.
        """
        ema_params = dict(ema_model.named_parameters())
        for name, mask in self.masks.items():
            ema = ema_params[name]
            fresh = mask & (ema == 0)
            ema.mul_(mask)
            ema.copy_(torch.where(fresh, self.params[name].to(ema.dtype), ema))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Masks as bool CPU tensors by parameter name (checkpoint entry ``'masks'``)."""
        return {name: mask.cpu() for name, mask in self.masks.items()}

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor]) -> None:
        unknown = sorted(set(state_dict) - set(self.params))
        if unknown:
            raise KeyError(f"checkpoint masks for parameters this run does not sparsify: "
                           f"{unknown[:5]}")
        self.masks = {}
        for name, mask in state_dict.items():
            param = self.params[name]
            if mask.shape != param.shape:
                raise ValueError(f"mask {name} has shape {tuple(mask.shape)}, the parameter "
                                 f"{tuple(param.shape)}")
            self.masks[name] = mask.to(param.device, torch.bool)
        self._broadcast()
        self.apply_mask()

    def _broadcast(self) -> None:
        if not _distributed():
            return
        for name in sorted(self.masks):
            mask = self.masks[name].to(torch.uint8)
            dist.broadcast(mask, src=0)
            self.masks[name] = mask.bool()

    # ------------------------------------------------------------------ report
    def densities(self) -> Dict[str, float]:
        """Density of each masked parameter, and ``'total'`` over every sparsifiable parameter
        (layers left dense after init count as fully active, so it matches ``1 - --sparsity``)."""
        report = {name: mask.float().mean().item() for name, mask in self.masks.items()}
        active = sum(int(self.masks[n].sum()) if n in self.masks else p.numel()
                     for n, p in self.params.items())
        report["total"] = active / sum(p.numel() for p in self.params.values())
        return report

    def density_report(self, per_layer: bool = False) -> str:
        report = self.densities()
        lines = [f"{name}: density {d:.4f}" for name, d in report.items() if name != "total"]
        summary = (f"sparse: {len(self.masks)} masked tensors, total density "
                   f"{report['total']:.4f} (target {self.density:.4f}), step {self.steps}, "
                   f"prune rate {self.prune_rate:.4f}")
        return "\n".join((lines if per_layer else []) + [summary])
