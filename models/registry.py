"""The one model registry of lknets.

Every model is registered under the exact name the upstream CLI uses (``RepLKNet-31B``,
``unireplknet_b``, ``SLaK_tiny``, ``convnext_tiny``) and belongs to a *family*. A family carries
what the training loop needs to know about a group of models without importing them by name:
the layer-id rule for layer-wise lr decay, and the family's own command-line flags.

Models are also registered with timm (``models.timm_api``), under the same name, or as
``lknets_<name>`` where timm has a model of that name, so ``timm.create_model`` builds lknets'
models after ``import models`` and still builds timm's own models exactly as before.
"""
from __future__ import annotations

import argparse
import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch.nn as nn

from .timm_api import register_with_timm


@dataclass
class Family:
    """What the framework knows about one model family.

    layer_id_for: maps a parameter name to its layer-decay group in ``0 .. num_layers + 1``
        (0 = stem, num_layers + 1 = head).
    num_layers: number of body groups for layer decay (12 for the ConvNeXt-style rule).
    add_args: adds the family's flags to the main argument parser.
    kwargs_from_args: turns parsed flags into constructor keyword arguments for this family.
    """

    name: str
    layer_id_for: Callable[[str], int]
    num_layers: int = 12
    add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None
    kwargs_from_args: Optional[Callable[[argparse.Namespace], Dict[str, Any]]] = None
    models: List[str] = field(default_factory=list)


@dataclass
class ModelEntry:
    name: str
    family: str
    constructor: Callable[..., nn.Module]
    timm_name: str


_FAMILIES: Dict[str, Family] = {}
_MODELS: Dict[str, ModelEntry] = {}


def register_family(family: Family) -> Family:
    if family.name in _FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    _FAMILIES[family.name] = family
    return family


def register_model(family: str, name: Optional[str] = None) -> Callable:
    """Decorator: register ``fn`` under ``name`` (default: the function's name) in ``family``."""

    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        model_name = name or fn.__name__
        if family not in _FAMILIES:
            raise ValueError(f"register family {family!r} before its models")
        if model_name in _MODELS:
            raise ValueError(f"model {model_name!r} is registered twice")
        timm_name = register_with_timm(model_name, fn)
        _MODELS[model_name] = ModelEntry(model_name, family, fn, timm_name)
        _FAMILIES[family].models.append(model_name)
        return fn

    return decorator


def timm_name(model_name: str) -> str:
    """The name ``model_name`` is registered under in timm (``lknets_<name>`` for ConvNeXt's)."""
    return _entry(model_name).timm_name


def list_models(pattern: str = "*", family: Optional[str] = None) -> List[str]:
    """Registered model names matching a shell-style ``pattern``, optionally of one family."""
    names = _FAMILIES[family].models if family is not None else list(_MODELS)
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def list_families() -> List[str]:
    return sorted(_FAMILIES)


def _entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=5, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}.{hint} Registered models: {', '.join(list_models())}")
    return _MODELS[name]


def get_family(model_name: str) -> Family:
    return _FAMILIES[_entry(model_name).family]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model. ``kwargs`` are the upstream constructor's own names
    (num_classes, drop_path_rate, layer_scale_init_value, head_init_scale, deploy, ...)."""
    entry = _entry(name)
    try:
        return entry.constructor(**kwargs)
    except TypeError as err:
        if "unexpected keyword argument" not in str(err):
            raise
        raise TypeError(f"model {name!r} (family {entry.family!r}) cannot be built with "
                        f"{sorted(kwargs)}: {err}") from err


def add_family_args(parser: argparse.ArgumentParser) -> None:
    """Add each family's own flags to ``parser`` (one argument group per family)."""
    for name in list_families():
        family = _FAMILIES[name]
        if family.add_args is not None:
            family.add_args(parser)


def family_flags() -> Dict[str, List[str]]:
    """Each family's own flag (by its dest) -> the families that take it."""
    owners: Dict[str, List[str]] = {}
    for name in list_families():
        family = _FAMILIES[name]
        if family.add_args is not None:
            probe = argparse.ArgumentParser(add_help=False)
            family.add_args(probe)
            for dest in vars(probe.parse_args([])):
                owners.setdefault(dest, []).append(name)
    return owners


def family_kwargs(model_name: str, args: argparse.Namespace) -> Dict[str, Any]:
    """Constructor kwargs the model's family reads from the parsed command line.

    Family flags default to None; one that is set for a model of a family that does not take
    it is a ValueError (silently ignoring ``--kernel_size`` on a ConvNeXt would train another
    model than the one asked for).
    """
    family = get_family(model_name)
    for dest, owners in family_flags().items():
        if family.name not in owners and getattr(args, dest, None) is not None:
            takers = ", ".join(f"{o} ({', '.join(_FAMILIES[o].models[:3])}, ...)"
                               for o in owners)
            raise ValueError(f"--{dest} is a flag of the {takers} models; {model_name} "
                             f"(family {family.name}) does not take it")
    return family.kwargs_from_args(args) if family.kwargs_from_args is not None else {}


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Switch ``model`` in place to its deploy (inference) form and return it.

    Every re-param block exposes one ``reparameterize()``; blocks are visited children-first so a
    parent sees its children already merged. A model without re-param blocks is left unchanged.
    """
    for module in list(model.modules())[::-1]:
        if module is not model and hasattr(module, "reparameterize"):
            module.reparameterize()
    if hasattr(model, "reparameterize"):
        model.reparameterize()
    return model
