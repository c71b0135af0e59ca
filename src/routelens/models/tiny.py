"""Tiny random-weight MoE models, one per supported family.

They are built from real Hugging Face configs (no download) and exist for tests, the
interim demo and quick experiments. Each config is small enough to run a forward in a few
milliseconds on one CPU core, yet exercises what makes its family different: dense layers
mixed with MoE layers (Qwen2-MoE, DeepSeek), group-limited routing (DeepSeek), a sigmoid
router with a correction bias (DeepSeek-V3), sliding-window layers and attention sinks
(GPT-OSS), MLA (DeepSeek), q/k norm (Qwen3), shared experts (Qwen2-MoE, DeepSeek).
Every family in the registry has one here (a test checks it).
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

TINY_VOCAB = 64

_COMMON = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

# model_type -> config overrides. Every config has at least 3 MoE layers so that a
# first, a middle and a last MoE layer exist.
TINY_CONFIGS: dict[str, dict] = {
    "olmoe": dict(num_hidden_layers=3, intermediate_size=48, num_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(
        num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=24, num_experts=8,
        num_experts_per_tok=3, head_dim=8, norm_topk_prob=True,
    ),
    "qwen2_moe": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, num_experts=8,
        num_experts_per_tok=2, shared_expert_intermediate_size=32, mlp_only_layers=[1],
    ),
    "mixtral": dict(num_hidden_layers=3, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2),
    "deepseek_v2": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=None, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
        num_key_value_heads=4,
    ),
    "deepseek_v3": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
        q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_group=4,
        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, num_key_value_heads=4,
    ),
    "gpt_oss": dict(
        num_hidden_layers=4, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
        head_dim=8, sliding_window=4, max_position_embeddings=131072,
    ),
    "phimoe": dict(num_hidden_layers=3, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2),
    "glm4_moe": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, head_dim=8,
    ),
    "exaone_moe": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        num_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
    "granitemoe": dict(
        num_hidden_layers=3, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
        residual_multiplier=0.5, logits_scaling=2.0, embedding_multiplier=1.5, attention_multiplier=0.3,
    ),
    "granitemoeshared": dict(
        num_hidden_layers=3, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
        shared_intermediate_size=32, residual_multiplier=0.5, logits_scaling=2.0, embedding_multiplier=1.5,
        attention_multiplier=0.3,
    ),
    "granitemoe_swa": dict(
        num_hidden_layers=4, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        residual_multiplier=0.5, logits_scaling=2.0, embedding_multiplier=1.5, attention_multiplier=0.3,
    ),
    "minimax_m2": dict(num_hidden_layers=3, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2, head_dim=8),
    "ernie4_5_moe": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, moe_num_experts=8, moe_k=2,
        moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_end_index=3, moe_layer_interval=1,
    ),
    "dots1": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
        norm_topk_prob=True, routed_scaling_factor=2.5, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    ),
    "glm4_moe_lite": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=1.8,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
        num_key_value_heads=4, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
    "afmoe": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, num_dense_layers=1, num_experts=8,
        num_experts_per_tok=2, num_shared_experts=1, route_scale=2.0, head_dim=8, global_attn_every_n_layers=2,
        sliding_window=4,
    ),
    "flex_olmo": dict(num_hidden_layers=3, intermediate_size=48, num_experts=6, num_experts_per_tok=2),
    "mellum": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, num_local_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        mlp_layer_types=["sparse"] * 4,
    ),
    "mimo_v2_flash": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        head_dim=8, v_head_dim=12, sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
    "solar_open": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, head_dim=8, first_k_dense_replace=1,
    ),
}


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """The tiny config of one family, with `overrides` applied on top."""
    if model_type not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for {model_type!r}; have {sorted(TINY_CONFIGS)}")
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_model(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A random-weight model of the family, in fp32 and eval mode.

    Router weights are drawn with a larger scale than the config's initializer so that
    routing is decisive (no near-ties between the k-th and (k+1)-th expert), and
    DeepSeek-V3's correction bias is made non-zero so that choosing and weighting differ.
    """
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".gate.weight", ".router.weight")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):   # a buffer, or a frozen parameter
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()
