"""Qwen3-Next: softmax top-k (renormalised over the k) plus a sigmoid-gated shared expert;
Gated DeltaNet linear-attention layers between full-attention layers (a hybrid: the cache
engine serves the layers the fast engine cannot patch)."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class Qwen3NextAdapter(SoftmaxTopKAdapter):
    pass
