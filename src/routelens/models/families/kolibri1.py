"""Kolibri-1 (Aleph Alpha): experts are *chosen* by top-k of the raw router logit + the
router's e_score_correction_bias (the bias shifts the logit, not the sigmoid), and
*weighted* by the sigmoid of their unbiased logits, divided by their sum if
norm_topk_prob; a shared expert added inside the block; sandwich norms (the MoE output
passes post_mlp_layernorm before the residual add); q/k norm; rotary on sliding layers
only when a sliding window is set.

The selection score is sigmoid(logit + bias): the router's own ranking (sigmoid is
increasing), non-negative, so the standard route maximises its sum."""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import SIGMOID_TOPK
from routelens.models.spec import Layout


class Kolibri1Adapter(MoEAdapter):
    gate = SIGMOID_TOPK   # the weights; the choice (bias on the logit) is `selection_scores` below
    layout = Layout(mlp_output_norm="post_mlp_layernorm")

    def logit_bias(self, layer: int) -> torch.Tensor:
        """The correction bias the router of `layer` adds to its logits for choosing (detached)."""
        return self.routers[layer].e_score_correction_bias.detach()

    def selection_scores(self, logits: torch.Tensor, layer: int, admitted_only: bool = True) -> torch.Tensor:
        bias = self.logit_bias(layer).float().reshape(-1).to(logits.device)
        return torch.sigmoid(logits.float() + bias)
