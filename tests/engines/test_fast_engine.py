"""The fast engine against the reference engine, for every registered family (layers it
cannot patch through its cache engine), and its invariance to chunking and batch composition."""

import warnings

import numpy as np
import pytest
import torch
from conftest import FAMILIES

from routelens.analyses.counterfactual.analysis import CounterfactualConfig, build_routes
from routelens.data.trajectories import Trajectory
from routelens.engine import CacheEngine, FastEngine, ReferenceEngine, ScoreItem, make_engine
from routelens.engine.fast import FastEngineUnsupported

LENGTHS = (13, 8, 17)


def _items(adapter, layer, num_routes=4, seed=0):
    items = []
    for i, length in enumerate(LENGTHS):
        ids = torch.randint(3, 64, (length,), generator=torch.Generator().manual_seed(seed + i)).tolist()
        trajectory = Trajectory(f"t{i}", ids, completion_start=3 + i)
        routes = build_routes(adapter, trajectory, [layer], CounterfactualConfig(routes=num_routes, null_routes=0, seed=seed))[layer]
        items.append(ScoreItem(torch.tensor(ids), routes.positions, torch.as_tensor(routes.experts), routes.weights))
    return items


def _layers(adapter):
    moe = adapter.moe_layers
    return sorted({moe[0], moe[len(moe) // 2], moe[-1]})


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_equals_reference(tiny_adapters, family):
    adapter = tiny_adapters[family]
    for layer in _layers(adapter):
        items = _items(adapter, layer)
        engine = FastEngine(adapter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")              # "scoring layer l with the cache engine" (hybrids)
            fast = engine.score_batch(layer, items)      # three lengths in one call
        assert engine.fallback_reason is None            # no check failed
        assert (layer in engine.cache_layers) == bool(engine.unpatchable(layer))
        exact = 1e-5
        assert engine.deviation.largest[0] <= exact
        reference = ReferenceEngine(adapter).score_batch(layer, items)
        for f, r, item in zip(fast, reference, items):
            assert f.shape == (len(item.positions), item.experts.shape[1])
            np.testing.assert_allclose(f, r, atol=exact, rtol=0)
            assert np.ptp(r) > 1e-4  # the routes really differ


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3", "gpt_oss"])
def test_chunking_and_batch_composition_do_not_change_results(tiny_adapters, family):
    adapter = tiny_adapters[family]
    layer = adapter.moe_layers[0]
    items = _items(adapter, layer, num_routes=6)
    whole = FastEngine(adapter).score_batch(layer, items)
    for engine in (FastEngine(adapter, route_chunk=1), FastEngine(adapter, route_chunk=5),
                   FastEngine(adapter, memory_budget=1)):   # budget 1 byte: one row, one query, one token per slice
        for a, b in zip(whole, engine.score_batch(layer, items)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    alone = [FastEngine(adapter).score_batch(layer, [item])[0] for item in items]
    reordered = FastEngine(adapter).score_batch(layer, items[::-1])[::-1]
    for a, b, c in zip(whole, alone, reordered):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        np.testing.assert_allclose(a, c, atol=1e-6, rtol=0)


def test_perturbed_sequences_per_chunk_do_not_grow_with_routes(tiny_adapters, monkeypatch):
    adapter = tiny_adapters["olmoe"]
    layer = adapter.moe_layers[0]
    engine = FastEngine(adapter, memory_budget=500_000)
    limit = engine._rows_per_chunk(max(LENGTHS))
    assert 1 <= limit < len(LENGTHS) * 5   # the budget forces several chunks even at 4 routes
    sizes = []
    original = engine._suffix
    monkeypatch.setattr(engine, "_suffix", lambda *a, **k: sizes.append(a[2].shape[0]) or original(*a, **k))
    peaks = {}
    for routes in (4, 32):
        sizes.clear()
        engine.score_batch(layer, _items(adapter, layer, num_routes=routes))
        peaks[routes] = max(sizes)
        assert sum(sizes) == len(LENGTHS) * (routes + 1)   # every (sequence, route) pair once
    assert peaks[4] == peaks[32] == limit


def test_unsupported_attention_falls_back_to_the_cache_engine_with_a_warning(tiny_adapters):
    adapter = tiny_adapters["olmoe"]
    original = adapter.config._attn_implementation
    adapter.config._attn_implementation = "flex_attention"
    try:
        with pytest.raises(FastEngineUnsupported):
            FastEngine(adapter)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine = make_engine("fast", adapter)
        assert isinstance(engine, CacheEngine)
        assert any("flex_attention" in str(w.message) and "cache engine" in str(w.message) for w in caught)
    finally:
        adapter.config._attn_implementation = original


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "phimoe"])
def test_unfused_attention_path_equals_reference(tiny_adapters, family, monkeypatch):
    """The fused CPU kernel serves most layers; the explicit path (sliding windows, other
    devices) must be exact too."""
    from routelens.engine import attention

    monkeypatch.setattr(attention, "_fused_off_diagonal", lambda *a: None)
    adapter = tiny_adapters[family]
    layer = adapter.moe_layers[0]
    items = _items(adapter, layer)
    for f, r in zip(FastEngine(adapter).score_batch(layer, items), ReferenceEngine(adapter).score_batch(layer, items)):
        np.testing.assert_allclose(f, r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_over_scored_positions_only_equals_the_full_suffix_and_the_reference(tiny_adapters, family, monkeypatch):
    """Sparse scored positions: the suffix carries only them (position embeddings and any
    per-position argument taken at those positions) or every position; both equal the reference."""
    adapter = tiny_adapters[family]
    layer = adapter.moe_layers[0]
    if FastEngine(adapter).unpatchable(layer):
        layer = adapter.moe_layers[-1]
    ids = torch.randint(3, 64, (15,), generator=torch.Generator().manual_seed(7)).tolist()
    routes = build_routes(adapter, Trajectory("sparse", ids, completion_start=1), [layer],
                          CounterfactualConfig(routes=4, seed=0))[layer]
    keep = [1, 6, 10]                                  # positions 2, 7, 11 of 15
    item = ScoreItem(torch.tensor(ids), routes.positions[keep], torch.as_tensor(routes.experts[keep]), routes.weights[keep])
    scored, carried = {}, []
    for name, share in (("gathered", 1.01), ("full", 0.0)):
        monkeypatch.setattr(FastEngine, "GATHER_BELOW", share)
        engine = FastEngine(adapter)
        original = engine._suffix
        monkeypatch.setattr(engine, "_suffix", lambda *a, original=original, **k: carried.append(a[2].shape[1]) or original(*a, **k))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scored[name] = engine.score_batch(layer, [item])[0]
        assert engine.fallback_reason is None
    if carried:                                        # the layer was patched (not handed to the cache engine)
        assert carried == [3, 15]                      # three positions carried, then all fifteen
    reference = ReferenceEngine(adapter).score_batch(layer, [item])[0]
    np.testing.assert_allclose(scored["gathered"], scored["full"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(scored["gathered"], reference, atol=1e-5, rtol=0)


def test_a_fused_kernel_that_disagrees_with_the_explicit_path_is_not_used(tiny_adapters, monkeypatch):
    """Where CI does not run the fused kernel (CUDA), its first output is checked against the
    explicit path; a wrong kernel (simulated here on CPU) is dropped with a warning and the
    scores still equal the reference."""
    from routelens.engine import attention

    adapter = tiny_adapters["olmoe"]
    layer = adapter.moe_layers[0]
    items = _items(adapter, layer)[:1]
    monkeypatch.setattr(attention, "TESTED_DEVICES", ())
    monkeypatch.setattr(attention, "FUSED_CHECKED", {})
    right = attention._fused_off_diagonal
    monkeypatch.setattr(attention, "_fused_off_diagonal", lambda *a: (lambda out: (out[0] * 1.5, out[1]))(right(*a)))
    with pytest.warns(UserWarning, match="fused attention kernel on cpu torch.float32 differs from the explicit path"):
        fast = FastEngine(adapter, memory_budget=2**40).score_batch(layer, items)[0]
    assert attention.FUSED_CHECKED == {("cpu", torch.float32): False}
    np.testing.assert_allclose(fast, ReferenceEngine(adapter).score_batch(layer, items)[0], atol=1e-5, rtol=0)
    monkeypatch.setattr(attention, "_fused_off_diagonal", right)   # the right kernel passes its check
    monkeypatch.setattr(attention, "FUSED_CHECKED", {})
    FastEngine(adapter, memory_budget=2**40).score_batch(layer, items)
    assert attention.FUSED_CHECKED == {("cpu", torch.float32): True}


def test_two_fast_engines_in_two_threads_do_not_share_attention_state(tiny_adapters):
    """Each engine's recorded keys and patch settings are its own (a context variable, not a
    module global): two engines on two models scoring at the same time in two threads give
    what each gives alone."""
    import threading

    jobs = []
    for family in ("olmoe", "qwen3_moe"):
        adapter = tiny_adapters[family]
        layer = adapter.moe_layers[0]
        jobs.append((FastEngine(adapter), layer, _items(adapter, layer)))
    alone = [engine.score_batch(layer, items) for engine, layer, items in jobs]
    together, errors = [None, None], []

    def run(index):
        engine, layer, items = jobs[index]
        try:
            together[index] = [engine.score_batch(layer, items) for _ in range(3)][-1]
        except Exception as error:   # noqa: BLE001 - reported below with its thread
            errors.append((index, error))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for got, want in zip(together, alone):
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
