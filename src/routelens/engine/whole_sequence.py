"""Scoring routes forced on every token of a sequence at one layer (the isolation study).

Counterfactual routing perturbs one token at a time; forcing a route on *every* token
changes the whole sequence above the layer, so the diagonal trick of the fast engine does
not apply and the saving is the prefix:

1. One natural forward per sequence records the hidden state entering each requested
   layer, the keyword arguments of every decoder layer from the lowest requested one up
   (position embeddings, attention masks), the natural routes, and the natural
   log-probabilities of the scored tokens.
2. For layer l, each condition (one route per token: `experts/weights [T, k]`) is one
   batch row; decoder layers l..L-1 run on the recorded layer-l input, with the route
   override at layer l on every row (the model's own experts compute the forced route).
   Layers below l are never recomputed, and all conditions of a chunk share one pass.

Conditions are batched in chunks sized to a memory budget; results do not depend on the
chunking, and equal a plain forward of the model under the same override (both tested).

Checked on every item: the gating rule reproduces the router's weights in the natural
pass, and one extra row per layer forces the natural route on every token through the
same scorer; it must reproduce the natural log-probabilities (`RuntimeCheckFailed`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from routelens.engine.checks import DeviationRecord, RuntimeCheckFailed, check_gating_rule
from routelens.engine.items import joint_layers, joint_overrides, layer_label, per_layer
from routelens.engine.readout import DEFAULT_MEMORY_BUDGET, activation_bytes, attention_score_bytes, target_log_probs
from routelens.models.adapter import MoEAdapter
from routelens.models.routing import RouterOutput, capture_routes, override_routes


@dataclass
class NaturalPass:
    """One sequence under natural routing. input_ids [T]; positions [P] (position t is
    scored for token t + 1); layer_inputs: layer -> [1, T, d]; layer_kwargs: decoder layer
    -> its forward's keyword arguments; routes: layer -> RouterOutput; logprobs [P]."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    layer_inputs: dict[int, torch.Tensor]
    layer_kwargs: dict[int, dict]
    routes: dict[int, RouterOutput]
    logprobs: np.ndarray


