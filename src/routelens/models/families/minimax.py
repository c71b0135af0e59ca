"""MiniMax-01 (MiniMax-Text-01): softmax top-k renormalised over the k; the residual of the
MLP sub-block is the normed state the MoE block reads, weighted by mlp_alpha_factor, the
block by mlp_beta_factor; lightning (linear) attention layers between softmax-attention
layers, whose state MiniMax keeps in a cache of its own (`MiniMaxCache.linear_cache`),
which the cache engine copies here."""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import SOFTMAX_TOPK_RENORMALISED
from routelens.models.spec import Layout


class MiniMaxAdapter(MoEAdapter):
    gate = SOFTMAX_TOPK_RENORMALISED
    layout = Layout(mlp_input=None)   # the residual of the MLP sub-block is the normed state the block reads
    # measured: on the tiny model, in float64, decoding token by token with MiniMaxCache differs
    # from the full forward by up to 0.1 nats, while the full forward is causal to 1e-15
    cache_engine_defect = ("transformers 5.23's MiniMax lightning attention decodes with its cache to other numbers "
                           "than its full forward (up to 0.1 nats in float64 on a tiny model)")

    # out = mlp_alpha_factor x (the normed state the MoE block reads) + mlp_beta_factor x MoE block
    def residual_weight(self, layer: int) -> float:
        return float(self.config.mlp_alpha_factor)

    def mlp_residual_scale(self, layer: int) -> float:
        return float(self.config.mlp_beta_factor)

    def new_cache(self):
        from transformers.models.minimax.modeling_minimax import MiniMaxCache
        return MiniMaxCache()

    def copy_cache(self, cache, first_layer: int, rows: int):
        clone = super().copy_cache(cache, first_layer, rows)
        index = torch.zeros(rows, dtype=torch.long)
        clone.linear_cache = [state if i < first_layer or not torch.is_tensor(state)
                              else state.index_select(0, index.to(state.device))
                              for i, state in enumerate(cache.linear_cache)]
        return clone
