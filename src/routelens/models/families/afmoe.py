"""AFMoE (Arcee Trinity): sigmoid affinities; experts chosen by affinity + the block's
expert_bias (passed into the router); weights = chosen affinities / (sum + 1e-20) x
route_scale; shared experts added; local/global attention layers."""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter


class AfmoeAdapter(MoEAdapter):
    model_types = ("afmoe",)
    mlp_residual_input_attribute = "pre_mlp_layernorm"

    def mlp_output_norm(self, layer: int):   # sandwich norms: the MLP output is normalised too
        return self.decoder_layers[layer].post_mlp_layernorm

    def router_extra_args(self, layer: int) -> tuple:
        return (self.moe_block(layer).expert_bias,)

    def selection_scores(self, logits: torch.Tensor, layer: int, admitted_only: bool = True) -> torch.Tensor:
        bias = self.moe_block(layer).expert_bias.float().to(logits.device)
        return (torch.sigmoid(logits.float()) + bias).clamp_min(0.0)

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(logits.float()).gather(-1, experts)
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * self.config.route_scale
