"""Mellum (JetBrains): OLMoE-style softmax top-k router (renormalised if norm_topk_prob);
sliding-window layers from config.layer_types."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class MellumAdapter(SoftmaxTopKAdapter):
    pass   # the default layout: its mask builder applies sliding windows to `sliding_attention` layers
