"""GLM-4.7-Flash (glm4_moe_lite): DeepSeek-V3's router on DeepSeek-style MLA attention;
dense layers from mlp_layer_types."""

from routelens.models.families.deepseek_v3 import DeepseekV3Adapter


class Glm4MoeLiteAdapter(DeepseekV3Adapter):
    pass   # DeepSeek-V3's gate and layout (a plain causal mask)
