"""Qwen3.5-MoE (its text model; the checkpoint's model_type may be the multimodal one): the
Qwen3-Next router, which always renormalises the top-k probabilities; Gated DeltaNet
linear-attention layers between full-attention layers."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import SOFTMAX_TOPK_RENORMALISED


class Qwen35MoeAdapter(MoEAdapter):
    gate = SOFTMAX_TOPK_RENORMALISED
