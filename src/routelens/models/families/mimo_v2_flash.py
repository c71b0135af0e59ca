"""MiMo-V2-Flash: DeepSeek-V3's router (sigmoid, correction bias for choosing only, top-2-sum
groups, routed_scaling_factor); sliding-window layers from config.layer_types; value head
dim apart from the query/key head dim."""

from routelens.models.families.deepseek_v3 import DeepseekV3Adapter
from routelens.models.spec import Layout


class MimoV2FlashAdapter(DeepseekV3Adapter):
    layout = Layout()   # its mask builder applies sliding windows to `sliding_attention` layers
