"""OLMoE (allenai/OLMoE-1B-7B): softmax top-k, renormalised only if norm_topk_prob."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter
from routelens.models.spec import Layout


class OlmoeAdapter(SoftmaxTopKAdapter):
    layout = Layout(windows="none")   # the model builds a plain causal mask whatever config.sliding_window says
