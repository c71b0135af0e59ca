"""The fast counterfactual engine: exact, batched over all tokens of a trajectory.

Changing the route of token t at layer l changes only the MoE output of position t at
layer l. Positions before t never see position t, and positions after t are not scored
for token t. So, for all scored tokens at once (see ../shared/DESIGN.md):

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

Routes are processed in chunks sized to `memory_budget` bytes; results do not depend on
the chunking (tested). Anything this engine cannot serve exactly raises
`FastEngineUnsupported`, and `make_engine` falls back to the reference engine with a
warning that says why.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from routelens.engine import attention
from routelens.models.adapter import MoEAdapter
from routelens.models.routing import capture_routes

DEFAULT_MEMORY_BUDGET = 2 * 2**30


class FastEngineUnsupported(Exception):
    """The model or setting cannot be served exactly by the fast engine."""


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output   # GPT-OSS returns (out, scores)


class FastEngine:
    name = "fast"

    def __init__(self, adapter: MoEAdapter, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 route_chunk: int | None = None, **_):
        self.adapter = adapter
        self.memory_budget = int(memory_budget)
        self.route_chunk = route_chunk
        self.check_supported(adapter)
        attention.register()

    @staticmethod
    def check_supported(adapter: MoEAdapter) -> None:
        implementation = adapter.config._attn_implementation
        if implementation not in attention.WRAPPED and implementation not in attention.WRAPPED.values():
            raise FastEngineUnsupported(f"attention implementation {implementation!r} (supported: sdpa, eager)")
        for index in adapter.moe_layers:
            layer = adapter.decoder_layers[index]
            if not hasattr(layer, "post_attention_layernorm") or not hasattr(layer.mlp, "experts"):
                raise FastEngineUnsupported(f"decoder layer {index} has an unexpected layout")
        if getattr(adapter.config, "layer_types", None) and any(
                t not in ("full_attention", "sliding_attention") for t in adapter.config.layer_types):
            raise FastEngineUnsupported(f"layer types {sorted(set(adapter.config.layer_types))}")

    # ------------------------------------------------------------------ natural pass
    @contextmanager
    def _wrapped_attention(self):
        config = self.adapter.config
        original = config._attn_implementation
        config._attn_implementation = attention.WRAPPED.get(original, original)
        try:
            yield
        finally:
            config._attn_implementation = original
            attention.STATE.mode = "off"

    def _natural_pass(self, input_ids: torch.Tensor, layer: int) -> dict:
        """Record keys/values of every layer and the layer-l quantities the routes need."""
        model, decoder = self.adapter.model, self.adapter.decoder_layers[layer]
        recorded: dict = {"layer_kwargs": {}}
        hooks = [
            decoder.post_attention_layernorm.register_forward_pre_hook(
                lambda m, args: recorded.__setitem__("h_mid", args[0].detach())),
            decoder.mlp.register_forward_pre_hook(lambda m, args: recorded.__setitem__("x", args[0].detach())),
            decoder.mlp.register_forward_hook(
                lambda m, args, out: recorded.__setitem__("block_out", _block_output(out).detach())),
        ]
        for index in range(layer + 1, self.adapter.num_layers):
            hooks.append(self.adapter.decoder_layers[index].register_forward_pre_hook(
                lambda m, args, kwargs, index=index: recorded["layer_kwargs"].__setitem__(index, kwargs),
                with_kwargs=True))
        attention.STATE.keys.clear()
        attention.STATE.values.clear()
        attention.STATE.mode = "record"
        try:
            with capture_routes(self.adapter, [layer]) as captured:
                logits = model(input_ids[None].to(self.adapter.device), use_cache=False).logits[0]
        finally:
            attention.STATE.mode = "off"
            for hook in hooks:
                hook.remove()
        missing = [i for i in range(layer + 1, self.adapter.num_layers) if i not in attention.STATE.keys]
        if missing or "h_mid" not in recorded:
            raise FastEngineUnsupported(f"attention of layers {missing} was not recorded")
        recorded["route"] = captured[layer]
        recorded["logits"] = logits
        return recorded

    # ------------------------------------------------------------------ layer l
    def _expert_outputs(self, layer: int, x: torch.Tensor, positions: np.ndarray,
                        experts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """E_e(x_t) for every (t, e) the routes use, computed once.

        x [T, d]; experts [P, R, k] -> (table [N, d], index [P, R, k] into the table)."""
        module = self.adapter.decoder_layers[layer].mlp.experts
        num_experts = self.adapter.num_experts
        keys = torch.as_tensor(positions, device=experts.device)[:, None, None] * num_experts + experts
        unique, index = torch.unique(keys, return_inverse=True)
        tokens, ids = unique // num_experts, unique % num_experts
        weights = torch.ones(len(unique), 1, dtype=x.dtype, device=x.device)
        table = module(x[tokens], ids[:, None], weights)                                  # [N, d]
        return table, index

    def _layer_outputs(self, layer: int, recorded: dict, positions: np.ndarray, experts: torch.Tensor,
                       weights: torch.Tensor) -> torch.Tensor:
        """Layer-l output of every scored token under every route: [R, P, d]."""
        device = self.adapter.device
        h_mid = recorded["h_mid"][0]                                                      # [T, d]
        x = recorded["x"].reshape(-1, h_mid.shape[-1])
        block_out = recorded["block_out"].reshape(-1, h_mid.shape[-1])
        route = recorded["route"]
        index_t = torch.as_tensor(positions, device=device)
        std_experts, std_weights = route.experts[index_t], route.weights[index_t]          # [P, k]
        all_experts = torch.cat([experts.to(device), std_experts[:, None]], dim=1)        # [P, R+1, k]
        table, index = self._expert_outputs(layer, x, positions, all_experts)
        mixed = (table[index] * torch.cat([weights.to(device, table.dtype), std_weights[:, None].to(table.dtype)],
                                          dim=1)[..., None]).sum(-2)                      # [P, R+1, d]
        routed = block_out[index_t][:, None] - mixed[:, -1:] + mixed[:, :-1]              # [P, R, d]
        routed[:, 0] = block_out[index_t]   # route 0 is the standard route: its output as the model made it
        return (h_mid[index_t][:, None] + routed).transpose(0, 1)                          # [R, P, d]

    # ------------------------------------------------------------------ suffix
    def _route_chunk(self, length: int) -> int:
        if self.route_chunk:
            return self.route_chunk
        config = self.adapter.config
        heads = config.num_attention_heads
        hidden = config.hidden_size
        intermediate = max(getattr(config, "moe_intermediate_size", 0) or 0, config.intermediate_size or 0)
        k = self.adapter.top_k
        per_route = 4 * (3 * heads * length * length + length * (12 * hidden + 3 * k * intermediate)
                         + length * config.vocab_size // 4)
        return max(1, self.memory_budget // max(per_route, 1))

    def _suffix(self, layer: int, recorded: dict, states: torch.Tensor) -> torch.Tensor:
        """Run decoder layers above `layer` on perturbed states [r, T, d]; returns final hidden."""
        attention.STATE.mode = "patch"
        try:
            for index in range(layer + 1, self.adapter.num_layers):
                kwargs = dict(recorded["layer_kwargs"][index])
                kwargs.update(attention_mask=None, past_key_values=None, use_cache=False)
                output = self.adapter.decoder_layers[index](states, **kwargs)
                states = output[0] if isinstance(output, tuple) else output
        finally:
            attention.STATE.mode = "off"
        return self.adapter.model.model.norm(states)

    @torch.no_grad()
    def score_positions(self, input_ids: torch.Tensor, layer: int, positions, experts: torch.Tensor,
                        weights: torch.Tensor) -> np.ndarray:
        """All routes of several positions: positions [P], experts/weights [P, R, k] -> [P, R]."""
        positions = np.asarray(positions)
        device = self.adapter.device
        with self._wrapped_attention():
            recorded = self._natural_pass(input_ids, layer)
            layer_out = self._layer_outputs(layer, recorded, positions, torch.as_tensor(experts, device=device),
                                            torch.as_tensor(weights, device=device))   # [R, P, d]
            natural_out = recorded["h_mid"] + recorded["block_out"].reshape(recorded["h_mid"].shape)  # [1, T, d]
            targets = input_ids.to(device)[torch.as_tensor(positions + 1, device=device)]
            index_t = torch.as_tensor(positions, device=device)
            num_routes, length = layer_out.shape[0], input_ids.shape[0]
            chunk = self._route_chunk(length)
            out = []
            for start in range(0, num_routes, chunk):
                block = layer_out[start: start + chunk]
                states = natural_out.expand(block.shape[0], -1, -1).clone()
                states[:, index_t] = block
                final = self._suffix(layer, recorded, states)[:, index_t]                  # [r, P, d]
                logits = self.adapter.model.lm_head(final).float()
                out.append(torch.log_softmax(logits, -1).gather(-1, targets[None, :, None].expand(
                    final.shape[0], -1, 1))[..., 0].double().cpu())
        return torch.cat(out).T.numpy()                                                     # [P, R]
