"""JetMoE: a mixture of attention heads (MoA) and a mixture of MLP experts (MoE) in every
decoder layer, each with a `JetMoeTopKGating` router of its own.

routelens audits and forces the MLP router (`layer.mlp.router`); the attention router routes
as the model does (attention experts are not routes of the MoE layer), above a perturbed
layer too, where it routes the perturbed states normally, like every router above it.

The gating router returns five outputs for its block's sorted dispatch: the flat (token,
slot) positions sorted by expert [N k], their token rows [N k], their weights [N k], the
number of slots per expert (a list of E ints) and the logits [N, E]. So:

- `route_of`: experts and weights [N, k] unsorted from the dispatch (slot j of token n is flat
  position n k + j); `router_output`: the dispatch of a route, sorted by expert (a stable
  sort: a token's slots hold distinct experts, so each output row sums them in the order the
  model does); the logits kept.
- Gating rule: top-k on the logits, softmax over the k (a data `Gate`).
- Its experts are two `JetMoeParallelExperts` (input and output linear, GLU between) plus a
  bias added after the sum: `experts(layer)` is a view that computes
  sum_j w_j E_{e_j}(x) with the block's own weights, which is what the fast engine needs
  (the bias does not depend on the route and cancels out of its algebra).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import TOPK_THEN_SOFTMAX


class JetMoeExperts(nn.Module):
    """A JetMoE MLP block's experts as a fused-experts call: (x [N, d], experts [N, k],
    weights [N, k]) -> [N, d], the weighted sum of the chosen experts' outputs (no block bias)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        block = self.block
        out = torch.zeros_like(x)
        for expert in experts.unique().tolist():
            rows, slots = torch.where(experts == expert)
            hidden = F.linear(x[rows], block.input_linear.weight[expert])
            gate, up = hidden.chunk(2, dim=-1)
            y = F.linear(block.activation(gate) * up, block.output_linear.weight[expert])
            out.index_add_(0, rows, (y * weights[rows, slots, None]).to(out.dtype))
        return out


class JetMoeAdapter(MoEAdapter):
    gate = TOPK_THEN_SOFTMAX

    def __init__(self, model):
        self._experts: dict[int, JetMoeExperts] = {}
        super().__init__(model)

    def _find_routers(self) -> dict[int, nn.Module]:
        # two JetMoeTopKGating per layer (attention and MLP): the MoE layer's is the MLP's
        return {index: layer.mlp.router for index, layer in enumerate(self.decoder_layers)}

    def route_of(self, output):
        sorted_positions, _, sorted_weights, expert_size, logits = output
        tokens, k = logits.shape[0], self.top_k
        sizes = torch.as_tensor(expert_size, device=sorted_positions.device)
        experts = torch.empty(tokens * k, dtype=torch.long, device=sorted_positions.device)
        experts[sorted_positions] = torch.repeat_interleave(torch.arange(len(expert_size), device=sizes.device), sizes)
        weights = torch.empty(tokens * k, dtype=sorted_weights.dtype, device=sorted_weights.device)
        weights[sorted_positions] = sorted_weights
        return logits, weights.view(tokens, k), experts.view(tokens, k)

    def router_output(self, output, route):
        logits, weights, experts = route
        flat = experts.reshape(-1)
        _, sorted_positions = flat.sort(stable=True, dim=0)
        expert_size = torch.bincount(flat, minlength=self.num_experts).tolist()
        return (sorted_positions, sorted_positions.div(experts.shape[1], rounding_mode="trunc"),
                weights.reshape(-1)[sorted_positions], expert_size, logits)

    def experts(self, layer: int) -> nn.Module:
        if layer not in self._experts:
            self._experts[layer] = JetMoeExperts(self.moe_block(layer))
        return self._experts[layer]

    def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        block = self.moe_block(layer)
        return {f"{self.module_name(module)}.weight": module.weight.data[expert]
                for module in (block.input_linear, block.output_linear)}

    def describe(self) -> dict:
        described = super().describe()
        described["counterfactual"] = (
            f"routes are k={self.top_k} of the {self.num_experts} MLP experts, forced exactly; the attention experts "
            "(a router of their own per layer) route as the model does, also above a forced route")
        return described

