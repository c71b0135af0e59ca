"""The cache engine: exact for every decoder layout, recurrent layers included.

The fast engine's diagonal patch holds for softmax attention only: a linear-attention,
Mamba or short-convolution layer carries a state from position to position, so a
perturbed token cannot be spliced into a whole-sequence pass above it. This engine walks
the sequence with the model's own cache instead (`past_key_values`, KV and recurrent
states as transformers builds them):

1. One forward fills the cache with the prefix before the first scored position; after
   that the sequence is decoded one token at a time, naturally (batch 1).
2. At a scored position t, the cache of tokens < t is copied before the natural step,
   and the natural step records the input of decoder layer l and the arguments of
   every layer from l up (position embeddings, masks, cache positions).
3. The routes of token t then run as one batch, from layer l up only: layer l with the
   route override, the layers above with the copied cache (one row per route), then the
   final norm and the LM head. Layers below l are never recomputed for the routes.
   Joint routes start at their lowest layer and are forced at each of their layers.

Cost per scored token: one batch-1 decode step plus (L - l) layers of a batch of routes,
against a prefix forward per route for the reference engine. The standard route (route 0)
must reproduce the natural forward's log-probabilities on every sequence; otherwise this
engine switches to the reference engine with a warning that says why.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from routelens.engine.base import DEFAULT_MAX_FALLBACK_TIME, FallbackBudget, check_fields, token_flags
from routelens.engine.checks import DeviationRecord, PaddingCheck
from routelens.engine.items import ScoreItem, joint_layers, joint_overrides, layer_label, per_layer
from routelens.engine.readout import DEFAULT_MEMORY_BUDGET, activation_bytes, record_layer_arguments, target_log_probs
from routelens.engine.reference import ReferenceEngine
from routelens.models.adapter import MoEAdapter
from routelens.models.routing import override_routes


class CacheStepMismatch(Exception):
    """A check of the cache engine failed on this checkpoint (the reason is the message)."""


def cache_bytes(cache, first_layer: int) -> int:
    """Bytes held by the cache's layers from `first_layer` up (what one route row copies)."""
    total = 0
    for layer in cache.layers[first_layer:]:
        for value in vars(layer).values():
            tensors = value.values() if isinstance(value, dict) else [value]
            total += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
    return total


