"""The cache engine (the model's own cache, routes decoded from the perturbed layer up)
against the reference engine, on every hybrid family and on attention families with
sliding windows; the fast engine handing it the layers it cannot patch; its run-time check."""

import warnings

import numpy as np
import pytest
import torch
from conftest import FAMILIES

from routelens.engine import CacheEngine, FastEngine, ReferenceEngine, ScoreItem, make_engine
from routelens.errors import RouteLensError
from routelens.models import adapter_for
from routelens.models.registry import FAMILIES as REGISTRY
from routelens.models.registry import adapter_class
from routelens.models.routing import capture_routes
from routelens.models.tiny import build_tiny_model

HYBRIDS = [family for family in FAMILIES if REGISTRY[family].mixers != "attention"]
EXACT = 1e-5


def sampled_routes(adapter, input_ids, layer, positions, num_routes=5, seed=0):
    """Route 0 the standard route, the rest random expert sets weighted by the gating rule."""
    with torch.no_grad(), capture_routes(adapter, [layer]) as captured:
        adapter.model(input_ids[None], use_cache=False)
    route = captured[layer]
    generator = torch.Generator().manual_seed(seed)
    experts = torch.zeros(len(positions), num_routes, adapter.top_k, dtype=torch.long)
    weights = torch.zeros(len(positions), num_routes, adapter.top_k)
    for i, t in enumerate(positions):
        experts[i, 0] = route.experts[t]
        for r in range(1, num_routes):
            experts[i, r] = torch.randperm(adapter.num_experts, generator=generator)[: adapter.top_k]
        weights[i] = adapter.weights_for(route.logits[t].expand(num_routes, -1), experts[i])
    return experts, weights


