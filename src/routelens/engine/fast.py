"""The fast counterfactual engine: exact, batched over all tokens of a trajectory.

Changing the route of token t at layer l changes only the MoE output of position t at
layer l. Positions before t never see position t, and positions after t are not scored
for token t. So, for all scored tokens at once (docs/engines.md tells the whole story):

1. One natural forward records, per layer, the standard keys and values (attention
   wrapper in record mode), and at layer l the post-attention residual h_mid, the MoE
   input x, the standard MoE block output and the standard route.
2. At layer l, each needed expert's output E_e(x_t) is computed once per token. A route's
   block output is the standard output minus the standard experts' weighted outputs plus
   the route's (shared experts and gates cancel out: they do not depend on the route).
3. Above l, a batch row per route carries *every* token perturbed by its r-th route; the
   decoder layers run as usual (routers above l route the perturbed states), with
   attention patched so that position t sees standard keys/values before it and its own
   perturbed key/value on the diagonal.
4. The final norm and LM head give log p(token t + 1) at each scored position t.

Joint routes (one route per listed layer, applied together) are served the same way from
the lowest listed layer: above it, each perturbed position's route at the other listed
layers is forced on its own row in the suffix, the diagonal patch having carried the
perturbed position up to them.

Routes are processed in chunks sized to `memory_budget` bytes; results do not depend on
the chunking (tested). Anything this engine cannot serve exactly raises
`FastEngineUnsupported`, and `make_engine` falls back to the cache engine with a
warning that says why. A layer with a recurrent layer (linear attention, Mamba, short
convolution) above it cannot be patched: the cache engine scores it, said once per layer.

Every call checks itself on the checkpoint at hand, at no extra forward: the natural pass
confirms the layer's residual layout as the adapter declares it (decoder output = residual
+ scale x output-norm(MoE block + parallel MLP))
and each layer's attention mask against the adapter's window, and the standard route's
scores (route 0, run through the patched suffix like every other route) must equal the
natural pass's log-probabilities. Any failure switches this engine to the cache engine
for the rest of the run, with a warning giving the reason (`fallback_reason`).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from routelens.engine import attention
from routelens.engine.base import DEFAULT_MAX_FALLBACK_TIME, FallbackBudget, check_fields, token_flags
from routelens.engine.batching import pad_right, per_row_arguments, row_positions
from routelens.engine.cache import CacheEngine
from routelens.engine.checks import (
    DEFAULT_CHECK_ROWS,
    DeviationRecord,
    PaddingCheck,
    RowBudget,
    sample_rows,
    single_threaded,
)
from routelens.engine.items import ScoreItem, joint_layers, joint_overrides, layer_label, per_layer
from routelens.engine.readout import (
    DEFAULT_MEMORY_BUDGET,
    activation_bytes,
    attention_score_bytes,
    final_norm_states,
    record_layer_arguments,
    target_log_probs,
)
from routelens.models.adapter import SOFTMAX_ATTENTION, MoEAdapter
from routelens.models.routing import RouteOverride, RouterOutput, capture_routes, override_routes


class FastEngineUnsupported(Exception):
    """The model or setting cannot be served exactly by the fast engine."""


class FastEngine:
    name = "fast"
    max_group = 64  # sequences scored together in one call (within the analysis' token budget)

    def __init__(self, adapter: MoEAdapter, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 route_chunk: int | None = None, route_batch_size: int = 33,
                 max_fallback_time: float = DEFAULT_MAX_FALLBACK_TIME, check_rows: int = DEFAULT_CHECK_ROWS):
        self.adapter = adapter
        self.memory_budget = int(memory_budget)
        self.route_chunk = route_chunk
        self.check_supported(adapter)
        attention.register()
        # layers the patch cannot serve, and any failed check, go to the cache engine (exact for
        # every layout, checked itself, and falling back to the reference engine in turn)
        self.deviation = DeviationRecord(adapter, memory_budget)   # |route 0 - natural| so far, nats (shared with `cache`)
        self.budget = FallbackBudget(max_fallback_time)   # how long slower engines may run after a failed check
        self.cache = CacheEngine(adapter, memory_budget=memory_budget, route_batch_size=route_batch_size,
                                 deviation=self.deviation, budget=self.budget)
        self.fallback_reason: str | None = None
        self.padding = PaddingCheck(adapter, memory_budget)   # may unequal lengths share a forward (checked once)
        self.attention = attention.AttentionState()   # what its attention functions read during its passes
        self.cache_layers: dict[int, str] = {}     # layer -> why the cache engine scores it
        self._last: tuple[torch.Tensor, dict[int, dict]] | None = None   # natural_routes' pass, for score_batch
        # rows per layer the block-algebra check runs the MoE block on, in all (`_check_block_algebra`)
        self.block_check = RowBudget("block_algebra", check_rows, "the MoE block under alternative routes gave what "
                                                                  "the engine's algebra gave on every row checked")

    @staticmethod
    def check_supported(adapter: MoEAdapter) -> None:
        implementation = adapter.config._attn_implementation
        if implementation not in attention.WRAPPED and implementation not in attention.WRAPPED.values():
            raise FastEngineUnsupported(f"attention implementation {implementation!r} (supported: sdpa, eager)")
        if adapter.norm_order != "pre":
            raise FastEngineUnsupported(f"{adapter.config.model_type} normalises after attention/MLP "
                                        f"({adapter.norm_order}-norm); the fast engine needs the residual stream")
        for index in adapter.moe_layers:
            try:
                adapter.mlp_residual_input(index), adapter.experts(index)
            except AttributeError as error:
                raise FastEngineUnsupported(f"decoder layer {index} has an unexpected layout ({error})") from None
        reason = adapter.fast_engine_unsupported()
        if reason:
            raise FastEngineUnsupported(reason)

    def unpatchable(self, layer: int) -> str | None:
        """Why the diagonal patch cannot carry a perturbation at `layer` to the output (a layer
        above it mixes positions other than by softmax attention), or None."""
        kinds = {self.adapter.layer_kind(i) for i in range(layer + 1, self.adapter.num_layers)} - set(SOFTMAX_ATTENTION)
        if kinds:
            return (f"layers above {layer} include {', '.join(sorted(kinds))} layers, which the fast engine's "
                    "attention patch does not cover")
        return None

    def check_record(self) -> dict:
        return check_fields(self.deviation, self.fallback_reason, self.cache_layers, self.cache.fallback_reason,
                            self.budget)

    def token_flags(self, items: list[ScoreItem]) -> list[np.ndarray]:
        return token_flags(self.deviation, items)

    # ------------------------------------------------------------------ natural pass
    @contextmanager
    def _wrapped_attention(self):
        config = self.adapter.config
        original = config._attn_implementation
        config._attn_implementation = attention.WRAPPED.get(original, original)
        try:
            with attention.active_state(self.attention):
                yield
        finally:
            config._attn_implementation = original
            self.attention.mode = "off"
            self.attention.row_source = None

    def natural_routes(self, input_ids: list[torch.Tensor], layers: list[int]) -> dict[int, RouterOutput] | None:
        """The router outputs of a group's natural forward at `layers` (rows b * T + t of the
        right-padded batch), from the same pass that records what scoring the group at those
        layers needs: the `score_batch` calls that follow on these sequences reuse it, so a
        group costs one natural forward, not one per layer plus one for its routes. None
        where no layer can be patched or the pass fails its checks (`score_batch` meets the
        same failure, says why and falls back)."""
        batch = pad_right(input_ids)
        patchable = [layer for layer in layers if layer not in self.cache_layers and not self.unpatchable(layer)]
        self._last = None
        if self.fallback_reason is not None or not patchable:
            return None
        try:
            with self._wrapped_attention():
                recorded, captured = self._natural_pass(batch, patchable, route_layers=layers)
        except FastEngineUnsupported:
            return None
        self._last = (batch, recorded)
        return captured

    def _recorded_pass(self, input_ids: torch.Tensor, layer: int) -> dict:
        """What scoring at `layer` needs of the natural pass: the one `natural_routes` made of
        these very sequences, or a new pass."""
        if self._last is not None and layer in self._last[1] and self._last[0].shape == input_ids.shape \
                and torch.equal(self._last[0], input_ids):
            recorded = self._last[1][layer]
            self.attention.keys, self.attention.values = dict(recorded["keys"]), dict(recorded["values"])
            self.attention.windows = {i: self.adapter.attention_window(i) for i in range(self.adapter.num_layers)}
            return recorded
        return self._natural_pass(input_ids, [layer])[0][layer]

    def _natural_pass(self, input_ids: torch.Tensor, layers: list[int],
                      route_layers: list[int] = ()) -> tuple[dict[int, dict], dict[int, RouterOutput]]:
        """Record keys/values of every layer and, at each of `layers`, the quantities its
        routes need (and the router outputs at `route_layers` too).

        input_ids [B, T], right-padded: causal attention keeps padding out of real positions."""
        adapter = self.adapter
        recorded: dict[int, dict] = {layer: {} for layer in layers}
        shared: dict = {}

        def keep(store, name):
            return lambda module, args, *out: store.__setitem__(name, (adapter.block_output(out[0]) if out else args[0]).detach())

        hooks = []
        for layer in layers:
            block, store = adapter.moe_block(layer), recorded[layer]
            inner_norm = adapter.block_output_norm(layer)   # the block's output before its own norm, if it has one
            hooks += [
                adapter.mlp_residual_input(layer).register_forward_pre_hook(keep(store, "h_mid")),
                block.register_forward_pre_hook(keep(store, "x")),
                block.register_forward_hook(keep(store, "block_out")) if inner_norm is None else
                inner_norm.register_forward_pre_hook(keep(store, "block_out")),
                adapter.decoder_layers[layer].register_forward_hook(keep(store, "layer_out")),
            ]
            parallel = adapter.parallel_mlp(layer)
            if parallel is not None:
                hooks.append(parallel.register_forward_hook(keep(store, "parallel_out")))
        lowest = min(layers)
        shared["layer_arguments"], argument_hooks = record_layer_arguments(adapter, range(lowest + 1, adapter.num_layers))
        hooks += argument_hooks
        self.attention.keys.clear()
        self.attention.values.clear()
        self.attention._checked_masks.clear()
        self.attention.mask_mismatch = None
        self.attention.windows = {i: adapter.attention_window(i) for i in range(adapter.num_layers)}
        self.attention.mode = "record"
        try:
            with capture_routes(adapter, sorted(set(layers) | set(route_layers))) as captured, \
                    final_norm_states(adapter) as final:
                adapter.model(input_ids.to(adapter.device), use_cache=False, logits_to_keep=1)
            shared["final"] = final["states"]
        finally:
            self.attention.mode = "off"
            for hook in hooks:
                hook.remove()
        missing = [i for i in range(lowest + 1, adapter.num_layers) if i not in self.attention.keys]
        if missing or any("h_mid" not in store for store in recorded.values()):
            raise FastEngineUnsupported(f"attention of layers {missing} was not recorded")
        if self.attention.mask_mismatch:
            raise FastEngineUnsupported(self.attention.mask_mismatch)
        shared.update(keys=dict(self.attention.keys), values=dict(self.attention.values), batch=input_ids.shape[0])
        for layer, store in recorded.items():
            store.update(shared, route=captured[layer])                                   # rows b * T + t
            self._check_layer_layout(layer, store)
        return recorded, captured

    def _check_layer_layout(self, layer: int, recorded: dict) -> None:
        """Flatten layer `layer`'s recorded quantities and confirm its residual layout: the
        decoder layer's output must be the adapter's declared combination of its residual and
        its MoE block (and parallel MLP) output."""
        adapter = self.adapter
        hidden = recorded["h_mid"].shape[-1]
        recorded["x"] = recorded["x"].reshape(-1, hidden)                               # [B*T, d]
        recorded["block_out"] = recorded["block_out"].reshape(-1, hidden)               # [B*T, d]
        # beside the routed block: a parallel MLP's output, scaled with it into the residual
        recorded["beside"] = recorded.pop("parallel_out").reshape(-1, hidden) if "parallel_out" in recorded else 0.0
        recorded["scale"] = adapter.mlp_residual_scale(layer)
        recorded["keep"] = adapter.residual_weight(layer)
        recorded["out_norm"] = adapter.mlp_output_norm(layer)
        recorded["block_norm"] = adapter.block_output_norm(layer)
        recorded["natural_out"] = recorded["keep"] * recorded["h_mid"] + recorded["scale"] * self._mlp_output(
            recorded, self._block_result(recorded, recorded["block_out"]) + recorded["beside"]
        ).reshape(recorded["h_mid"].shape)
        layer_out = adapter.block_output(recorded.pop("layer_out"))
        close = 1e-5 if layer_out.dtype in (torch.float32, torch.float64) else 1e-2   # one add, rounded once
        if not torch.allclose(recorded["natural_out"], layer_out.to(recorded["natural_out"].device), rtol=close, atol=close):
            # a norm, scale or parallel MLP the adapter does not declare
            difference = float((recorded["natural_out"] - layer_out).abs().max())
            raise FastEngineUnsupported(
                f"decoder layer {layer}'s output is not {recorded['keep']:g} x its residual plus {recorded['scale']:g} x its MoE block "
                f"output as the adapter declares it (off by {difference:.3g}): a post-norm or scaled residual layout")

    # ------------------------------------------------------------------ layer l
    def _layer_outputs(self, layer: int, recorded: dict, rows: torch.Tensor, experts: torch.Tensor,
                       weights: torch.Tensor, is_standard: torch.Tensor) -> torch.Tensor:
        """Layer-l output of flat token rows under one route each.

        rows [N] (b * T + t); experts/weights [N, k]; is_standard [N] -> [N, d]. Each needed
        expert output E_e(x_t) is computed once; a route's block output is the standard one
        minus the standard experts' weighted outputs plus the route's."""
        x, block_out = recorded["x"], recorded["block_out"]
        moved = torch.nonzero(~is_standard).flatten()
        delta = (self._route_deltas(layer, x, recorded["route"], rows[moved], experts[moved], weights[moved])
                 .to(block_out.dtype) if len(moved) else None)

        def routed_blocks() -> torch.Tensor:   # each row's block output (route 0: as the model made it)
            routed = block_out[rows]
            return routed if delta is None else routed.index_add_(0, moved, delta)

        if recorded["block_norm"] is None and recorded["out_norm"] is None:
            # a linear layout: the layer's output moves by scale x delta from the natural one (route 0
            # keeps it exactly), so nothing else of [N, d] is recomputed; the same arithmetic whether
            # or not this chunk is one the block check looks at (results must not depend on which)
            out = recorded["natural_out"].reshape(-1, x.shape[-1])[rows]
            if delta is not None:
                out.index_add_(0, moved, delta if recorded["scale"] == 1 else recorded["scale"] * delta)
            if self.block_check.left(layer, len(moved)) > 0:
                self._check_block_algebra(layer, x, rows, experts, weights, routed_blocks(), is_standard)
            return out
        h_mid = recorded["h_mid"].reshape(-1, x.shape[-1])
        routed = self._block_result(recorded, routed_blocks())
        self._check_block_algebra(layer, x, rows, experts, weights, routed, is_standard)
        beside = recorded["beside"][rows] if torch.is_tensor(recorded["beside"]) else recorded["beside"]
        return recorded["keep"] * h_mid[rows] + recorded["scale"] * self._mlp_output(recorded, routed + beside)

    def _route_deltas(self, layer: int, x: torch.Tensor, route: RouterOutput, rows: torch.Tensor,
                      experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j w_j E_{e_j}(x_t) - sum_j w_std_j E_{std_j}(x_t) for each row (token row t, route
        experts/weights [M, k]) -> [M, d] in fp32. Each (token, expert) output any row needs is
        computed once, in one call of the model's own experts (the table no exact method can
        skip); the rows combine it as one sparse [M, U] x [U, d] product (no [M, 2k, d] gather)."""
        tokens, num_experts = x.shape[0], self.adapter.num_experts
        std_experts, std_weights = route.experts[rows], route.weights[rows]
        both = torch.cat([experts, std_experts], dim=1)                                 # [M, 2k]
        # the (token, expert) pairs needed, found on a dense [tokens, E] map (no sort of M * 2k keys)
        needed = torch.zeros(tokens, num_experts, dtype=torch.bool, device=x.device)
        needed[rows[:, None], both] = True
        pair_token, pair_expert = needed.nonzero(as_tuple=True)                          # U pairs
        slot = torch.empty(tokens, num_experts, dtype=torch.long, device=x.device)
        slot[pair_token, pair_expert] = torch.arange(len(pair_token), device=x.device)
        ones = torch.ones(len(pair_token), 1, dtype=x.dtype, device=x.device)
        table = self.adapter.experts(layer)(x[pair_token], pair_expert[:, None], ones)   # [U, d]
        # each row's net coefficient per expert: an expert in both sets at the same weight cancels
        # exactly, so a route equal to the standard one gets a delta of exactly 0 (ties stay ties)
        net = torch.zeros(len(rows), num_experts, dtype=torch.float32, device=x.device)
        net.scatter_add_(1, experts, weights.float())
        net.scatter_add_(1, std_experts, -std_weights.float())
        row, expert = net.nonzero(as_tuple=True)                                          # row-major order
        crow = torch.zeros(len(rows) + 1, dtype=torch.long, device=x.device)
        crow[1:] = torch.bincount(row, minlength=len(rows)).cumsum(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # torch's one-time "CSR support is in beta" notice
            matrix = torch.sparse_csr_tensor(crow, slot[rows[row], expert], net[row, expert],
                                             (len(rows), len(pair_token)), check_invariants=False)
        return self.adapter.routed_scale(layer) * (matrix @ table.float())

    def _check_block_algebra(self, layer: int, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor,
                             weights: torch.Tensor, routed: torch.Tensor, is_standard: torch.Tensor) -> None:
        """The MoE block itself, run on tokens under their alternative routes, must give what
        the algebra gave: an expert scale applied outside the router, a latent projection or a
        gate on the experts' input would break the algebra without touching route 0.

        At a fixed cost: up to `check_rows` (token, route) rows per layer in all
        (`block_check`), taken from the first chunks that score the layer, by `sample_rows`
        (deterministic): the alternative routes with the largest and smallest gate mass and
        the largest single weight, each expert id's heaviest use, then rows evenly spaced over
        the chunk's routes and trajectories; one run of the block, on one CPU thread. A fault
        that shows on every token or for some experts (the layouts above) is caught; one
        confined to a few tokens' hidden states that none of the chosen rows hold, or to
        routes of chunks after the budget is spent, is not."""
        if self.block_check.left(layer, int((~is_standard).sum())) == 0:
            return
        with single_threaded(x.device):
            alternative, moved = self._other_than_standard(rows.cpu().numpy(), experts.cpu().numpy(),
                                                           weights.float().cpu().numpy(), is_standard.cpu().numpy())
            budget = self.block_check.left(layer, len(alternative))
            if budget == 0:
                return
            picked = alternative[sample_rows(experts[alternative].cpu().numpy(), weights[alternative].float().cpu().numpy(),
                                             budget, priority=moved)]
            sample = torch.as_tensor(picked, device=rows.device)
            override = RouteOverride(torch.arange(len(sample)), experts[sample], weights[sample])
            with override_routes(self.adapter, {layer: override}):
                actual = self.adapter.block_output(self.adapter.moe_block(layer)(x[rows[sample]][None]))
            actual, expected = actual.reshape(len(sample), -1).float(), routed[sample].float()
            close = 1e-4 if routed.dtype in (torch.float32, torch.float64) else 5e-2   # bf16: ~6x its rounding
            difference = float((actual - expected).abs().max())
            scale = max(1.0, float(expected.abs().max()))
        if difference > close * scale:
            raise FastEngineUnsupported(
                f"the MoE block of layer {layer} under an alternative route is not its standard output plus the "
                f"experts' weighted difference (off by {difference:.3g}): the block combines its experts in a way the "
                "adapter does not declare")
        self.block_check.spend(layer, len(sample), difference)

    @staticmethod
    def _other_than_standard(rows: np.ndarray, experts: np.ndarray, weights: np.ndarray,
                             is_standard: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The non-standard rows that can show a wrong algebra, and the weight each moves.

        An alternative that drew its token's standard expert set gives the standard output
        under any algebra, so it is left out where the token's route 0 is among `rows`; the
        weight moved is sum |w - w_std| over the union of the two expert sets (the size of
        the difference the algebra adds; 0 where route 0 is not among `rows`)."""
        alternative = np.flatnonzero(~is_standard)
        standard = np.flatnonzero(is_standard)
        if not len(standard):
            return alternative, np.zeros(len(alternative))
        order = standard[np.argsort(rows[standard], kind="stable")]
        match = order[np.clip(np.searchsorted(rows[order], rows[alternative]), 0, len(order) - 1)]
        known = rows[match] == rows[alternative]
        own, std = experts[alternative], experts[match]
        in_std = (own[:, :, None] == std[:, None, :]).any(-1)        # [A, k]: alternative's expert in the standard set
        in_own = (std[:, :, None] == own[:, None, :]).any(-1)        # [A, k]: standard expert in the alternative
        same = known & in_std.all(-1) & in_own.all(-1)
        own_weight, std_weight = weights[alternative], weights[match]
        shared = (own[:, :, None] == std[:, None, :]) * std_weight[:, None, :]   # each own expert's standard weight
        moved = (np.abs(own_weight - shared.sum(-1)).sum(-1) + np.where(in_own, 0.0, std_weight).sum(-1)) * known
        return alternative[~same], moved[~same]

    @staticmethod
    def _block_result(recorded: dict, summed: torch.Tensor) -> torch.Tensor:
        """What the MoE block returns for its experts' combined output `summed`: through the
        block's own output norm where it has one (per token, like the algebra before it)."""
        return summed if recorded["block_norm"] is None else recorded["block_norm"](summed)

    @staticmethod
    def _mlp_output(recorded: dict, mixed: torch.Tensor) -> torch.Tensor:
        """The MLP sub-block's contribution to the residual: its output, through the layer's
        output norm where it has one (a per-token norm, so rows stay independent)."""
        return mixed if recorded["out_norm"] is None else recorded["out_norm"](mixed)

    # ------------------------------------------------------------------ suffix
    def _rows_per_chunk(self, length: int) -> int:
        """Perturbed sequences per chunk: activations of one decoder layer (residual, attention
        projections, top-k expert intermediates) and one query block of attention scores."""
        if self.route_chunk:
            return self.route_chunk
        per_row = activation_bytes(self.adapter, length) + self._score_bytes(length)
        return max(1, self.memory_budget // per_row)

    def _query_block(self, length: int) -> int:
        """Queries per attention block so one block's scores of one row fit a quarter budget."""
        return max(1, min(length, self.memory_budget // 4 // attention_score_bytes(self.adapter, 1, length)))

    def _score_bytes(self, length: int) -> int:
        return attention_score_bytes(self.adapter, self._query_block(length), length)

    def _suffix(self, layer: int, recorded: dict, states: torch.Tensor, sources: torch.Tensor,
                overrides: dict[int, RouteOverride] | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run decoder layers above `layer` on perturbed states [rows, T, d] whose standard
        keys/values are those of recorded sequence `sources[row]` (with the routes of joint
        `overrides` forced at their layers); returns the final hidden. With `positions`
        [rows, P], the states [rows, P, d] are those of these positions only."""
        self.attention.mode, self.attention.row_source = "patch", sources
        self.attention.query_positions = positions
        self.attention.query_block = self._query_block(recorded["natural_out"].shape[1])
        self.attention.patched_calls = 0
        try:
            with override_routes(self.adapter, overrides) if overrides else nullcontext():
                states = self._decoder_layers_above(layer, recorded, states, sources, positions)
        finally:
            self.attention.mode, self.attention.query_positions = "off", None
        expected = self.adapter.num_layers - layer - 1
        if self.attention.patched_calls != expected:
            raise RuntimeError(f"patched attention ran {self.attention.patched_calls} times, expected {expected}: "
                               "the suffix did not go through the fast engine's attention")
        return self.adapter.final_norm(states)

    def _decoder_layers_above(self, layer: int, recorded: dict, states: torch.Tensor, sources: torch.Tensor,
                              positions: torch.Tensor | None = None) -> torch.Tensor:
        for index in range(layer + 1, self.adapter.num_layers):
            kwargs = per_row_arguments(recorded["layer_arguments"][index][2], sources, recorded["batch"],
                                       self.adapter.positional_arguments, positions)
            kwargs.update(attention_mask=None, past_key_values=None, use_cache=False)
            output = self.adapter.decoder_layers[index](states, **kwargs)
            states = output[0] if isinstance(output, tuple) else output
        return states

    @torch.no_grad()
    def score_batch(self, layer: int | list[int], items: list[ScoreItem]) -> list[np.ndarray]:
        """Score every route of every item (trajectories of any lengths) at `layer` (or joint
        routes at a list of layers); after a failed check, and for the rest of the run, through
        the cache engine (as are layers the patch cannot serve)."""
        first = joint_layers(layer)[0]
        if first not in self.cache_layers and (reason := self.unpatchable(first)):
            self.cache_layers[first] = reason
            warnings.warn(f"{reason}: scoring layer {first} with the cache engine", stacklevel=2)
        self.deviation.start_batch()
        self.deviation.calibrate(items)   # the first batch: the tolerance from this model's noise
        if self.fallback_reason is None and first not in self.cache_layers:
            try:
                return self._score_batch(layer, items)
            except FastEngineUnsupported as reason:
                self.fallback_reason = f"{layer_label(layer)} ({self.adapter.config.model_type}): {reason}"
                warnings.warn(f"fast engine check failed at {self.fallback_reason}; "
                              "scoring with the cache engine from here on", stacklevel=2)
        if self.fallback_reason is None:   # a layer the patch cannot serve: the cache engine by design
            return self.cache.score_batch(layer, items)
        return self.budget.run(self.cache, self.fallback_reason, layer, items)

    def _check_standard_route(self, items: list[ScoreItem], results: list[np.ndarray],
                              recorded: dict, input_ids: torch.Tensor) -> None:
        """Route 0 went through the patched suffix like every route: it must reproduce the
        natural pass's log-probabilities (recorded at the final norm, no extra forward)."""
        final = recorded["final"]
        batch = torch.cat([torch.full((len(item.positions),), b) for b, item in enumerate(items)])
        positions = torch.cat([torch.as_tensor(np.asarray(item.positions)) for item in items])
        targets = input_ids[batch, positions + 1].to(final.device)
        natural = target_log_probs(self.adapter, final[batch.to(final.device), positions.to(final.device)],
                                   targets, self.memory_budget)
        miss = self.deviation.judge(np.concatenate([result[:, 0] for result in results]), natural)
        if miss is not None and not miss.small:
            raise FastEngineUnsupported(miss.clause)
        if miss is not None:
            self.deviation.announce(miss, f"the fast engine at {layer_label(self._layer)}")

    def _score_batch(self, layer: int | list[int], items: list[ScoreItem]) -> list[np.ndarray]:
        self._layer = layer
        layers = joint_layers(layer)
        first = layers[0]
        device = self.adapter.device_of(self.adapter.decoder_layers[first])
        num_routes = items[0].experts.shape[1]
        if any(item.experts.shape[1] != num_routes for item in items):
            raise ValueError("all items of a batch need the same number of routes")
        routes = [(per_layer(item.experts, layer), per_layer(item.weights, layer)) for item in items]   # [P, R, J, k]
        input_ids = pad_right([item.input_ids for item in items])
        length = input_ids.shape[1]
        # every (item, route) pair is one perturbed sequence; its scored tokens are the item's positions
        pairs = [(b, r) for r in range(num_routes) for b in range(len(items))]
        results = [np.zeros((len(item.positions), num_routes)) for item in items]
        with self._wrapped_attention():
            recorded = self._recorded_pass(input_ids, first)
            chunk = self._rows_per_chunk(length)
            for start in range(0, len(pairs), chunk):
                block = pairs[start: start + chunk]
                sources = torch.tensor([b for b, _ in block], device=device)
                row_of, slot_of, pos_of, flat_rows, experts, weights = [], [], [], [], [], []
                for row, (b, r) in enumerate(block):
                    positions = torch.as_tensor(np.asarray(items[b].positions), device=device)
                    row_of.append(torch.full_like(positions, row))
                    slot_of.append(torch.arange(len(positions), device=device))
                    pos_of.append(positions)
                    flat_rows.append(b * length + positions)
                    experts.append(torch.as_tensor(routes[b][0][:, r], device=device))     # [P, J, k]
                    weights.append(torch.as_tensor(routes[b][1][:, r], device=device))
                row_of, slot_of, pos_of, flat_rows = torch.cat(row_of), torch.cat(slot_of), torch.cat(pos_of), torch.cat(flat_rows)
                experts, weights = torch.cat(experts), torch.cat(weights)
                is_standard = torch.tensor([r == 0 for _, r in block], device=device)[row_of]
                outputs = self._layer_outputs(first, recorded, flat_rows, experts[:, 0], weights[:, 0], is_standard)
                slots = max(len(items[b].positions) for b, _ in block)
                if first == self.adapter.num_layers - 1:
                    # the last layer: nothing above it mixes positions, so each row's output goes
                    # straight to the final norm (no [rows, T, d] states to build and read back)
                    final = self.adapter.final_norm(outputs)
                    logprobs = target_log_probs(self.adapter, final, input_ids[sources[row_of].cpu(), pos_of.cpu() + 1],
                                                self.memory_budget)
                    self._store(results, block, items, logprobs)
                    continue
                if slots < self.GATHER_BELOW * length:
                    # the suffix carries each row's scored positions only: a position's perturbed states
                    # depend on no other perturbed position, so the unscored ones (and padding) are dropped
                    index = row_positions([items[b].positions for b, _ in block], slots, device)    # [rows, slots]
                    states = recorded["natural_out"][sources].gather(
                        1, index[..., None].expand(-1, -1, outputs.shape[-1]))                      # [rows, slots, d]
                    column_of = slot_of
                else:
                    index, states, column_of = None, recorded["natural_out"][sources].clone(), pos_of   # [rows, T, d]
                states[row_of, column_of] = outputs
                width = states.shape[1]
                final = self._suffix(first, recorded, states, sources,
                                     self._upper_overrides(layers, row_of * width + column_of, experts, weights, is_standard),
                                     positions=index)
                final = final[row_of.to(final.device), column_of.to(final.device)]            # [N, d]
                targets = input_ids[sources[row_of].cpu(), pos_of.cpu() + 1]
                logprobs = target_log_probs(self.adapter, final, targets, self.memory_budget)
                self._store(results, block, items, logprobs)
        self._check_standard_route(items, results, recorded, input_ids)   # route 0 is in every batch
        return results

    @staticmethod
    def _store(results: list[np.ndarray], block: list[tuple[int, int]], items: list[ScoreItem],
               logprobs: np.ndarray) -> None:
        """Put a chunk's log-probs (its pairs' scored positions in turn) into each item's [P, R]."""
        offset = 0
        for b, r in block:
            count = len(items[b].positions)
            results[b][:, r] = logprobs[offset: offset + count]
            offset += count

    GATHER_BELOW = 0.75   # carry only the scored positions when they are fewer than this share of the padded length

    @staticmethod
    def _upper_overrides(layers: tuple[int, ...], token_rows: torch.Tensor, experts: torch.Tensor,
                         weights: torch.Tensor, is_standard: torch.Tensor) -> dict[int, RouteOverride]:
        """Joint routes: each perturbed position's route at the listed layers above the first,
        forced in the suffix on its own row (rows of flat tokens row * T + t); the diagonal
        patch already carries the perturbed position up to them. Route 0 routes naturally."""
        keep = ~is_standard
        return joint_overrides(layers[1:], token_rows[keep], experts[keep, 1:], weights[keep, 1:])

    def score_positions(self, input_ids: torch.Tensor, layer: int | list[int], positions, experts: torch.Tensor,
                        weights: torch.Tensor) -> np.ndarray:
        """All routes of several positions of one sequence: experts/weights [P, R, k] (or
        [P, R, J, k] at a list of J layers) -> [P, R]."""
        return self.score_batch(layer, [ScoreItem(input_ids, positions, experts, weights)])[0]
