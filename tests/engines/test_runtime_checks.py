"""Exactness on configurations we did not write, and the checks every run makes.

- Attention windows applied only through the mask (Qwen2-MoE layer types, PhiMoE), through
  a kwarg (Mixtral, GPT-OSS), or a kwarg the mask ignores (OLMoE): fast == reference ==
  plain forward, with a sliding layer above the perturbed one and sequences longer than
  the window.
- A post-norm layout (FlexOlmo) is refused from what the model computes, not from names.
- A wrong gating rule and a broken attention patch are caught at run time.
"""

import warnings

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from routelens.analyses.counterfactual.analysis import CounterfactualConfig, build_routes
from routelens.data.trajectories import Trajectory
from routelens.engine import FastEngine, ReferenceEngine, ScoreItem, attention, make_engine
from routelens.engine.checks import RuntimeCheckFailed
from routelens.engine.whole_sequence import WholeSequenceScorer
from routelens.models import RouteOverride, adapter_for, override_routes
from routelens.models.families.olmoe import OlmoeAdapter
from routelens.models.tiny import build_tiny_model

LENGTHS = (14, 11)
WINDOW = 4

# family -> tiny-config overrides that put a window of 4 on some layers above the first MoE layer
WINDOWED = {
    # mask only, from config.layer_types: even layers sliding (0 and 2), layer 1 dense
    "qwen2_moe": dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=4),
    "phimoe": dict(sliding_window=WINDOW),            # mask only, every layer
    "mixtral": dict(sliding_window=WINDOW),           # mask and kwarg, every layer
    "qwen3_moe": dict(use_sliding_window=True, sliding_window=WINDOW),
    "gpt_oss": dict(sliding_window=WINDOW),           # alternate layers, kwarg and mask, sinks
    "olmoe": dict(sliding_window=WINDOW),             # kwarg passed, mask plain causal: no window
}


def _items(adapter, layer, num_routes=4, seed=0):
    items = []
    for i, length in enumerate(LENGTHS):
        ids = torch.randint(3, 64, (length,), generator=torch.Generator().manual_seed(seed + i)).tolist()
        trajectory = Trajectory(f"t{i}", ids, completion_start=2)
        routes = build_routes(adapter, trajectory, [layer], CounterfactualConfig(routes=num_routes, seed=seed))[layer]
        items.append(ScoreItem(torch.tensor(ids), routes.positions, torch.as_tensor(routes.experts), routes.weights))
    return items


def _falls_back_and_stays_exact(adapter, warning: str, atol: float) -> FastEngine:
    """Score the first MoE layer with the fast engine: it must warn (`warning`, a regex) that a
    check failed, and its results, from the engine it falls back to, equal the reference's."""
    layer = adapter.moe_layers[0]
    items = _items(adapter, layer)
    engine = FastEngine(adapter)
    with pytest.warns(UserWarning, match=warning):
        fast = engine.score_batch(layer, items)
    for f, r in zip(fast, ReferenceEngine(adapter).score_batch(layer, items)):
        np.testing.assert_allclose(f, r, atol=atol, rtol=0)
    return engine


@torch.no_grad()
def _plain_forward(adapter, layer, item, p, r):
    """log p(token t+1) from one forward of the whole sequence with route r forced at t."""
    t = int(item.positions[p])
    override = RouteOverride(torch.tensor([t]), item.experts[p, r][None], item.weights[p, r][None])
    with override_routes(adapter, {layer: override}):
        logits = adapter.model(item.input_ids[None], use_cache=False).logits[0, t]
    return float(torch.log_softmax(logits.float(), -1)[item.input_ids[t + 1]])


