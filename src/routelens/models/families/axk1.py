"""A.X-K1 (SK Telecom): DeepSeek-V3's router (sigmoid affinities, correction bias for
choosing only, top-2-sum groups, x routed_scaling_factor) and MLA attention, with one
difference in the block: it normalises its own output, post_mlp_layernorm over the routed
experts' weighted sum plus the shared experts, before the residual add.

That norm sits inside the MoE block, so the block's output is not linear in the route's
weights; the route algebra holds on what the norm reads. The layout declares the norm
(`Layout.block_output_norm`): the fast engine records the block's output before it, forms
each route's sum there (standard sum minus the standard experts' weighted outputs plus the
route's) and applies the norm per token after, which is what the block computes; its
block-algebra check runs the block itself under sampled routes on every pass. Released
checkpoints store the norm at the decoder-layer level (`post_mlp_layernorm.*`), which
transformers' conversion mapping moves into the block at load."""

from routelens.models.families.deepseek_v3 import DeepseekV3Adapter
from routelens.models.spec import Layout


class AXK1Adapter(DeepseekV3Adapter):
    layout = Layout(windows="none", block_output_norm="post_mlp_layernorm")   # a plain causal mask
