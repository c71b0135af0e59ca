"""Adapters against each model's own Hugging Face forward, for all 8 families."""

import pytest
import torch
from conftest import FAMILIES

from routelens.engine.reference import ReferenceEngine
from routelens.errors import OverrideNotApplied, RouteLensError
from routelens.models import RouteOverride, adapter_class, adapter_for, capture_routes, override_routes
from routelens.models.tiny import build_tiny_model

SEQ = 11


def _inputs(batch=2, seq=SEQ, seed=0):
    return torch.randint(3, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _natural(adapter, ids):
    with torch.no_grad(), capture_routes(adapter) as captured:
        logits = adapter.model(ids).logits
    return logits, captured


def _different_route(adapter, standard: torch.Tensor, logits_row: torch.Tensor):
    """A k-expert route sharing no expert with the standard one, weighted by the gating rule."""
    others = [e for e in range(adapter.num_experts) if e not in standard.tolist()][: adapter.top_k]
    experts = torch.tensor([others])
    return experts, adapter.weights_for(logits_row[None], experts)


def test_every_registered_family_has_a_tiny_model_and_its_own_config_class():
    from transformers import CONFIG_MAPPING

    from routelens.models.tiny import TINY_CONFIGS, tiny_config

    assert set(TINY_CONFIGS) == set(FAMILIES)
    for family in FAMILIES:
        assert type(tiny_config(family)) is CONFIG_MAPPING[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_weights_for_reproduces_router_weights(tiny_adapters, family):
    adapter = tiny_adapters[family]
    _, captured = _natural(adapter, _inputs())
    assert sorted(captured) == adapter.moe_layers
    for out in captured.values():
        assert out.experts.shape == (2 * SEQ, adapter.top_k)
        expected = adapter.weights_for(out.logits, out.experts)
        torch.testing.assert_close(expected, out.weights.float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_standard_route_maximises_selection_score(tiny_adapters, family):
    adapter = tiny_adapters[family]
    _, captured = _natural(adapter, _inputs())
    for layer, out in captured.items():
        # admitted_only (the default): a group-limited router (DeepSeek) may choose only inside its
        # kept groups, so the best k *admitted* experts are the choice for every family
        scores = adapter.selection_scores(out.logits, layer)
        chosen = scores.gather(-1, out.experts).sum(-1)
        best_k = scores.topk(adapter.top_k, dim=-1).values.sum(-1)
        torch.testing.assert_close(chosen, best_k, atol=1e-6, rtol=0)
        config = adapter.config
        if (getattr(config, "n_group", None) or 1) > (getattr(config, "topk_group", None) or 1):
            everything = adapter.selection_scores(out.logits, layer, admitted_only=False)
            assert (scores != everything).any(), "the group mask must remove the experts of the dropped groups"


@pytest.mark.parametrize("family", FAMILIES)
def test_override_changes_only_the_forced_position(tiny_adapters, family):
    adapter = tiny_adapters[family]
    ids = _inputs()
    base, captured = _natural(adapter, ids)
    b, s = 1, 6
    row = b * SEQ + s
    for layer in adapter.moe_layers:
        experts, weights = _different_route(adapter, captured[layer].experts[row], captured[layer].logits[row])
        with torch.no_grad(), override_routes(adapter, {layer: RouteOverride(torch.tensor([row]), experts, weights)}):
            forced = adapter.model(ids).logits
        assert (forced[b, s] - base[b, s]).abs().max() > 1e-4, "a different route must change the logits"
        torch.testing.assert_close(forced[b, :s], base[b, :s], atol=1e-6, rtol=0)
        torch.testing.assert_close(forced[0], base[0], atol=1e-6, rtol=0)  # other sequence untouched


@pytest.mark.parametrize("family", FAMILIES)
def test_forcing_the_standard_route_reproduces_logits(tiny_adapters, family):
    adapter = tiny_adapters[family]
    ids = _inputs()
    base, captured = _natural(adapter, ids)
    rows = torch.arange(2 * SEQ)
    overrides = {}
    for layer, out in captured.items():  # every token at every MoE layer, in sorted expert order
        order = out.experts.argsort(dim=-1)
        overrides[layer] = RouteOverride(rows, out.experts.gather(-1, order),
                                         adapter.weights_for(out.logits, out.experts.gather(-1, order)))
    with torch.no_grad(), override_routes(adapter, overrides):
        forced = adapter.model(ids).logits
    torch.testing.assert_close(forced, base, atol=1e-5, rtol=0)


class _ForcedRouter(torch.nn.Module):
    """Stands in for a router module: calls the real one, then rewrites one row. A second
    mechanism (module replacement, no hooks) to check the reference engine against."""

    def __init__(self, adapter, router, row, experts, weights):
        super().__init__()
        self.adapter, self.router, self.row, self.experts, self.weights = adapter, router, row, experts, weights

    def forward(self, hidden, *args, **kwargs):   # MiniMax-M2's block passes its correction bias in
        output = self.router(hidden, *args, **kwargs)
        logits, weights, experts = self.adapter.route_of(output)   # a router with its own layout (Llama 4), mapped
        weights, experts = weights.clone(), experts.clone()
        weights[self.row], experts[self.row] = self.weights.to(weights.dtype), self.experts
        return self.adapter.router_output(output, (logits, weights, experts))


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_engine_matches_module_replacement(family):
    adapter = adapter_for(build_tiny_model(family, seed=3))
    ids = _inputs(batch=1, seq=14, seed=5)[0]
    _, captured = _natural(adapter, ids[None])
    position, layer = 9, adapter.moe_layers[-1]
    experts, weights = _different_route(adapter, captured[layer].experts[position], captured[layer].logits[position])
    routes_experts = torch.cat([captured[layer].experts[position][None], experts])
    routes_weights = torch.cat([captured[layer].weights[position][None].float(), weights])
    engine_logprobs = ReferenceEngine(adapter).score(ids, position, layer, routes_experts, routes_weights)

    block = adapter.moe_block(layer)
    name = "router" if hasattr(block, "router") else "gate"
    original = getattr(block, name)
    for r in range(2):
        setattr(block, name, _ForcedRouter(adapter, original, position, routes_experts[r], routes_weights[r]))
        try:
            with torch.no_grad():
                full = adapter.model(ids[None]).logits[0, position]   # whole sequence, no truncation
        finally:
            setattr(block, name, original)
        expected = torch.log_softmax(full.double(), -1)[ids[position + 1]].item()
        assert abs(engine_logprobs[r] - expected) <= 1e-5
    assert abs(engine_logprobs[0] - engine_logprobs[1]) > 1e-6


def test_override_that_never_fires_is_an_error(tiny_adapters):
    adapter = tiny_adapters["olmoe"]
    block = adapter.decoder_layers[0].mlp
    layer_input = torch.zeros(1, 3, adapter.config.hidden_size)
    override = RouteOverride(torch.tensor([0]), torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(OverrideNotApplied):
        with override_routes(adapter, {0: override}):
            pass  # no forward: the hook never fires
    with pytest.raises(OverrideNotApplied):
        with torch.no_grad(), override_routes(adapter, {0: override}, expected_calls=1):
            block(layer_input)
            block(layer_input)  # fired twice where once was expected


def test_unknown_architecture_lists_supported():
    with pytest.raises(RouteLensError, match="unsupported architecture 'llama'.*olmoe.*phimoe"):
        adapter_class("llama")


def test_model_without_moe_layers_is_refused():
    model = build_tiny_model("qwen2_moe", mlp_only_layers=[0, 1, 2, 3])
    with pytest.raises(RouteLensError, match="no MoE layers"):
        adapter_for(model)


def test_layer_resolution(tiny_adapters):
    adapter = tiny_adapters["deepseek_v3"]  # layer 0 dense, 1..3 MoE
    assert adapter.moe_layers == [1, 2, 3]
    assert adapter.resolve_layers([1, -1, 3]) == [1, 3]
    with pytest.raises(RouteLensError, match=r"layer 0 is a dense layer; choose one of the MoE layers \[1, 2, 3\]"):
        adapter.resolve_layers([0])
    with pytest.raises(RouteLensError, match="out of range"):
        adapter.resolve_layers([4])
    with pytest.raises(RouteLensError, match="out of range"):
        adapter.resolve_layers([-5])