class WholeSequenceScorer:
    def __init__(self, adapter: MoEAdapter, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 rows_per_chunk: int | None = None, check: bool = True):
        self.adapter = adapter
        self.memory_budget = int(memory_budget)
        self.fixed_rows = rows_per_chunk
        self.check = check
        self.deviation = DeviationRecord(adapter)   # |natural route forced - natural| seen so far, nats

    @contextmanager
    def _recording(self, first_layer: int, layers: list[int]):
        inputs: dict[int, torch.Tensor] = {}
        kwargs_of: dict[int, dict] = {}

        def record(module, args, kwargs, index):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index in layers:
                inputs[index] = hidden.detach()
            kwargs_of[index] = {k: v for k, v in kwargs.items() if k != "hidden_states"}

        handles = [self.adapter.decoder_layers[i].register_forward_pre_hook(
            lambda m, a, k, i=i: record(m, a, k, i), with_kwargs=True)
            for i in range(first_layer, self.adapter.num_layers)]
        try:
            yield inputs, kwargs_of
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def natural(self, input_ids: torch.Tensor, layers: list[int], positions) -> NaturalPass:
        """The natural forward of one sequence input_ids [T], recording what `score` needs for
        each of `layers`, and log p(token t + 1) at each of `positions`."""
        device = self.adapter.device
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        positions = torch.as_tensor(np.asarray(positions), dtype=torch.long, device=device)
        with self._recording(min(layers), layers) as (inputs, kwargs_of), \
                capture_routes(self.adapter, layers) as routes:
            logits = self.adapter.model(input_ids[None].to(device), use_cache=False,
                                        logits_to_keep=positions).logits[0]
        logprobs = torch.log_softmax(logits.float(), -1).gather(
            -1, input_ids.to(logits.device)[positions.to(logits.device) + 1, None])[:, 0]
        for layer in layers:
            route = routes[layer]
            check_gating_rule(self.adapter, layer, route.logits, route.experts, route.weights)
        return NaturalPass(input_ids, positions, inputs, kwargs_of, dict(routes), logprobs.double().cpu().numpy())

    def rows_per_chunk(self, length: int) -> int:
        """Conditions per pass: one decoder layer's activations and its full attention scores per row."""
        if self.fixed_rows:
            return self.fixed_rows
        per_row = activation_bytes(self.adapter, length) + attention_score_bytes(self.adapter, length, length)
        return max(1, self.memory_budget // per_row)

    @torch.no_grad()
    def score(self, natural: NaturalPass, layer: int | list[int], experts: torch.Tensor,
              weights: torch.Tensor) -> np.ndarray:
        """log p(token t + 1) at the natural pass's positions under each condition, a route
        per token forced at `layer` on every token: experts/weights [C, T, k] -> [C, P]; or
        at a list of J layers at once: [C, T, J, k] (the natural pass must record them all)."""
        layers = joint_layers(layer)
        experts, weights = per_layer(experts, layer), per_layer(weights, layer)      # [C, T, J, k]
        length = natural.input_ids.shape[0]
        if experts.shape[:2] != (experts.shape[0], length) or experts.shape != weights.shape:
            raise ValueError(f"conditions need experts and weights [C, {length}, k] per layer, got "
                             f"{tuple(experts.shape)} and {tuple(weights.shape)}")
        first = 0
        if self.check:   # row 0: the natural route, which must reproduce the natural forward
            route_e = torch.stack([natural.routes[at].experts.cpu() for at in layers], dim=1)   # [T, J, k]
            route_w = torch.stack([natural.routes[at].weights.cpu() for at in layers], dim=1)
            experts = torch.cat([route_e[None].to(experts.dtype), experts.cpu()])
            weights = torch.cat([route_w[None].to(weights.dtype), weights.cpu()])
            first = 1
        out = []
        chunk = self.rows_per_chunk(length)
        for start in range(0, experts.shape[0], chunk):
            out.append(self._score_chunk(natural, layers, experts[start: start + chunk], weights[start: start + chunk]))
        scored = np.concatenate(out) if out else np.zeros((0, len(natural.positions)))
        if self.check:
            self._check_natural_route(layer, natural, scored[0])
        return scored[first:]

    def _check_natural_route(self, layer, natural: NaturalPass, scored: np.ndarray) -> None:
        mismatch = self.deviation.check(scored, natural.logprobs)
        if mismatch:
            raise RuntimeCheckFailed(f"natural-route check failed at {layer_label(layer)} "
                                     f"({self.adapter.config.model_type}, isolation scorer): {mismatch}")

    def _score_chunk(self, natural: NaturalPass, layers: tuple[int, ...], experts: torch.Tensor,
                     weights: torch.Tensor) -> np.ndarray:
        layer = layers[0]
        device = self.adapter.device_of(self.adapter.decoder_layers[layer])
        rows, length, _, k = experts.shape
        states = natural.layer_inputs[layer].expand(rows, -1, -1).contiguous()
        overrides = joint_overrides(layers, torch.arange(rows * length, device=device),
                                    experts.reshape(rows * length, -1, k).to(device),
                                    weights.reshape(rows * length, -1, k).to(device))
        with override_routes(self.adapter, overrides):
            for index in range(layer, self.adapter.num_layers):
                kwargs = dict(natural.layer_kwargs[index])
                kwargs.update(past_key_values=None, use_cache=False)
                output = self.adapter.decoder_layers[index](states, **kwargs)
                states = output[0] if isinstance(output, tuple) else output
        final = self.adapter.final_norm(states[:, natural.positions.to(states.device)])     # [C, P, d]
        targets = natural.input_ids[natural.positions.cpu() + 1].expand(rows, -1)
        logprobs = target_log_probs(self.adapter, final.reshape(-1, final.shape[-1]), targets.reshape(-1),
                                    self.memory_budget)
        return logprobs.reshape(rows, -1)
