"""Mixtral: softmax top-k, always renormalised over the k (router jitter only in training)."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class MixtralAdapter(SoftmaxTopKAdapter):
    model_types = ("mixtral",)
    gating_rule = "fp32 softmax over all experts, top-k, always renormalised over the k"

    @property
    def normalize(self) -> bool:
        return True
