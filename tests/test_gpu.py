"""The gpu tier: the API and the engines on CUDA (skipped without a CUDA device)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import routelens as rl

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fast_and_cache_engines_equal_the_reference_on_cuda(dtype):
    lens = rl.load("demo", device="cuda", dtype=dtype)
    pairs = [("Q:12+7=A:", "12+7=19#19"), ("Q:3*4+5=A:", "3*4=12;12+5=17#17")]
    trajs = rl.trajectories_from_text(lens.tokenizer, pairs)
    results = {engine: rl.counterfactual(lens, trajs, layers=[0, -1], routes=8, engine=engine).routes["logprob"]
               for engine in ("reference", "fast", "cache")}
    tolerance = 1e-4 if dtype == "float32" else 0.1
    for engine in ("fast", "cache"):
        np.testing.assert_allclose(results[engine], results["reference"], atol=tolerance, rtol=0)


def test_capture_and_force_on_cuda():
    lens = rl.load("demo", device="cuda")
    ids = lens.encode("Q:3*4+5=A:")
    assert ids.device.type == "cuda"
    with torch.no_grad(), lens.force(-1, [(0, 4)], [[0, 1, 2, 3]]), lens.capture([-1]) as routes:
        lens.model(ids)
    assert sorted(routes[-1].experts[0, 4].tolist()) == [0, 1, 2, 3] and routes[-1].logits.is_cuda


def test_run_records_the_cuda_memory_peak_against_the_budget(tmp_path):
    import json

    lens = rl.load("demo", device="cuda")
    trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:12+7=A:", "12+7=19#19")] * 4)
    budget = 8 * 2**20
    rl.counterfactual(lens, trajs, str(tmp_path / "cf"), layers=[0], routes=32, memory_budget=budget,
                          show_progress=False)
    memory = json.load(open(tmp_path / "cf" / "run.json"))["timings"]["memory"]
    assert memory["memory_budget_bytes"] == budget and memory["cuda_peak_bytes"] >= memory["cuda_model_bytes"] > 0
    # what the chunks added on top of the weights stays within a few budgets (the budget is an estimate)
    assert memory["cuda_peak_bytes"] - memory["cuda_model_bytes"] <= 4 * budget


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_cuda_attention_equals_the_explicit_path(dtype, monkeypatch):
    from routelens.engine import attention

    lens = rl.load("demo", device="cuda", dtype=dtype)
    trajs = rl.trajectories_from_text(lens.tokenizer, [("Q:12+7=A:", "12+7=19#19"), ("Q:3*4+5=A:", "3*4=12;12+5=17#17")])
    from routelens.engine.fast import FastEngine

    monkeypatch.setattr(FastEngine, "GATHER_BELOW", 0.0)   # every position carried: the fused kernel's case
    monkeypatch.setattr(attention, "FUSED_CHECKED", {})
    fused = rl.counterfactual(lens, trajs, layers=[0], routes=8).routes["logprob"]
    assert attention.FUSED_CHECKED.get(("cuda", getattr(torch, dtype))) is True   # checked once, and agreed
    monkeypatch.setattr(attention, "_fused_off_diagonal", lambda *a: None)
    explicit = rl.counterfactual(lens, trajs, layers=[0], routes=8).routes["logprob"]
    np.testing.assert_allclose(fused, explicit, atol=1e-4 if dtype == "float32" else 0.1, rtol=0)
