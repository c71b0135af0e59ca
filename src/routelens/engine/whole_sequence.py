"""Scoring routes forced on every token of a sequence at one layer (the isolation study).

Counterfactual routing perturbs one token at a time; forcing a route on *every* token
changes the whole sequence above the layer, so the diagonal trick of the fast engine does
not apply and the saving is the prefix:

1. One natural forward of a group of sequences (right-padded into one batch) records the
   hidden state entering each requested layer, the keyword arguments of every decoder
   layer from the lowest requested one up (position embeddings, attention masks), the
   natural routes, and the natural log-probabilities of each sequence's scored tokens.
2. For layer l, each (sequence, condition) pair (one route per token: `experts/weights
   [T, k]`) is one batch row; decoder layers l..L-1 run on the recorded layer-l input, with
   the route override at layer l on every real token of the row (the model's own experts
   compute the forced route; padding routes naturally and is never read). Layers below l
   are never recomputed, and the conditions of all sequences of a chunk share one pass.

Conditions are batched in chunks sized to a memory budget; results do not depend on the
chunking or the grouping, and equal a plain forward of the model under the same override
(all tested).

Checked on every sequence: the gating rule reproduces the router's weights in the natural
pass, and one extra row per sequence and layer forces the natural route on every token
through the same scorer; it must reproduce the natural log-probabilities
(`RuntimeCheckFailed`). The first padded group also scores its shortest sequence alone:
padding that reaches a real position is `PaddingNotInert` (group equal lengths only).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from routelens.engine.batching import pad_right, row_positions, rows_of, sequence_routes, shared_rows
from routelens.engine.checks import (
    DeviationRecord,
    PaddingCheck,
    RuntimeCheckFailed,
    check_gating_rule,
    standard_route_mismatch,
)
from routelens.engine.items import joint_layers, joint_overrides, layer_label, per_layer
from routelens.engine.readout import (
    DEFAULT_MEMORY_BUDGET,
    activation_bytes,
    attention_score_bytes,
    final_norm_states,
    target_log_probs,
)
from routelens.models.adapter import MoEAdapter
from routelens.models.routing import RouterOutput, capture_routes, override_routes


@dataclass
class NaturalBatch:
    """The natural forward of a group of sequences, right-padded into one batch:
    input_ids [B, T]; layer_inputs: layer -> [B, T, d]; layer_kwargs: decoder layer -> its
    forward's keyword arguments (a tensor all rows share kept as one row)."""

    input_ids: torch.Tensor
    layer_inputs: dict[int, torch.Tensor]
    layer_kwargs: dict[int, dict]
    # layer -> what layer l's own MoE block needs to start there (`MidLayer`); absent where the
    # layer's residual layout did not check out, and the whole decoder layer l runs instead
    mid_layers: dict[int, MidLayer] = field(default_factory=dict)


@dataclass
class MidLayer:
    """Decoder layer l cut at its MoE block: its output is keep * h_mid + scale *
    out_norm(block(x) + beside), with h_mid (the residual after attention), x (the block's
    input) and beside (a parallel MLP's output, or 0) route-independent and recorded, so a
    forced route at l needs only the block, not layer l's attention again."""

    h_mid: torch.Tensor
    x: torch.Tensor
    beside: torch.Tensor | float
    keep: float
    scale: float
    out_norm: object | None

    def output(self, adapter: MoEAdapter, layer: int, sources: torch.Tensor) -> torch.Tensor:
        """Layer l's output for rows `sources` of the batch under the routes in force."""
        block = adapter.block_output(adapter.moe_block(layer)(self.x.index_select(0, sources)))
        beside = self.beside.index_select(0, sources) if torch.is_tensor(self.beside) else self.beside
        return self.combine(self.h_mid.index_select(0, sources), block, beside)

    def combine(self, h_mid: torch.Tensor, block: torch.Tensor, beside: torch.Tensor | float) -> torch.Tensor:
        """The layer's output from its pieces [rows, T, d] (the block's may come flat, [rows * T, d])."""
        mixed = block.reshape(*h_mid.shape[:-1], block.shape[-1]) + beside
        mixed = mixed if self.out_norm is None else self.out_norm(mixed)
        return self.keep * h_mid + self.scale * mixed


