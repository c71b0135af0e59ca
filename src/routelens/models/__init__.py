"""Model adapters: one protocol (`MoEAdapter`), one file per family, a registry."""

from routelens.models.adapter import MoEAdapter
from routelens.models.loading import LoadedModel, load_model
from routelens.models.registry import SUPPORTED, adapter_class, adapter_for
from routelens.models.routing import RouteOverride, RouterOutput, capture_routes, override_routes

__all__ = [
    "MoEAdapter", "LoadedModel", "load_model", "SUPPORTED", "adapter_class", "adapter_for",
    "RouteOverride", "RouterOutput", "capture_routes", "override_routes",
]
