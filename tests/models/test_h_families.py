"""Issue 29, group H: DBRX (its block's own top-k step moved into the router, per instance; a
p-norm gate; q/k/v clamped before attention) and MiniMax-M3-VL (its text model through
`spec.Tower`; block-sparse attention picked by a lightning indexer, served through the DSA
contract). The shared battery runs on them through the registry; these tests check each
family's own mechanism against the model's own Hugging Face forward."""

import copy

import numpy as np
import pytest
import torch
from transformers.models.dbrx.modeling_dbrx import DbrxFFN, DbrxRouter

import routelens as rl
from routelens.engine import FastEngine, ReferenceEngine, ScoreItem
from routelens.models import adapter_for, capture_routes
from routelens.models.families.dbrx import DbrxRoutedFFN, DbrxRoutingRouter
from routelens.models.tiny import build_tiny_model

EXACT = 1e-5


def _ids(length=12, seed=0, batch=2):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- DBRX
def test_dbrx_routing_in_the_router_leaves_the_model_bit_for_bit_and_its_routes_are_the_blocks_own():
    untouched, model = build_tiny_model("dbrx"), build_tiny_model("dbrx")
    ids = _ids()
    with torch.no_grad():
        expected = untouched(ids, output_router_logits=True)
    assert type(untouched.transformer.blocks[0].ffn) is DbrxFFN   # building a tiny model patches nothing
    adapter = adapter_for(model)
    assert all(type(r) is DbrxRoutingRouter and isinstance(r, DbrxRouter) for r in adapter.routers.values())
    assert type(adapter.moe_block(0)) is DbrxRoutedFFN
    assert adapter_for(model).routers[1] is adapter.routers[1]   # a second adapter patches nothing more
    with torch.no_grad(), capture_routes(adapter) as captured:
        actual = model(ids, output_router_logits=True)
    assert torch.equal(actual.logits, expected.logits)
    for layer, route in captured.items():
        logits = expected.router_logits[layer]   # the untouched model's recorder: its router's logits
        weights, experts = untouched.transformer.blocks[layer].ffn.route_tokens_to_experts(logits)
        assert torch.equal(route.logits, logits) and torch.equal(route.experts, experts)
        assert torch.equal(route.weights, weights)
    # the patched classes survive a deep copy (a graft's or a Ray actor's model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, expected.logits)


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, None])
def test_dbrx_gate_is_the_blocks_p_norm(p):
    model = build_tiny_model("dbrx", ffn_config=dict(ffn_hidden_size=24, moe_num_experts=8, moe_top_k=3,
                                                     moe_normalize_expert_weights=p))
    block = model.transformer.blocks[0].ffn
    adapter = adapter_for(model)
    logits = torch.randn(40, 8, generator=torch.Generator().manual_seed(1)) * 2
    weights, experts = DbrxFFN.route_tokens_to_experts(block, logits)
    torch.testing.assert_close(adapter.weights_for(logits, experts), weights, atol=1e-7, rtol=1e-6)
    if p is None:
        assert torch.allclose(weights, torch.softmax(logits, -1).gather(1, experts))
    else:
        assert torch.allclose(weights.norm(p=p, dim=-1), torch.ones(40))
    # any other expert set too (a counterfactual route's weights)
    others = torch.stack([torch.randperm(8, generator=torch.Generator().manual_seed(i))[:3] for i in range(40)])
    chosen = torch.softmax(logits, -1).gather(1, others)
    expected = chosen if p is None else chosen / chosen.norm(p=p, dim=-1, keepdim=True)
    torch.testing.assert_close(adapter.weights_for(logits, others), expected)


def test_dbrx_forced_route_equals_the_untouched_model_with_its_blocks_route_replaced():
    """A second mechanism: the untouched Hugging Face model whose block's own
    route_tokens_to_experts is replaced on the instance, against `Lens.force` (router hook)
    and the reference engine on the adapted model."""
    untouched, model = build_tiny_model("dbrx", seed=2), build_tiny_model("dbrx", seed=2)
    lens = rl.wrap(model)
    ids = _ids(13, seed=4, batch=1)
    layer, position = 1, 8
    with torch.no_grad(), capture_routes(lens.adapter, [layer]) as captured:
        natural = model(ids).logits[0]
    standard = captured[layer].experts[position].tolist()
    others = [e for e in range(8) if e not in standard][:2]
    weights = lens.adapter.weights_for(captured[layer].logits[position][None], torch.tensor([others]))
    block = untouched.transformer.blocks[layer].ffn

    def replaced(logits):
        w, e = DbrxFFN.route_tokens_to_experts(block, logits)
        w, e = w.clone(), e.clone()
        w[position], e[position] = weights[0], torch.tensor(others)
        return w, e

    block.route_tokens_to_experts = replaced
    with torch.no_grad():
        expected = untouched(ids).logits[0]
        with lens.force(layer=layer, positions=[(0, position)], experts=[others]):
            forced = model(ids).logits[0]
    assert torch.equal(forced, expected)
    torch.testing.assert_close(forced[:position], natural[:position], atol=1e-6, rtol=0)   # batched experts' rounding
    assert (forced[position] - natural[position]).abs().max() > 1e-3
    target = ids[0, position + 1]
    scores = ReferenceEngine(lens.adapter).score(ids[0], position, layer, torch.tensor([standard, others]),
                                                 torch.cat([captured[layer].weights[position][None], weights]))
    assert abs(scores[1] - torch.log_softmax(expected[position].double(), -1)[target].item()) <= EXACT
    assert abs(scores[0] - scores[1]) > 1e-4


