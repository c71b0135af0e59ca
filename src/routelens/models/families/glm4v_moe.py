"""GLM-4.5V / GLM-4.6V (glm4v_moe), served through its text model (`vision_language`): GLM-4.5
MoE's decoder and router (DeepSeek-V3's gate: sigmoid, correction bias for choosing only,
top-2-sum groups, routed_scaling_factor; shared experts; first layers dense); MRoPE, which on
text alone is the plain (partial) rotary embedding."""

from routelens.models.families.deepseek_v3 import DeepseekV3Adapter
from routelens.models.spec import Tower


class Glm4vMoeAdapter(DeepseekV3Adapter):
    tower = Tower()
