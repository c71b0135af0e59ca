"""The gating-rule and block-algebra checks look at a bounded number of rows per run, and
still catch what they are there to catch: a rule wrong on every token, a rule wrong only on
some experts or on the tokens of extreme gate mass, a block that scales its experts."""

import numpy as np
import pandas as pd
import pytest
import torch

from routelens.analyses.counterfactual.analysis import (
    CounterfactualConfig,
    analyse_trajectories,
    engine_checks,
)
from routelens.data.trajectories import Trajectory
from routelens.engine import FastEngine, make_engine
from routelens.engine.checks import GatingCheck, RuntimeCheckFailed, sample_rows
from routelens.models import adapter_for
from routelens.models.families.olmoe import OlmoeAdapter
from routelens.models.tiny import build_tiny_model


def _routes(count=1000, k=2, experts=16, seed=0):
    rng = np.random.default_rng(seed)
    chosen = np.stack([rng.choice(experts, k, replace=False) for _ in range(count)])
    weights = rng.dirichlet(np.ones(k), count) * rng.uniform(0.2, 1.0, (count, 1))
    return chosen, weights


@pytest.mark.quick
def test_sample_rows_is_bounded_deterministic_and_holds_the_rows_a_partial_fault_shows_on():
    experts, weights = _routes()
    weights[417] = [0.01, 0.01]      # the smallest gate mass: where a normalisation floor would show
    experts[733] = [15, 3]
    experts = np.where((experts == 15) & (np.arange(1000)[:, None] != 733), 14, experts)   # expert 15: one row only
    picked = sample_rows(experts, weights, 64)
    assert len(picked) == 64 and len(set(picked)) == 64 and np.all(np.diff(picked) > 0)
    assert np.array_equal(picked, sample_rows(experts, weights, 64))            # no random draw
    assert 417 in picked and 733 in picked
    assert picked.min() < 100 and picked.max() > 900                            # spread over all rows
    assert set(np.unique(experts[picked])) == set(np.unique(experts))          # every expert id is seen
    assert np.array_equal(sample_rows(experts[:50], weights[:50], 64), np.arange(50))   # few rows: all
    assert len(sample_rows(experts, weights, 1)) == 1


class WrongForOneExpert(OlmoeAdapter):
    """A gating rule wrong only for the routes that hold one expert."""

    faulty = 5

    def weights_for(self, logits, experts):
        weights = super().weights_for(logits, experts)
        return torch.where(experts == self.faulty, weights * 0.5, weights)


def _natural(adapter, ids):
    from routelens.models.routing import capture_routes

    with torch.no_grad(), capture_routes(adapter, adapter.moe_layers) as captured:
        adapter.model(ids, use_cache=False, logits_to_keep=1)
    return captured


def test_a_rule_wrong_for_one_expert_is_caught_by_a_few_rows_and_the_budget_holds():
    adapter = WrongForOneExpert(build_tiny_model("olmoe", seed=0))
    ids = torch.randint(3, 64, (8, 40), generator=torch.Generator().manual_seed(1))
    route = _natural(adapter, ids)[0]
    holds = (route.experts.reshape(-1, route.experts.shape[-1]) == WrongForOneExpert.faulty).any(-1)
    assert 0 < int(holds.sum()) < len(holds)   # the fault shows on some tokens only
    with pytest.raises(RuntimeCheckFailed, match="gating rule check failed at layer 0"):
        GatingCheck(adapter, rows=2 * adapter.num_experts).check(0, route.logits, route.experts, route.weights)
    right = adapter_for(adapter.model)
    check = GatingCheck(right, rows=24)
    for _ in range(3):   # the budget is per layer and run: spent, later calls look at nothing
        check.check(0, route.logits, route.experts, route.weights)
    assert check.check(0, route.logits, route.experts, route.weights) is None
    record = check.record()
    assert record["gating_rule"]["rows_checked"] == {"0": 24} and record["gating_rule_checked_rows"] == 24
    assert "deterministic" in record["gating_rule"]["selection"]


def test_counterfactual_group_checks_a_bounded_number_of_rows_and_says_so():
    adapter = adapter_for(build_tiny_model("olmoe", seed=0))
    engine = make_engine("fast", adapter, check_rows=16)
    trajectories = [Trajectory(f"t{i}", torch.randint(3, 64, (20 + i,), generator=torch.Generator().manual_seed(i)).tolist(),
                               completion_start=2) for i in range(4)]
    config = CounterfactualConfig(routes=4, null_routes=2, seed=0, layers=[0, 1], check_rows=16)
    gating = GatingCheck(adapter, config.check_rows)
    grouped = analyse_trajectories(adapter, engine, trajectories, [0, 1], config, gating=gating)
    checks = engine_checks(engine, gating)
    assert checks["gating_rule"]["rows_checked"] == {"0": 16, "1": 16}
    assert checks["block_algebra"]["rows_checked"] == {"0": 16, "1": 16}
    assert checks["block_algebra_checked_rows"] == 32
    # the results do not depend on how many rows the checks looked at
    every = analyse_trajectories(adapter, FastEngine(adapter, check_rows=10**6), trajectories, [0, 1], config)
    for a, b in zip(grouped, every):
        for table in ("tokens", "routes", "null_routes"):
            pd.testing.assert_frame_equal(a[table].to_pandas(), b[table].to_pandas(), check_exact=True)


def test_a_scaled_block_is_caught_with_a_budget_of_one_row(monkeypatch):
    adapter = adapter_for(build_tiny_model("olmoe", seed=0))
    inner = {layer: adapter.experts(layer) for layer in adapter.moe_layers}

    class Doubled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x, indices, weights):
            return 2 * self.module(x, indices, weights)

    monkeypatch.setattr(adapter, "experts", lambda layer: Doubled(inner[layer]))
    trajectory = Trajectory("t", list(range(3, 20)), completion_start=2)
    engine = FastEngine(adapter, check_rows=1)
    with pytest.warns(UserWarning, match="combines its experts in a way the adapter does not declare"):
        analyse_trajectories(adapter, engine, [trajectory], [0], CounterfactualConfig(routes=3, null_routes=0))
    assert "MoE block of layer 0" in engine.fallback_reason
