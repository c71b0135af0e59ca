"""The gates the shipped families share, by name (torch-free: the registry generates each
family's gating rule from them, and the adapters compute with the same objects).

Examples:
    >>> from routelens.models.gates import DEEPSEEK_V3
    >>> DEEPSEEK_V3.scale, DEEPSEEK_V3.groups.score
    ('routed_scaling_factor', 'top2')
"""

from __future__ import annotations

from routelens.models.spec import Gate, Groups

#: OLMoE, Qwen2/3-MoE, FlexOlmo, Mellum, Qwen3-Next: renormalised only if the config says so
SOFTMAX_TOPK = Gate("softmax", normalise="norm_topk_prob")
#: Mixtral, Hunyuan, Qwen3.5-MoE, MiniMax: always renormalised
SOFTMAX_TOPK_RENORMALISED = Gate("softmax", normalise=True)
#: Jamba: never renormalised
SOFTMAX_TOPK_PLAIN = Gate("softmax")
#: DeepSeek-V2: greedy, or group-limited greedy by the groups' largest probability; scaled, never renormalised
DEEPSEEK_V2 = Gate("softmax", groups=Groups("max", when=("topk_method", "group_limited_greedy")),
                   scale="routed_scaling_factor")
#: DeepSeek-V3 and its many copies: the correction bias only for choosing, top-2-sum groups
DEEPSEEK_V3 = Gate("sigmoid", choice_bias="router.e_score_correction_bias", groups=Groups("top2"),
                   normalise="norm_topk_prob", epsilon=1e-20, scale="routed_scaling_factor")
#: Beam: DeepSeek-V3's router, but the block (not the router) applies routed_scaling_factor
BEAM = Gate("sigmoid", choice_bias="router.e_score_correction_bias", groups=Groups("top2"),
            normalise="norm_topk_prob", epsilon=1e-20)
#: GPT-OSS, Granite MoE
TOPK_THEN_SOFTMAX = Gate("topk_then_softmax")
#: MiniMax-M2: the block holds the correction bias and passes it to its router
MINIMAX_M2 = Gate("sigmoid", choice_bias="block.e_score_correction_bias", normalise=True)
#: ERNIE 4.5 MoE: the router's statistics bias; the sum floored at moe_norm_min
ERNIE = Gate("softmax", choice_bias="router.moe_statics.e_score_correction_bias", normalise=True,
             norm_floor="moe_norm_min")
#: AFMoE (Arcee Trinity)
AFMOE = Gate("sigmoid", choice_bias="block.expert_bias", normalise=True, epsilon=1e-20, scale="route_scale")
#: LFM2-MoE (its expert_bias is optional: use_expert_bias)
LFM2_MOE = Gate("sigmoid", choice_bias="block.expert_bias", normalise="norm_topk_prob", epsilon=1e-6,
                scale="routed_scaling_factor")

# issue 29 (group A)
#: Flint: sigmoid affinities, no choice bias, renormalised if the config says so
SIGMOID_TOPK = Gate("sigmoid", normalise="norm_topk_prob")
#: Laguna: sigmoid, the router's correction bias for choosing only, always renormalised (the block scales)
LAGUNA = Gate("sigmoid", choice_bias="router.e_score_correction_bias", normalise=True)
#: HY-V3 (Hunyuan 3): the block holds the correction bias and passes it in; x router_scaling_factor
HY_V3 = Gate("sigmoid", choice_bias="block.e_score_correction_bias", normalise=True, epsilon=1e-20,
             scale="router_scaling_factor")

# issue 29 (group C)
#: Llama 4: sigmoid of the chosen logits, never renormalised (the score scales the expert's input)
LLAMA4 = Gate("sigmoid")
#: LongCat-Flash: fp32 softmax over the routed and the zero-computation (identity) experts together;
#: the correction bias only for choosing; not renormalised; x routed_scaling_factor
LONGCAT_FLASH = Gate("softmax", choice_bias="router.e_score_correction_bias", scale="routed_scaling_factor")

# issue 29 (group H)
#: DBRX: softmax over all experts (in the logits' dtype), top-k, the chosen probabilities over their
#: p-norm, p = ffn_config.moe_normalize_expert_weights (none if None)
DBRX = Gate("softmax", normalise=True, norm_p="ffn_config.moe_normalize_expert_weights")
# issue 29 (group g)
#: Mistral 4 (Mistral Small 4): softmax scores, top-2-sum groups, no bias; renormalised if norm_topk_prob (+1e-20)
MISTRAL4 = Gate("softmax", groups=Groups("top2"), normalise="norm_topk_prob", epsilon=1e-20,
                scale="routed_scaling_factor")
#: Mistral Large 4: Mistral 4's router in float32, always renormalised
MISTRAL_LARGE4 = Gate("softmax", groups=Groups("top2"), normalise=True, epsilon=1e-20, scale="routed_scaling_factor")
