"""Optimizers with ConvNeXt-style parameter groups: no weight decay for 1-D parameters, biases and
``model.no_weight_decay()``, and layer-wise lr decay through each model family's layer-id rule."""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional, Set

import torch
from timm.optim import create_optimizer_v2

import models


def layer_scales(layer_decay: float, num_layers: int) -> List[float]:
    """lr multiplier per layer id 0..num_layers+1: the head gets 1, each layer below one more
    factor of ``layer_decay``."""
    return [layer_decay ** (num_layers + 1 - i) for i in range(num_layers + 2)]


def no_weight_decay_names(model: torch.nn.Module) -> Set[str]:
    return set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()


def get_parameter_groups(model: torch.nn.Module, weight_decay: float,
                         skip_list: Set[str] = frozenset(),
                         layer_id_for: Optional[Callable[[str], int]] = None,
                         scales: Optional[List[float]] = None) -> List[Dict]:
    """Param groups ``layer_{id}_{decay|no_decay}`` (or ``decay``/``no_decay`` without layer
    decay), each with ``weight_decay`` and ``lr_scale``; frozen parameters are left out."""
    groups: Dict[str, Dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name.endswith(".bias") or name in skip_list
        kind = "no_decay" if no_decay else "decay"
        if layer_id_for is not None:
            layer_id = layer_id_for(name)
            group_name, lr_scale = f"layer_{layer_id}_{kind}", scales[layer_id]
        else:
            group_name, lr_scale = kind, 1.0
        group = groups.setdefault(group_name, {
            "weight_decay": 0.0 if no_decay else weight_decay, "params": [], "param_names": [],
            "lr_scale": lr_scale, "group_name": group_name})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def create_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    """timm optimizer ``--opt`` over the lknets parameter groups of ``model`` (``--model``)."""
    layer_id_for, scales = None, None
    if args.layer_decay != 1.0:
        family = models.get_family(args.model)
        layer_id_for = family.layer_id_for
        scales = layer_scales(args.layer_decay, family.num_layers)
    groups = get_parameter_groups(model, args.weight_decay, no_weight_decay_names(model),
                                  layer_id_for, scales)
    kwargs = {"eps": args.opt_eps, "momentum": args.momentum}
    if args.opt_betas is not None:
        kwargs["betas"] = tuple(args.opt_betas)
    # Weight decay is set per group above; the optimizer-wide value must not override it.
    return create_optimizer_v2(groups, opt=args.opt, lr=args.lr, weight_decay=0.0, **kwargs)
