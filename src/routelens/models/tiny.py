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

import copy

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

# DeepSeek-V3's tiny config, shared by the families built on it (DSA: deepseek_v32, glm_moe_dsa)
TINY_CONFIGS_DEEPSEEK_V3 = dict(
    num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
    q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12, n_group=4,
    topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, num_key_value_heads=4,
)

# The OCR checkpoints' language model (issue 29, group e): DeepSeek-V2's router and experts,
# multi-head attention, dense layers where mlp_layer_types says so
TINY_CONFIGS_OCR = dict(
    num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
    n_shared_experts=1, topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5,
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
)

# issue 29 (group H): MiniMax-M3's text model (the multimodal checkpoint's, and the text model alone);
# the indexer keeps 2 blocks of 2 keys per query (its own block among them): a 16-token sequence is sparse
TINY_CONFIGS_MINIMAX_M3 = dict(
    num_hidden_layers=4, intermediate_size=24, dense_intermediate_size=48, shared_intermediate_size=16,
    num_local_experts=8, num_experts_per_tok=2, head_dim=8, routed_scaling_factor=2.0,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    layer_types=["minimax_m3_sparse", "full_attention", "minimax_m3_sparse", "full_attention"],
    mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    index_n_heads=2, index_head_dim=8, index_block_size=2, index_topk_blocks=2, index_local_blocks=1,
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
    "deepseek_v3": dict(TINY_CONFIGS_DEEPSEEK_V3),
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
    "hunyuan_v1_moe": dict(num_hidden_layers=3, intermediate_size=48, num_experts=8, moe_topk=2, head_dim=8),
    "beam": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, head_dim=8, sliding_window=4,
        final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
    # hybrids: linear attention / Mamba / short convolutions between softmax-attention layers
    "qwen3_next": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        shared_expert_intermediate_size=32, norm_topk_prob=True, head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=3,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    ),
    "qwen3_5_moe_text": dict(
        num_hidden_layers=4, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        shared_expert_intermediate_size=32, head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=3,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
    ),
    "kimi_linear": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_token=2,
        num_shared_experts=1, num_expert_group=4, topk_group=2, moe_renormalize=True, routed_scaling_factor=2.5,
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, head_dim=8,
        num_key_value_heads=4, linear_head_dim=8, linear_num_heads=4, linear_conv_kernel_dim=3,
        layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
    "minimax": dict(
        num_hidden_layers=4, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2, head_dim=8,
        block_size=4, layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        full_attn_alpha_factor=0.9, full_attn_beta_factor=1.1, linear_attn_alpha_factor=0.8,
        linear_attn_beta_factor=1.2, mlp_alpha_factor=0.7, mlp_beta_factor=1.3, initializer_range=0.1,
    ),
    "jamba": dict(
        num_hidden_layers=4, intermediate_size=48, num_experts=8, num_experts_per_tok=2, expert_layer_period=1,
        expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=3,
        mamba_expand=2, mamba_dt_rank=4,
    ),
    "lfm2_moe": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        num_dense_layers=1, conv_L_cache=3, norm_topk_prob=True, routed_scaling_factor=1.5,
        layer_types=["conv", "full_attention", "conv", "conv"],
    ),
    "granitemoehybrid": dict(
        num_hidden_layers=4, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
        shared_intermediate_size=32, residual_multiplier=0.5, logits_scaling=2.0, embedding_multiplier=1.5,
        attention_multiplier=0.3, mamba_n_heads=4, mamba_n_groups=1, mamba_d_state=8, mamba_d_head=16,
        mamba_d_conv=3, mamba_chunk_size=4,
        layer_types=["mamba", "attention", "mamba", "mamba"],
    ),
    "nemotron_h": dict(
        layers_block_type=["linear_attention", "moe", "full_attention", "moe", "linear_attention", "moe"],
        num_hidden_layers=6, intermediate_size=48, moe_intermediate_size=24, moe_shared_expert_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, head_dim=8, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=1,
        conv_kernel=3, chunk_size=4,
    ),
    "bailing_hybrid": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_token=2,
        num_shared_experts=1, num_expert_group=4, topk_group=2, moe_renormalize=True, routed_scaling_factor=2.5,
        first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12,
        head_dim=8, num_key_value_heads=4, linear_head_dim=8, linear_num_heads=4, linear_conv_kernel_dim=3,
        short_conv_kernel_size=3, layer_group_size=2, num_nextn_predict_layers=0,
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
    # issue 29 (group A)
    "cohere2_moe": dict(
        num_hidden_layers=4, intermediate_size=24, num_experts=8, num_experts_per_tok=2, head_dim=8,
        num_shared_experts=1, prefix_dense_intermediate_size=48, sliding_window=4, logit_scale=0.5,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
    "flint": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=4, mlp_only_layers=[0],
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    ),
    "laguna": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=32,
        num_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=4, moe_routed_scaling_factor=2.5,
        moe_router_logit_softcapping=3.0, num_attention_heads_per_layer=[4, 2, 4, 2],
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
    "kolibri1": dict(
        num_hidden_layers=3, moe_intermediate_size=24, shared_expert_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "hy_v3": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        num_shared_experts=1, head_dim=8, router_scaling_factor=2.5,
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
    # issue 29 (group D): multimodal checkpoints served through their text model (TINY_TOWERS: the rest)
    "qwen3_vl_moe": dict(
        num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    ),
    "glm4v_moe": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, num_attention_heads=2, num_key_value_heads=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "mrope_section": [2, 1, 1]},
    ),
    "aria": dict(num_hidden_layers=3, intermediate_size=24, moe_num_experts=8, moe_topk=2, moe_num_shared_experts=1,
                 head_dim=8),
    # issue 29 (group B): indexers (DSA) pick 4 keys per query, so a 16-token sequence is sparse;
    # 8+ indexer heads: with 2, every head's ReLU is 0 for many keys and their ties break differently
    # in a cached decode than in a full forward
    "deepseek_v32": dict(**TINY_CONFIGS_DEEPSEEK_V3, index_topk=4, index_n_heads=8, index_head_dim=16),
    "glm_moe_dsa": dict(**{**TINY_CONFIGS_DEEPSEEK_V3, "num_hidden_layers": 5}, index_topk=4, index_n_heads=8,
                        index_head_dim=16,
        indexer_types=["full", "full", "shared", "full", "shared"],
    ),
    "axk2": dict(
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, n_group=None, topk_group=None, norm_topk_prob=True,
        routed_scaling_factor=2.5, num_key_value_heads=4, index_topk=4, index_n_heads=8, index_head_dim=16,
        gated_norm_rank=8, mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
    # issue 29 (group C)
    "llama4_text": dict(   # MoE every 2nd layer (dense MLPs between); chunked + no-RoPE layers (chunks: tests/models/test_C_families.py)
        num_hidden_layers=6, intermediate_size=24, intermediate_size_mlp=48, num_local_experts=8, num_experts_per_tok=2,
        head_dim=8, interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=128,
    ),
    "longcat_flash": dict(   # 8 routed + 2 zero-computation experts, top-3
        num_layers=3, num_key_value_heads=4, ffn_hidden_size=48, expert_ffn_hidden_size=24, n_routed_experts=8,
        zero_expert_num=2, moe_topk=3, routed_scaling_factor=2.0, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, head_dim=8, v_head_dim=12,
    ),
    "jetmoe": dict(num_hidden_layers=3, kv_channels=8, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
    # issue 29 (lead)
    "axk1": dict({key: value for key, value in TINY_CONFIGS_DEEPSEEK_V3.items() if key != "first_k_dense_replace"},
                 mlp_layer_types=["dense", "sparse", "sparse", "sparse"]),
    # issue 29 (group e): DeepSeek-V2's MoE with multi-head attention (TINY_TOWERS: the OCR front ends)
    "deepseek_ocr2": dict(TINY_CONFIGS_OCR),
    "unlimited_ocr": dict(TINY_CONFIGS_OCR, sliding_window=4),   # reference sliding windows shorter than a test text
    # issue 29 (group f): text towers (TINY_TOWERS: the rest)
    "qwen3_omni_moe": dict(   # the thinker's text config
        num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
        head_dim=8, norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    ),
    "step3p7": dict(   # sliding layers with their own head count, rotary theta and partial factor; dense first layer
        num_hidden_layers=4, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
        share_expert_dim=32, head_dim=8, sliding_window=4, num_sliding_attention_heads=2,
        moe_router_scaling_factor=2.5, rope_theta=[10000.0, 5000.0, 10000.0, 10000.0],
        partial_rotary_factors=[0.5, 1.0, 0.5, 0.5],
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
    ),
    # issue 29 (group H)
    "dbrx": dict(   # d_model: DbrxConfig sizes its experts from it before the hidden_size alias is applied
        d_model=32, num_hidden_layers=3, attn_config=dict(kv_n_heads=2, clip_qkv=0.1, rope_theta=10000.0),
        ffn_config=dict(ffn_hidden_size=24, moe_num_experts=8, moe_top_k=2, moe_normalize_expert_weights=2.0),
    ),
    "minimax_m3_vl": dict(TINY_CONFIGS_MINIMAX_M3),
    "minimax_m3_vl_text": dict(TINY_CONFIGS_MINIMAX_M3),   # its text model alone
    # issue 29 (group g): Mistral 4 (softmax router, groups; Llama 4's query scale from position 4 on) and
    # its multimodal checkpoint (mistral3, TINY_TOWERS); Mistral Large 4's text model (DSA: 4 keys per query,
    # shared top-k, shared latent KV, a no-RoPE layer; TINY_TOWERS)
    "mistral4": dict(
        TINY_CONFIGS_DEEPSEEK_V3, routed_scaling_factor=1.5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 64.0, "original_max_position_embeddings": 4,
                         "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                         "llama_4_scaling_beta": 0.1},
    ),
    "mistral_large4": dict(
        num_hidden_layers=6, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=12, n_group=4, topk_group=2, routed_scaling_factor=2.5, num_key_value_heads=4, index_topk=4,
        index_n_heads=8, index_head_dim=16, final_logit_softcapping=3.0,
        indexer_types=["full", "full", "shared", "full", "shared", "full"], no_rope_layers=[1, 1, 1, 1, 1, 0],
        kv_source_layers=[0, 1, 1, 3, 3, 5],   # layers 2 and 4 attend to the latent KV of layers 1 and 3
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 128,
                         "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.0},
    ),
}
TINY_CONFIGS["mistral3"] = dict(TINY_CONFIGS["mistral4"], model_type="mistral4")   # its text config


# multimodal checkpoints whose causal-LM class is their text model: the composite config, as
# the checkpoint's config.json has it (model_type -> its text model's tiny config)
TINY_COMPOSITE = {"qwen3_5_moe": "qwen3_5_moe_text",
                  "llama4": "llama4_text"}   # issue 29 (group C)
TINY_CONFIGS.update({composite: TINY_CONFIGS[text] for composite, text in TINY_COMPOSITE.items()})
_TINY_VISION = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32)
_TINY_SAM = dict(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                 patch_size=16, global_attn_indexes=[0], window_size=2, mlp_dim=16, downsample_channels=[8, 16])
_TINY_TALKER = dict(vocab_size=32, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                    intermediate_size=16, num_hidden_layers=1)   # issue 29 (group f): Qwen3-Omni's talker
_TINY_PIXTRAL = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                     image_size=28, patch_size=14)   # issue 29 (group g)
# multimodal checkpoints served through their text tower (`routelens.models.families.vision_language`):
# model_type -> the composite config's other parts (vision encoder, ...); TINY_CONFIGS has its text config
TINY_TOWERS: dict[str, dict] = {
    "qwen3_vl_moe": dict(vision_config=_TINY_VISION),
    "glm4v_moe": dict(vision_config=_TINY_VISION),
    "aria": dict(vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    image_size=28, patch_size=14), projector_patch_to_query_dict={4: 4},
                 image_token_index=TINY_VOCAB),   # its default (9) lies inside the tiny vocabulary
    # issue 29 (group e): a 1-layer SAM on 2 x 2 patches and a 1-layer vision encoder
    "deepseek_ocr2": dict(vision_config=dict(sam_config=_TINY_SAM, encoder_config=dict(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))),
    "unlimited_ocr": dict(vision_config=dict(sam_config=_TINY_SAM, encoder_config=dict(
        hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14))),
    # issue 29 (group f)
    "qwen3_omni_moe": dict(   # the thinker's encoders tiny, and a tiny talker + code2wav (not scored, but there)
        thinker_config=dict(
            vision_config=dict(_TINY_VISION, deepstack_visual_indexes=[0], num_position_embeddings=16),
            audio_config=dict(encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=16, d_model=16,
                              output_dim=32, num_mel_bins=16, downsample_hidden_size=8, max_source_positions=32)),
        talker_config=dict(
            spatial_merge_size=2, thinker_hidden_size=32, num_code_groups=2, accept_hidden_layer=1,
            text_config=dict(_TINY_TALKER, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                             shared_expert_intermediate_size=8),
            code_predictor_config=dict(_TINY_TALKER, num_code_groups=2)),
        code2wav_config=dict(codebook_size=32, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=16, num_hidden_layers=1, num_quantizers=2, upsample_rates=[2],
                             upsampling_ratios=[2], decoder_dim=16, sliding_window=4),
    ),
    "step3p7": dict(vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                                       patch_size=14, max_position_embeddings=4)),
    # issue 29 (group H)
    "minimax_m3_vl": dict(vision_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2)),
    # issue 29 (group g): a Pixtral encoder; the image token (10) moved out of the tiny vocabulary
    "mistral3": dict(vision_config=_TINY_PIXTRAL, image_token_index=TINY_VOCAB),
    "mistral_large4": dict(vision_config=_TINY_PIXTRAL, image_token_index=TINY_VOCAB),
}
# issue 29 (group f): where a tower's text config sits when not at the top (the omni thinker's config)
TINY_TEXT_CONFIG_IN: dict[str, str] = {"qwen3_omni_moe": "thinker_config"}


