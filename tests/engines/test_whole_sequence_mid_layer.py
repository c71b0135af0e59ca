"""The isolation scorer starts a forced row at layer l's MoE block (layer l's attention is
the same for every row) where the layer's residual layout checks out, and runs the whole
decoder layer where it does not; both give a plain forward's numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES

from routelens.engine.whole_sequence import WholeSequenceScorer
from routelens.models.routing import RouteOverride, override_routes


def _plain(adapter, ids, layer, experts, weights, positions) -> np.ndarray:
    with torch.no_grad(), override_routes(adapter, {layer: RouteOverride(torch.arange(len(ids)), experts, weights)}):
        logits = adapter.model(ids[None], use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), -1)[positions, ids[positions + 1]].double().numpy()


def _conditions(adapter, length: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    k = adapter.top_k
    experts = torch.stack([torch.randperm(adapter.num_experts, generator=generator)[:k] for _ in range(3 * length)])
    weights = torch.rand(3 * length, k, generator=generator)
    return experts.reshape(3, length, k), (weights / weights.sum(-1, keepdim=True)).reshape(3, length, k)


def _count_calls(module):
    calls = []
    return calls, module.register_forward_hook(lambda *args: calls.append(1))


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral"])
def test_rows_start_at_the_moe_block_and_equal_a_plain_forward(family, tiny_adapters):
    adapter = tiny_adapters[family]
    layer = adapter.moe_layers[-1]
    ids = torch.randint(4, adapter.config.vocab_size, (9,), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(3, 8)
    scorer = WholeSequenceScorer(adapter)
    natural = scorer.natural(ids, [layer], positions)
    assert layer in natural.batch.mid_layers, "the residual layout of a plain pre-norm layer should check out"
    experts, weights = _conditions(adapter, len(ids), seed=2)
    scorer.score(natural, layer, experts, weights)   # the first call also calibrates the check's tolerance
    attention = adapter.decoder_layers[layer].self_attn
    calls, handle = _count_calls(attention)
    try:
        scored = scorer.score(natural, layer, experts, weights)
    finally:
        handle.remove()
    assert not calls, "layer l's attention ran again for the forced rows"
    for c in range(3):
        np.testing.assert_allclose(scored[c], _plain(adapter, ids, layer, experts[c], weights[c], positions), atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES[:6])
def test_a_layout_that_does_not_check_out_runs_the_whole_layer(family, tiny_adapters, monkeypatch):
    adapter = tiny_adapters[family]
    layer = adapter.moe_layers[0]
    monkeypatch.setattr(type(adapter), "residual_weight", lambda self, index: 0.5)   # a wrong declaration
    ids = torch.randint(4, adapter.config.vocab_size, (8,), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(2, 7)
    scorer = WholeSequenceScorer(adapter)
    natural = scorer.natural(ids, [layer], positions)
    assert layer not in natural.batch.mid_layers
    experts, weights = _conditions(adapter, len(ids), seed=4)
    scored = scorer.score(natural, layer, experts, weights)
    for c in range(3):
        np.testing.assert_allclose(scored[c], _plain(adapter, ids, layer, experts[c], weights[c], positions), atol=1e-5)


def test_the_cut_is_taken_on_most_served_families(tiny_adapters):
    """Not a silent fallback everywhere: the families whose layer l is cut at its block."""
    cut = []
    for family in FAMILIES:
        adapter = tiny_adapters[family]
        layer = adapter.moe_layers[-1]
        ids = torch.randint(4, adapter.config.vocab_size, (6,), generator=torch.Generator().manual_seed(0))
        natural = WholeSequenceScorer(adapter).natural(ids, [layer], torch.arange(1, 5))
        cut += [family] if layer in natural.batch.mid_layers else []
    assert len(cut) >= 0.8 * len(FAMILIES), f"cut on {len(cut)} of {len(FAMILIES)}: {sorted(set(FAMILIES) - set(cut))}"


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_zero_weight_slots_of_a_forced_expert_are_not_computed(family, tiny_adapters, monkeypatch):
    from routelens.analyses.isolation.analysis import forced_conditions

    adapter = tiny_adapters[family]
    layer = adapter.moe_layers[0]
    ids = torch.randint(4, adapter.config.vocab_size, (7,), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(2, 6)
    scorer = WholeSequenceScorer(adapter, check=False)
    natural = scorer.natural(ids, [layer], positions)
    experts, weights = forced_conditions(adapter.num_experts, len(ids), adapter.top_k)
    module = adapter.experts(layer)
    rows = []
    own = type(module).forward

    def counting(self, hidden, *args, **kwargs):
        if self is module:
            rows.append(hidden.shape[0])
        return own(self, hidden, *args, **kwargs)

    monkeypatch.setattr(type(module), "forward", counting)
    scored = scorer.score(natural, layer, experts[:2], weights[:2])
    assert sum(rows) == 2 * len(ids), f"the forced rows computed {sum(rows)} (token, slot) pairs, not one per token"
    for c in range(2):
        np.testing.assert_allclose(scored[c], _plain(adapter, ids, layer, experts[c], weights[c], positions), atol=1e-5)
    assert "forward" not in module.__dict__   # the patch is gone after the pass
