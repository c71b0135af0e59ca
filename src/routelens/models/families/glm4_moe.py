"""GLM-4.5 / GLM-4.6 MoE: DeepSeek-V3's router (sigmoid, correction bias for choosing only,
top-2-sum groups, routed_scaling_factor); shared experts added; first layers dense."""

from routelens.models.families.deepseek_v3 import DeepseekV3Adapter


class Glm4MoeAdapter(DeepseekV3Adapter):
    pass   # DeepSeek-V3's gate and layout (a plain causal mask)
