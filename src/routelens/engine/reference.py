"""The reference engine: score a route by running the model with it.

For token position t (target: token t+1) and layer l, each route is scored by a plain
forward of the prefix `input_ids[: t + 1]` with the route forced on position t at layer l
(joint routes: at each of their layers in the same forward),
reading log p(token t+1) from the last position. Truncating to the prefix is exact
(causal attention: nothing after t can reach position t) and saves the suffix. Routes of
the same token are batched (identical rows, one override row each); nothing else is
shared, which is what makes this engine obviously right and slow. The fast engine is
checked against it.

Each sequence's standard route (route 0) is also checked against one natural forward of
the whole sequence: a mismatch is a `RuntimeCheckFailed` error, never a result.
"""

from __future__ import annotations

import numpy as np
import torch

from routelens.engine.base import check_fields, token_flags
from routelens.engine.checks import DeviationRecord, PaddingCheck, RuntimeCheckFailed
from routelens.engine.items import ScoreItem, joint_layers, joint_overrides, layer_label, per_layer
from routelens.engine.readout import DEFAULT_MEMORY_BUDGET, target_log_probs
from routelens.models.adapter import MoEAdapter
from routelens.models.routing import override_routes


class ReferenceEngine:
    name = "reference"
    # scoring sequences together gains nothing here; one per group writes (and resumes) one at a time
    max_group = 1

    fallback_reason = None

    def __init__(self, adapter: MoEAdapter, route_batch_size: int = 33, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 deviation: DeviationRecord | None = None):
        self.adapter = adapter
        self.route_batch_size = max(1, int(route_batch_size))
        self.memory_budget = int(memory_budget)
        # |route 0 - natural| seen so far, nats (shared with the engine that hands work here)
        self.deviation = deviation or DeviationRecord(adapter, memory_budget)
        self.padding = PaddingCheck(adapter, memory_budget)   # may unequal lengths share a forward (checked once)

    def natural_routes(self, input_ids: list[torch.Tensor], layers: list[int]) -> None:
        """No natural pass of its own to share: the analysis runs the forward (see `Engine`)."""
        return None

    def check_record(self) -> dict:
        return check_fields(self.deviation, self.fallback_reason)

    def token_flags(self, items: list[ScoreItem]) -> list[np.ndarray]:
        return token_flags(self.deviation, items)

    @torch.no_grad()
    def natural_log_probs(self, input_ids: torch.Tensor, positions) -> np.ndarray:
        """log p(token t + 1) at each position t under natural routing: one forward."""
        positions = torch.as_tensor(np.asarray(positions), dtype=torch.long)
        hidden = self.adapter.base_model(input_ids[None].to(self.adapter.device), use_cache=False).last_hidden_state[0]
        return target_log_probs(self.adapter, hidden[positions.to(hidden.device)], input_ids[positions + 1],
                                self.memory_budget)

    def _check_standard_route(self, layer, item: ScoreItem, scored: np.ndarray) -> None:
        natural = self.natural_log_probs(item.input_ids, item.positions)
        miss = self.deviation.judge(scored[:, 0], natural)
        if miss is not None and not miss.small:
            raise RuntimeCheckFailed(f"standard-route check failed at {layer_label(layer)} "
                                     f"({self.adapter.config.model_type}, reference engine): {miss.clause}")
        if miss is not None:
            self.deviation.announce(miss, f"the reference engine at {layer_label(layer)}")

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, position: int, layer: int | list[int],
              experts: torch.Tensor, weights: torch.Tensor) -> np.ndarray:
        """log p(input_ids[position + 1]) at `position` under each route forced at `layer`.

        input_ids [L] token ids; experts/weights [R, k], or [R, J, k] with `layer` a list of
        J layers (each route forced at all of them at once) -> float64 array [R].
        """
        layers = joint_layers(layer)
        experts, weights = per_layer(experts, layer), per_layer(weights, layer)
        if not 0 <= position < input_ids.shape[0] - 1:
            raise ValueError(f"position {position} has no next token in a sequence of {input_ids.shape[0]}")
        device = self.adapter.device
        prefix = input_ids[: position + 1].to(device)
        target = int(input_ids[position + 1])
        out = []
        for start in range(0, experts.shape[0], self.route_batch_size):
            chunk = slice(start, start + self.route_batch_size)
            n = experts[chunk].shape[0]
            rows = torch.arange(n, device=device) * (position + 1) + position
            with override_routes(self.adapter, joint_overrides(layers, rows, experts[chunk], weights[chunk])):
                logits = self.adapter.model(
                    prefix.expand(n, -1), use_cache=False, logits_to_keep=1
                ).logits[:, -1]
            out.append(torch.log_softmax(logits.float(), dim=-1)[:, target].double().cpu())
        return torch.cat(out).numpy()

    def score_batch(self, layer: int | list[int], items: list[ScoreItem]) -> list[np.ndarray]:
        """Each item's routes, one item after the other: [P, R] per item (route 0 checked)."""
        self.deviation.start_batch()
        self.deviation.calibrate(items)   # the first batch: the tolerance from this model's noise
        results = []
        for item in items:
            scored = self.score_positions(item.input_ids, layer, item.positions, item.experts, item.weights)
            if len(item.positions):
                self._check_standard_route(layer, item, scored)
            results.append(scored)
        return results

    def score_positions(self, input_ids: torch.Tensor, layer: int | list[int], positions, experts: torch.Tensor,
                        weights: torch.Tensor) -> np.ndarray:
        """All routes of several positions: positions [P], experts/weights [P, R, k] (or
        [P, R, J, k] at a list of J layers) -> [P, R]."""
        return np.stack([self.score(input_ids, int(t), layer, experts[i], weights[i])
                         for i, t in enumerate(positions)])
