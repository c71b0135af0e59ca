"""Mixtral: softmax top-k, always renormalised over the k (router jitter only in training)."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class MixtralAdapter(SoftmaxTopKAdapter):
    model_types = ("mixtral",)

    @property
    def normalize(self) -> bool:
        return True