@contextmanager
def skipping_zero_weights(adapter: MoEAdapter, layers):
    """The experts of `layers` leave out the (token, slot) pairs whose gate weight is 0: a
    forced single expert is given to the router as k slots of it at weights 1, 0, ..., 0,
    and w * E(x) is exactly 0 for w = 0 (E(x) finite), so computing those k - 1 slots is
    wasted. Pairs are summed per token as the experts module sums them; a module of another
    signature (not experts(x [N, d], indices [N, k], weights [N, k])) runs as it is."""
    patched = []
    for layer in layers:
        try:
            module = adapter.experts(layer)
        except AttributeError:
            continue
        original = module.forward

        def forward(hidden, indices=None, weights=None, *args, _original=original, **kwargs):
            if (args or kwargs or not torch.is_tensor(indices) or not torch.is_tensor(weights) or hidden.dim() != 2
                    or indices.dim() != 2 or weights.shape != indices.shape or indices.shape[0] != hidden.shape[0]):
                return _original(hidden, indices, weights, *args, **kwargs)
            kept = weights != 0
            if bool(kept.all()):
                return _original(hidden, indices, weights)
            token, slot = kept.nonzero(as_tuple=True)
            pairs = _original(hidden[token], indices[token, slot][:, None], weights[token, slot][:, None])
            return torch.zeros(hidden.shape[0], pairs.shape[-1], dtype=pairs.dtype, device=pairs.device).index_add_(
                0, token, pairs)

        patched.append((module, module.__dict__.get("forward")))
        module.forward = forward
    try:
        yield
    finally:
        for module, before in patched:
            if before is None:
                del module.forward   # back to the class's own
            else:
                module.forward = before


