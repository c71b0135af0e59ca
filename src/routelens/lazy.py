"""Names of a package imported on first use (PEP 562), so that importing the package loads
nothing heavy: `routelens --help` and `routelens models` import no torch."""

from __future__ import annotations

import importlib


def lazy_getattr(package: str, namespace: dict, exports: dict[str, str]):
    """The module `__getattr__` of `package` that imports each name of `exports` (name ->
    defining module) on first use and keeps it in the package's `namespace`."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        namespace[name] = value
        return value

    return __getattr__
