"""Beam: DeepSeek-V3's router (sigmoid, correction bias for choosing only, top-2-sum groups,
renormalised), but routed_scaling_factor is applied by the block to the experts' sum, after
the router; sandwich norms around the MLP and a depth-scaled residual add (the n-th add of
the network weighs the residual sqrt((n-1)/n) and the new part 1/sqrt(n)); final logits
soft-capped (tanh) at final_logit_softcapping; sliding layers."""

from __future__ import annotations

import math

import torch

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import BEAM
from routelens.models.spec import Layout


class BeamAdapter(MoEAdapter):
    gate = BEAM
    layout = Layout(mlp_input="pre_feedforward_layernorm", mlp_output_norm="post_feedforward_layernorm")
    # full-attention layers scale queries by position: attention_scaling [B, 1, T, 1]
    positional_arguments = {"position_embeddings": (0, 1), "position_ids": (0, 1), "attention_scaling": (0, 2)}

    def _mlp_add(self, layer: int) -> int:
        return self.decoder_layers[layer].mlp_residual_add_idx

    def residual_weight(self, layer: int) -> float:
        return math.sqrt((self._mlp_add(layer) - 1) / self._mlp_add(layer))

    def mlp_residual_scale(self, layer: int) -> float:
        return 1.0 / math.sqrt(self._mlp_add(layer))

    def routed_scale(self, layer: int) -> float:
        return float(self.config.routed_scaling_factor)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        logits = self.lm_head(hidden)
        return logits if not cap else torch.tanh(logits / cap) * cap
