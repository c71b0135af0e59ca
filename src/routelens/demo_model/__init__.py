"""The embedded demo model: a small OLMoE trained by this project on chain-of-thought
arithmetic (`routelens.data.arithmetic`), shipped as package data in `weights/`.

`--model demo` (and no `--model` at all) loads it. `routelens train-demo` retrains it from
its seed; `card.json` beside the weights records how it was trained and what it scored.
"""

from __future__ import annotations

import os

from transformers import OlmoeConfig

from routelens.data.arithmetic import ALPHABET

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
CARD = "card.json"


def demo_config() -> OlmoeConfig:
    """The architecture: 4 layers, hidden 128, 16 experts of width 96, top-4; router aux loss on."""
    vocab = 4 + len(ALPHABET)  # <pad> <bos> <eos> <unk> + characters
    return OlmoeConfig(
        vocab_size=32 if vocab <= 32 else vocab,
        hidden_size=128,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=False,
        router_aux_loss_coef=0.01,
        output_router_logits=False,  # switched on during training only
        max_position_embeddings=128,
        rope_theta=10000.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )


def is_available() -> bool:
    return os.path.exists(os.path.join(WEIGHTS_DIR, "model.safetensors"))
