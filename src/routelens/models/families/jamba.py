"""Jamba: Mamba and attention decoder layers, MoE every `expert_layer_period` layers in the
`feed_forward` slot; softmax top-k, not renormalised."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class JambaAdapter(SoftmaxTopKAdapter):
    model_types = ("jamba",)
    moe_block_attribute = "feed_forward"
    mlp_residual_input_attribute = "pre_ff_layernorm"
    final_norm_attribute = "final_layernorm"
    normalize = False
