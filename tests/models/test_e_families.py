"""Issue 29, group e: the OCR checkpoints whose language model is DeepSeek-V2's MoE
(deepseek_ocr2, unlimited_ocr), served through their text model with image tokens absent.

Both are also in the registry, TINY_CONFIGS and TINY_TOWERS, so the per-family battery
(verify, fast == cache == reference, fuzzing, run-time checks) runs on their text towers.
Here: a saved checkpoint loads as its text tower and says so, the tower's logits are the
full model's, the image placeholder is refused, the router is the model's own rule under
both of its choice methods, and unlimited_ocr's reference sliding-window (R-SWA) cache:
the model's own cache windows tokens decoded after its prefill (so it would not reproduce
the forward routelens scores), the adapter's cache declares the whole text the reference
and decodes exactly that forward."""


import numpy as np
import pytest
import torch

from routelens.engine import CacheEngine, ReferenceEngine, ScoreItem
from routelens.models import adapter_for
from routelens.models.families.refusals import REFUSED
from routelens.models.registry import FAMILIES, adapter_class
from routelens.models.routing import capture_routes
from routelens.models.tiny import TINY_CONFIGS, TINY_TOWERS, build_tiny_model

TYPES = ["deepseek_ocr2", "unlimited_ocr"]
EXACT = 1e-5


def test_the_ocr_types_are_served_as_text_towers_not_refused():
    for model_type in TYPES:
        assert model_type in FAMILIES and model_type in TINY_CONFIGS and model_type in TINY_TOWERS
        assert model_type not in REFUSED
        tower = adapter_class(model_type).tower
        assert tower.auto_class == "AutoModelForImageTextToText" and tower.placeholders == ("image_token_id",)
        assert (tower.text_model, tower.lm_head) == ("model.language_model", "lm_head")


@pytest.mark.parametrize("model_type", TYPES)
def test_the_tiny_tower_builds_fast_with_a_tiny_vision_encoder(model_type):
    model = build_tiny_model(model_type)
    full = model.full_model
    vision = sum(p.numel() for p in full.model.vision_tower.parameters())
    assert vision < 30_000, vision   # 1-layer SAM and vision encoder: the text model dominates
    adapter = adapter_for(model)
    assert adapter.moe_layers == [1, 2, 3] and adapter.num_experts == 8 and adapter.top_k == 2
    assert type(adapter.base_model).__name__.endswith("TextModel")


