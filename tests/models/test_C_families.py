"""Issue 29, group C: routers with output layouts of their own, mapped once in the family
contract (`MoEAdapter.route_of` / `router_output`): Llama 4 (dense input-scaling scores, MoE
layers on a stride, chunked attention), LongCat-Flash (zero-computation identity experts,
adaptive expert counts, two attention and two MLP sublayers per layer) and JetMoE (sorted
dispatch; attention routed by a router of its own). The shared battery runs on them through
the registry; these tests cover what is particular to each."""

import numpy as np
import pytest
import torch

from routelens.engine import CacheEngine, FastEngine, ReferenceEngine, ScoreItem
from routelens.errors import RouteLensError
from routelens.models import RouteOverride, adapter_for, capture_routes, override_routes
from routelens.models.tiny import build_tiny_model

GROUP_C = ["llama4", "llama4_text", "longcat_flash", "jetmoe"]
EXACT = 1e-5


def _ids(length=12, seed=0, batch=2):
    return torch.randint(3, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def _natural(adapter, ids):
    raw = {}
    hooks = [router.register_forward_hook(lambda m, a, o, layer=layer: raw.__setitem__(layer, o))
             for layer, router in adapter.routers.items()]
    try:
        with torch.no_grad(), capture_routes(adapter) as captured:
            logits = adapter.model(ids).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, captured, raw


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("family", GROUP_C)
def test_the_layout_mapping_reads_the_standard_route_and_writes_it_back_bit_for_bit(family):
    adapter = adapter_for(build_tiny_model(family))
    _, captured, raw = _natural(adapter, _ids())
    for output in raw.values():
        logits, weights, experts = adapter.route_of(output)
        assert logits.shape[-1] == adapter.num_experts and experts.shape == weights.shape == (24, adapter.top_k)
        written = adapter.router_output(output, (logits, weights, experts))
        assert _same(adapter.route_of(written), (logits, weights, experts))
        if family != "jetmoe":   # JetMoE's own (unstable) sort may order one expert's slots otherwise: same sums
            assert _same(written, output)
        torch.testing.assert_close(adapter.weights_for(logits, experts), weights.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", GROUP_C)
def test_a_forced_route_equals_replacing_the_router_module(family):
    """A second mechanism (the router module replaced, no hooks), in the router's own layout:
    tests/models/test_adapters.py's module replacement for the standard layout, here through
    the family's `router_output`."""
    adapter = adapter_for(build_tiny_model(family, seed=3))
    ids = _ids(14, seed=5, batch=1)
    _, captured, _ = _natural(adapter, ids)
    layer, position = adapter.moe_layers[-1], 9
    standard = captured[layer].experts[position]
    others = torch.tensor([[e for e in range(adapter.num_experts) if e not in standard.tolist()][: adapter.top_k]])
    weights = adapter.weights_for(captured[layer].logits[position][None], others)
    engine = ReferenceEngine(adapter).score(ids[0], position, layer, torch.cat([standard[None], others]),
                                            torch.cat([captured[layer].weights[position][None].float(), weights]))

    block = adapter.moe_block(layer)
    name = next(n for n in ("router", "gate") if getattr(block, n, None) is adapter.routers[layer])
    original = getattr(block, name)

    class Replaced(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = original

        def forward(self, *args, **kwargs):
            output = self.inner(*args, **kwargs)
            logits, w, e = adapter.route_of(output)
            w, e = w.clone(), e.clone()
            w[position], e[position] = weights[0].to(w.dtype), others[0]
            return adapter.router_output(output, (logits, w, e))

    setattr(block, name, Replaced())
    try:
        with torch.no_grad():
            full = adapter.model(ids).logits[0, position]
    finally:
        setattr(block, name, original)
    expected = torch.log_softmax(full.double(), -1)[ids[0, position + 1]].item()
    assert abs(engine[1] - expected) <= EXACT and abs(engine[0] - engine[1]) > 1e-6


# ---------------------------------------------------------------------------- Llama 4
def test_llama4_scores_scale_the_expert_input_and_the_fast_engine_is_exact_on_it():
    adapter = adapter_for(build_tiny_model("llama4_text"))
    assert adapter.moe_layers == [1, 3, 5]   # interleave_moe_layer_step = 2: dense MLPs between
    with pytest.raises(RouteLensError, match=r"layer 2 is a dense layer; choose one of the MoE layers \[1, 3, 5\]"):
        adapter.resolve_layers([2])
    ids = _ids(10, seed=1, batch=1)
    _, captured, raw = _natural(adapter, ids)
    scores, logits = raw[5]
    # the router's weights are the sigmoid of the chosen logits, 0 elsewhere
    torch.testing.assert_close(captured[5].weights, torch.sigmoid(logits).gather(1, captured[5].experts))
    assert int((scores > 0).sum()) == ids.numel() * adapter.top_k
    # the fast engine's table holds E(s x) / s: weighted by the gating rule, the block's own terms
    view, block = adapter.experts(5), adapter.moe_block(5)
    x = torch.randn(3, adapter.config.hidden_size)
    experts = torch.tensor([[0, 4], [1, 2], [7, 3]])
    w = adapter.weights_for(block.router(x)[1], experts)
    routed_in = x.repeat(2, 1).view(2, 3, -1)
    manual = torch.zeros_like(x)
    for slot in range(2):
        for row in range(3):
            e = int(experts[row, slot])
            gate, up = ((x[row] * w[row, slot]) @ block.experts.gate_up_proj[e]).chunk(2, -1)
            manual[row] += (up * block.experts.act_fn(gate)) @ block.experts.down_proj[e]
    assert routed_in.shape[0] == 2
    torch.testing.assert_close(view(x, experts, w), manual, atol=1e-6, rtol=1e-5)


def test_llama4_chunked_attention_is_served_by_the_cache_engine_and_the_fast_engine_refuses_longer_sequences():
    adapter = adapter_for(build_tiny_model("llama4_text", attention_chunk_size=4))
    ids = torch.randint(3, 64, (14,), generator=torch.Generator().manual_seed(2))
    positions = np.array([3, 6, 11])
    items, references = {}, {}
    for layer in (1, 5):
        with torch.no_grad(), capture_routes(adapter, [layer]) as captured:
            adapter.model(ids[None])
        route = captured[layer]
        experts = torch.stack([torch.stack([route.experts[t], torch.tensor([0, 6]), torch.tensor([2, 7])])
                               for t in positions])
        weights = torch.stack([adapter.weights_for(route.logits[t].expand(3, -1), experts[i])
                               for i, t in enumerate(positions)])
        items[layer] = item = ScoreItem(ids, positions, experts, weights)
        references[layer] = ReferenceEngine(adapter).score_batch(layer, [item])[0]
        cache = CacheEngine(adapter)
        np.testing.assert_allclose(cache.score_batch(layer, [item])[0], references[layer], atol=EXACT, rtol=0)
        assert cache.fallback_reason is None
    fast = FastEngine(adapter)
    with pytest.warns(UserWarning, match="chunked_attention"):   # chunked layers above: handed to the cache engine
        np.testing.assert_allclose(fast.score_batch(1, [items[1]])[0], references[1], atol=EXACT, rtol=0)
    with pytest.warns(UserWarning, match="attention mask"):       # 14 tokens, chunks of 4: not causal attention
        np.testing.assert_allclose(fast.score_batch(5, [items[5]])[0], references[5], atol=EXACT, rtol=0)
    assert "attention mask" in fast.check_record()["engine_fallback"]


# ---------------------------------------------------------------------------- LongCat-Flash
def test_loading_a_longcat_checkpoint_says_what_is_not_counterfactual(tmp_path, capsys):
    from routelens.models.loading import load_model

    build_tiny_model("longcat_flash").save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    said = capsys.readouterr().err
    assert f"routelens: {tmp_path}: " + loaded.adapter.describe()["counterfactual"] in said
    assert "not held equal" in said


def test_longcat_routes_run_over_routed_and_identity_experts_and_identity_experts_pass_the_input_through():
    adapter = adapter_for(build_tiny_model("longcat_flash"))
    assert adapter.num_experts == 10 and adapter.identity_experts == [8, 9] and adapter.top_k == 3
    described = adapter.describe()
    assert described["identity_experts"] == [8, 9]
    assert "identity" in described["counterfactual"] and "not held equal" in described["counterfactual"]
    ids = _ids(12, seed=4, batch=1)
    _, captured, _ = _natural(adapter, ids)
    chosen = torch.cat([captured[layer].experts for layer in adapter.moe_layers])
    counts = adapter.compute_experts(chosen)
    assert (counts == (chosen < 8).sum(-1)).all() and counts.min() < 3, "the router chose some identity experts"
    # a route of identity experts only: the block's output at that position is (sum of weights) x its input
    layer, position = adapter.moe_layers[1], 7
    experts = torch.tensor([[8, 9, 8]])
    weights = adapter.weights_for(captured[layer].logits[position][None], experts)
    block_in, block_out = {}, {}
    hooks = [adapter.moe_block(layer).register_forward_pre_hook(lambda m, a: block_in.__setitem__("x", a[0])),
             adapter.moe_block(layer).register_forward_hook(lambda m, a, o: block_out.__setitem__("y", o))]
    try:
        with torch.no_grad(), override_routes(adapter, {layer: RouteOverride(torch.tensor([position]), experts, weights)}):
            adapter.model(ids)
    finally:
        for hook in hooks:
            hook.remove()
    x = block_in["x"][0, position]
    torch.testing.assert_close(block_out["y"][0, position], weights.sum() * x, atol=1e-6, rtol=1e-6)


def test_longcat_refuses_an_experts_module_whose_high_ids_are_not_identity():
    model = build_tiny_model("longcat_flash")
    for layer in model.model.layers:
        layer.mlp.experts.identity_expert = torch.nn.Tanh()
    with pytest.raises(RouteLensError, match="not identity experts"):
        adapter_for(model)


def test_longcat_identity_experts_hold_no_tensors_to_graft():
    adapter = adapter_for(build_tiny_model("longcat_flash"))
    tensors = adapter.expert_tensors(0, 3)
    assert {name.rsplit(".", 1)[1] for name in tensors} == {"gate_up_proj", "down_proj"}
    with pytest.raises(RouteLensError, match="identity"):
        adapter.expert_tensors(0, 9)


# ---------------------------------------------------------------------------- JetMoE
def test_jetmoe_audits_the_mlp_router_and_leaves_the_attention_router_alone():
    adapter = adapter_for(build_tiny_model("jetmoe"))
    assert all(router is adapter.decoder_layers[i].mlp.router for i, router in adapter.routers.items())
    attention_router = adapter.decoder_layers[1].self_attention.experts.router
    calls = []
    handle = attention_router.register_forward_hook(lambda m, a, o: calls.append(o[4].shape))
    try:
        _natural(adapter, _ids())
    finally:
        handle.remove()
    assert calls == [torch.Size([24, adapter.num_experts])]   # it ran, as the model's, untouched
    # the dispatch of a route with a weight-0 duplicate (the isolation study's padding) is exact
    logits, weights, experts = torch.randn(3, 8), torch.tensor([[1.0, 0.0]] * 3), torch.tensor([[5, 5], [0, 0], [5, 5]])
    sorted_positions, rows, gates, sizes, _ = adapter.router_output(None, (logits, weights, experts))
    assert sizes[5] == 4 and sizes[0] == 2 and rows.tolist() == (sorted_positions // 2).tolist()
    assert _same(adapter.route_of((sorted_positions, rows, gates, sizes, logits))[1:], (weights, experts))


@pytest.mark.parametrize("family", ["llama4_text", "jetmoe"])
def test_router_update_reads_a_router_of_its_own_layout_through_route_of(family):
    """router-update calls the router itself: what it reads as the logits is the route the
    hooks read (`route_of`), i.e. the logits a natural forward's router returned, not the
    scores (Llama 4) or the sorted dispatch positions (JetMoE)."""
    from routelens.analyses.router_update.analysis import router_logits
    from routelens.models import capture_routes

    adapter = adapter_for(build_tiny_model(family))
    layer = adapter.moe_layers[-1]
    inputs = {}
    handle = adapter.routers[layer].register_forward_pre_hook(lambda module, args: inputs.setdefault("x", args[0]))
    ids = torch.randint(3, 64, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture_routes(adapter, [layer]) as captured:
        adapter.model(ids, use_cache=False)
    handle.remove()
    x = inputs["x"].reshape(-1, adapter.config.hidden_size)
    with torch.no_grad():
        logits = router_logits(adapter, layer, x, inputs["x"].dim())
    assert logits.shape == (x.shape[0], adapter.num_experts)
    torch.testing.assert_close(logits, captured[layer].logits.reshape(x.shape[0], -1), rtol=0, atol=1e-6)


def test_zaya_is_refused_in_one_line_naming_the_router_state_it_carries_between_layers():
    from routelens.models.loading import load_model

    with pytest.raises(RouteLensError, match=r"ZAYA's router reads the router state of the MoE layer below") as error:
        load_model("tiny:zaya")
    assert "\n" not in str(error.value)


def test_a_multimodal_llama4_checkpoint_loads_as_its_text_model_with_the_same_logits(tmp_path):
    from transformers import Llama4ForConditionalGeneration

    from routelens.models.loading import load_model
    from routelens.models.tiny import tiny_config

    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(tiny_config("llama4")).eval()
    model.save_pretrained(tmp_path)
    adapter = load_model(str(tmp_path), device="cpu").adapter
    assert type(adapter.model).__name__ == "Llama4ForCausalLM" and adapter.config.model_type == "llama4_text"
    ids = _ids(9, batch=1)
    with torch.no_grad():
        assert torch.equal(adapter.model(ids).logits, model(input_ids=ids).logits)   # image tokens absent


@pytest.mark.parametrize("family", GROUP_C)
def test_upcast_router_reads_and_writes_the_route_through_the_family_layout(family):
    """--upcast-router casts the weights back through `route_of` / `router_output`: a bf16 model
    with fp32 routers runs, its logits are fp32, its weights keep the dtype its block expects."""
    from routelens.models.loading import load_model

    off = load_model(f"tiny:{family}", device="cpu", dtype="bfloat16").adapter
    on = load_model(f"tiny:{family}", device="cpu", dtype="bfloat16", upcast_router=True).adapter
    ids = _ids(10, seed=3)
    _, natural, _ = _natural(off, ids)
    logits, routes, _ = _natural(on, ids)
    assert logits.dtype == torch.bfloat16
    for layer, route in routes.items():
        assert route.logits.dtype == torch.float32 and route.weights.dtype == natural[layer].weights.dtype
        torch.testing.assert_close(route.weights.float(), on.weights_for(route.logits, route.experts).to(
            route.weights.dtype).float(), atol=1e-6, rtol=0)
