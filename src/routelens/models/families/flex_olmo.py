"""FlexOlmo: OLMoE's softmax top-k router in a post-norm layout: the MoE block reads the
residual stream itself (no norm before it) and its output is normalised
(post_feedforward_layernorm) before the residual add. The adapter declares both, and the
fast engine's layout check confirms them on every run."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter
from routelens.models.spec import Layout


class FlexOlmoAdapter(SoftmaxTopKAdapter):
    layout = Layout(mlp_input=None, mlp_output_norm="post_feedforward_layernorm", windows="none")
