"""bf16, the dtype users run: checks that neither cry wolf nor stay silent (issue 34).

- Real-shaped models (OLMoE-1B-7B, Qwen3-30B-A3B and DeepSeek-V3 expert counts, top-k and
  groups, fewer layers and a narrower stream, logits as decisive as a trained model's) in
  bf16 run end to end with no false alarm and no fallback; a broken engine still fails the
  calibrated check on each of them.
- The tolerance is measured on the model (natural forward against a float32 / float64
  shadow) and recorded; the shadow equals a float32 copy of the model and leaves the model
  bit for bit as it was.
- A small bf16 miss (the max beyond, the mean within) continues and flags its tokens; a
  fallback is timed and bounded by max_fallback_time.
- Beam with a window of 6 in bf16: scores resting on a router above the layer that bf16
  rounding flipped are found by the precision audit, in the tables and run.json's checks,
  and a plain float32 copy of the model confirms each flip.
"""

from __future__ import annotations

import copy
import json
import time
import types
import warnings

import numpy as np
import pytest
import torch

import routelens as rl
from routelens.analyses.counterfactual.analysis import CounterfactualConfig, build_routes
from routelens.analyses.counterfactual.table import precision_line
from routelens.data.trajectories import Trajectory
from routelens.engine import FastEngine, ScoreItem, attention, make_engine
from routelens.engine.base import FallbackBudget
from routelens.engine.checks import Tolerance
from routelens.engine.precision import higher_precision, shadow_log_probs
from routelens.errors import FallbackTooSlow
from routelens.models import RouteOverride, adapter_for, capture_routes, override_routes
from routelens.models.tiny import REAL_SHAPED, TINY_VOCAB, build_real_shaped, build_tiny_model

VOCAB = 1024


def real_shaped_bf16(name: str):
    return build_real_shaped(name).to(torch.bfloat16).eval()


def _sequences(count: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(3, vocab, length))) for _ in range(count)]


def _items(adapter, layer: int, count: int = 3, length: int = 64, routes: int = 4) -> list[ScoreItem]:
    items = []
    for i, ids in enumerate(_sequences(count, length, adapter.config.vocab_size, seed=1)):
        trajectory = Trajectory(f"t{i}", ids, completion_start=4)
        built = build_routes(adapter, trajectory, [layer], CounterfactualConfig(routes=routes, seed=0))[layer]
        items.append(ScoreItem(torch.tensor(ids), built.positions, torch.as_tensor(built.experts), built.weights))
    return items


@pytest.fixture(scope="module", params=sorted(REAL_SHAPED))
def real_shaped(request):
    return request.param, rl.wrap(real_shaped_bf16(request.param))


