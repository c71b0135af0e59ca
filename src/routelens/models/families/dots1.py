"""dots.llm1: DeepSeek-V3's router (sigmoid, correction bias for choosing only, top-2-sum
groups, routed_scaling_factor); sliding-window layers from config.layer_types."""

from routelens.models.families.deepseek_v3 import DeepseekV3Adapter
from routelens.models.spec import Layout


class Dots1Adapter(DeepseekV3Adapter):
    layout = Layout()   # its mask builder applies sliding windows to `sliding_attention` layers
