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
