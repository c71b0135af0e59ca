"""Model adapters: one protocol (`MoEAdapter`), one file per family, a registry.

Names are imported on first use, so that reading the registry (`routelens models`) loads no torch.
"""

from __future__ import annotations

from routelens.lazy import lazy_getattr

_EXPORTS = {
    "MoEAdapter": "routelens.models.adapter", "LoadedModel": "routelens.models.loading",
    "load_model": "routelens.models.loading", "SUPPORTED": "routelens.models.registry",
    "adapter_class": "routelens.models.registry", "adapter_for": "routelens.models.registry",
    "RouteOverride": "routelens.models.routing", "RouterOutput": "routelens.models.routing",
    "capture_routes": "routelens.models.routing", "override_routes": "routelens.models.routing",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
