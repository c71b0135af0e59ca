"""Small valid configs of a family that vary the knobs its config class exposes and its
modeling code reads (issue 32): a user's checkpoint is such a variant of the one tiny
config per type the other tests use.

`fuzzed_overrides(model_type, seed)` draws one set of overrides on top of the family's
tiny config (`routelens.models.tiny`), from a seeded generator: the expert count and top-k
(with group limits kept consistent), shared experts on or off, where the MoE layers start
(dense layers first, `mlp_only_layers`, interleaving), `norm_topk_prob`, the routed
scaling factor, sliding windows shorter than the test sequence, tied embeddings and bias
terms. A knob is varied only where the family's config class takes it (its `__init__`
signature) or its tiny config sets it; aliases (num_experts / n_routed_experts / ...) are
set under the name the tiny config uses.
"""

from __future__ import annotations

import inspect
import random

from routelens.models.tiny import TINY_COMPOSITE, TINY_CONFIGS, tiny_config

# knob -> its spellings across families (the first one present is varied)
EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K = ("num_experts_per_tok", "num_experts_per_token", "moe_k", "moe_topk")
SHARED = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
GROUPS = ("n_group", "num_expert_group")
DENSE_FIRST = ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index")
RENORMALISE = ("norm_topk_prob", "moe_renormalize")
SCALE = ("routed_scaling_factor", "route_scale")
BOOLEANS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "qkv_bias")
WINDOWS = (2, 3, 5, 8)   # the verify sequence is 16 tokens: every window cuts it


def _knobs(model_type: str) -> set[str]:
    """The names the family's (text) config class takes, and those its tiny config sets."""
    config = tiny_config(model_type)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return set(inspect.signature(type(text).__init__).parameters) | set(TINY_CONFIGS[model_type])


def _spelling(names: tuple[str, ...], tiny: dict, knobs: set[str]) -> str | None:
    """The family's name of a knob: the tiny config's, else the config class's."""
    return next((n for n in names if n in tiny), None) or next((n for n in names if n in knobs), None)


def fuzzed_overrides(model_type: str, seed: int) -> dict:
    """One draw of config overrides for `model_type` (deterministic in `seed`)."""
    text_type = TINY_COMPOSITE.get(model_type, model_type)
    tiny, knobs = TINY_CONFIGS[text_type], _knobs(model_type)
    rng = random.Random(f"{model_type}-{seed}")
    out: dict = {}
    layers = tiny.get("num_hidden_layers", 4)
    experts_key, top_k_key = _spelling(EXPERTS, tiny, knobs), _spelling(TOP_K, tiny, knobs)
    groups_key = _spelling(GROUPS, tiny, knobs) if any(g in tiny for g in GROUPS) else None
    experts = rng.choice((4, 6, 8, 12))
    if groups_key:   # DeepSeek-style: groups of >= 2 experts, k within the admitted groups
        n_group = rng.choice([g for g in (1, 2, 4) if experts % g == 0 and experts // g >= 2])
        topk_group = rng.randint(1, n_group)
        admitted = topk_group * experts // n_group
        out.update({groups_key: n_group, "topk_group": topk_group})
    else:
        admitted = experts
    if experts_key and top_k_key:
        out[experts_key] = experts
        out[top_k_key] = rng.randint(1, min(4, admitted - 1))
    shared_key = _spelling(SHARED, tiny, knobs)
    if shared_key and shared_key in tiny:
        out[shared_key] = rng.choice((0, 1, 2))
    if "shared_expert_intermediate_size" in tiny:
        out["shared_expert_intermediate_size"] = rng.choice((16, 32))
    dense_key = _spelling(DENSE_FIRST, tiny, knobs)
    if "mlp_layer_types" in tiny:   # an explicit list decides which layers are dense
        first = rng.choice(("dense", "sparse"))
        out["mlp_layer_types"] = [first] + ["sparse"] * (layers - 1)
    elif dense_key and dense_key in tiny:
        out[dense_key] = rng.randint(0, layers - 2)
        if dense_key == "moe_layer_start_index":
            out["moe_layer_end_index"] = layers - 1
    if "mlp_only_layers" in knobs and "layer_types" not in tiny:
        out["mlp_only_layers"] = sorted(rng.sample(range(layers), rng.randint(0, layers - 2)))
    if "decoder_sparse_step" in knobs and "mlp_only_layers" not in out:
        out["decoder_sparse_step"] = rng.choice((1, 2)) if layers >= 4 else 1
    renorm_key = _spelling(RENORMALISE, tiny, knobs)
    if renorm_key:
        out[renorm_key] = rng.random() < 0.5
    scale_key = _spelling(SCALE, tiny, knobs)
    if scale_key and scale_key in tiny:
        out[scale_key] = round(rng.uniform(0.5, 3.0), 3)
    if "topk_method" in tiny:
        out["topk_method"] = rng.choice(("greedy", "group_limited_greedy"))
    if "sliding_window" in knobs and (tiny.get("sliding_window") or "layer_types" not in tiny):
        out["sliding_window"] = rng.choice(WINDOWS)
        if "use_sliding_window" in knobs:
            out["use_sliding_window"] = True
    for name in BOOLEANS:
        if name in knobs:
            out[name] = rng.random() < 0.5
    if "expert_layer_period" in tiny:   # Jamba: MoE on a stride
        period = rng.choice((1, 2))
        out.update(expert_layer_period=period, expert_layer_offset=rng.randint(0, period - 1))
    return out
