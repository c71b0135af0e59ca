"""Kimi Linear: DeepSeek-V3's router (sigmoid, correction bias for choosing only, top-2-sum
groups, renormalised, x routed_scaling_factor) and MLA full-attention layers between Kimi
Delta Attention (linear) layers."""

from routelens.models.families.deepseek_v3 import DeepseekV3Adapter


class KimiLinearAdapter(DeepseekV3Adapter):
    pass
