"""Bailing hybrid (Ling/Ring 2.5 linear): DeepSeek-V3's router (sigmoid, correction bias for
choosing only, top-2-sum groups, x routed_scaling_factor); MLA full-attention layers between
linear-attention layers."""

from routelens.models.families.deepseek_v3 import DeepseekV3Adapter


class BailingHybridAdapter(DeepseekV3Adapter):
    pass
