"""An alternative route equal to the standard one reaches the suffix with exactly the
standard route's state (the fast engine's net coefficients cancel to 0), so on a model
whose batched kernels round every row alike it scores exactly what the standard route
scores: rank statistics over routes (ties, percentile, alignment) must not rest on the
engine's own rounding of equal routes. (A suffix whose kernels round a row by its place in
the batch, e.g. DeepSeek-V3's MLA on CPU, can still part them by an ulp.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routelens.analyses.counterfactual.analysis import CounterfactualConfig, build_routes
from routelens.data.trajectories import Trajectory
from routelens.engine import FastEngine, ScoreItem


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral"])
def test_a_route_equal_to_the_standard_one_scores_exactly_the_same(family, tiny_adapters):
    adapter = tiny_adapters[family]
    layer = adapter.moe_layers[0]
    ids = torch.randint(4, adapter.config.vocab_size, (12,), generator=torch.Generator().manual_seed(7))
    routes = build_routes(adapter, Trajectory("t", ids.tolist(), 1), [layer],
                          CounterfactualConfig(routes=4, null_routes=0, seed=0))[layer]
    experts, weights = torch.as_tensor(routes.experts).clone(), torch.as_tensor(routes.weights).clone()
    experts[:, 2], weights[:, 2] = experts[:, 0], weights[:, 0]                    # route 2 := the standard route
    experts[:, 3] = experts[:, 0].flip(-1)                                         # route 3: the same set, other order
    weights[:, 3] = weights[:, 0].flip(-1)
    scores = FastEngine(adapter).score_batch(layer, [ScoreItem(ids, routes.positions, experts, weights)])[0]
    np.testing.assert_array_equal(scores[:, 2], scores[:, 0])
    np.testing.assert_array_equal(scores[:, 3], scores[:, 0])
