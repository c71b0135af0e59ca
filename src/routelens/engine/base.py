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
- `token_flags(items)`: per item of the last `score_batch`, which scored tokens a small
  low-precision miss of the standard-route check flagged (`DeviationRecord`).
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

    def token_flags(self, items: list[ScoreItem]) -> list[np.ndarray]: ...


def check_fields(deviation, fallback_reason: str | None, cache_layers: dict | None = None,
                 cache_fallback: str | None = None, budget: FallbackBudget | None = None) -> dict:
    """The run.json fields every engine reports, in one shape."""
    largest, mean = deviation.largest
    return {"standard_route_max_abs_logprob_diff": largest, "standard_route_mean_abs_logprob_diff": mean,
            **deviation.record(), "engine_fallback": fallback_reason,
            "cache_engine_layers": {str(k): v for k, v in (cache_layers or {}).items()},
            "cache_engine_fallback": cache_fallback,
            **(budget.record() if budget else {"fallback_seconds": 0.0, "fallback_tokens": 0, "max_fallback_time": None})}


def token_flags(deviation, items) -> list[np.ndarray]:
    """Split the flags the last batch's checks left (in item order) by item."""
    import numpy as np

    sizes = [len(item.positions) for item in items]
    flags = np.concatenate(deviation.batch_flags) if deviation.batch_flags else np.zeros(0, dtype=bool)
    if flags.size != sum(sizes):   # a batch checked by no engine (nothing scored): nothing flagged
        flags = np.zeros(sum(sizes), dtype=bool)
    return list(np.split(flags, np.cumsum(sizes)[:-1])) if sizes else []


DEFAULT_MAX_FALLBACK_TIME = 600.0   # seconds a slower engine may score after a failed check


class FallbackBudget:
    """How long the engines a failed check handed work to may run, shared along the chain
    (fast -> cache -> reference). A fallback engine's first batch starts with one sequence,
    timed: its rate is announced with the estimated time of the rest of the batch, and a
    batch (that one's rest included) that would run past `seconds` in all is refused before
    it starts (`FallbackTooSlow`), so a run never stalls on an engine 1,000x slower than the
    one it planned on. Rates are kept per engine; a fallback inside a timed one (cache to
    reference) is counted by the outer. 0: no bound."""

    def __init__(self, seconds: float = DEFAULT_MAX_FALLBACK_TIME):
        self.seconds = float(seconds)
        self.spent = 0.0
        self.tokens = 0
        self._by_engine: dict[str, list[float]] = {}   # engine -> [seconds, tokens]
        self._announced: set[str] = set()              # engines whose rate was announced
        self._running = False

    def rate(self, engine: str) -> float | None:
        """Seconds per scored token of `engine` as a fallback so far (None: not yet timed)."""
        seconds, tokens = self._by_engine.get(engine, (0.0, 0))
        return seconds / tokens if tokens else None

    def before(self, engine: str, reason: str, tokens: int) -> None:
        """Refuse a fallback batch of `tokens` scored tokens that would exceed the bound."""
        from routelens.errors import FallbackTooSlow

        rate = self.rate(engine)
        if not self.seconds or rate is None:
            return
        estimate = rate * tokens
        if self.spent + estimate > self.seconds:
            raise FallbackTooSlow(
                f"stopped: after a failed check ({reason}) the fallback engines have scored for {self.spent:.0f} s; "
                f"the {engine} engine scores {rate:.3g} s per token, so the next {tokens} tokens would take "
                f"~{estimate:.0f} s more, past max_fallback_time {self.seconds:g} s; what was scored is kept (a run "
                f"folder resumes). Rerun in float32 (--dtype float32), with --engine {engine} from the start, or "
                "raise --max-fallback-time (0: no bound)")

    def _timed(self, engine, reason: str, layer, items) -> list:
        import time

        tokens = sum(len(item.positions) for item in items)
        self.before(engine.name, reason, tokens)
        started = time.perf_counter()
        results = engine.score_batch(layer, items)
        seconds = time.perf_counter() - started
        self.spent += seconds
        self.tokens += tokens
        spent = self._by_engine.setdefault(engine.name, [0.0, 0])
        spent[0] += seconds
        spent[1] += tokens
        return results

    def run(self, engine, reason: str, layer, items) -> list:
        """`engine.score_batch(layer, items)` as a fallback: an engine not timed yet scores the
        first sequence alone, then announces its rate and the estimate of the rest, which is
        refused before it starts if it would run past the bound."""
        import warnings

        if self._running:   # a fallback inside a timed fallback: the outer call counts it
            return engine.score_batch(layer, items)
        self._running = True
        try:
            results, rest = [], list(items)
            if self.rate(engine.name) is None and len(rest) > 1:
                results = self._timed(engine, reason, layer, rest[:1])
                flags = list(engine.deviation.batch_flags)   # the next call starts its own batch
                rest = rest[1:]
            else:
                flags = []
            rate = self.rate(engine.name)
            if rest and rate is not None and engine.name not in self._announced:
                self._announced.add(engine.name)
                remaining = rate * sum(len(item.positions) for item in rest)
                bound = f"bounded by max_fallback_time {self.seconds:g} s" if self.seconds else "no time bound"
                warnings.warn(f"the {engine.name} engine scores {rate:.3g} s per token here: ~{remaining:.0f} s for the "
                              f"rest of this batch ({bound}; {self.spent:.0f} s so far)", stacklevel=3)
            if rest:
                results = results + self._timed(engine, reason, layer, rest)
                engine.deviation.batch_flags[:0] = flags
            return results
        finally:
            self._running = False

    def record(self) -> dict:
        return {"fallback_seconds": round(self.spent, 3), "fallback_tokens": self.tokens,
                "max_fallback_time": self.seconds}
