"""Qwen3-MoE: softmax top-k; real checkpoints set norm_topk_prob=True (config default False)."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class Qwen3MoeAdapter(SoftmaxTopKAdapter):
    pass