# loading a saved checkpoint as its tower, its logits and the placeholder refusal: test_d_families.py
# runs those on every tower type (these two included)


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_the_gate_is_the_models_router_under_both_choice_methods(model_type, method):
    """The model's own router picks the experts the adapter's selection scores rank first, and
    weighs them as `weights_for` does (unrenormalised probabilities x routed_scaling_factor)."""
    # one group of 4 admitted, top-2 inside it (with topk_group >= k the groups never exclude a top-k expert)
    model = build_tiny_model(model_type, seed=1, topk_method=method, n_group=2, topk_group=1, routed_scaling_factor=2.0)
    adapter = adapter_for(model)
    ids = torch.randint(3, 60, (1, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), capture_routes(adapter, adapter.moe_layers) as captured:
        model(ids, use_cache=False)
    grouped_away = 0
    for layer in adapter.moe_layers:
        route = captured[layer]
        scores = adapter.selection_scores(route.logits, layer)
        chosen = torch.sort(route.experts, -1).values
        torch.testing.assert_close(torch.sort(scores.topk(adapter.top_k, -1).indices, -1).values, chosen)
        torch.testing.assert_close(adapter.weights_for(route.logits, route.experts), route.weights, rtol=0,
                                   atol=1e-6)
        probabilities = torch.softmax(route.logits.float(), -1)
        grouped_away += int((probabilities.topk(adapter.top_k, -1).indices.sort(-1).values != chosen).any(-1).sum())
    # group-limited choice does exclude a top-k expert somewhere (the test would not notice otherwise)
    assert (grouped_away > 0) == (method == "group_limited_greedy")


# ------------------------------------------------------------------ unlimited_ocr's R-SWA cache
def _decoded(adapter, ids, cache, prefix):
    """Log-probs of a prefix forward then token-by-token decoding through `cache` [1, T, V]."""
    with torch.no_grad():
        out = [adapter.model(ids[:, :prefix], past_key_values=cache, use_cache=True).logits]
        out += [adapter.model(ids[:, i: i + 1], past_key_values=cache, use_cache=True).logits
                for i in range(prefix, ids.shape[1])]
    return torch.log_softmax(torch.cat(out, 1), -1)


def test_unlimited_ocr_reference_sliding_layers_are_full_causal_in_a_forward_of_a_whole_text():
    adapter = adapter_for(build_tiny_model("unlimited_ocr"))
    config = adapter.config
    assert config.sliding_window == 4 and set(config.layer_types) == {"reference_sliding_attention"}
    assert all(adapter.layer_kind(i) == "full_attention" and adapter.attention_window(i) is None
               for i in range(adapter.num_layers))
    described = adapter.describe()
    assert described["attention_windows"] == {} and described["other_layer_kinds"] == {}
    assert "window 4" in described["reference_sliding_window"]
    # the mask the model builds over a whole text is causal: a later token changes no earlier logit,
    # and a token far beyond the window still moves the last one
    ids = torch.randint(3, 60, (1, 16), generator=torch.Generator().manual_seed(4))
    changed = ids.clone()
    changed[0, 1] = 3 if int(ids[0, 1]) != 3 else 4
    with torch.no_grad():
        logits, moved = adapter.model(ids).logits, adapter.model(changed).logits
    torch.testing.assert_close(logits[:, :1], moved[:, :1], rtol=0, atol=0)
    assert float((logits[:, -1] - moved[:, -1]).abs().max()) > 1e-4


def test_unlimited_ocr_cache_as_the_model_builds_it_windows_decoded_tokens_the_adapters_does_not():
    """Measured, not assumed: with the model's own R-SWA cache, tokens decoded more than
    sliding_window past the prefill lose the ones between, so decoding parts from the full
    forward; the adapter's cache (the whole text its reference) decodes the full forward."""
    from transformers import DynamicCache

    adapter = adapter_for(build_tiny_model("unlimited_ocr"))
    ids = torch.randint(3, 60, (1, 18), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = torch.log_softmax(adapter.model(ids).logits, -1)
    own = _decoded(adapter, ids, DynamicCache(config=adapter.config), prefix=3)
    assert type(DynamicCache(config=adapter.config).layers[0]).__name__ == "UnlimitedOcrDynamicReferenceSlidingWindowLayer"
    torch.testing.assert_close(own[:, :3 + 4], full[:, :3 + 4], rtol=0, atol=EXACT)   # within the window: the same
    assert float((own - full).abs().max()) > 1e-3                                     # past it: another computation
    ours = _decoded(adapter, ids, adapter.new_cache(), prefix=3)
    torch.testing.assert_close(ours, full, rtol=0, atol=EXACT)
    copied = adapter.copy_cache(adapter.new_cache(), 0, 2)   # a copy keeps the declaration
    assert all(layer.prefill_length == adapter.new_cache().layers[0].prefill_length for layer in copied.layers)


def _item(adapter, length, layer, positions, seed=6, routes=4):
    ids = torch.randint(3, 60, (length,), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), capture_routes(adapter, [layer]) as captured:
        adapter.model(ids[None], use_cache=False)
    route, generator = captured[layer], torch.Generator().manual_seed(seed)
    experts = torch.zeros(len(positions), routes, adapter.top_k, dtype=torch.long)
    weights = torch.zeros(len(positions), routes, adapter.top_k)
    for i, t in enumerate(positions):
        experts[i, 0] = route.experts[t]
        for r in range(1, routes):
            experts[i, r] = torch.randperm(adapter.num_experts, generator=generator)[: adapter.top_k]
        weights[i] = adapter.weights_for(route.logits[t].expand(routes, -1), experts[i])
    return ScoreItem(ids, np.array(positions), experts, weights)


@pytest.mark.parametrize("window", [2, 4])
def test_unlimited_ocr_cache_engine_equals_the_reference_far_past_the_window(window):
    adapter = adapter_for(build_tiny_model("unlimited_ocr", sliding_window=window))
    for layer in (adapter.moe_layers[0], adapter.moe_layers[-1]):
        item = _item(adapter, 20, layer, positions=[2, 9, 18])
        reference = ReferenceEngine(adapter).score_batch(layer, [item])[0]
        engine = CacheEngine(adapter)
        cached = engine.score_batch(layer, [item])[0]
        assert engine.fallback_reason is None
        np.testing.assert_allclose(cached, reference, atol=EXACT, rtol=0)
        assert np.abs(cached[:, 1:] - cached[:, :1]).max() > 1e-4   # the routes do move the scores


def test_unlimited_ocr_cache_engine_with_the_models_own_cache_would_be_caught(monkeypatch):
    """The cache engine's run-time check notices the windowed decode (so the adapter's cache is
    what keeps it exact, not luck of the scored positions)."""
    from transformers import DynamicCache

    adapter = adapter_for(build_tiny_model("unlimited_ocr"))
    layer = adapter.moe_layers[-1]
    item = _item(adapter, 20, layer, positions=[2, 18])
    reference = ReferenceEngine(adapter).score_batch(layer, [item])[0]
    monkeypatch.setattr(adapter, "new_cache", lambda: DynamicCache(config=adapter.config))
    engine = CacheEngine(adapter)
    with pytest.warns(UserWarning, match="cache engine check failed"):
        scored = engine.score_batch(layer, [item])[0]
    assert "standard route" in engine.fallback_reason
    np.testing.assert_allclose(scored, reference, atol=EXACT, rtol=0)