# issue 29 (group H): routers whose weight has another name, drawn decisive like the others
TINY_ROUTER_WEIGHTS: dict[str, tuple[str, ...]] = {"dbrx": (".router.layer.weight",)}


def tiny_config(model_type: str, **overrides) -> PretrainedConfig:
    """The tiny config of one family, with `overrides` applied on top (to the text config of
    a composite one)."""
    if model_type not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for {model_type!r}; have {sorted(TINY_CONFIGS)}")
    kwargs = {**_COMMON, **TINY_CONFIGS[model_type], **overrides}
    if model_type in TINY_COMPOSITE:
        return AutoConfig.for_model(model_type, text_config=kwargs, vision_config=_TINY_VISION)
    if model_type in TINY_TOWERS:
        parts = copy.deepcopy(TINY_TOWERS[model_type])
        holder = parts.setdefault(TINY_TEXT_CONFIG_IN[model_type], {}) if model_type in TINY_TEXT_CONFIG_IN else parts
        holder["text_config"] = kwargs
        return AutoConfig.for_model(model_type, **parts)
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_model(model_type: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A random-weight model of the family, in fp32 and eval mode.

    Router weights are drawn with a larger scale than the config's initializer so that
    routing is decisive (no near-ties between the k-th and (k+1)-th expert), and
    DeepSeek-V3's correction bias is made non-zero so that choosing and weighting differ.
    """
    config = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    if model_type in TINY_TOWERS:   # the text tower of the multimodal model
        from routelens.models.families.vision_language import tower_from_config
        from routelens.models.registry import adapter_class

        model = tower_from_config(config, model_type, adapter_class(model_type).tower)
    else:   # AutoModelForCausalLM, or the causal-LM class the family declares
        from routelens.models.loading import from_config
        from routelens.models.registry import FAMILIES, adapter_class

        model_class = adapter_class(model_type).causal_lm_class() if model_type in FAMILIES else AutoModelForCausalLM
        model = from_config(model_class, config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".gate.weight", ".router.weight", *TINY_ROUTER_WEIGHTS.get(model_type, ()))):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        for name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if name.endswith(("e_score_correction_bias", "expert_bias")):   # a buffer, or a frozen parameter
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model.eval()


# The routing of real checkpoints (experts, top-k, groups, shared experts) in 3 layers of a
# 128-wide stream: what bf16 does to routing depends on E, k and the groups, not on width.
REAL_SHAPED_COMMON = dict(vocab_size=1024, hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                          max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          tie_word_embeddings=False, num_hidden_layers=3)
REAL_SHAPED: dict[str, tuple[str, dict]] = {
    "olmoe-1b-7b": ("olmoe", dict(intermediate_size=32, num_experts=64, num_experts_per_tok=8)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(intermediate_size=256, moe_intermediate_size=32, num_experts=128,
                                        num_experts_per_tok=8, norm_topk_prob=True, head_dim=32, num_key_value_heads=2)),
    "deepseek-v3": ("deepseek_v3", dict(intermediate_size=256, moe_intermediate_size=16, n_routed_experts=256,
                                        num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=1,
                                        kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=16,
                                        v_head_dim=16, n_group=8, topk_group=4, norm_topk_prob=True,
                                        routed_scaling_factor=2.5)),
}


def build_real_shaped(name: str, seed: int = 0) -> PreTrainedModel:
    """A random-weight model with the routing of a real checkpoint (`REAL_SHAPED`), fp32,
    eval mode, its LM head at 25x its initial scale: a trained model's logits are decisive
    (std ~ 8), and a near-uniform head would hide what bf16 rounding does to log-probs."""
    model_type, overrides = REAL_SHAPED[name]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**REAL_SHAPED_COMMON, **overrides}),
                                             dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
        for tensor_name, tensor in [*model.named_buffers(), *model.named_parameters()]:
            if tensor_name.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape) * 0.01)
    return model.eval()
