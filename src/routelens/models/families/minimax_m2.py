"""MiniMax-M2: sigmoid affinities; experts chosen by affinity + a correction bias that the
MoE block (not the router) holds and passes in; weights = the chosen affinities over their
sum."""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter


class MiniMaxM2Adapter(MoEAdapter):
    model_types = ("minimax_m2",)
    window_source = "none"   # plain causal mask

    def selection_scores(self, logits: torch.Tensor, layer: int, admitted_only: bool = True) -> torch.Tensor:
        bias = self.moe_block(layer).e_score_correction_bias.float().to(logits.device)
        return (torch.sigmoid(logits.float()) + bias).clamp_min(0.0)

    def router_extra_args(self, layer: int) -> tuple:
        return (self.moe_block(layer).e_score_correction_bias,)

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(logits.float()).gather(-1, experts)
        return weights / weights.sum(dim=-1, keepdim=True)
