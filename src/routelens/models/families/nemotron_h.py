"""NVIDIA Nemotron-H (Nemotron 3): every decoder block holds one mixer (Mamba-2, attention,
a dense MLP or a MoE) behind one pre-norm; the MoE uses DeepSeek-V3's router (sigmoid,
correction bias for choosing only, groups, x routed_scaling_factor) plus shared experts."""

from __future__ import annotations

from routelens.models.families.deepseek_v3 import DeepseekV3Adapter
from routelens.models.spec import Layout


class NemotronHAdapter(DeepseekV3Adapter):
    layout = Layout(moe_block="mixer", mlp_input="norm", final_norm="norm_f", windows="none")

    def fast_engine_unsupported(self) -> str | None:
        if getattr(self.config, "moe_latent_size", None):
            return "its experts run in a latent space (moe_latent_size) between two projections"
        return None
