"""Jamba: Mamba and attention decoder layers, MoE every `expert_layer_period` layers in the
`feed_forward` slot; softmax top-k, not renormalised."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class JambaAdapter(SoftmaxTopKAdapter):
    model_types = ("jamba",)
    layer_mixers = "attention + Mamba"
    gating_rule = "fp32 softmax over all experts, top-k (not renormalised)"
    normalize = False

    @property
    def final_norm(self):
        return self.model.model.final_layernorm

    def moe_block(self, layer: int):
        return self.decoder_layers[layer].feed_forward

    def mlp_residual_input(self, layer: int):
        return self.decoder_layers[layer].pre_ff_layernorm
