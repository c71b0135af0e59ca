"""Solar Open (Upstage): DeepSeek-V3's router (sigmoid, correction bias for choosing only,
top-2-sum groups, routed_scaling_factor); shared experts."""

from routelens.models.families.deepseek_v3 import DeepseekV3Adapter


class SolarOpenAdapter(DeepseekV3Adapter):
    pass   # DeepSeek-V3's gate and layout (a plain causal mask)
