"""LFM2-MoE (Liquid): short-convolution and attention layers; sigmoid affinities, experts
chosen by affinity + the block's expert_bias (passed into the router; absent without
use_expert_bias), weights = chosen affinities / (sum + 1e-6) if norm_topk_prob, x
routed_scaling_factor."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import LFM2_MOE
from routelens.models.spec import Layout


class Lfm2MoeAdapter(MoEAdapter):
    gate = LFM2_MOE
    layout = Layout(moe_block="feed_forward", mlp_input="ffn_norm", final_norm="embedding_norm")
