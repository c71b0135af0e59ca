"""ERNIE 4.5 MoE: fp32 softmax; experts chosen by softmax + the router's statistics bias
(moe_statics.e_score_correction_bias); weights = the chosen probabilities over
max(their sum, moe_norm_min)."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import ERNIE
from routelens.models.spec import Layout


class Ernie45MoeAdapter(MoEAdapter):
    gate = ERNIE
    layout = Layout(windows="none")   # plain causal mask
