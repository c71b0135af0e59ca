"""ERNIE 4.5 MoE: fp32 softmax; experts chosen by softmax + the router's statistics bias
(moe_statics.e_score_correction_bias); weights = the chosen probabilities over
max(their sum, moe_norm_min)."""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter


class Ernie45MoeAdapter(MoEAdapter):
    model_types = ("ernie4_5_moe",)
    window_source = "none"   # plain causal mask

    def selection_scores(self, logits: torch.Tensor, layer: int, admitted_only: bool = True) -> torch.Tensor:
        bias = self.routers[layer].moe_statics.e_score_correction_bias.float().reshape(-1).to(logits.device)
        return (torch.softmax(logits.float(), dim=-1) + bias).clamp_min(0.0)

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(logits.float(), dim=-1).gather(-1, experts)
        return weights / weights.sum(dim=-1, keepdim=True).clamp_min(self.config.moe_norm_min)
