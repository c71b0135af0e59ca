"""Qwen2-MoE: softmax top-k plus a sigmoid-gated shared expert, which is not routed and
therefore the same under every route. Dense layers come from mlp_only_layers and
decoder_sparse_step."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class Qwen2MoeAdapter(SoftmaxTopKAdapter):
    pass
