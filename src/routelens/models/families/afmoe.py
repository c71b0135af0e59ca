"""AFMoE (Arcee Trinity): sigmoid affinities; experts chosen by affinity + the block's
expert_bias (passed into the router); weights = chosen affinities / (sum + 1e-20) x
route_scale; shared experts added; sandwich norms around the MLP; local/global attention layers."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import AFMOE
from routelens.models.spec import Layout


class AfmoeAdapter(MoEAdapter):
    gate = AFMOE
    layout = Layout(mlp_input="pre_mlp_layernorm", mlp_output_norm="post_mlp_layernorm")
