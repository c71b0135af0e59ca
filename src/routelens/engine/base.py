"""The Engine contract: what an analysis may ask of a route-scoring engine, and nothing else.

An analysis never probes an engine (`hasattr`) nor reaches into it: it calls these members.

- `natural_routes(input_ids, layers)`: the router outputs of one natural forward of a
  right-padded group at `layers` (rows b * T + t), made by the engine when the same pass
  also records what scoring the group needs; None when the engine has no such pass (the
  analysis then runs the forward itself).
- `score_batch(layer, items)`: log p(token t + 1) at each scored position t under each
  route forced at `layer` (or at every layer of a list at once), [P, R] per `ScoreItem`.
- `check_record()`: what `run.json` records of the engine's run-time checks: the largest
  standard-route deviation from the natural forward (max and per-batch mean, nats), why
  it fell back if it did, the layers it handed to the cache engine and why, and the cache
  engine's own fallback.
- `padding`: the check that unequal lengths may share a padded forward (`PaddingCheck`),
  `max_group`: how many sequences are worth handing it at once, `name`.

`FastEngine`, `CacheEngine` and `ReferenceEngine` implement it; the isolation study's
`WholeSequenceScorer` is a different contract (a route on every token, not one token's).
An engine that hands work to another (fast to cache, cache to reference) shares its
`DeviationRecord` with it at construction, so the record covers every route scored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from routelens.engine.checks import PaddingCheck
    from routelens.engine.items import ScoreItem
    from routelens.models.routing import RouterOutput


@runtime_checkable
class Engine(Protocol):
    name: str
    max_group: int
    padding: PaddingCheck

    def natural_routes(self, input_ids: list[torch.Tensor], layers: list[int]) -> dict[int, RouterOutput] | None: ...

    def score_batch(self, layer: int | list[int], items: list[ScoreItem]) -> list[np.ndarray]: ...

    def check_record(self) -> dict: ...


def check_fields(deviation, fallback_reason: str | None, cache_layers: dict | None = None,
                 cache_fallback: str | None = None) -> dict:
    """The run.json fields every engine reports, in one shape."""
    largest, mean = deviation.largest
    return {"standard_route_max_abs_logprob_diff": largest, "standard_route_mean_abs_logprob_diff": mean,
            "engine_fallback": fallback_reason,
            "cache_engine_layers": {str(k): v for k, v in (cache_layers or {}).items()},
            "cache_engine_fallback": cache_fallback}
