"""OLMoE (allenai/OLMoE-1B-7B): softmax top-k, renormalised only if norm_topk_prob."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class OlmoeAdapter(SoftmaxTopKAdapter):
    model_types = ("olmoe",)
    window_source = "none"  # the model builds a plain causal mask whatever config.sliding_window says
