"""timm's model contract, written once for every lknets network, and lknets' timm registrations.

timm and the tools built on it (its optimizer factory, ``features_only`` backbones, fx feature
extraction, its own model tests) expect a classifier to expose one small surface:
``forward_features`` (the unpooled last map), ``forward_head``, ``forward_intermediates``,
``prune_intermediate_layers``, ``reset_classifier``, ``feature_info``, ... :class:`TimmModelMixin`
implements it on top of four per-family hooks (stem, one stage, the tap of a stage, truncation),
so ConvNeXt (and SLaK and the oriented-1D ConvNeXt built on it), RepLKNet and UniRepLKNet share
one implementation.

:func:`register_with_timm` registers a model with timm without shadowing any of timm's own
names: an lknets name that timm already has is registered as ``lknets_<name>``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, is_model
from timm.models import register_model as timm_register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._features import feature_take_indices

from . import pretrained as pretrained_table

__all__ = ["TimmModelMixin", "POOL_TYPES", "stage_feature_info", "register_with_timm"]

# Pooling before the classifier: mean or max over H and W, or none (the head sees the map).
POOL_TYPES = ("avg", "max", "")
TIMM_PREFIX = "lknets_"
# timm.create_model(features_only=True) wraps the model in timm's FeatureGetterNet, which calls
# prune_intermediate_layers and forward_intermediates: the four stage outputs by default.
FEATURE_CFG = {"feature_cls": "getter", "out_indices": (0, 1, 2, 3)}

# timm's register_model reads the pretrained cfgs of an entry point from ``default_cfgs`` in the
# entry point's module; register_with_timm fills it (keyed by timm name) for the entries it
# defines here.
default_cfgs: Dict[str, Any] = {}


def check_global_pool(global_pool: str) -> None:
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")


def global_pool_2d(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """(N, C, H, W) -> (N, C) for 'avg'/'max', unchanged for ''."""
    if pool_type == "avg":
        return x.mean((-2, -1))
    if pool_type == "max":
        return x.amax((-2, -1))
    return x


def stage_feature_info(dims: List[int], stem_reduction: int = 4) -> List[Dict[str, Any]]:
    """timm's feature_info of a 4-stage network whose stages halve the resolution after stage 0."""
    return [{"num_chs": int(d), "reduction": stem_reduction * 2 ** i, "module": f"stages.{i}"}
            for i, d in enumerate(dims)]


class TimmModelMixin:
    """timm's model API for a network of ``self.stages`` (one entry per feature stage).

    The network sets ``in_chans``, ``num_classes``, ``num_features``, ``feature_info``, and
    builds its head with :meth:`_init_head`, and implements the hooks:

    - ``_forward_stem(x)``: everything before stage 0,
    - ``_forward_stage(i, x)``: stage ``i``, including the downsampling that leads into it,
    - ``_stage_output(i, x)``: the feature map reported for stage ``i`` (default: ``x``; the
      upstream backbones pass it through their own per-stage norm),
    - ``_truncate_stages(n)``: drop every module that only stages ``n`` and later use,
    - ``set_grad_checkpointing(enable)`` and ``group_matcher(coarse)``.

    Where the final norm sits is the one difference between the heads: ConvNeXt and UniRepLKNet
    normalize the pooled vector (``norm`` belongs to the head, as in timm's ConvNeXt head),
    RepLKNet normalizes the last map before pooling (``norm_before_pool``; then ``norm`` ends
    ``forward_features``, as timm's ``norm_pre``). Upstream backbones (``out_indices`` set, no
    ``norm``/``head``) return the list of their stage maps from ``forward`` and
    ``forward_features``, as upstream.
    """

    norm_before_pool = False
    out_indices: Optional[Tuple[int, ...]] = None
    stages: nn.ModuleList

    def _forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _forward_stage(self, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _stage_output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def _truncate_stages(self, num_stages: int) -> None:
        raise NotImplementedError

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float,
                   norm: Optional[nn.Module]) -> None:
        """Register ``norm`` (if any) and ``head`` (a Linear, or Identity for 0 classes), in
        that order, which is upstream's state_dict order."""
        check_global_pool(global_pool)
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = num_features
        if norm is not None:
            self.norm = norm
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _has_head(self) -> bool:
        return "head" in self._modules

    def _require_head(self) -> None:
        if not self._has_head():
            raise RuntimeError(f"this {type(self).__name__} is a backbone (built with "
                               f"num_classes=None, out_indices={self.out_indices}): it has no "
                               f"classifier head; build it with num_classes for one")

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_before_pool and "norm" in self._modules:
            return self.norm(x)
        return x

    def forward_features(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        """The last feature map, unpooled (a list of stage maps for an upstream backbone)."""
        if self.out_indices is not None:
            return self.forward_intermediates(x, list(self.out_indices), intermediates_only=True)
        x = self._forward_stem(x)
        for index in range(len(self.stages)):
            x = self._forward_stage(index, x)
        return self._final_norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool, normalize (ConvNeXt/UniRepLKNet), dropout, classify; ``pre_logits`` stops before
        the classifier. With ``global_pool=''`` the norm and the classifier act on the channels
        of every position: an (N, C or num_classes, H, W) map comes out."""
        self._require_head()
        pooled = bool(self.global_pool)
        x = global_pool_2d(x, self.global_pool)
        if not pooled:
            x = x.permute(0, 2, 3, 1)
        if not self.norm_before_pool:
            x = self.norm(x)
        x = self.head_drop(x)
        if not pre_logits:
            x = self.head(x)
        return x if pooled else x.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        if self.out_indices is not None:
            return self.forward_features(x)
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage maps at ``indices`` (timm's semantics: None = all, n = the last n, or a list,
        negatives from the end), in stage order.

        ``norm`` passes the last stage's map through the final norm where the network has one on
        the map (RepLKNet). Stages after the last index are skipped with ``stop_early`` or
        ``intermediates_only`` (their output would be thrown away). Returns the intermediates,
        or ``(final features, intermediates)``, the final features being ``forward_features``'.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"lknets models give NCHW feature maps only, not {output_fmt!r}")
        num_stages = len(self.stages)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        last = num_stages - 1
        end = max_index if stop_early or intermediates_only else last
        intermediates = []
        x = self._forward_stem(x)
        for index in range(end + 1):
            x = self._forward_stage(index, x)
            if index in take_indices:
                feature = self._stage_output(index, x)
                intermediates.append(self._final_norm(feature) if norm and index == last
                                     else feature)
        if intermediates_only:
            return intermediates
        if end == last:
            x = self._final_norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> List[int]:
        """Drop the stages after the last of ``indices`` (and what only they use), the final
        norm with ``prune_norm`` or when the last stage goes, and the classifier with
        ``prune_head``. Returns the absolute indices to pass to :meth:`forward_intermediates`."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self._truncate_stages(max_index + 1)
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if (prune_norm or prune_end) and self.norm_before_pool and "norm" in self._modules:
            self.norm = nn.Identity()
        if (prune_head or prune_end) and self._has_head():
            self.reset_classifier(0, "", reset_other=True)
        return take_indices

    def get_classifier(self) -> nn.Module:
        self._require_head()
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None,
                         reset_other: bool = False) -> None:
        """A new classifier for ``num_classes`` (0: none); ``global_pool`` None keeps the current
        pooling. ``reset_other`` also drops the head's norm (ConvNeXt, UniRepLKNet). New layers
        take the device, dtype and train/eval mode of the model."""
        self._require_head()
        pool = self.global_pool if global_pool is None else global_pool
        check_global_pool(pool)
        reference = next(self.parameters())
        self.num_classes = num_classes
        self.global_pool = pool
        if reset_other and not self.norm_before_pool:
            self.norm = nn.Identity()
        head = (nn.Linear(self.head_hidden_size, num_classes, device=reference.device,
                          dtype=reference.dtype) if num_classes > 0 else nn.Identity())
        self.head = head.train(self.training)

    def no_weight_decay(self) -> Set[str]:
        """Empty: optim_factory's rule (no decay for 1-D parameters and biases) already covers
        every norm, layer scale and theta; a name here would change the parameter groups lknets
        trains with (UniRepLKNet's (1, 1, 1, C) GRN terms keep their weight decay)."""
        return set()


