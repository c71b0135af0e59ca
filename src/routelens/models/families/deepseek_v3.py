"""DeepSeek-V3 and the routers that copy it (GLM-4.5 MoE, EXAONE MoE): sigmoid affinities;
experts are *chosen* by affinity + e_score_correction_bias within the top topk_group groups
(a group's score is the sum of its top-2 biased affinities), but *weighted* by the unbiased
affinity, divided by (sum + 1e-20) if norm_topk_prob, times routed_scaling_factor.

An equal-compute alternative is a route the router could have produced, so the selection
scores are zero outside the groups the router admitted for that token: alternatives are
drawn from the admitted groups only."""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter


def admitted_groups(scores: torch.Tensor, num_groups: int, top_groups: int, group_score: str = "top2") -> torch.Tensor:
    """[N, E] choice scores -> bool [N, E]: experts in the `top_groups` groups the router keeps
    (group score: sum of the group's top-2 scores, or its maximum)."""
    if num_groups <= 1 or top_groups >= num_groups:
        return torch.ones_like(scores, dtype=torch.bool)
    grouped = scores.view(scores.shape[0], num_groups, -1)
    per_group = grouped.topk(2, dim=-1)[0].sum(-1) if group_score == "top2" else grouped.amax(-1)
    kept = torch.zeros_like(per_group, dtype=torch.bool).scatter_(1, per_group.topk(top_groups, dim=-1)[1], True)
    return kept[:, :, None].expand_as(grouped).reshape(scores.shape)


class DeepseekV3Adapter(MoEAdapter):
    model_types = ("deepseek_v3",)
    window_source = "none"  # the model builds a plain causal mask whatever config.sliding_window says

    def selection_scores(self, logits: torch.Tensor, layer: int, admitted_only: bool = True) -> torch.Tensor:
        # Each layer has its own correction bias. Clamped at 0 so the scores stay a
        # non-negative ranking mass (a negative bias can push a tiny affinity below 0).
        bias = self.routers[layer].e_score_correction_bias.float().to(logits.device)
        choice = torch.sigmoid(logits.float()) + bias
        if not admitted_only:
            return choice.clamp_min(0.0)
        return choice.clamp_min(0.0) * admitted_groups(choice, self.config.n_group, self.config.topk_group)

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(logits.float()).gather(-1, experts)
        if self.config.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.config.routed_scaling_factor