@pytest.mark.parametrize("family", sorted(WINDOWED))
def test_windowed_attention_fast_equals_reference_and_plain_forward(family):
    adapter = adapter_for(build_tiny_model(family, seed=0, **WINDOWED[family]))
    windows = [adapter.attention_window(i) for i in range(adapter.num_layers)]
    if family == "olmoe":
        assert windows == [None] * adapter.num_layers
    else:
        first = adapter.moe_layers[0]
        assert WINDOW in windows[first + 1:], f"no sliding layer above layer {first}: {windows}"
    layer = adapter.moe_layers[0]
    items = _items(adapter, layer)
    engine = FastEngine(adapter)
    fast = engine.score_batch(layer, items)
    reference = ReferenceEngine(adapter).score_batch(layer, items)
    assert engine.fallback_reason is None
    for f, r, item in zip(fast, reference, items):
        np.testing.assert_allclose(f, r, atol=1e-5, rtol=0)
        for p in (len(item.positions) - 1, len(item.positions) // 2):   # late positions: window < t
            assert abs(_plain_forward(adapter, layer, item, p, 1) - r[p, 1]) <= 1e-5


def test_a_window_the_adapter_does_not_know_falls_back_with_the_reason(monkeypatch):
    """If the adapter says "no window" but the model masks one, the record-mode mask check
    catches it before any route is scored, and the results come from the cache engine."""
    adapter = adapter_for(build_tiny_model("phimoe", seed=0, sliding_window=WINDOW))
    monkeypatch.setattr(type(adapter), "window_source", "none")
    engine = _falls_back_and_stays_exact(adapter, "attention mask the model builds for layer 0 is not the full causal", 1e-6)
    assert "phimoe" in engine.fallback_reason


def test_broken_attention_patch_is_caught_by_the_standard_route_check(monkeypatch):
    """A patch that forgets the diagonal term: route 0 no longer equals the natural forward,
    so the fast engine falls back (warning with layer, family and size) and stays exact."""
    adapter = adapter_for(build_tiny_model("olmoe", seed=0))
    original = attention.patched_attention

    def broken(module, query, key, value, scaling, sliding_window=None, s_aux=None):
        out, _ = original(module, query, key, value, scaling, sliding_window, s_aux)
        return out * 0.9, None

    monkeypatch.setattr(attention, "patched_attention", broken)
    engine = _falls_back_and_stays_exact(adapter, r"layer 0 \(olmoe\): the standard route's log-prob differs .* by up to",
                                         1e-6)
    assert engine.fallback_reason.startswith("layer 0 (olmoe)")


class WrongGatingAdapter(OlmoeAdapter):
    """A deliberately wrong gating rule: uniform weights over the chosen experts."""

    def weights_for(self, logits, experts):
        return torch.full(experts.shape, 1.0 / experts.shape[-1])


def test_wrong_gating_rule_is_an_error_in_every_analysis():
    adapter = WrongGatingAdapter(build_tiny_model("olmoe", seed=0))
    trajectory = Trajectory("t", list(range(3, 15)), completion_start=2)
    with pytest.raises(RuntimeCheckFailed, match=r"gating rule check failed at layer 0 \(olmoe, WrongGatingAdapter\).*differs"):
        build_routes(adapter, trajectory, [0], CounterfactualConfig(routes=2))
    with pytest.raises(RuntimeCheckFailed, match="gating rule check failed at layer 1"):
        WholeSequenceScorer(adapter).natural(torch.arange(3, 15), [1], [3, 4])


def test_reference_engine_refuses_a_standard_route_that_is_not_the_natural_one():
    adapter = adapter_for(build_tiny_model("olmoe", seed=0))
    items = _items(adapter, 1)
    item = items[0]
    item.weights = item.weights.clone()
    item.weights[:, 0] *= 0.5     # route 0 no longer what the router applied
    with pytest.raises(RuntimeCheckFailed, match=r"standard-route check failed at layer 1 \(olmoe, reference engine\)"):
        ReferenceEngine(adapter).score_batch(1, [item])


def test_isolation_scorer_checks_the_natural_route(monkeypatch):
    adapter = adapter_for(build_tiny_model("qwen2_moe", seed=0, **WINDOWED["qwen2_moe"]))
    scorer = WholeSequenceScorer(adapter)
    natural = scorer.natural(torch.arange(3, 17), [0], [5, 9, 12])
    experts = natural.routes[0].experts[None].repeat(2, 1, 1)
    weights = natural.routes[0].weights[None].repeat(2, 1, 1)
    scored = scorer.score(natural, 0, experts, weights)                  # the natural route twice
    assert scored.shape == (2, 3)
    np.testing.assert_allclose(scored, np.tile(natural.logprobs, (2, 1)), atol=1e-5)
    assert scorer.deviation.largest[0] <= 1e-5
    natural.logprobs = natural.logprobs + 0.1                            # a natural pass that disagrees
    with pytest.raises(RuntimeCheckFailed, match="natural-route check failed at layer 0 .*isolation scorer"):
        scorer.score(natural, 0, experts, weights)


def _tiny_flex_olmo():
    config = AutoConfig.for_model(
        "flex_olmo", vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=3, intermediate_size=48, num_experts=6, num_experts_per_tok=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


class PostNormMisdeclared(OlmoeAdapter):
    """OLMoE's pre-norm layout claimed for a post-norm model (FlexOlmo)."""


def test_post_norm_layout_is_detected_from_the_model_not_from_names():
    adapter = PostNormMisdeclared(_tiny_flex_olmo())
    _falls_back_and_stays_exact(adapter, "post-norm or scaled residual layout", 1e-6)
    declared = type("PostNorm", (PostNormMisdeclared,), {"norm_order": "post"})(adapter.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert make_engine("fast", declared).name == "cache"   # exact for any layout
    assert any("post-norm" in str(w.message) for w in caught)


def test_an_undeclared_expert_scale_is_caught_by_the_block_check(monkeypatch):
    """The fast engine's block algebra runs the adapter's experts module; if the block scales
    its experts' sum in a way the adapter does not declare (Beam applies routed_scaling_factor
    after aggregation), route 0 still matches, so a run of the block itself on a few tokens
    under their alternative routes must catch it: a fallback, with the reason, and exact results."""
    adapter = adapter_for(build_tiny_model("olmoe", seed=0))
    experts = {layer: adapter.experts(layer) for layer in adapter.moe_layers}

    class Doubled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, indices, weights):
            return 2 * self.inner(x, indices, weights)

    monkeypatch.setattr(adapter, "experts", lambda layer: Doubled(experts[layer]))
    engine = _falls_back_and_stays_exact(adapter, "combines its experts in a way the adapter does not declare", 1e-5)
    assert "MoE block of layer 0" in engine.fallback_reason


def test_padding_check_needs_a_padded_row_with_scored_positions(tiny_adapters):
    """The padding check is never passed vacuously: a group whose only padded row has no
    scored position, or whose scored rows are all unpadded, leaves it due; a padded row
    with scored positions is compared with the sequence alone."""
    from routelens.engine.checks import PaddingCheck
    from routelens.engine.readout import final_norm_states

    adapter = tiny_adapters["qwen3_moe"]
    sequences = [torch.arange(3, 15), torch.arange(5, 12)]       # 12 and 7 tokens: the second is padded
    padded = torch.zeros(2, 12, dtype=torch.long)
    padded[0], padded[1, :7] = sequences[0], sequences[1]
    with torch.no_grad(), final_norm_states(adapter) as final:
        adapter.model(padded, use_cache=False, logits_to_keep=1)
    check = PaddingCheck(adapter, memory_budget=2**26)
    check.check(final["states"], sequences, [np.arange(2, 10), np.arange(0)])   # the padded row scores nothing
    assert check.due([12, 7]) and check.verdict is None
    check.check(final["states"], sequences, [np.arange(2, 10), np.arange(1, 6)])
    assert not check.due([12, 7]) and check.failure is None and "inert" in check.verdict