def test_real_shaped_bf16_models_run_end_to_end_without_a_false_alarm(real_shaped):
    """6 trajectories x 128 tokens, layers 1 and 2, 8 routes (the run that fell back twice
    and stalled for 21 minutes on the DeepSeek-V3-style model): no fallback, no flagged
    token beyond the calibrated tolerance's mean, the tolerance recorded."""
    name, lens = real_shaped
    trajectories = rl.trajectories_from_ids(_sequences(6, 128, VOCAB), completion_start=16)
    config = rl.CounterfactualConfig(layers=[1, 2], routes=8, null_routes=0, precision_audit=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a fallback or a small-miss warning would fail here
        result = rl.counterfactual(lens, trajectories, config=config, show_progress=False)
    checks = result.info["checks"]
    assert checks["engine_fallback"] is None and checks["cache_engine_fallback"] is None, name
    assert checks["fallback_seconds"] == 0
    tolerance = checks["standard_route_tolerance"]
    assert tolerance["dtype"] == "bfloat16" and tolerance["source"].startswith("calibrated")
    calibration = tolerance["calibration"]
    assert calibration["method"] == "float32 shadow" and calibration["tokens"] >= 128
    assert tolerance["max_nats"] == pytest.approx(max(0.02, 4 * calibration["noise_max"]))
    assert checks["standard_route_max_abs_logprob_diff"] <= tolerance["max_nats"]
    assert checks["standard_route_checked_tokens"] == len(result.table("tokens"))   # every scored (token, layer)
    assert checks["low_precision"]["layers"]["1"]["audited_tokens"] == 1


def test_a_broken_engine_still_fails_the_calibrated_check_in_bf16(real_shaped, monkeypatch):
    """The guard keeps its teeth: attention output scaled by 0.9 in the patched suffix is a
    systematic error the calibrated mean tolerance catches on every real-shaped model."""
    name, lens = real_shaped
    original = attention.patched_attention

    def broken(module, query, key, value, scaling, sliding_window=None, s_aux=None):
        out, _ = original(module, query, key, value, scaling, sliding_window, s_aux)
        return out * 0.9, None

    monkeypatch.setattr(attention, "patched_attention", broken)
    adapter = lens.adapter
    engine = FastEngine(adapter, max_fallback_time=0)
    items = _items(adapter, adapter.moe_layers[0], count=2, length=48)
    with pytest.warns(UserWarning, match=r"the standard route's log-prob differs .* calibrated"):
        engine.score_batch(adapter.moe_layers[0], items)
    assert engine.fallback_reason is not None, name
    assert engine.deviation.largest[1] > engine.deviation.tolerance.logprob_mean


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_the_shadow_equals_a_float32_copy_and_leaves_the_model_as_it_was(family):
    model = build_tiny_model(family, seed=0).to(torch.bfloat16)
    adapter = adapter_for(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    dtypes = {name: tensor.dtype for name, tensor in model.state_dict().items()}
    ids = torch.tensor(_sequences(1, 20, TINY_VOCAB)[0])
    item = ScoreItem(ids, np.arange(3, 19), torch.zeros(16, 1, adapter.top_k, dtype=torch.long),
                     torch.zeros(16, 1, adapter.top_k))
    shadow = shadow_log_probs(adapter, [item], 2**28, torch.float32)
    for name, tensor in model.state_dict().items():   # bit for bit, dtypes included
        assert tensor.dtype == dtypes[name] and torch.equal(tensor, before[name]), name
    copy32 = copy.deepcopy(model).float()
    with torch.no_grad():
        logits = copy32(ids[None], use_cache=False).logits[0].float()
    plain = torch.log_softmax(logits, -1)[torch.arange(3, 19), ids[4:20]].double().numpy()
    np.testing.assert_allclose(shadow, plain, atol=2e-5, rtol=0)


def test_a_float32_run_is_checked_against_a_float64_shadow_far_tighter_than_before(tiny_adapters):
    adapter = tiny_adapters["qwen3_moe"]
    engine = make_engine("fast", adapter)
    layer = adapter.moe_layers[-1]
    engine.score_batch(layer, _items(adapter, layer, count=2, length=24))
    record = engine.check_record()["standard_route_tolerance"]
    assert record["calibration"]["method"] == "float64 shadow"
    assert record["max_nats"] <= 1e-4 and record["mean_nats"] <= 1e-5   # the fixed table said 2e-3
    assert engine.fallback_reason is None


def test_a_small_bf16_miss_continues_and_flags_its_tokens():
    """Only the max beyond tolerance, the mean within it: a tail of flipped tokens, not a
    broken engine. No fallback; the tokens beyond the max tolerance are flagged and counted."""
    adapter = adapter_for(build_tiny_model("olmoe", seed=0).to(torch.bfloat16))
    engine = make_engine("fast", adapter)
    layer = adapter.moe_layers[0]
    items = _items(adapter, layer, count=2, length=24)
    engine.score_batch(layer, items)                       # calibrates
    deviations = engine.deviation.largest
    engine.deviation.tolerance = Tolerance(weight=1.0, logprob_max=deviations[0] / 2, logprob_mean=1.0)
    with pytest.warns(UserWarning, match="not a broken engine: continuing"):
        scored = engine.score_batch(layer, items)
    assert engine.fallback_reason is None
    flags = engine.token_flags(items)
    assert [len(f) for f in flags] == [len(item.positions) for item in items]
    natural_minus_route0 = []
    for item, result in zip(items, scored):   # the flags are the tokens beyond the max tolerance, by plain code
        with torch.no_grad():
            logits = adapter.model(item.input_ids[None], use_cache=False).logits[0].float()
        natural = torch.log_softmax(logits, -1)[torch.as_tensor(item.positions), item.input_ids[item.positions + 1]]
        natural_minus_route0.append(np.abs(result[:, 0] - natural.double().numpy()))
    expected = np.concatenate(natural_minus_route0) > deviations[0] / 2
    assert np.concatenate(flags).sum() >= 1
    assert np.mean(np.concatenate(flags) == expected) >= 0.9   # the padded batch and a lone forward round alike
    assert engine.check_record()["standard_route_flagged_tokens"] == int(np.concatenate(flags).sum())


class _SlowEngine:
    """A fallback engine that takes `per_token` seconds per scored token (and may itself
    hand its batch to `inner` through the same budget, as the cache engine does)."""

    def __init__(self, name: str, per_token: float, budget=None, inner=None):
        self.name, self.per_token, self.budget, self.inner = name, per_token, budget, inner
        self.deviation = types.SimpleNamespace(batch_flags=[])
        self.calls = []

    def score_batch(self, layer, items):
        if self.inner is not None:
            return self.budget.run(self.inner, "inner reason", layer, items)
        self.calls.append(len(items))
        self.deviation.batch_flags = [np.full(len(item.positions), len(self.calls) == 1) for item in items]
        time.sleep(self.per_token * sum(len(item.positions) for item in items))
        return [np.zeros((len(item.positions), 2)) for item in items]


def _fake_items(count: int, positions: int = 10) -> list[ScoreItem]:
    return [ScoreItem(torch.arange(positions + 1), np.arange(positions), torch.zeros(positions, 2, 1, dtype=torch.long),
                      torch.zeros(positions, 2, 1)) for _ in range(count)]


def test_the_fallback_budget_times_one_sequence_first_and_refuses_a_batch_past_the_bound():
    """No rate yet: the first sequence alone, timed; the rest of the batch is estimated from
    it and refused before it starts when it would run past the bound."""
    engine = _SlowEngine("cache", per_token=0.05)
    budget = FallbackBudget(seconds=1.0)
    with pytest.raises(FallbackTooSlow, match=r"the cache engine scores 0.0\d+ s per token, so the next 20 tokens would "
                                              r"take ~1 s more, past max_fallback_time 1 s") as error:
        budget.run(engine, "a reason", 0, _fake_items(3))
    assert engine.calls == [1] and "\n" not in str(error.value)
    assert budget.record()["fallback_tokens"] == 10
    FallbackBudget(seconds=0).before("cache", "a reason", tokens=10**9)   # 0: no bound


def test_the_fallback_budget_announces_the_estimate_keeps_the_flags_and_counts_a_chain_once():
    budget = FallbackBudget(seconds=100)
    reference = _SlowEngine("reference", per_token=0.001)
    cache = _SlowEngine("cache", per_token=0, budget=budget, inner=reference)
    cache.deviation = reference.deviation   # one record along the chain, as the engines share theirs
    with pytest.warns(UserWarning, match=r"the cache engine scores .* s per token here: ~0 s for the rest of this "
                                         r"batch \(bounded by max_fallback_time 100 s"):
        results = budget.run(cache, "a reason", 0, _fake_items(3))
    assert len(results) == 3 and reference.calls == [1, 2]
    # the first sequence's flags (set by the first call) survive the second call's batch
    assert [bool(f[0]) for f in reference.deviation.batch_flags] == [True, False, False]
    assert budget.record()["fallback_tokens"] == 30   # cache -> reference inside: counted once


def test_a_fallback_past_max_fallback_time_stops_the_run_with_what_was_scored_kept(tmp_path, monkeypatch):
    """A broken fast engine on a bf16 model, a bound of a millisecond: the first group falls
    back to the cache engine (its rate measured), the next one is refused in one line; the
    run folder keeps the first group, and the same command with no bound completes it."""
    original = attention.patched_attention

    def broken(module, query, key, value, scaling, sliding_window=None, s_aux=None):
        out, _ = original(module, query, key, value, scaling, sliding_window, s_aux)
        return out * 0.5, None

    monkeypatch.setattr(attention, "patched_attention", broken)
    lens = rl.wrap(build_tiny_model("olmoe", seed=0).to(torch.bfloat16))
    trajectories = rl.trajectories_from_ids(_sequences(3, 24, TINY_VOCAB), completion_start=2)
    config = rl.CounterfactualConfig(layers=[0], routes=4, null_routes=0, group_tokens=24, max_fallback_time=1e-3)
    out = str(tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FallbackTooSlow, match="past max_fallback_time 0.001 s; what was scored is kept"):
            rl.counterfactual(lens, trajectories, out, config=config, show_progress=False)
        parts = list((tmp_path / "run" / "parts").iterdir())
        assert parts, "the group scored before the bound was kept"
        config.max_fallback_time = 0
        result = rl.counterfactual(lens, trajectories, out, config=config, show_progress=False)
    assert result.table("tokens")["trajectory_id"].nunique() == 3


def _upper_sets(adapter, model, ids, position, layer, experts, weights):
    """The expert sets of every MoE layer above `layer` at `position` with the route forced
    at `layer`, from one plain forward of `model` (which `adapter` wraps)."""
    upper = [m for m in adapter.moe_layers if m > layer]
    override = RouteOverride(torch.tensor([position]), torch.as_tensor(experts)[None], torch.as_tensor(weights)[None])
    with torch.no_grad(), override_routes(adapter, {layer: override}), capture_routes(adapter, upper) as captured:
        model(torch.as_tensor(ids[: position + 1])[None], use_cache=False)
    return [sorted(captured[m].experts[position].tolist()) for m in upper]


def test_beam_bf16_route_flips_are_reported_in_the_tables_and_checks(tmp_path):
    """Beam, window 6, bf16: a router above the layer picks another expert group under bf16
    rounding for some routes. The audit (every token) finds them; each flagged row's flip,
    and each unflagged row's agreement, is confirmed against a plain float32 copy."""
    model = build_tiny_model("beam", seed=0, sliding_window=6).to(torch.bfloat16)
    lens = rl.wrap(model)
    trajectories = rl.trajectories_from_ids(_sequences(4, 24, TINY_VOCAB), completion_start=2)
    config = rl.CounterfactualConfig(layers=[1], routes=8, null_routes=0, precision_audit=2, precision_audit_tokens=64)
    result = rl.counterfactual(lens, trajectories, str(tmp_path / "run"), config=config, show_progress=False)
    routes = result.table("routes")
    audited = routes[routes["upper_route_flip"].notna()]
    assert set(audited["trajectory_id"]) == {"0", "1"}           # the first precision_audit trajectories, all tokens
    flipped = audited[audited["upper_route_flip"].astype(bool)]
    assert len(flipped) > 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    low = run["checks"]["low_precision"]["layers"]["1"]
    assert low["scores_with_upper_route_flip"] == len(flipped) and low["audited_scores"] == len(audited)
    tokens = result.table("tokens")
    assert int(tokens["upper_route_flips"].sum()) == len(flipped)
    assert f"{len(flipped)} of {len(audited)} audited scores" in precision_line(result.summary_dict)
    # the same rows by plain code: the bf16 model against a float32 copy of it
    adapter, copy32 = lens.adapter, copy.deepcopy(model).float()
    adapter32 = adapter_for(copy32)
    ids = {t.id: t.input_ids for t in trajectories}
    for row in [*flipped.head(3).itertuples(), *audited[~audited["upper_route_flip"].astype(bool)].head(3).itertuples()]:
        low_sets = _upper_sets(adapter, model, ids[row.trajectory_id], row.position, 1, row.experts, row.weights)
        high_sets = _upper_sets(adapter32, copy32, ids[row.trajectory_id], row.position, 1, row.experts, row.weights)
        assert (low_sets != high_sets) == bool(row.upper_route_flip), row
    # where the audit re-scored, the shadow's score is the float32 copy's, and the bf16 score the engine's
    row = flipped.iloc[0]
    sequence = torch.as_tensor(ids[row.trajectory_id][: row.position + 1])[None]
    override = RouteOverride(torch.tensor([row.position]), torch.as_tensor(row.experts)[None],
                             torch.as_tensor(row.weights, dtype=torch.float32)[None])
    with torch.no_grad(), override_routes(adapter32, {1: override}):
        logits = copy32(sequence, use_cache=False).logits[0, -1]
    target = ids[row.trajectory_id][row.position + 1]
    assert abs(float(torch.log_softmax(logits, -1)[target]) - row.shadow_logprob) <= 1e-4


def test_the_shadow_context_restores_the_model_after_an_error():
    model = build_tiny_model("olmoe", seed=0).to(torch.bfloat16)
    adapter = adapter_for(model)
    with pytest.raises(ValueError, match="inside"), higher_precision(adapter, torch.float32):
        model(torch.tensor([[3, 4, 5]]), use_cache=False)
        raise ValueError("inside")
    assert {tensor.dtype for tensor in model.state_dict().values()} == {torch.bfloat16}


def test_the_command_line_says_what_low_precision_did(tmp_path, capsys):
    """`routelens counterfactual --dtype bfloat16` on a saved checkpoint: the printed summary
    and run.json say how many audited scores rest on a flipped route and how the tolerance
    was measured."""
    from routelens.cli import main

    build_tiny_model("beam", seed=0, sliding_window=6).save_pretrained(tmp_path / "beam")
    with open(tmp_path / "traj.jsonl", "w") as handle:
        for i, ids in enumerate(_sequences(3, 24, TINY_VOCAB)):
            handle.write(json.dumps({"id": f"t{i}", "input_ids": ids, "completion_start": 2}) + "\n")
    code = main(["counterfactual", "--model", str(tmp_path / "beam"), "--dtype", "bfloat16", "--trajectories",
                 str(tmp_path / "traj.jsonl"), "--layers", "1", "--routes", "8", "--null-routes", "0",
                 "--precision-audit", "3", "--precision-audit-tokens", "64", "--out", str(tmp_path / "run")])
    assert code == 0
    printed = capsys.readouterr().out
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    low = run["checks"]["low_precision"]["layers"]["1"]
    assert low["audited_tokens"] == 3 * 22 and low["scores_with_upper_route_flip"] > 0
    assert f"{low['scores_with_upper_route_flip']} of {low['audited_scores']} audited scores" in " ".join(printed.split())
    assert run["checks"]["standard_route_tolerance"]["source"].startswith("calibrated")
    assert run["performance"]["max_fallback_time"] == 600.0 and run["checks"]["max_fallback_time"] == 600.0
