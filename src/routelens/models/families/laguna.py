"""Laguna (poolside): sigmoid affinities of the (optionally tanh soft-capped) router logits;
experts chosen by affinity + the router's e_score_correction_bias, weighted by the unbiased
affinities over their sum; the block multiplies the experts' sum by
moe_routed_scaling_factor (after the router) and adds a shared expert. Attention has a
softplus output gate, per-layer head counts and per-layer-type rotary embeddings."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import LAGUNA


class LagunaAdapter(MoEAdapter):
    gate = LAGUNA

    def routed_scale(self, layer: int) -> float:
        return float(self.config.moe_routed_scaling_factor)
