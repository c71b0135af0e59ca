"""Route scoring engines.

An engine scores routes forced at one layer (`max_group`: how many sequences it is worth
handing it at once): `score_batch(layer, items)` with one
`ScoreItem` per sequence (input_ids [L], positions [P], experts/weights [P, R, k]) returns
log p(token t + 1) at each position t under each route, [P, R] per item.

- `reference`: plain forwards of the prefix with the route override; obviously right, slow.
- `fast` (default): prefix reuse, expert outputs computed once, diagonal-patched attention
  above the layer; exact (checked against `reference`), batched over tokens and sequences.
"""

from __future__ import annotations

import warnings

from routelens.engine.fast import FastEngine, FastEngineUnsupported
from routelens.engine.items import ScoreItem
from routelens.engine.reference import ReferenceEngine
from routelens.errors import RouteLensError

ENGINES = {"fast": FastEngine, "reference": ReferenceEngine}


def make_engine(name: str, adapter, **options):
    """The named engine; `fast` falls back to `reference` with a warning that says why."""
    if name not in ENGINES:
        raise RouteLensError(f"unknown --engine {name!r}; available: {', '.join(ENGINES)}")
    try:
        return ENGINES[name](adapter, **options)
    except FastEngineUnsupported as reason:
        warnings.warn(f"fast engine cannot serve this model exactly ({reason}); using the reference engine",
                      stacklevel=2)
        return ReferenceEngine(adapter, **options)


__all__ = ["ENGINES", "FastEngine", "ReferenceEngine", "ScoreItem", "make_engine"]