def item_for(adapter, length, layer, seed=3, positions=None):
    input_ids = torch.randint(3, adapter.config.vocab_size, (length,), generator=torch.Generator().manual_seed(seed))
    positions = np.array(positions if positions is not None else [0, 1, length // 2, length - 2])
    experts, weights = sampled_routes(adapter, input_ids, layer, positions)
    return ScoreItem(input_ids, positions, experts, weights)


def test_hybrid_families_are_in_the_registry():
    assert {"qwen3_next", "qwen3_5_moe", "kimi_linear", "minimax", "jamba", "lfm2_moe", "granitemoehybrid",
            "nemotron_h", "bailing_hybrid"} <= set(HYBRIDS)


# served by the cache engine: every hybrid but MiniMax (its adapter declares its cached path
# unusable, tested below), and attention families with sliding windows, sinks, MLA
CACHE_SERVED = [f for f in HYBRIDS if not adapter_class(f).cache_engine_defect] + [
    "gpt_oss", "exaone_moe", "deepseek_v3"]


@pytest.mark.parametrize("family", CACHE_SERVED)
def test_cache_engine_equals_reference_at_first_middle_last_moe_layer(family, tiny_adapters):
    adapter = tiny_adapters[family]
    moe = adapter.moe_layers
    tolerance = EXACT
    for length in (6, 13):   # 13 tokens: longer than every tiny sliding window (4) and conv kernel (3)
        for layer in sorted({moe[0], moe[len(moe) // 2], moe[-1]}):
            item = item_for(adapter, length, layer)
            reference = ReferenceEngine(adapter).score_batch(layer, [item])[0]
            engine = CacheEngine(adapter)
            cached = engine.score_batch(layer, [item])[0]
            assert engine.fallback_reason is None
            np.testing.assert_allclose(cached, reference, atol=tolerance, rtol=0,
                                       err_msg=f"{family} layer {layer} length {length}")
            # the alternatives do move the scores: the engine is not returning route 0 everywhere
            assert np.abs(cached[:, 1:] - cached[:, :1]).max() > 1e-4


@pytest.mark.parametrize("family", ["qwen3_next", "nemotron_h"])
def test_fast_engine_hands_unpatchable_layers_to_the_cache_engine_once(family, tiny_adapters):
    adapter = tiny_adapters[family]
    engine = FastEngine(adapter)
    below = [layer for layer in adapter.moe_layers if engine.unpatchable(layer)]
    top = adapter.moe_layers[-1]
    assert below and engine.unpatchable(top) is None   # nothing above the last layer: the patch serves it
    layer = below[0]
    item = item_for(adapter, 9, layer)
    with pytest.warns(UserWarning, match=f"scoring layer {layer} with the cache engine") as caught:
        first = engine.score_batch(layer, [item])[0]
        again = engine.score_batch(layer, [item])[0]
    assert sum("cache engine" in str(w.message) for w in caught) == 1          # said once
    assert layer in engine.cache_layers and engine.fallback_reason is None
    np.testing.assert_array_equal(first, again)
    reference = ReferenceEngine(adapter).score_batch(layer, [item])[0]
    np.testing.assert_allclose(first, reference, atol=EXACT, rtol=0)
    top_item = item_for(adapter, 9, top)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the patched fast path, no fallback, no cache engine
        fast = engine.score_batch(top, [top_item])[0]
    assert top not in engine.cache_layers
    np.testing.assert_allclose(fast, ReferenceEngine(adapter).score_batch(top, [top_item])[0], atol=EXACT, rtol=0)


def test_minimax_cached_path_differs_from_its_forward_so_the_cache_engine_is_not_used(tiny_adapters):
    """Measured, not assumed: MiniMax's own decode with its cache disagrees with its full
    forward; its adapter says so, and the fast engine's unpatchable layers go to the reference
    engine with that reason (and exact results)."""
    adapter = tiny_adapters["minimax"]
    input_ids = torch.randint(3, 60, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = torch.log_softmax(adapter.model(input_ids).logits, -1)
        cache = adapter.new_cache()
        decoded = torch.cat([torch.log_softmax(adapter.model(input_ids[:, i: i + 1], past_key_values=cache,
                                                             use_cache=True).logits, -1) for i in range(10)], 1)
    assert float((decoded - full).abs().max()) > 1e-3          # the model's own paths disagree
    engine = FastEngine(adapter)
    layer = next(layer for layer in adapter.moe_layers if engine.unpatchable(layer))
    item = item_for(adapter, 9, layer)
    with pytest.warns(UserWarning, match="cache engine cannot serve minimax.*lightning attention"):
        scored = engine.score_batch(layer, [item])[0]
    np.testing.assert_allclose(scored, ReferenceEngine(adapter).score_batch(layer, [item])[0], atol=1e-9, rtol=0)


def test_cache_engine_results_do_not_depend_on_route_chunking(tiny_adapters):
    adapter = tiny_adapters["jamba"]
    layer = adapter.moe_layers[1]
    item = item_for(adapter, 11, layer, positions=[3, 4, 9])
    one = CacheEngine(adapter, route_chunk=1).score_batch(layer, [item])[0]
    every = CacheEngine(adapter, route_chunk=64).score_batch(layer, [item])[0]
    np.testing.assert_allclose(one, every, atol=1e-6, rtol=0)


def test_cache_engine_scores_unordered_and_gapped_positions(tiny_adapters):
    adapter = tiny_adapters["qwen3_next"]
    layer = adapter.moe_layers[0]
    item = item_for(adapter, 12, layer, positions=[9, 2, 6])
    cached = CacheEngine(adapter).score_batch(layer, [item])[0]
    np.testing.assert_allclose(cached, ReferenceEngine(adapter).score_batch(layer, [item])[0], atol=EXACT, rtol=0)


def test_a_cache_copy_that_leaks_the_live_cache_is_caught_and_falls_back(tiny_adapters, monkeypatch):
    """A copy taken after the natural step sees token t twice: the standard route no longer
    matches the natural forward, and the engine says so and scores with the reference."""
    adapter = tiny_adapters["granitemoehybrid"]
    layer = adapter.moe_layers[0]
    item = item_for(adapter, 10, layer)
    reference = ReferenceEngine(adapter).score_batch(layer, [item])[0]
    monkeypatch.setattr(adapter, "expand_cache",   # copies the live cache, already past token t
                        lambda snapshot, first_layer, rows: adapter.copy_cache(snapshot.source, first_layer, rows))
    engine = CacheEngine(adapter)
    with pytest.warns(UserWarning, match="cache engine check failed"):
        scored = engine.score_batch(layer, [item])[0]
    assert "standard route" in engine.fallback_reason
    np.testing.assert_allclose(scored, reference, atol=EXACT, rtol=0)


def test_make_engine_falls_back_to_the_cache_engine(tiny_adapters, monkeypatch):
    adapter = tiny_adapters["nemotron_h"]
    monkeypatch.setattr(adapter.config, "moe_latent_size", 16, raising=False)
    with pytest.warns(UserWarning, match="latent space.*using the cache engine"):
        engine = make_engine("fast", adapter)
    assert isinstance(engine, CacheEngine)


def test_a_model_loaded_with_hub_kernels_is_refused_in_one_line():
    model = build_tiny_model("olmoe")
    model._use_kernels = True   # what from_pretrained(use_kernels=True) leaves on the model
    with pytest.raises(RouteLensError, match="use_kernels=True") as error:
        adapter_for(model)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["fast", "cache", "reference"])
def test_every_engine_implements_the_engine_contract_and_shares_its_deviation_record(tiny_adapters, name):
    from routelens.engine import Engine

    adapter = tiny_adapters["olmoe"]
    engine = make_engine(name, adapter)
    assert isinstance(engine, Engine)
    record = engine.check_record()
    assert set(record) == {"standard_route_max_abs_logprob_diff", "standard_route_mean_abs_logprob_diff",
                           "standard_route_tolerance", "standard_route_flagged_tokens", "standard_route_checked_tokens",
                           "engine_fallback", "cache_engine_layers", "cache_engine_fallback",
                           "fallback_seconds", "fallback_tokens", "max_fallback_time"}
    helpers = [getattr(engine, "cache", None), getattr(getattr(engine, "cache", engine), "reference", None)]
    for helper in filter(None, helpers):   # engines that hand work on record every route in one place
        assert helper.deviation is engine.deviation
    if name == "fast":   # and bound the time of what they hand on by one clock
        assert engine.cache.budget is engine.budget
