"""DeepSeek-V3: sigmoid affinities; experts are *chosen* by affinity + e_score_correction_bias
within the top topk_group groups, but *weighted* by the unbiased affinity, divided by
(sum + 1e-20) if norm_topk_prob, times routed_scaling_factor."""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter


class DeepseekV3Adapter(MoEAdapter):
    model_types = ("deepseek_v3",)
    window_source = "none"  # the model builds a plain causal mask whatever config.sliding_window says
    gating_rule = (
        "sigmoid affinities; chosen by affinity + correction bias within top groups; "
        "weights = affinity / (sum + 1e-20) if norm_topk_prob, x routed_scaling_factor"
    )

    def selection_scores(self, logits: torch.Tensor, layer: int) -> torch.Tensor:
        # Each layer has its own correction bias. Clamped at 0 so the scores stay a
        # non-negative ranking mass (a negative bias can push a tiny affinity below 0).
        bias = self.routers[layer].e_score_correction_bias.float().to(logits.device)
        return (torch.sigmoid(logits.float()) + bias).clamp_min(0.0)

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(logits.float()).gather(-1, experts)
        if self.config.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.config.routed_scaling_factor
