"""Model types with a routed MoE block that routelens refuses, each with the one thing that
stands in the way (issue 29). Loading one raises a `RouteLensError` with its reason in one
line (`refuse`, called by `routelens.models.loading` before any weight is read);
scripts/moe_families.py states the same reasons in docs/moe-families.md.

Examples:
    >>> from routelens.models.families.refusals import REFUSED
    >>> "causal trajectory" in REFUSED["switch_transformers"]
    True
"""

from __future__ import annotations

from routelens.errors import RouteLensError

_NOT_CAUSAL = "so a text has no causal trajectory to score"
_TOWER_TODO = "its text model is not adapted yet (routelens serves multimodal checkpoints through their text model)"

REFUSED: dict[str, str] = {
    # issue 29 (group D): not causal LMs, and multimodal checkpoints whose text model is not adapted
    "switch_transformers": "an encoder-decoder model: its decoder scores a token given an encoder input, " + _NOT_CAUSAL,
    "nllb-moe": "an encoder-decoder translation model: its decoder scores a token given an encoder input, " + _NOT_CAUSAL,
    "diffusion_gemma": "a block-diffusion model: its decoder denoises blocks of tokens with bidirectional attention "
                       "instead of predicting the next one, " + _NOT_CAUSAL,
    "openai_privacy_filter": "a bidirectional token classifier with no language-model head: there is no next-token "
                             "probability to score",
    "granite_docling": "its language model is dense: its only router (GraniteDoclingDensityRouter) weighs vision "
                       "features in the connector, so there is no routed expert to audit",
    "ernie4_5_vl_moe": "each MoE layer holds two routers (text and vision experts, chosen per token by modality) and "
                       "the model records the block, not a router, as its router; " + _TOWER_TODO,
    "glm5_next": "its text model mixes several residual streams per layer (hyper-connections) and has linear-attention "
                 "and indexer-attention layers; " + _TOWER_TODO,
    "inkling_mm_model": "its router returns a fourth output, per-token gains of the shared experts, and its attention "
                        "adds relative-position logits; " + _TOWER_TODO,
    "inkling2": "its text model has short-convolution, sliding and full layers with a block attention residual and "
                "soft-capped SwiGLU activations; " + _TOWER_TODO,
    "muse_spark": "its decoder layers gate the attention output's residual add (MuseSparkResidualGate); " + _TOWER_TODO,
    # issue 29 (group B)
    "hy_v4": "hyper-connections: each layer reads and writes several residual streams ([B, S, hc, d]) mixed by "
             "learned weights, while the engines carry one residual stream; plus indexed (DSA) attention",
    "deepseek_v4": "hyper-connections (several residual streams per layer, [B, S, hc, d]) the engines' single residual "
                   "stream cannot carry, compressed attention kinds, and hash routing by token id in its first layers",
    "qwen4_exp": "hyper-connections ([B, S, hc * d]: several residual streams per layer) the engines' single residual "
                 "stream cannot carry, beside linear-attention and indexed-attention layers",
    "dots3_note": "its indexer's float32 cached decode parts from the full forward at near-ties of indexer scores "
                  "(1.6e-3 nats on a fuzzed config), so the cache engine that serves the layers below an indexed one is "
                  "not exact on every config yet",
    # issue 29 (group A)
    "gemma4": "Gemma4 has no MoE block module: its router and experts sit on the decoder layer itself, the router "
              "reading the residual and the experts pre_feedforward_layernorm_2 of it, their sum normed "
              "(post_feedforward_layernorm_2) and added to the normed dense MLP's output before a further norm, "
              "plus per-layer inputs and a layer scalar; the engines need a block module to hook and its output to "
              "form routes from",
    "doge": "DogeCDMoE routes inline from one [B, S, 2*sqrt(E)] product-key projection (no router module returns a "
            "route to replace) and splits it with view(2, B*S, -1), which pairs halves of different tokens, so in a "
            "full forward a token's route depends on later tokens: no per-token route override can be exact",
    # issue 29 (group C)
    "zaya": "ZAYA's router reads the router state of the MoE layer below (prev_router_hidden_states, handed from "
            "decoder layer to decoder layer beside the hidden states, outside the cache and the layer's keyword "
            "arguments), which routelens' engines do not carry when they re-run the layers above a forced route "
            "(the fast engine's suffix, the cache engine, the isolation scorer): only whole forwards would be exact",
}


def refuse(model_type: str) -> None:
    """Raise the one-line refusal of `model_type`, if routelens refuses it (and no family was
    registered for it since)."""
    from routelens.models.registry import FAMILIES

    if model_type in REFUSED and model_type not in FAMILIES:
        raise RouteLensError(f"routelens does not serve model type {model_type!r}: {REFUSED[model_type]}")


def markdown_table() -> str:
    """The refused model types and what stands in the way of each, as docs/families.md lists
    them (between its `refusals:begin` and `refusals:end` markers; scripts/families_doc.py)."""
    rows = ["| model type | what stands in the way |", "| --- | --- |"]
    rows += [f"| `{model_type}` | {REFUSED[model_type]} |" for model_type in sorted(REFUSED)]
    return "\n".join(rows) + "\n"
