"""What the newer families add: group-limited routers whose alternatives must be routes the
router could produce, and layouts beyond one MLP block (Granite's scaled residual, a parallel
shared MLP, scaled logits)."""

import numpy as np
import pytest
import torch

from routelens.analyses.counterfactual.analysis import CounterfactualConfig, build_routes
from routelens.data.trajectories import Trajectory
from routelens.models import adapter_for
from routelens.models.families.deepseek_v3 import admitted_groups
from routelens.models.routing import capture_routes
from routelens.models.tiny import build_tiny_model


def _routes_and_logits(family):
    """A tiny model's sampled routes (16 alternatives per token) at its last MoE layer, and the router logits."""
    adapter = adapter_for(build_tiny_model(family, seed=0))
    ids = list(range(3, 30))
    layer = adapter.moe_layers[-1]
    routes = build_routes(adapter, Trajectory("t", ids, completion_start=2), [layer],
                          CounterfactualConfig(routes=16, seed=0))[layer]
    with torch.no_grad(), capture_routes(adapter, [layer]) as captured:
        adapter.model(torch.tensor([ids]))
    return adapter, layer, routes, captured[layer].logits[torch.as_tensor(routes.positions)].float()


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "exaone_moe", "mimo_v2_flash", "solar_open"])
def test_alternatives_of_group_limited_routers_stay_in_the_admitted_groups(family):
    adapter, layer, routes, logits = _routes_and_logits(family)
    choice = torch.sigmoid(logits) + adapter.routers[layer].e_score_correction_bias
    admitted = admitted_groups(choice, adapter.config.n_group, adapter.config.topk_group)     # the router's own mask
    assert admitted.sum(-1).eq(adapter.num_experts * adapter.config.topk_group // adapter.config.n_group).all()
    inside = np.take_along_axis(admitted.numpy()[:, None, :].repeat(routes.experts.shape[1], 1), routes.experts, -1)
    assert inside.all()                                          # every route, standard and alternative
    # the standard route is the router's own top-k of the admitted, biased scores
    masked = choice.masked_fill(~admitted, float("-inf"))
    assert np.array_equal(np.sort(masked.topk(adapter.top_k).indices.numpy(), -1), routes.experts[:, 0])


def test_alternatives_of_deepseek_v2_group_limited_greedy_stay_in_its_groups():
    adapter, layer, routes, logits = _routes_and_logits("deepseek_v2")
    assert adapter.config.topk_method == "group_limited_greedy"
    probs = torch.softmax(logits, -1)
    admitted = admitted_groups(probs, adapter.config.n_group, adapter.config.topk_group, group_score="max")
    inside = np.take_along_axis(admitted.numpy()[:, None, :].repeat(routes.experts.shape[1], 1), routes.experts, -1)
    assert inside.all() and not admitted.all()


def test_granite_layout_is_declared_and_checked():
    adapter = adapter_for(build_tiny_model("granitemoeshared", seed=0))
    assert adapter.mlp_residual_scale(0) == 0.5 and adapter.parallel_mlp(0) is not None
    hidden = torch.randn(3, adapter.config.hidden_size)
    torch.testing.assert_close(adapter.logits(hidden), adapter.lm_head(hidden) / 2.0)
