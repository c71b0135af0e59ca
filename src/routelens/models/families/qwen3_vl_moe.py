"""Qwen3-VL-MoE, served through its text model (`vision_language`): Qwen3-MoE's decoder, whose
router always renormalises the top-k probabilities (whatever norm_topk_prob says); MRoPE,
which on text alone (the three position components equal) is the plain rotary embedding;
DeepStack adds visual features to early layers only where image tokens are, and there are
none. No sliding windows (the config sets none)."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import SOFTMAX_TOPK_RENORMALISED
from routelens.models.spec import Layout, Tower


class Qwen3VLMoeAdapter(MoEAdapter):
    gate = SOFTMAX_TOPK_RENORMALISED
    layout = Layout(windows="none")
    tower = Tower()
