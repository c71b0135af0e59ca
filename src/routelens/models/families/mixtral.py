"""Mixtral: softmax top-k, always renormalised over the k (router jitter only in training)."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import SOFTMAX_TOPK_RENORMALISED


class MixtralAdapter(MoEAdapter):
    gate = SOFTMAX_TOPK_RENORMALISED
