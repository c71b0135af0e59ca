"""DeepSeek-V2: fp32 softmax; greedy or group-limited greedy selection; the weights are
the unnormalised softmax probabilities times routed_scaling_factor (norm_topk_prob is
ignored by the model). Shared experts are added outside the route; the first
first_k_dense_replace layers are dense. Under group_limited_greedy the router keeps the
topk_group groups with the largest maximum probability; alternatives are drawn inside them."""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter
from routelens.models.families.deepseek_v3 import admitted_groups


class DeepseekV2Adapter(MoEAdapter):
    model_types = ("deepseek_v2",)
    window_source = "none"  # the model builds a plain causal mask whatever config.sliding_window says

    def selection_scores(self, logits: torch.Tensor, layer: int, admitted_only: bool = True) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        if not admitted_only or self.config.topk_method != "group_limited_greedy":
            return probs
        return probs * admitted_groups(probs, self.config.n_group, self.config.topk_group, group_score="max")

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=-1)
        return probs.gather(-1, experts) * self.config.routed_scaling_factor