class CacheEngine:
    name = "cache"
    max_group = 1   # one sequence at a time: its cache is walked token by token

    def __init__(self, adapter: MoEAdapter, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 route_batch_size: int = 33, route_chunk: int | None = None, deviation: DeviationRecord | None = None,
                 budget: FallbackBudget | None = None, max_fallback_time: float = DEFAULT_MAX_FALLBACK_TIME):
        self.adapter = adapter
        self.memory_budget = int(memory_budget)
        self.route_chunk = route_chunk
        # |route 0 - natural| seen so far, nats: one record with the reference engine it falls back to
        self.deviation = deviation or DeviationRecord(adapter, memory_budget)
        # how long the reference engine may run after a failed check (shared with the fast engine's)
        self.budget = budget or FallbackBudget(max_fallback_time)
        self.reference = ReferenceEngine(adapter, route_batch_size=route_batch_size, memory_budget=memory_budget,
                                         deviation=self.deviation)
        self.fallback_reason: str | None = None
        self._failed = False   # a failed check (not a declared defect) sent it to the reference engine
        self.padding = PaddingCheck(adapter, memory_budget)   # may unequal lengths share a forward (checked once)

    def natural_routes(self, input_ids: list[torch.Tensor], layers: list[int]) -> None:
        """No natural pass of its own to share: the analysis runs the forward (see `Engine`)."""
        return None

    def check_record(self) -> dict:
        return check_fields(self.deviation, self.fallback_reason, budget=self.budget)

    def token_flags(self, items: list[ScoreItem]) -> list[np.ndarray]:
        return token_flags(self.deviation, items)

    # ------------------------------------------------------------------ one natural step
    def _natural_step(self, token: torch.Tensor, cache, layer: int) -> dict:
        """Decode one token naturally through the decoder stack (no LM head: the cache is what
        it is for), advancing the cache in place; returns what every layer from `layer` up
        was passed (`record_layer_arguments`), layer `layer`'s input included."""
        adapter = self.adapter
        recorded, hooks = record_layer_arguments(adapter, range(layer, adapter.num_layers))
        try:
            adapter.base_model(token.view(1, 1).to(adapter.device), past_key_values=cache, use_cache=True)
        finally:
            for hook in hooks:
                hook.remove()
        if len(recorded) != adapter.num_layers - layer:
            raise CacheStepMismatch(f"decoder layers {sorted(set(range(layer, adapter.num_layers)) - set(recorded))} "
                                    "did not run in a decode step")
        return recorded

    def _routes_from_layer(self, layers: tuple[int, ...], recorded: dict, snapshot, experts: torch.Tensor,
                           weights: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [R, d] of token t under each route [R, J, k] forced at
        `layers` (one route per layer), running only layers `layers[0]`.. with `snapshot`
        (the cache before t) per row."""
        adapter = self.adapter
        layer, rows = layers[0], experts.shape[0]
        cache = adapter.expand_cache(snapshot, layer, rows)
        hidden = recorded[layer][0]
        hidden = hidden.expand(rows, *hidden.shape[1:]).contiguous()
        with override_routes(adapter, joint_overrides(layers, torch.arange(rows), experts, weights)):
            for index in range(layer, adapter.num_layers):
                _, args, kwargs = recorded[index]
                kwargs = {name: (cache if value is snapshot.source else value) for name, value in kwargs.items()}
                hidden = adapter.block_output(adapter.decoder_layers[index](hidden, *args, **kwargs))
        return adapter.final_norm(hidden[:, -1])

    def _rows_per_chunk(self, snapshot, layer: int) -> int:
        if self.route_chunk:
            return self.route_chunk
        per_row = cache_bytes(snapshot.cache, layer) + activation_bytes(self.adapter, 1) + 8 * self.adapter.config.vocab_size
        return max(1, self.memory_budget // max(per_row, 1))

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_positions(self, input_ids: torch.Tensor, layer: int | list[int], positions, experts: torch.Tensor,
                        weights: torch.Tensor) -> np.ndarray:
        """All routes of several positions of one sequence: experts/weights [P, R, k] (or
        [P, R, J, k] at a list of J layers, forced together) -> [P, R]."""
        adapter = self.adapter
        layers = joint_layers(layer)
        experts, weights = per_layer(experts, layer), per_layer(weights, layer)
        positions = [int(t) for t in np.asarray(positions)]
        if any(not 0 <= t < input_ids.shape[0] - 1 for t in positions):
            raise ValueError(f"positions must have a next token in a sequence of {input_ids.shape[0]}")
        if len(set(positions)) != len(positions):
            raise ValueError("positions must be distinct")
        out = np.zeros((len(positions), experts.shape[1]))
        if not positions:
            return out
        order = {t: i for i, t in enumerate(positions)}
        first = min(positions)
        cache = adapter.new_cache()
        if first > 0:   # the prefix before the first scored token: one forward
            adapter.base_model(input_ids[None, :first].to(adapter.device), past_key_values=cache, use_cache=True)
        for t in range(first, max(positions) + 1):
            if t not in order:
                adapter.base_model(input_ids[t].view(1, 1).to(adapter.device), past_key_values=cache, use_cache=True)
                continue
            i = order[t]
            snapshot = adapter.snapshot_cache(cache)            # tokens < t, before the natural step
            recorded = self._natural_step(input_ids[t], cache, layers[0])
            chunk = self._rows_per_chunk(snapshot, layers[0])
            target = input_ids[t + 1].repeat(experts.shape[1])
            final = torch.cat([self._routes_from_layer(layers, recorded, snapshot, experts[i, s: s + chunk],
                                                       weights[i, s: s + chunk])
                               for s in range(0, experts.shape[1], chunk)])
            out[i] = target_log_probs(adapter, final, target, self.memory_budget)
        return out

    def score_batch(self, layer: int | list[int], items: list[ScoreItem]) -> list[np.ndarray]:
        """Each item's routes, [P, R] per item (route 0 checked against the natural forward);
        after a failed check, and for the rest of the run, through the reference engine."""
        if self.fallback_reason is None and (declared := self.adapter.cache_engine_defect):
            self.fallback_reason = f"{self.adapter.config.model_type}: {declared}"
            warnings.warn(f"the cache engine cannot serve {self.fallback_reason}; scoring with the reference engine",
                          stacklevel=2)
        self.deviation.start_batch()
        self.deviation.calibrate(items)   # the first batch: the tolerance from this model's noise
        if self.fallback_reason is None:
            try:
                return [self._score_item(layer, item) for item in items]
            except CacheStepMismatch as reason:
                self.fallback_reason = f"{layer_label(layer)} ({self.adapter.config.model_type}): {reason}"
                self._failed = True
                warnings.warn(f"cache engine check failed at {self.fallback_reason}; "
                              "scoring with the reference engine from here on", stacklevel=2)
        if not self._failed:   # a family the cache engine cannot serve: the reference by design
            return self.reference.score_batch(layer, items)
        return self.budget.run(self.reference, self.fallback_reason, layer, items)

    def _score_item(self, layer: int | list[int], item: ScoreItem) -> np.ndarray:
        scored = self.score_positions(item.input_ids, layer, item.positions, item.experts, item.weights)
        if len(item.positions):
            natural = self.reference.natural_log_probs(item.input_ids, item.positions)
            miss = self.deviation.judge(scored[:, 0], natural)
            if miss is not None and not miss.small:
                raise CacheStepMismatch(miss.clause)
            if miss is not None:
                self.deviation.announce(miss, f"the cache engine at {layer_label(layer)}")
        return scored