def test_dbrx_experts_view_and_expert_slices_are_the_models_own():
    adapter = adapter_for(build_tiny_model("dbrx"))
    glu = adapter.moe_block(2).experts.mlp
    slices = adapter.expert_tensors(2, 5)
    assert sorted(slices) == [f"transformer.blocks.2.ffn.experts.mlp.{n}" for n in ("v1", "w1", "w2")]
    for name, tensor in slices.items():
        full = getattr(glu, name.rsplit(".", 1)[1])
        assert tensor.shape == (24, 32) and torch.equal(tensor, full[5 * 24: 6 * 24])
        assert tensor.data_ptr() == full[5 * 24:].data_ptr()   # a view: a graft writes the parameter
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    w1, v1, w2 = slices[f"{adapter.module_name(glu)}.w1"], slices[f"{adapter.module_name(glu)}.v1"], \
        slices[f"{adapter.module_name(glu)}.w2"]
    manual = (torch.nn.functional.silu(x @ w1.T) * (x @ v1.T)) @ w2
    out = adapter.experts(2)(x, torch.full((4, 1), 5), torch.full((4, 1), 0.5))
    assert out.shape == (4, 32)
    torch.testing.assert_close(out, 0.5 * manual)


def test_dbrx_clamped_attention_is_patched_exactly_by_the_fast_engine():
    adapter = adapter_for(build_tiny_model("dbrx"))
    attention = adapter.decoder_layers[1].norm_attn_norm.attn
    seen = {}
    hook = attention.Wqkv.register_forward_hook(lambda m, a, o: seen.__setitem__("qkv", o))
    ids = torch.randint(3, 64, (15,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        adapter.model(ids[None])
    hook.remove()
    assert float((seen["qkv"].abs() > attention.clip_qkv).float().mean()) > 0.05   # the clamp bites
    positions = np.array([1, 6, 13])
    with torch.no_grad(), capture_routes(adapter, [0]) as captured:
        adapter.model(ids[None])
    route = captured[0]
    experts = torch.stack([torch.stack([route.experts[t], torch.tensor([0, 7]), torch.tensor([3, 4])])
                           for t in positions])
    weights = torch.stack([adapter.weights_for(route.logits[t].expand(3, -1), experts[i])
                           for i, t in enumerate(positions)])
    item = ScoreItem(ids, positions, experts, weights)
    fast = FastEngine(adapter)
    scored = fast.score_batch(0, [item])[0]
    assert fast.fallback_reason is None and not fast.cache_layers
    np.testing.assert_allclose(scored, ReferenceEngine(adapter).score_batch(0, [item])[0], atol=EXACT, rtol=0)


# ---------------------------------------------------------------------------- MiniMax-M3-VL
def _indexer_blocks(adapter, ids):
    """Per indexed layer, the key blocks each query keeps (a set per head and position): from
    one full forward, and from a token-by-token decode with the model's own cache."""
    layers = [i for i in range(adapter.num_layers) if adapter.decoder_layers[i].self_attn.indexer is not None]
    full, decoded = {}, {i: [] for i in layers}

    def sets(blocks):   # [1, H, S, k] -> [H][S] sets of kept blocks (-1: an unused slot)
        return [[frozenset(b for b in blocks[0, h, s].tolist() if b >= 0) for s in range(blocks.shape[2])]
                for h in range(blocks.shape[1])]

    def recorded(store):
        return [adapter.decoder_layers[i].self_attn.indexer.register_forward_hook(
            lambda m, a, o, i=i: store(i, o)) for i in layers]

    with torch.no_grad():
        hooks = recorded(lambda i, o: full.__setitem__(i, sets(o)))
        adapter.base_model(ids, use_cache=False)
        for hook in hooks:
            hook.remove()
        hooks = recorded(lambda i, o: decoded[i].append(sets(o)))
        cache = adapter.new_cache()
        for t in range(ids.shape[1]):
            adapter.base_model(ids[:, t: t + 1], past_key_values=cache, use_cache=True)
        for hook in hooks:
            hook.remove()
    steps = {i: [[decoded[i][t][h][0] for t in range(ids.shape[1])] for h in range(len(full[i]))] for i in layers}
    return full, steps


@pytest.mark.parametrize("overrides", [dict(), dict(index_block_size=3, index_topk_blocks=3, index_local_blocks=2),
                                       dict(index_block_size=1, index_topk_blocks=4, index_local_blocks=1)])
def test_minimax_m3_indexer_keeps_the_same_blocks_in_a_decode_step_as_in_the_full_forward(overrides):
    adapter = adapter_for(build_tiny_model("minimax_m3_vl", seed=1, **overrides))
    config = adapter.config
    for seed in range(3):
        ids = torch.randint(3, 64, (1, 30), generator=torch.Generator().manual_seed(seed))
        full, steps = _indexer_blocks(adapter, ids)
        assert full == steps
        for layer_blocks in full.values():   # sparse: late queries keep index_topk_blocks of many earlier blocks
            assert all(len(kept) == config.index_topk_blocks for kept in layer_blocks[0][20:])
            assert max(t // config.index_block_size for t in range(20, 30)) + 1 > config.index_topk_blocks


def test_minimax_m3_more_local_blocks_than_kept_ones_is_refused_in_one_line_as_its_forward_is_not_causal():
    from routelens.models.families.minimax_m3_vl import MiniMaxM3VLAdapter

    model = build_tiny_model("minimax_m3_vl", index_topk_blocks=1, index_local_blocks=2)
    ids = torch.randint(3, 64, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():   # the +inf ties: a position's output depends on how many tokens follow it
        whole, prefix = model(ids).logits[0, :12], model(ids[:, :12]).logits[0]
    assert (whole - prefix).abs().max() > 1e-3
    with pytest.raises(rl.RouteLensError) as error:
        MiniMaxM3VLAdapter(model)
    message = str(error.value)
    assert message.splitlines() == [message] and "index_local_blocks = 2 > index_topk_blocks = 1" in message
    # as served (one local block of 2 kept): a position's output does not depend on the tokens after it
    model = build_tiny_model("minimax_m3_vl")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits[0, :12], model(ids[:, :12]).logits[0], atol=1e-5, rtol=0)


def test_minimax_m3_sparse_layers_keep_their_mask_under_the_fast_engines_wrapper():
    from routelens.engine import attention

    adapter = adapter_for(build_tiny_model("minimax_m3_vl"))
    assert [adapter.layer_kind(i) for i in range(4)] == ["indexed_attention", "full_attention"] * 2
    ids = torch.randint(3, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    attention.register()
    with torch.no_grad():
        plain = adapter.model(ids).logits
        adapter.config._attn_implementation = "routelens_sdpa"
        try:
            wrapped = adapter.model(ids).logits
        finally:
            adapter.config._attn_implementation = "sdpa"
        indexer = type(adapter.decoder_layers[0].self_attn.indexer)
        original = indexer.build_block_mask
        indexer.build_block_mask = lambda self, blocks, mask, *args: mask   # every earlier key, as dense attention
        try:
            dense = adapter.model(ids).logits
        finally:
            indexer.build_block_mask = original
    assert torch.equal(wrapped, plain)
    assert (dense - plain).abs().max() > 1e-3   # the sparse mask matters at this length


@pytest.mark.parametrize("model_type", ["minimax_m3_vl", "minimax_m3_vl_text"])
def test_minimax_m3_fast_engine_serves_the_layers_above_every_sparse_one_and_the_cache_engine_the_rest(model_type):
    adapter = adapter_for(build_tiny_model(model_type, seed=4))
    assert type(adapter.model).__name__ == {"minimax_m3_vl": "MiniMaxM3SparseForConditionalGenerationTextTower",
                                            "minimax_m3_vl_text": "MiniMaxM3VLForCausalLM"}[model_type]
    ids = torch.randint(3, 64, (26,), generator=torch.Generator().manual_seed(5))
    positions = np.array([2, 9, 17, 24])
    fast = FastEngine(adapter)
    for layer in adapter.moe_layers:
        with torch.no_grad(), capture_routes(adapter, [layer]) as captured:
            adapter.model(ids[None])
        route = captured[layer]
        experts = torch.stack([torch.stack([route.experts[t], torch.tensor([0, 7]), torch.tensor([3, 5])])
                               for t in positions])
        weights = torch.stack([adapter.weights_for(route.logits[t].expand(3, -1), experts[i])
                               for i, t in enumerate(positions)])
        item = ScoreItem(ids, positions, experts, weights)
        reference = ReferenceEngine(adapter).score_batch(layer, [item])[0]
        with pytest.warns(UserWarning, match="indexed_attention") if layer == 1 else _no_warning():
            scored = fast.score_batch(layer, [item])[0]
        np.testing.assert_allclose(scored, reference, atol=EXACT, rtol=0)
        assert np.abs(scored[:, 1:] - scored[:, :1]).max() > 1e-4
    assert fast.fallback_reason is None and sorted(fast.cache_layers) == [1]   # layer 2 is indexed, layer 1 below it


def _no_warning():
    import contextlib
    import warnings

    @contextlib.contextmanager
    def context():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield
    return context()


def test_the_dbrx_memory_estimate_counts_its_experts():
    """The engines size their chunks by `activation_bytes`; DBRX keeps its experts' width in
    ffn_config (no top-level intermediate size), which the estimate must read."""
    from routelens.engine.readout import activation_bytes

    adapter = adapter_for(build_tiny_model("dbrx"))
    width = adapter.config.ffn_config.ffn_hidden_size
    assert adapter.expert_intermediate_size == width > 0
    assert activation_bytes(adapter, 10) == 4 * 10 * (12 * adapter.config.hidden_size + 3 * adapter.top_k * width)
