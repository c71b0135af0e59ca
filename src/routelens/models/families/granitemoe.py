"""IBM Granite MoE (and GraniteMoeShared): top-k on the router logits, softmax over the k.
The MoE block is `block_sparse_moe`; GraniteMoeShared adds a dense `shared_mlp` beside it;
both go into the residual scaled by residual_multiplier, and the logits are divided by
logits_scaling."""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter


class GraniteMoeAdapter(MoEAdapter):
    model_types = ("granitemoe", "granitemoeshared")
    moe_block_attribute = "block_sparse_moe"
    window_source = "none"   # plain causal mask

    def parallel_mlp(self, layer: int):
        return getattr(self.decoder_layers[layer], "shared_mlp", None)

    def mlp_residual_scale(self, layer: int) -> float:
        return float(self.config.residual_multiplier)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden) / self.config.logits_scaling

    def weights_for(self, logits: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float().gather(-1, experts), dim=-1)


class GraniteMoeSwaAdapter(GraniteMoeAdapter):
    """GraniteMoeSWA: Granite MoE with sliding-window layers (config.layer_types) and a
    learnable per-head attention sink."""

    model_types = ("granitemoe_swa",)
    window_source = "config"   # its mask builder applies sliding windows to `sliding_attention` layers
