"""Hunyuan-A13B (HunYuanMoEV1): fp32 router (`wg`), softmax top-k always renormalised over
the k, plus a dense shared MLP inside the block; q/k norm."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import SOFTMAX_TOPK_RENORMALISED


class HunYuanMoEV1Adapter(MoEAdapter):
    gate = SOFTMAX_TOPK_RENORMALISED
