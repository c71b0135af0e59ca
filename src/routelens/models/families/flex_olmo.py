"""FlexOlmo: OLMoE's softmax top-k router in a post-norm layout: the MoE block reads the
residual stream itself (no norm before it) and its output is normalised
(post_feedforward_layernorm) before the residual add. The adapter declares both, and the
fast engine's layout check confirms them on every run."""

from routelens.models.families.softmax_topk import SoftmaxTopKAdapter


class FlexOlmoAdapter(SoftmaxTopKAdapter):
    model_types = ("flex_olmo",)
    window_source = "none"   # plain causal mask

    def mlp_residual_input(self, layer: int):
        return self.moe_block(layer)

    def mlp_output_norm(self, layer: int):
        return self.decoder_layers[layer].post_feedforward_layernorm
