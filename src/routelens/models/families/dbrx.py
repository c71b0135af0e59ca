"""DBRX (Databricks): every decoder layer (`DbrxBlock`: norm_1, attention, norm_2 inside
`norm_attn_norm`, then the `ffn` MoE block) routes its tokens to k of E GLU experts.

The router (`DbrxRouter`) returns only the [N, E] logits; its block (`DbrxFFN`) then takes
the route in its own method `route_tokens_to_experts`: softmax over all experts (in the
logits' dtype), top-k, the k probabilities divided by their p-norm, p =
`ffn_config.moe_normalize_expert_weights` (1 in DBRX's checkpoints: their sum; None: not
divided). No module returns a route a hook could replace, so the adapter moves that step
into the router, once per model, on each instance (`route_in_router`):

- the router's class becomes `DbrxRoutingRouter` (a `DbrxRouter`: same parameters, same
  names, same output recorder), whose forward is the router's own followed by the block's
  own `DbrxFFN.route_tokens_to_experts` (the same function on the same values: the block's
  `top_k` and `moe_normalize_expert_weights`, copied onto the router), returning the
  standard (logits, weights, experts);
- the block's class becomes `DbrxRoutedFFN`, whose `route_tokens_to_experts` takes that
  route as it is (its forward is DbrxFFN's own).

Every op of the model's forward is then the one it ran before, in the same order, so its
outputs are the same bit for bit (tests/models/test_h_families.py compares with an untouched
copy); routes are read and forced through the router like every standard family's (capture,
`Lens.force`, the fast engine's route algebra and its block check, router-update's
`functional_call` on the router's own parameters).

- Gating rule (a data `Gate`, `gates.DBRX`): the chosen probabilities over their p-norm.
  The model's softmax runs in the logits' dtype: bf16 in a bf16 checkpoint, where the
  gating rule (fp32) matches the router's weights to bf16 rounding (as GPT-OSS's);
  `--upcast-router` makes the router compute in fp32.
- Experts (`DbrxExperts`) keep each projection as one [E x ffn, d] parameter and return
  [N, 1, d] for a flat [N, d] input: `experts(layer)` is a view that returns [N, d], and
  `expert_tensors` the [ffn, d] slices of expert e.
- Attention (`DbrxAttention`) clamps q, k and v to +-clip_qkv before RoPE and calls the
  attention function with the clamped tensors: the fast engine's patch (at the attention
  function) sees what the model attends with. No sliding windows.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.dbrx.modeling_dbrx import DbrxFFN, DbrxRouter

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import DBRX
from routelens.models.spec import Layout


class DbrxRoutingRouter(DbrxRouter):
    """DBRX's router with its block's routing step: (logits [N, E], weights [N, k], experts [N, k])."""

    #: the block's own method, run on the router's copy of the block's `top_k` and `moe_normalize_expert_weights`
    route_tokens_to_experts = DbrxFFN.route_tokens_to_experts

    def forward(self, hidden_states: torch.Tensor):
        logits = super().forward(hidden_states)
        weights, experts = self.route_tokens_to_experts(logits)
        return logits, weights, experts


class DbrxRoutedFFN(DbrxFFN):
    """DBRX's MoE block taking the route its router (`DbrxRoutingRouter`) returns."""

    def route_tokens_to_experts(self, route):
        _, weights, experts = route
        return weights, experts


def route_in_router(block: DbrxFFN) -> None:
    """Make `block`'s router return its route (see the module doc); once per block."""
    if isinstance(block, DbrxRoutedFFN):
        return
    router = block.router
    router.top_k = block.top_k
    router.moe_normalize_expert_weights = block.moe_normalize_expert_weights
    router.num_experts = block.experts.num_experts
    router.__class__ = DbrxRoutingRouter
    block.__class__ = DbrxRoutedFFN


class DbrxExpertsView(nn.Module):
    """`DbrxExperts` as a fused-experts call: (x [N, d], experts [N, k], weights [N, k]) -> [N, d]."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.experts(x, experts, weights).reshape(x.shape)


class DbrxAdapter(MoEAdapter):
    gate = DBRX
    layout = Layout(moe_block="ffn", mlp_input=None, final_norm="norm_f")

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    @property
    def base_model(self) -> nn.Module:
        return self.model.transformer

    def _find_routers(self) -> dict[int, nn.Module]:
        routers = {}
        for index, layer in enumerate(self.decoder_layers):
            route_in_router(layer.ffn)
            routers[index] = layer.ffn.router
        return routers

    @property
    def expert_intermediate_size(self) -> int:
        return int(self.config.ffn_config.ffn_hidden_size)   # DbrxConfig has no top-level intermediate size

    def mlp_residual_input(self, layer: int) -> nn.Module:
        return self.decoder_layers[layer].norm_attn_norm.norm_2   # its input: the residual after attention

    def experts(self, layer: int) -> nn.Module:
        return DbrxExpertsView(self.moe_block(layer).experts)

    def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        glu = self.moe_block(layer).experts.mlp
        prefix = self.module_name(glu)
        return {f"{prefix}.{name}": parameter.data.view(glu.moe_num_experts, glu.ffn_hidden_size, -1)[expert]
                for name, parameter in glu.named_parameters()}
