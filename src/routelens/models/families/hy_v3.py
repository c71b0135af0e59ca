"""HY-V3 (Hunyuan 3): DeepSeek-V3's sigmoid router without groups; the correction bias lives
on the MoE block (`HYV3MoE.e_score_correction_bias`), which passes it into its router;
weights = the chosen affinities / (their sum + 1e-20) x router_scaling_factor; a shared
expert added inside the block; q/k norm; a plain causal mask."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import HY_V3
from routelens.models.spec import Layout


class HYV3Adapter(MoEAdapter):
    gate = HY_V3
    layout = Layout(windows="none")   # the model builds a plain causal mask
