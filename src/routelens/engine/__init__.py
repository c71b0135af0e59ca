"""Route scoring engines.

An engine scores routes forced at one layer (`max_group`: how many sequences it is worth
handing it at once): `score_batch(layer, items)` with one
`ScoreItem` per sequence (input_ids [L], positions [P], experts/weights [P, R, k]) returns
log p(token t + 1) at each position t under each route, [P, R] per item.

- `reference`: plain forwards of the prefix with the route override; obviously right, slow.
- `cache`: the model's own cache of each prefix, the routes of a token decoded as one
  batch from the perturbed layer up; exact for every layout, recurrent layers included.
- `fast` (default): prefix reuse, expert outputs computed once, diagonal-patched attention
  above the layer; exact (checked against `reference`), batched over tokens and sequences.
  Layers it cannot patch (a recurrent layer above) go to `cache`, said once.

Each implements the `Engine` contract (`routelens.engine.base`).
"""

from __future__ import annotations

import warnings

from routelens.engine.base import DEFAULT_MAX_FALLBACK_TIME, Engine
from routelens.engine.cache import CacheEngine
from routelens.engine.checks import DEFAULT_CHECK_ROWS
from routelens.engine.fast import FastEngine, FastEngineUnsupported
from routelens.engine.items import ScoreItem
from routelens.engine.readout import DEFAULT_MEMORY_BUDGET
from routelens.engine.reference import ReferenceEngine
from routelens.errors import SettingError

ENGINES = {"fast": FastEngine, "cache": CacheEngine, "reference": ReferenceEngine}


def make_engine(name: str, adapter, *, memory_budget: int = DEFAULT_MEMORY_BUDGET, route_batch_size: int = 33,
                route_chunk: int | None = None, max_fallback_time: float = DEFAULT_MAX_FALLBACK_TIME,
                check_rows: int = DEFAULT_CHECK_ROWS):
    """The named engine; `fast` falls back to `cache` with a warning that says why.

    Options are explicit (a misspelt one is a TypeError, never silently dropped):
    `memory_budget` bytes for one chunk of perturbed sequences, `route_batch_size` routes
    per forward of the reference engine, `route_chunk` routes per chunk (fast and cache
    engines; None: from the memory budget), `max_fallback_time` seconds a slower engine may
    score after a failed check (0: no bound), `check_rows` rows per layer the fast engine's
    block-algebra check looks at in all."""
    if name not in ENGINES:
        raise SettingError(f"unknown `engine` {name!r}; available: {', '.join(ENGINES)}", "engine")
    if name == "reference":
        return ReferenceEngine(adapter, route_batch_size=route_batch_size, memory_budget=memory_budget)
    options = dict(memory_budget=memory_budget, route_batch_size=route_batch_size, route_chunk=route_chunk,
                   max_fallback_time=max_fallback_time)
    try:
        return ENGINES[name](adapter, **options, **({"check_rows": check_rows} if name == "fast" else {}))
    except FastEngineUnsupported as reason:
        warnings.warn(f"fast engine cannot serve this model exactly ({reason}); using the cache engine",
                      stacklevel=2)
        return CacheEngine(adapter, **options)


__all__ = ["ENGINES", "CacheEngine", "Engine", "FastEngine", "ReferenceEngine", "ScoreItem", "make_engine"]
