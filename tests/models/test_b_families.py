"""Issue 29, group B: sparse attention picked by an indexer (DSA) beside the router.

What the family contract claims for an indexed layer (`routelens.models.families.dsa`), each
checked here on the tiny models (the per-family battery runs the rest: verify, fast == cache
== reference at the first, middle and last MoE layer, config fuzzing):

- the tiny models are really sparse: the indexer drops keys on the test sequences;
- indexed layers are declared (`layer_kind`), and the fast engine hands every MoE layer with
  an indexed layer above it to the cache engine, saying so, and serves the others;
- the cache engine is exact because the model's own cached decode is: decoding token by
  token with the cache equals the full forward (float64);
- under the fast engine's wrapped attention an indexed layer still applies its mask (the
  model's own attention, `OwnAttention`): its natural pass is the model's forward;
- GLM-5's shared top-k layers get the top-k of the layer below in the same run
  (`chain_shared_topk`): the identity for a plain forward, and exact for routes run from a
  layer up on a batch.
"""

import warnings

import numpy as np
import pytest
import torch

from routelens.engine import CacheEngine, FastEngine, ReferenceEngine
from routelens.engine.items import ScoreItem
from routelens.models import adapter_for
from routelens.models.families.dsa import INDEXED_ATTENTION, OwnAttention
from routelens.models.registry import FAMILIES
from routelens.models.tiny import build_tiny_model

DSA = [t for t in ("deepseek_v32", "glm_moe_dsa", "axk2", "dots3_note", "dots3_note_text") if t in FAMILIES]


def _ids(seed: int, length: int = 16) -> torch.Tensor:
    return torch.randint(3, 64, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", DSA)
def test_the_tiny_indexer_drops_keys(model_type):
    """index_topk (4) is below the test sequence's length, so the mask is sparse: widening it
    to every key changes the logits."""
    sparse = build_tiny_model(model_type)
    dense = build_tiny_model(model_type, index_topk=64)
    ids = _ids(0)[None]
    with torch.no_grad():
        assert (sparse(ids).logits - dense(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("model_type", DSA)
def test_indexed_layers_are_declared_and_handed_to_the_cache_engine(model_type):
    adapter = adapter_for(build_tiny_model(model_type))
    kinds = [adapter.layer_kind(i) for i in range(adapter.num_layers)]
    assert INDEXED_ATTENTION in kinds
    assert adapter.describe()["other_layer_kinds"] == {i: k for i, k in enumerate(kinds) if k == INDEXED_ATTENTION}
    engine = FastEngine(adapter)
    for layer in adapter.moe_layers:
        above = set(kinds[layer + 1:])
        assert bool(engine.unpatchable(layer)) == (INDEXED_ATTENTION in above), (layer, kinds)
    item = ScoreItem(_ids(1), np.array([5, 9]), *_standard_and_other_routes(adapter, _ids(1), [5, 9], adapter.moe_layers[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.score_batch(adapter.moe_layers[0], [item])
    assert adapter.moe_layers[0] in engine.cache_layers
    assert any("indexed_attention" in str(w.message) and "cache engine" in str(w.message) for w in caught)
    assert engine.fallback_reason is None and engine.cache.fallback_reason is None


@pytest.mark.parametrize("model_type", DSA + ["mistral_large4"])   # Mistral Large 4's indexer too (group g)
def test_the_cached_decode_equals_the_full_forward(model_type):
    """The cache engine decodes with the model's own cache (the indexer's key cache with it):
    exact only if that decode is; measured in float64 (the rotary tables stay float32: ~3e-8;
    a key picked differently by the indexer moves the logits by ~1e-2)."""
    model = build_tiny_model(model_type).double()
    model.set_experts_implementation("eager")
    for seed in range(3):
        ids = _ids(seed)[None]
        with torch.no_grad():
            full = model(ids).logits[0]
            out = model(ids[:, :3], use_cache=True)
            steps, cache = [out.logits[0]], out.past_key_values
            for t in range(3, ids.shape[1]):
                out = model(ids[:, t: t + 1], past_key_values=cache, use_cache=True)
                steps.append(out.logits[0])
        assert (full - torch.cat(steps)).abs().max() < 1e-6


@pytest.mark.parametrize("model_type", DSA)
def test_indexed_attention_keeps_its_mask_under_the_fast_engine(model_type):
    """The fast engine's natural pass (wrapped attention) is the model's own forward, the
    indexer's mask applied: its log-probs equal the plain forward's."""
    adapter = adapter_for(build_tiny_model(model_type))
    indexed = [i for i in range(adapter.num_layers) if adapter.layer_kind(i) == INDEXED_ATTENTION]
    assert all(isinstance(adapter.decoder_layers[i].self_attn.config, OwnAttention) for i in indexed)
    engine, ids = FastEngine(adapter), _ids(2)
    with torch.no_grad(), engine._wrapped_attention():
        assert adapter.config._attn_implementation.startswith("routelens_")
        assert adapter.decoder_layers[indexed[0]].self_attn.config._attn_implementation in ("sdpa", "eager")
        wrapped = adapter.model(ids[None]).logits
    with torch.no_grad():
        plain = adapter.model(ids[None]).logits
    assert (wrapped - plain).abs().max() < 1e-6
    assert adapter_for(adapter.model).decoder_layers[indexed[0]].self_attn.config.__class__ is OwnAttention   # once


def _standard_and_other_routes(adapter, ids, positions, layer):
    from routelens.models.routing import capture_routes

    with torch.no_grad(), capture_routes(adapter, [layer]) as captured:
        adapter.model(ids[None])
    out = captured[layer]
    experts, weights = [], []
    for t in positions:
        standard = out.experts[t].sort().values
        other = out.logits[t].argsort()[: adapter.top_k].sort().values   # the k lowest logits
        logits = out.logits[t][None]
        experts.append(torch.stack([standard, other, standard]))
        weights.append(torch.cat([adapter.weights_for(logits, standard[None]), adapter.weights_for(logits, other[None]),
                                  adapter.weights_for(logits, standard[None])]))
    return torch.stack(experts), torch.stack(weights)


@pytest.mark.skipif("glm_moe_dsa" not in FAMILIES, reason="glm_moe_dsa not served")
def test_glm_shared_top_k_follows_the_layer_below_in_the_same_run():
    """Layers 2 and 4 of the tiny GLM-5 reuse the top-k of the layer below. The cache engine
    re-runs layers l.. on a batch of routes: each shared layer must see the perturbed top-k of
    its layer below (not the natural one of the recorded arguments), so the cache engine
    equals the reference engine at every MoE layer; a plain forward is unchanged."""
    model = build_tiny_model("glm_moe_dsa")
    ids = _ids(3)
    with torch.no_grad():
        before = model(ids[None]).logits
    adapter = adapter_for(model)
    assert model.config.indexer_types == ["full", "full", "shared", "full", "shared"]
    with torch.no_grad():
        assert torch.equal(model(ids[None]).logits, before)
    positions = [4, 8, 12]
    for layer in adapter.moe_layers:
        experts, weights = _standard_and_other_routes(adapter, ids, positions, layer)
        item = ScoreItem(ids, np.array(positions), experts, weights)
        cache = CacheEngine(adapter).score_batch(layer, [item])[0]
        reference = ReferenceEngine(adapter).score_batch(layer, [item])[0]
        assert np.abs(cache - reference).max() < 1e-5, layer
        assert np.abs(cache[:, 1] - cache[:, 0]).max() > 1e-4   # the other route moves the score
