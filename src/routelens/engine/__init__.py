"""Route scoring engines: `reference` (plain forwards with the override) and, later, `fast`.

An engine scores routes forced at one layer: `score_positions(input_ids [L], layer,
positions [P], experts [P, R, k], weights [P, R, k]) -> logprob [P, R]` of token t + 1 at
each position t.
"""

from routelens.engine.reference import ReferenceEngine
from routelens.errors import RouteLensError

ENGINES = {"reference": ReferenceEngine}


def make_engine(name: str, adapter, **options):
    if name not in ENGINES:
        raise RouteLensError(f"unknown --engine {name!r}; available: {', '.join(ENGINES)}")
    return ENGINES[name](adapter, **options)


__all__ = ["ReferenceEngine", "ENGINES", "make_engine"]
