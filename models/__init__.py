"""lknets models: one registry for every large-kernel ConvNet family.

``import models`` registers every family, and every model with timm (``models.timm_api``: under
its own name, or ``lknets_<name>`` where timm has a model of that name).
"""
from .registry import (Family, add_family_args, create_model, family_kwargs, get_family,
                       list_families, list_models, register_family, register_model,
                       reparameterize_model, timm_name)
from . import convnext  # noqa: F401  (registers the family)
from . import replknet, unireplknet  # noqa: F401
from . import slak  # noqa: F401
from . import convnext_1d  # noqa: F401

__all__ = ["Family", "add_family_args", "create_model", "family_kwargs", "get_family",
           "list_families", "list_models", "register_family", "register_model",
           "reparameterize_model", "timm_name"]
