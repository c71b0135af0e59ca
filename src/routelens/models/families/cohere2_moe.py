"""Cohere Command A MoE (Cohere2-MoE): a parallel block: attention and the MoE block both read
the same input-normed state and both outputs join the residual in one add,

    out = h + attention(norm(h)) + moe(norm(h)).

The fast engine's layer algebra (out = residual + MoE block + a parallel module beside it)
holds with the residual read at the input norm (`mlp_input="input_layernorm"`) and the
attention as the module beside the block (`parallel_mlp="self_attn"`): a route changes only
the MoE term. The router takes top-k of the raw logits, then weights them by a softmax over
the k (expert_selection_fn = softmax, the default) or by their sigmoids, divided by their
sum if norm_topk_prob (expert_selection_fn = sigmoid); with shared experts the block adds
their output to the experts' sum and halves it (shared_expert_combination_strategy =
average, the default) or not (sum); logits x logit_scale."""

from __future__ import annotations

import torch

from routelens.models import gating
from routelens.models.adapter import MoEAdapter
from routelens.models.gates import SIGMOID_TOPK, TOPK_THEN_SOFTMAX
from routelens.models.spec import Layout


class Cohere2MoeAdapter(MoEAdapter):
    gate = TOPK_THEN_SOFTMAX   # expert_selection_fn = sigmoid: SIGMOID_TOPK on the same logits (below)
    layout = Layout(mlp_input="input_layernorm", parallel_mlp="self_attn")

    @property
    def _sigmoid(self) -> bool:
        return getattr(self.config, "expert_selection_fn", "softmax") == "sigmoid"

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        if self._sigmoid:
            return gating.weights_for(SIGMOID_TOPK, logits, experts, self.config)
        return super().weights_for(logits, experts)

    def selection_scores(self, logits: torch.Tensor, layer: int, admitted_only: bool = True) -> torch.Tensor:
        if self._sigmoid:   # top-k on the logits is top-k on their sigmoids
            return gating.selection_scores(SIGMOID_TOPK, logits, None, self.config, admitted_only)
        return super().selection_scores(logits, layer, admitted_only)

    def routed_scale(self, layer: int) -> float:
        averaged = self.config.num_shared_experts > 0 and self.config.shared_expert_combination_strategy == "average"
        return 0.5 if averaged else 1.0

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) * self.config.logit_scale
