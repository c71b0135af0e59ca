"""IBM Granite MoE (and GraniteMoeShared): top-k on the router logits, softmax over the k.
The MoE block is `block_sparse_moe`; GraniteMoeShared adds a dense `shared_mlp` beside it;
both go into the residual scaled by residual_multiplier, and the logits are divided by
logits_scaling."""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import TOPK_THEN_SOFTMAX
from routelens.models.spec import Layout


class GraniteMoeAdapter(MoEAdapter):
    gate = TOPK_THEN_SOFTMAX
    layout = Layout(moe_block="block_sparse_moe", parallel_mlp="shared_mlp", windows="none")   # plain causal mask

    def mlp_residual_scale(self, layer: int) -> float:
        return float(self.config.residual_multiplier)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) / self.config.logits_scaling


class GraniteMoeSwaAdapter(GraniteMoeAdapter):
    """GraniteMoeSWA: Granite MoE with sliding-window layers (config.layer_types) and a
    learnable per-head attention sink."""

    layout = Layout(moe_block="block_sparse_moe", parallel_mlp="shared_mlp")   # sliding windows from the config
