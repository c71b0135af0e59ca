"""Hunyuan-A13B (HunYuanMoEV1): fp32 router (`wg`), softmax top-k always renormalised over
the k, plus a dense shared MLP inside the block; q/k norm."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class HunYuanMoEV1Adapter(SoftmaxTopKAdapter):
    model_types = ("hunyuan_v1_moe",)
    normalize = True
