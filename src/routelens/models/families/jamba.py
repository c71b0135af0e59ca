"""Jamba: Mamba and attention decoder layers, MoE every `expert_layer_period` layers in the
`feed_forward` slot; softmax top-k, not renormalised."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import SOFTMAX_TOPK_PLAIN
from routelens.models.spec import Layout


class JambaAdapter(MoEAdapter):
    gate = SOFTMAX_TOPK_PLAIN
    layout = Layout(moe_block="feed_forward", mlp_input="pre_ff_layernorm", final_norm="final_layernorm")
