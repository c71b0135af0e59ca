"""Qwen3.5-MoE (its text model; the checkpoint's model_type may be the multimodal one): the
Qwen3-Next router, which always renormalises the top-k probabilities; Gated DeltaNet
linear-attention layers between full-attention layers."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class Qwen35MoeAdapter(SoftmaxTopKAdapter):
    model_types = ("qwen3_5_moe", "qwen3_5_moe_text")
    normalize = True
