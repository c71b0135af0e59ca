"""DeepSeek-OCR-2 (deepseek_ocr2), served through its text model (`vision_language`): a
DeepSeek-V2 MoE decoder (fp32 softmax router, greedy or group-limited greedy choice with
groups ranked by their largest probability, the chosen probabilities not renormalised, times
routed_scaling_factor; shared experts added outside the route; dense layers where
config.mlp_layer_types says "dense") with plain multi-head attention (no MLA) and a plain
causal mask. The SAM + Qwen2-style vision encoder and its projector feed only the image
placeholder positions (config.image_token_id), which a text-only trajectory never holds:
the routes are the text model's own, forced exactly; nothing visual is counterfactual."""

from routelens.models.families.deepseek_v2 import DeepseekV2Adapter
from routelens.models.spec import Tower


class DeepseekOcr2Adapter(DeepseekV2Adapter):
    # DeepseekOcr2ForConditionalGeneration (AutoModelForImageTextToText): model.language_model, lm_head
    tower = Tower(placeholders=("image_token_id",))