def _no_download(timm_name: str, kwargs: Dict[str, Any]) -> ValueError:
    cfg = resolve_pretrained_cfg(timm_name, pretrained_cfg=kwargs.get("pretrained_cfg"),
                                 pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
    source = cfg.url or cfg.file or (f"{cfg.hf_hub_id} / {cfg.hf_hub_filename}"
                                     if cfg.hf_hub_id else None)
    where = f" The upstream checkpoint is {source}." if source else ""
    return ValueError(
        f"lknets does not download weights: build {timm_name} with pretrained=False and load the "
        f"file yourself: main.py --resume FILE (same head) or --finetune FILE (new head), or "
        f"model.load_state_dict(torch.load(FILE)['model']).{where}")


def register_with_timm(model_name: str, constructor: Callable[..., nn.Module]) -> str:
    """Register ``constructor`` (lknets' ``model_name``) with timm, with its pretrained cfgs
    from :mod:`models.pretrained`; returns the timm name (``models.timm_name`` looks it up).

    The entry point builds through timm's ``build_model_with_cfg`` (pretrained cfg, num_classes
    and in_chans from the cfg, ``features_only``/``out_indices``), takes timm's ``device`` and
    ``dtype``, and refuses ``pretrained=True``: lknets never downloads.
    """
    # A name timm already has (its ConvNeXt's) gets the prefix, so importing lknets changes
    # nothing that timm resolves.
    timm_name = TIMM_PREFIX + model_name if is_model(model_name) else model_name
    cfgs = pretrained_table.pretrained_cfgs(model_name)
    default_cfgs.update(generate_default_cfgs(
        {timm_name + key[len(model_name):]: cfg for key, cfg in cfgs.items()}))

    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise _no_download(timm_name, kwargs)
        device = kwargs.pop("device", None)
        dtype = kwargs.pop("dtype", None)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = build_model_with_cfg(constructor, timm_name, pretrained=False,
                                         feature_cfg=dict(FEATURE_CFG), **kwargs)
        return model if dtype is None else model.to(dtype=dtype)

    entry.__name__ = entry.__qualname__ = timm_name
    entry.__module__ = __name__
    entry.__doc__ = f"lknets' {model_name} ({constructor.__module__}.{constructor.__name__})."
    # timm lists every entry point in its module's __all__; make each one an attribute too, so
    # that ``from models.timm_api import *`` keeps working.
    globals()[timm_name] = entry
    timm_register_model(entry)
    return timm_name
