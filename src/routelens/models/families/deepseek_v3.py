"""DeepSeek-V3 and the routers that copy it (GLM-4.5 MoE, EXAONE MoE, ...): sigmoid affinities;
experts are *chosen* by affinity + e_score_correction_bias within the top topk_group groups
(a group's score is the sum of its top-2 biased affinities), but *weighted* by the unbiased
affinity, divided by (sum + 1e-20) if norm_topk_prob, times routed_scaling_factor.

An equal-compute alternative is a route the router could have produced, so the selection
scores are zero outside the groups the router admitted for that token: alternatives are
drawn from the admitted groups only."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import DEEPSEEK_V3
from routelens.models.gating import admitted_groups  # noqa: F401  (imported from here by users and tests)
from routelens.models.spec import Layout


class DeepseekV3Adapter(MoEAdapter):
    gate = DEEPSEEK_V3
    layout = Layout(windows="none")   # the model builds a plain causal mask whatever config.sliding_window says
