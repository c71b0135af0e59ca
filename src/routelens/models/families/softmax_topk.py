"""The softmax top-k gate shared by OLMoE, Qwen3-MoE, Qwen2-MoE and Mixtral.

Rule: p = softmax(logits) in fp32 over all E experts; the route's weights are p of its
experts, divided by their sum when the top-k weights are renormalised.
"""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter


class SoftmaxTopKAdapter(MoEAdapter):

    @property
    def normalize(self) -> bool:
        return bool(getattr(self.config, "norm_topk_prob", False))

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(logits.float(), dim=-1).gather(-1, experts)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights
