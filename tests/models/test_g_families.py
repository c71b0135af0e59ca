"""Issue 29, group g: Mistral 4 (mistral4, and the multimodal Mistral Small 4 checkpoint,
mistral3) and Mistral Large 4 (mistral_large4), each against the model's own HF forward.

- mistral4: transformers' AutoModelForCausalLM does not map it; the family declares its
  causal-LM class, and a saved text-only checkpoint loads through it; its router (softmax,
  top-2-sum groups, no bias) is the gate routelens computes; Llama 4's position-dependent
  query scale is on in the tiny model and the fast engine is exact under it.
- mistral3: the multimodal Mistral Small 4 checkpoint, served through its Mistral 4 text model
  (the tower's logits are the full model's); a mistral3 checkpoint around a dense text model
  is refused in one line.
- mistral_large4: DSA (`routelens.models.families.dsa`): its attention holds an `indexer`
  applied only under the implementation names "eager"/"sdpa" (the contract `OwnAttention`
  keeps), really sparse on the tests' sequences; shared top-k layers and latent KV shared
  between layers follow each run (`chain_shared_topk`, `chain_shared_kv`): the cache engine
  and the whole-sequence scorer equal the model's own forward at every MoE layer; the tower
  soft-caps its logits as the full model does.
"""

import inspect
import json

import numpy as np
import pytest
import torch
from test_b_families import _standard_and_other_routes  # per position: standard, k lowest logits, standard
from transformers import AutoConfig, AutoModelForCausalLM, Mistral4ForCausalLM

from routelens.engine import CacheEngine, FastEngine, ReferenceEngine
from routelens.engine.items import ScoreItem
from routelens.engine.whole_sequence import WholeSequenceScorer
from routelens.errors import RouteLensError
from routelens.models import adapter_for
from routelens.models.families.dsa import INDEXED_ATTENTION, OwnAttention
from routelens.models.loading import load_model
from routelens.models.registry import adapter_class
from routelens.models.routing import RouteOverride, override_routes
from routelens.models.tiny import TINY_VOCAB, build_tiny_model, tiny_config
from routelens.verify import verify_model


def _ids(seed: int, length: int = 16) -> torch.Tensor:
    return torch.randint(3, TINY_VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- mistral4
def test_mistral4_is_built_by_the_causal_lm_class_its_family_declares():
    with pytest.raises(ValueError):   # why the family declares it: the auto class does not map the type
        AutoModelForCausalLM.from_config(tiny_config("mistral4"))
    assert adapter_class("mistral4").causal_lm_class() is Mistral4ForCausalLM
    assert adapter_class("olmoe").causal_lm_class() is AutoModelForCausalLM   # the default is unchanged
    assert type(build_tiny_model("mistral4")) is Mistral4ForCausalLM


def test_a_saved_text_only_mistral4_checkpoint_loads_from_its_folder(tmp_path):
    model = build_tiny_model("mistral4", seed=1)
    model.save_pretrained(tmp_path)
    assert json.load(open(tmp_path / "config.json"))["model_type"] == "mistral4"
    loaded = load_model(str(tmp_path), device="cpu")
    assert type(loaded.adapter.model) is Mistral4ForCausalLM and not hasattr(loaded.adapter.model, "tower_of")
    ids = _ids(0)[None]
    with torch.no_grad():
        torch.testing.assert_close(loaded.adapter.model(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    structure = load_model(str(tmp_path), device="cpu", weights=False)   # a Ray driver's: the same class, no weight
    assert type(structure.adapter.model) is Mistral4ForCausalLM
    assert next(structure.adapter.model.parameters()).device.type == "meta"
    table = verify_model(loaded, length=12)
    assert (table["status"] == "pass").all(), table[table["status"] != "pass"].to_string()


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_the_mistral4_router_is_the_gate_routelens_computes(norm_topk_prob):
    """softmax scores, experts chosen within the top-2-sum groups, weights / (sum + 1e-20) if
    norm_topk_prob, x routed_scaling_factor; the groups really bind on these tokens."""
    adapter = adapter_for(build_tiny_model("mistral4", norm_topk_prob=norm_topk_prob))
    layer = adapter.moe_layers[0]
    router = adapter.routers[layer]
    hidden = torch.randn(256, adapter.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, weights, experts = router(hidden)
    torch.testing.assert_close(adapter.weights_for(logits, experts), weights.float(), rtol=1e-6, atol=1e-6)
    chosen = adapter.selection_scores(logits, layer).topk(adapter.top_k, dim=-1).indices
    assert torch.equal(chosen.sort(-1).values, experts.sort(-1).values)
    unlimited = torch.softmax(logits, -1).topk(adapter.top_k, dim=-1).indices
    assert not torch.equal(unlimited.sort(-1).values, experts.sort(-1).values)   # groups change some choices
    if norm_topk_prob:
        torch.testing.assert_close(weights.sum(-1), torch.full((256,), adapter.config.routed_scaling_factor))


def test_mistral4_query_scale_by_position_is_on_and_the_fast_engine_is_exact_under_it():
    model = build_tiny_model("mistral4")
    unscaled = build_tiny_model("mistral4", rope_parameters={**model.config.rope_parameters, "llama_4_scaling_beta": 0.0})
    ids = _ids(1)
    with torch.no_grad():
        assert (model(ids[None]).logits[0, 4:] - unscaled(ids[None]).logits[0, 4:]).abs().max() > 1e-4
    adapter = adapter_for(model)
    positions = [3, 7, 11, 14]
    for layer in adapter.moe_layers[:2]:
        item = ScoreItem(ids, np.array(positions), *_standard_and_other_routes(adapter, ids, positions, layer))
        engine = FastEngine(adapter)
        fast = engine.score_batch(layer, [item])[0]
        reference = ReferenceEngine(adapter).score_batch(layer, [item])[0]
        assert engine.fallback_reason is None and not engine.cache_layers
        assert np.abs(fast - reference).max() < 1e-5
        assert np.abs(fast[:, 1] - fast[:, 0]).max() > 1e-4


# ---------------------------------------------------------------------------------------------- mistral3
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny multimodal checkpoints saved as their conditional-generation classes save them."""
    folders = {}
    for model_type in ("mistral3", "mistral_large4"):
        folder = tmp_path_factory.mktemp(model_type)
        build_tiny_model(model_type, seed=2).full_model.save_pretrained(folder)
        folders[model_type] = str(folder)
    return folders


@pytest.mark.parametrize("model_type, full_class", [("mistral3", "Mistral3ForConditionalGeneration"),
                                                    ("mistral_large4", "MistralLarge4ForConditionalGeneration")])
def test_a_saved_multimodal_checkpoint_serves_its_text_tower_with_the_full_models_logits(saved, model_type, full_class):
    folder = saved[model_type]
    config = json.load(open(f"{folder}/config.json"))
    assert config["model_type"] == model_type
    loaded = load_model(folder, device="cpu")
    tower = loaded.adapter.model
    assert type(tower.full_model).__name__ == full_class and tower.tower_of == model_type
    assert loaded.adapter.base_model is tower.full_model.model.language_model
    ids = torch.stack([_ids(3), _ids(4)])
    with torch.no_grad():
        full = tower.full_model(input_ids=ids).logits
        assert torch.equal(tower(ids).logits, full)
        final = loaded.adapter.base_model(ids).last_hidden_state   # final-normed
        torch.testing.assert_close(loaded.adapter.logits(final), full, rtol=0, atol=1e-6)   # the engines' read-out
    with pytest.raises(RouteLensError, match="image"):
        tower(torch.tensor([[3, tower.full_model.config.image_token_id]]))


def test_the_mistral3_tower_is_mistral4(saved):
    adapter = load_model(saved["mistral3"], device="cpu").adapter
    assert adapter.config.model_type == "mistral4" and type(adapter.base_model).__name__ == "Mistral4Model"
    assert adapter.gate == adapter_class("mistral4").gate


def test_a_mistral3_checkpoint_around_a_dense_text_model_is_refused_in_one_line(tmp_path):
    from transformers import Mistral3ForConditionalGeneration

    config = AutoConfig.for_model("mistral3", text_config=dict(
        model_type="mistral", vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8), vision_config=tiny_config("mistral3").vision_config,
        image_token_index=TINY_VOCAB)
    Mistral3ForConditionalGeneration(config).save_pretrained(tmp_path)
    built = []
    original = Mistral3ForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        built.append(cls.__name__)
        return original(cls, *args, **kwargs)

    Mistral3ForConditionalGeneration.from_pretrained = classmethod(spy)
    try:
        with pytest.raises(RouteLensError, match="text model is 'mistral', not Mistral 4's MoE") as error:
            load_model(str(tmp_path), device="cpu")
    finally:
        Mistral3ForConditionalGeneration.from_pretrained = classmethod(original)
    assert "\n" not in str(error.value) and "no router to audit" in str(error.value)
    assert built == []   # refused from the config, before any weight is read


# ---------------------------------------------------------------------------------------------- mistral_large4
def test_mistral_large4_attention_follows_the_dsa_contract():
    """Each layer's attention holds an indexer (or reuses the layer below's top-k), and applies
    its mask only under the implementation names "eager"/"sdpa" (what `OwnAttention` keeps
    under the fast engine's wrapper); every layer is declared indexed."""
    from transformers.models.mistral_large4 import modeling_mistral_large4 as modeling

    source = inspect.getsource(modeling.MistralLarge4TextAttention.forward)
    assert 'self.config._attn_implementation in ("eager", "sdpa")' in source
    adapter = adapter_for(build_tiny_model("mistral_large4"))
    types = adapter.config.indexer_types
    for index, layer in enumerate(adapter.decoder_layers):
        attention = layer.self_attn
        assert (attention.indexer is None) == attention.skip_topk == (types[index] == "shared")
        assert isinstance(attention.config, OwnAttention)
        assert adapter.layer_kind(index) == INDEXED_ATTENTION
    engine, ids = FastEngine(adapter), _ids(2)
    with torch.no_grad(), engine._wrapped_attention():
        assert adapter.config._attn_implementation.startswith("routelens_")
        assert adapter.decoder_layers[0].self_attn.config._attn_implementation == "sdpa"
        wrapped = adapter.model(ids[None]).logits
    with torch.no_grad():
        assert (wrapped - adapter.model(ids[None]).logits).abs().max() < 1e-6
    assert [layer for layer in adapter.moe_layers if not engine.unpatchable(layer)] == [adapter.moe_layers[-1]]


def test_the_mistral_large4_indexer_is_really_sparse_on_the_test_sequences():
    model = build_tiny_model("mistral_large4")
    assert model.config.index_topk == 4
    picked = {}
    indexer = model.model.layers[1].self_attn.indexer
    handle = indexer.register_forward_hook(lambda module, args, out: picked.__setitem__("topk", out))
    ids = _ids(0)[None]
    with torch.no_grad():
        sparse = model(ids).logits
    handle.remove()
    assert picked["topk"].shape[-1] == 4 < ids.shape[1]   # the last query attends to 4 of its 16 keys
    with torch.no_grad():
        dense = build_tiny_model("mistral_large4", index_topk=64)(ids).logits
    assert (sparse - dense).abs().max() > 1e-3


def test_mistral_large4_cache_and_fast_engines_equal_the_reference_at_every_moe_layer():
    """Layers 2 and 4 reuse the latent KV of layers 1 and 3 and the top-k of the layer below:
    a run from layer 2 up must see layer 1's KV (the model's one dict ends the natural step
    holding layer 3's), and each chunk of routes its own; the cache engine runs one route per
    chunk here, so a stale dict would show."""
    model = build_tiny_model("mistral_large4")
    ids = _ids(3)
    with torch.no_grad():
        before = model(ids[None]).logits
    adapter = adapter_for(model)
    assert model.config.kv_sharing_modes == [None, "store", "reuse", "store", "reuse", None]
    with torch.no_grad():
        assert torch.equal(model(ids[None]).logits, before)   # the chains are the identity on a forward
    positions = [4, 8, 12]
    for layer in adapter.moe_layers:
        item = ScoreItem(ids, np.array(positions), *_standard_and_other_routes(adapter, ids, positions, layer))
        engine = CacheEngine(adapter, route_chunk=1)
        cache = engine.score_batch(layer, [item])[0]
        reference = ReferenceEngine(adapter).score_batch(layer, [item])[0]
        assert engine.fallback_reason is None, engine.fallback_reason
        assert np.abs(cache - reference).max() < 1e-5, layer
        assert np.abs(cache[:, 1] - cache[:, 0]).max() > 1e-4
    fast_engine = FastEngine(adapter)
    last = adapter.moe_layers[-1]
    item = ScoreItem(ids, np.array(positions), *_standard_and_other_routes(adapter, ids, positions, last))
    fast = fast_engine.score_batch(last, [item])[0]
    assert fast_engine.fallback_reason is None and last not in fast_engine.cache_layers
    assert np.abs(fast - ReferenceEngine(adapter).score_batch(last, [item])[0]).max() < 1e-5


def test_mistral_large4_whole_sequence_scores_equal_forced_forwards_of_each_sequence():
    """The isolation scorer re-runs layers l.. on rows of a padded batch of two sequences: the
    shared KV is taken at each row's sequence, as it stood below l."""
    adapter = adapter_for(build_tiny_model("mistral_large4"))
    sequences = [_ids(5, 14), _ids(6, 10)]
    layer = 2
    scorer = WholeSequenceScorer(adapter)
    passes = scorer.natural_batch(sequences, [layer], [np.arange(2, len(s) - 1) for s in sequences])
    experts = [torch.full((1, len(s), adapter.top_k), 0, dtype=torch.long) + torch.arange(adapter.top_k)
               for s in sequences]
    weights = [torch.full((1, len(s), adapter.top_k), 1.0 / adapter.top_k) for s in sequences]
    scored = scorer.score_batch(passes, layer, experts, weights)   # the natural-route row checks itself
    for ids, natural, chosen, weighted, values in zip(sequences, passes, experts, weights, scored):
        override = RouteOverride(torch.arange(len(ids)), chosen[0], weighted[0])
        with torch.no_grad(), override_routes(adapter, {layer: override}):
            logits = adapter.model(ids[None]).logits[0]
        at = natural.positions.cpu()
        expected = torch.log_softmax(logits.double(), -1)[at, ids[at + 1]].numpy()
        assert np.abs(values[0] - expected).max() < 1e-5
