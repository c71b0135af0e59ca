"""LFM2-MoE (Liquid): short-convolution and attention layers; sigmoid affinities, experts
chosen by affinity + the block's expert_bias (passed into the router), weights = chosen
affinities / (sum + 1e-6) if norm_topk_prob, x routed_scaling_factor."""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter


class Lfm2MoeAdapter(MoEAdapter):
    model_types = ("lfm2_moe",)
    moe_block_attribute = "feed_forward"
    mlp_residual_input_attribute = "ffn_norm"
    final_norm_attribute = "embedding_norm"

    def _bias(self, layer: int):
        return getattr(self.moe_block(layer), "expert_bias", None)

    def router_extra_args(self, layer: int) -> tuple:
        return (self._bias(layer),)

    def selection_scores(self, logits: torch.Tensor, layer: int, admitted_only: bool = True) -> torch.Tensor:
        scores = torch.sigmoid(logits.float())
        bias = self._bias(layer)
        return scores if bias is None else (scores + bias.float().to(logits.device)).clamp_min(0.0)

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(logits.float()).gather(-1, experts)
        if self.config.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-6)
        return weights * self.config.routed_scaling_factor
