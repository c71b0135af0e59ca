"""Model adapters: one protocol (`MoEAdapter`), one file per family, a registry.

Names are imported on first use, so that reading the registry (`routelens models`) loads no torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MoEAdapter": "routelens.models.adapter", "LoadedModel": "routelens.models.loading",
    "load_model": "routelens.models.loading", "SUPPORTED": "routelens.models.registry",
    "adapter_class": "routelens.models.registry", "adapter_for": "routelens.models.registry",
    "RouteOverride": "routelens.models.routing", "RouterOutput": "routelens.models.routing",
    "capture_routes": "routelens.models.routing", "override_routes": "routelens.models.routing",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'routelens.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