@dataclass
class NaturalPass:
    """One sequence of a natural batch: input_ids [T] (its own tokens); positions [P]
    (position t is scored for token t + 1); routes: layer -> RouterOutput of its tokens;
    logprobs [P]; its batch and row there."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    routes: dict[int, RouterOutput]
    logprobs: np.ndarray
    batch: NaturalBatch
    row: int


class WholeSequenceScorer:
    def __init__(self, adapter: MoEAdapter, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 rows_per_chunk: int | None = None, check: bool = True):
        self.adapter = adapter
        self.memory_budget = int(memory_budget)
        self.fixed_rows = rows_per_chunk
        self.check = check
        self.deviation = DeviationRecord(adapter, memory_budget)   # |natural route forced - natural| so far, nats
        self.padding = PaddingCheck(adapter, memory_budget)   # checked once per scorer

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
        pieces: dict[int, dict] = {layer: {} for layer in layers}
        adapter = self.adapter

        def keep(store, name):
            return lambda module, args, *out: store.__setitem__(name, (adapter.block_output(out[0]) if out else args[0]).detach())

        for layer in layers:
            try:
                store, parallel = pieces[layer], adapter.parallel_mlp(layer)
                handles += [adapter.mlp_residual_input(layer).register_forward_pre_hook(keep(store, "h_mid")),
                            adapter.moe_block(layer).register_forward_pre_hook(keep(store, "x")),
                            adapter.moe_block(layer).register_forward_hook(keep(store, "block")),
                            adapter.decoder_layers[layer].register_forward_hook(keep(store, "layer_out"))]
                if parallel is not None:
                    handles.append(parallel.register_forward_hook(keep(store, "beside")))
            except AttributeError:   # a layout the adapter cannot cut: the whole layer runs
                pieces.pop(layer)
        try:
            yield inputs, kwargs_of, pieces
        finally:
            for handle in handles:
                handle.remove()

    def _mid_layer(self, layer: int, store: dict) -> MidLayer | None:
        """Layer l cut at its MoE block, where the recorded pieces recombine into the layer's
        recorded output as the adapter declares its residual layout (checked here, on every
        natural batch); None otherwise (the whole decoder layer l then runs)."""
        adapter = self.adapter
        if not {"h_mid", "x", "block", "layer_out"} <= set(store):
            return None
        mid = MidLayer(store["h_mid"], store["x"], store.get("beside", 0.0), adapter.residual_weight(layer),
                       adapter.mlp_residual_scale(layer), adapter.mlp_output_norm(layer))
        rows = mid.h_mid.shape[:-1]   # [B, T]: every piece is indexed by batch row
        if mid.x.shape[:-1] != rows or (torch.is_tensor(mid.beside) and mid.beside.shape[:-1] != rows):
            return None
        recombined = mid.combine(mid.h_mid, store["block"], mid.beside)
        close = 1e-5 if recombined.dtype in (torch.float32, torch.float64) else 1e-2   # one add, rounded once
        layer_out = store["layer_out"]
        if recombined.shape != layer_out.shape or not torch.allclose(recombined, layer_out, rtol=close, atol=close):
            return None
        return mid

    def natural(self, input_ids: torch.Tensor, layers: list[int], positions) -> NaturalPass:
        """The natural forward of one sequence input_ids [T], recording what `score` needs for
        each of `layers`, and log p(token t + 1) at each of `positions`."""
        return self.natural_batch([input_ids], layers, [positions])[0]

    @torch.no_grad()
    def natural_batch(self, sequences: list, layers: list[int], positions: list) -> list[NaturalPass]:
        """`natural` for a group of sequences in one right-padded forward: one `NaturalPass`
        per sequence, which `score_batch` scores together."""
        device = self.adapter.device
        sequences = [torch.as_tensor(ids, dtype=torch.long).cpu() for ids in sequences]
        positions = [torch.as_tensor(np.asarray(p), dtype=torch.long) for p in positions]
        input_ids = pad_right(sequences)
        size, length = input_ids.shape
        with self._recording(min(layers), layers) as (inputs, kwargs_of, pieces), \
                capture_routes(self.adapter, layers) as routes, final_norm_states(self.adapter) as final:
            last = self.adapter.model(input_ids.to(device), use_cache=False, logits_to_keep=1).logits[:, -1]
        mid_layers = {layer: mid for layer, store in pieces.items() if (mid := self._mid_layer(layer, store))}
        for layer in layers:
            route = routes[layer]
            check_gating_rule(self.adapter, layer, route.logits, route.experts, route.weights)
        states = final["states"]                                                        # [B, T, d]
        self._check_readout(states[:, -1], input_ids[:, -1], last)
        positional = self.adapter.positional_arguments
        batch = NaturalBatch(input_ids, inputs, {index: shared_rows(kwargs, size, positional)
                                                 for index, kwargs in kwargs_of.items()}, mid_layers)
        passes = []
        for row, (ids, at) in enumerate(zip(sequences, positions)):
            logprobs = target_log_probs(self.adapter, states[row, at.to(states.device)], ids[at + 1], self.memory_budget)
            passes.append(NaturalPass(ids, at.to(device), sequence_routes(routes, row, length, len(ids)), logprobs,
                                      batch, row))
        if self.padding.due([len(ids) for ids in sequences]):
            self.padding.check(states, sequences, positions)
        return passes

    def _check_readout(self, states: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor) -> None:
        """Log-probs are read off final-norm states through the adapter's head (memory-safe,
        in slices); at the last position it must give what the model's own logits give."""
        head = target_log_probs(self.adapter, states, targets, self.memory_budget)
        model = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None].to(logits.device))[:, 0]
        mismatch = standard_route_mismatch(head, model.double().cpu().numpy(), self.deviation.dtype,
                                           what="the adapter's read-out (final norm, LM head) differs from the model's logits")
        if mismatch:
            raise RuntimeCheckFailed(f"read-out check failed ({self.adapter.config.model_type}): {mismatch}")

    def rows_per_chunk(self, length: int) -> int:
        """Conditions per pass: one decoder layer's activations and its full attention scores per row."""
        if self.fixed_rows:
            return self.fixed_rows
        per_row = activation_bytes(self.adapter, length) + attention_score_bytes(self.adapter, length, length)
        return max(1, self.memory_budget // per_row)

    def score(self, natural: NaturalPass, layer: int | list[int], experts: torch.Tensor,
              weights: torch.Tensor) -> np.ndarray:
        """log p(token t + 1) at the natural pass's positions under each condition, a route
        per token forced at `layer` on every token: experts/weights [C, T, k] -> [C, P]; or
        at a list of J layers at once: [C, T, J, k] (the natural pass must record them all)."""
        return self.score_batch([natural], layer, [experts], [weights])[0]

    @torch.no_grad()
    def score_batch(self, passes: list[NaturalPass], layer: int | list[int], experts: list[torch.Tensor],
                    weights: list[torch.Tensor]) -> list[np.ndarray]:
        """`score` for sequences of one natural batch together: experts/weights [C_b, T_b, k]
        (or [C_b, T_b, J, k]) per sequence -> [C_b, P_b] per sequence, the rows of all
        sequences sharing passes."""
        layers = joint_layers(layer)
        if any(natural.batch is not passes[0].batch for natural in passes):
            raise ValueError("score_batch needs sequences of one natural batch")
        conditions = []
        for natural, chosen, weighted in zip(passes, experts, weights, strict=True):
            chosen, weighted = per_layer(chosen, layer), per_layer(weighted, layer)      # [C, T, J, k]
            length = natural.input_ids.shape[0]
            if chosen.shape[:2] != (chosen.shape[0], length) or chosen.shape != weighted.shape:
                raise ValueError(f"conditions need experts and weights [C, {length}, k] per layer, got "
                                 f"{tuple(chosen.shape)} and {tuple(weighted.shape)}")
            chosen, weighted = chosen.cpu(), weighted.cpu()
            if self.check:   # row 0: the natural route, which must reproduce the natural forward
                route_e = torch.stack([natural.routes[at].experts.cpu() for at in layers], dim=1)   # [T, J, k]
                route_w = torch.stack([natural.routes[at].weights.cpu() for at in layers], dim=1)
                chosen = torch.cat([route_e[None].to(chosen.dtype), chosen])
                weighted = torch.cat([route_w[None].to(weighted.dtype), weighted])
            conditions.append((chosen, weighted))
        pairs = [(b, c) for b, (chosen, _) in enumerate(conditions) for c in range(chosen.shape[0])]
        scored = [np.zeros((chosen.shape[0], len(natural.positions))) for natural, (chosen, _) in zip(passes, conditions)]
        chunk = self.rows_per_chunk(passes[0].batch.input_ids.shape[1])
        for start in range(0, len(pairs), chunk):
            block = pairs[start: start + chunk]
            for (b, c), values in zip(block, self._score_chunk(passes, conditions, layers, block)):
                scored[b][c] = values
        first = 0
        if self.check:
            first = 1
            self.deviation.start_batch()
            self.deviation.calibrate(passes)   # the first group: the tolerance from this model's noise
            for natural, values in zip(passes, scored):
                self._check_natural_route(layer, natural, values[0])
        return [values[first:] for values in scored]

    def _check_natural_route(self, layer, natural: NaturalPass, scored: np.ndarray) -> None:
        miss = self.deviation.judge(scored, natural.logprobs)
        if miss is not None and not miss.small:
            raise RuntimeCheckFailed(f"natural-route check failed at {layer_label(layer)} "
                                     f"({self.adapter.config.model_type}, isolation scorer): {miss.clause}")
        if miss is not None:
            self.deviation.announce(miss, f"the isolation scorer at {layer_label(layer)}")

    def _score_chunk(self, passes: list[NaturalPass], conditions: list[tuple[torch.Tensor, torch.Tensor]],
                     layers: tuple[int, ...], block: list[tuple[int, int]]) -> list[np.ndarray]:
        """Rows (sequence b, condition c) through layers l..L-1: log-probs [P_b] per row."""
        layer = layers[0]
        device = self.adapter.device_of(self.adapter.decoder_layers[layer])
        batch = passes[0].batch
        size, length = batch.input_ids.shape
        sources = torch.tensor([passes[b].row for b, _ in block], device=device)
        states = batch.layer_inputs[layer].index_select(0, sources.to(batch.layer_inputs[layer].device))
        # each row's own tokens take the condition's route; padding routes naturally, unread
        own = [torch.arange(passes[b].input_ids.shape[0]) for b, _ in block]
        token_rows = torch.cat([row * length + tokens for row, tokens in enumerate(own)])
        chosen = torch.cat([conditions[b][0][c] for b, c in block])                   # [N, J, k]
        weighted = torch.cat([conditions[b][1][c] for b, c in block])
        overrides = joint_overrides(layers, token_rows.to(device), chosen.to(device), weighted.to(device))
        positional = self.adapter.positional_arguments
        mid = batch.mid_layers.get(layer)
        with override_routes(self.adapter, overrides), skipping_zero_weights(self.adapter, layers):
            if mid is not None:   # layer l's attention is the same for every row: start at its MoE block
                states = mid.output(self.adapter, layer, sources.to(mid.x.device))
            for index in range(layer + (mid is not None), self.adapter.num_layers):
                kwargs = rows_of(batch.layer_kwargs[index], sources, size, positional)
                kwargs.update(past_key_values=None, use_cache=False)
                output = self.adapter.decoder_layers[index](states, **kwargs)
                states = output[0] if isinstance(output, tuple) else output
        at = [passes[b].positions for b, _ in block]
        slots = max(len(p) for p in at)
        index = row_positions([p.cpu() for p in at], slots, states.device)              # [rows, slots]
        final = self.adapter.final_norm(states.gather(1, index[..., None].expand(-1, -1, states.shape[-1])))
        targets = batch.input_ids[sources.cpu()].gather(1, index.cpu() + 1)          # [rows, slots]
        logprobs = target_log_probs(self.adapter, final.reshape(-1, final.shape[-1]), targets.reshape(-1),
                                    self.memory_budget).reshape(len(block), slots)
        return [logprobs[row, : len(p)] for row, p in enumerate(at)]
