"""Llama 4 (its text model, `Llama4ForCausalLM`; a multimodal `llama4` checkpoint loads as it,
model type `llama4_text`, image tokens absent).

The router (`Llama4Router`) returns two [N, E] tensors, not the standard three: the *scores*
(sigmoid of the k largest logits, exactly 0 for every other expert) and the raw *logits*.
Its block runs every expert on every token, each on the token's input multiplied by that
expert's score (0 for the experts not chosen, whose output is then exactly 0), and adds a
shared expert. So:

- `route_of`: experts = top-k of the logits (the router's own `torch.topk` on the same
  tensor, so the same set and order), weights = the scores at those experts;
  `router_output`: the scores rebuilt from a route, 0 outside it (a duplicated expert's
  weights add, so a weight-0 duplicate pads a route exactly). The logits are kept.
- Gating rule: sigmoid of each chosen logit, never renormalised (a data `Gate`); choosing by
  the sigmoid is choosing by the logit.
- The weight scales an expert's *input*, not its output: the block adds E_e(s_e x), not
  s_e E_e(x). But an expert's score s_e = sigmoid(logit_e) is the same in every route that
  holds it, so a route's block output is still a sum of fixed per-expert terms: the fast
  engine's per-expert table (`experts(layer)`, a view) holds E_e(s_e x) / s_e, which its
  weighted sum with the gating rule's weights (w_e = s_e, the only weights a counterfactual
  route carries) turns into the block's own terms. A route forced with other weights
  (`Lens.force`, the isolation study's weight 1.0) runs through the model itself, never this
  algebra; the fast engine's block-algebra check compares the two on every pass.
- Chunked-attention layers (`attention_chunk_size`) are not a sliding window the fast engine's
  patch knows: it hands the MoE layers below one to the cache engine, and a sequence longer
  than the chunk fails its mask check (the cache engine takes over, saying so).
- MoE layers on a stride (`interleave_moe_layer_step` / `moe_layers`) with dense MLPs between:
  only the MoE layers have a router, so the dense ones are refused as layers by name.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import LLAMA4
from routelens.models.spec import Layout


class Llama4ExpertsView(nn.Module):
    """Llama 4's experts as the fast engine reads them (see the module doc): expert e on token x
    contributes E_e(s_e x) / s_e per unit weight, s_e = sigmoid(logit_e) as the router computes it."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        block = self.block
        logits = F.linear(x, block.router.weight)
        scores = torch.sigmoid(logits.gather(-1, experts).float()).to(x.dtype)                  # [N, k]
        out = torch.zeros_like(x)
        for expert in experts.unique().tolist():
            rows, slots = torch.where(experts == expert)
            score = scores[rows, slots, None]
            gate, up = ((x[rows] * score) @ block.experts.gate_up_proj[expert]).chunk(2, dim=-1)
            y = (up * block.experts.act_fn(gate)) @ block.experts.down_proj[expert]
            per_weight = torch.where(score > 0, y / score, torch.zeros_like(y))   # a score of 0: E(0) = 0
            out.index_add_(0, rows, (per_weight * weights[rows, slots, None]).to(out.dtype))
        return out


class Llama4Adapter(MoEAdapter):
    gate = LLAMA4
    layout = Layout(moe_block="feed_forward", windows="none")   # chunked attention is not a sliding window

    def __init__(self, model):
        self._views: dict[int, Llama4ExpertsView] = {}
        super().__init__(model)

    def route_of(self, output):
        scores, logits = output
        experts = torch.topk(logits, self.top_k, dim=1).indices   # as Llama4Router chose them
        return logits, scores.gather(1, experts), experts

    def router_output(self, output, route):
        scores, _ = output
        logits, weights, experts = route
        # in the weights' dtype: the router's own, or the one --upcast-router casts them back to for the block
        rebuilt = torch.zeros(scores.shape, dtype=weights.dtype, device=scores.device)
        return rebuilt.scatter_add_(1, experts.to(scores.device), weights.to(scores.device)), logits

    def experts(self, layer: int) -> nn.Module:
        """A view of layer `layer`'s experts for the fast engine: (x [N, d], experts [N, k],
        weights [N, k]) -> sum_j weights_j E_{e_j}(s_{e_j} x) / s_{e_j}, s = the router's score."""
        if layer not in self._views:
            self._views[layer] = Llama4ExpertsView(self.moe_block(layer))
        return self._views[layer]

    def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        module = self.moe_block(layer).experts
        return {f"{self.module_name(module)}.{name}": parameter.data[expert]
                for name, parameter in module.named_parameters()}

    def describe(self) -> dict:
        described = super().describe()
        described["counterfactual"] = (
            f"routes are k={self.top_k} of the {self.num_experts} experts, forced exactly: each chosen expert runs on the "
            "token's input scaled by its weight (the router's sigmoid score); dense MLP layers between the MoE layers")
        return described

