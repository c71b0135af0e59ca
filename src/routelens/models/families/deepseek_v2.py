"""DeepSeek-V2: fp32 softmax; greedy or group-limited greedy selection; the weights are
the unnormalised softmax probabilities times routed_scaling_factor (norm_topk_prob is
ignored by the model). Shared experts are added outside the route; the first
first_k_dense_replace layers are dense. Under group_limited_greedy the router keeps the
topk_group groups with the largest maximum probability; alternatives are drawn inside them."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import DEEPSEEK_V2
from routelens.models.spec import Layout


class DeepseekV2Adapter(MoEAdapter):
    gate = DEEPSEEK_V2
    layout = Layout(windows="none")   # the model builds a plain causal mask whatever config.sliding_window says
