"""The softmax top-k gate shared by OLMoE, Qwen3-MoE, Qwen2-MoE and Mixtral.

Rule: p = softmax(logits) in fp32 over all E experts; the route's weights are p of its
experts, divided by their sum when the top-k weights are renormalised (`gates.SOFTMAX_TOPK`:
when config.norm_topk_prob says so).
"""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import SOFTMAX_TOPK


class SoftmaxTopKAdapter(MoEAdapter):
    gate = SOFTMAX_TOPK
