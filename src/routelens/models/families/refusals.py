"""Model types with a routed MoE block that routelens refuses, each with the one thing that
stands in the way (issue 29). Loading one raises a `RouteLensError` with its reason in one
line (`refuse`, called by `routelens.models.loading` before any weight is read);
scripts/moe_families.py states the same reasons in docs/moe-families.md.

Examples:
    >>> from routelens.models.families.refusals import REFUSED
    >>> "causal" in REFUSED["doge"]
    True
"""

from __future__ import annotations

from routelens.errors import RouteLensError

REFUSED: dict[str, str] = {
    # issue 29 (group A)
    "axk1": "AXK1MoE normalises its output (post_mlp_layernorm over the experts' sum plus the shared experts) inside "
            "the block, so a route's block output is not the standard one plus the experts' weighted difference, the "
            "algebra the fast engine scores routes by (it needs a declared block-output norm)",
    "gemma4": "Gemma4's routed experts sit on the decoder layer beside its dense MLP: their sum passes "
              "post_feedforward_layernorm_2, joins the normed dense-MLP output, and that sum passes "
              "post_feedforward_layernorm before the residual add, a nested norm the fast engine's route algebra "
              "(residual + block + a parallel MLP, one output norm) cannot express",
    "doge": "DogeCDMoE routes inline from one [B, S, 2*sqrt(E)] product-key projection (no router module returns a "
            "route to replace) and splits it with view(2, B*S, -1), which pairs halves of different tokens, so in a "
            "full forward a token's route depends on later tokens: no per-token route override can be exact",
    "dbrx": "DbrxRouter returns only the [N, E] logits and DbrxFFN takes the top-k in its own route_tokens_to_experts, "
            "so no router module returns a route that a hook can replace; forcing one would mean patching the block",
    # issue 29 (group C)
    "zaya": "ZAYA's router reads the router state of the MoE layer below (prev_router_hidden_states, handed from "
            "decoder layer to decoder layer beside the hidden states, outside the cache and the layer's keyword "
            "arguments), which routelens' engines do not carry when they re-run the layers above a forced route "
            "(the fast engine's suffix, the cache engine, the isolation scorer): only whole forwards would be exact",
}


def refuse(model_type: str) -> None:
    """Raise the one-line refusal of `model_type`, if routelens refuses it."""
    if model_type in REFUSED:
        raise RouteLensError(f"routelens does not serve model type {model_type!r}: {REFUSED[model_type]}")
