"""Gumbel-top-k alternatives: reproducible, exactly k distinct experts from the top-M,
inclusion frequency rising with the router logit."""

import numpy as np
import pytest
from scipy import stats

from routelens.analyses.route_sampling import (
    check_route_settings,
    flag_duplicates,
    gumbel_top_k_routes,
    route_rng,
    top_candidates,
    uniform_candidate_routes,
)
from routelens.errors import RouteLensError

pytestmark = pytest.mark.quick   # the quick tier: pure functions, run first


def _scores(n=5, e=16, seed=0):
    logits = np.random.default_rng(seed).normal(size=(n, e)) * 2
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True), logits


def test_same_seed_same_routes_and_order_independence():
    scores, _ = _scores()
    a = gumbel_top_k_routes(scores, 4, 32, 8, 1.0, route_rng(0, 3, "traj-a"))
    b = gumbel_top_k_routes(scores, 4, 32, 8, 1.0, route_rng(0, 3, "traj-a"))
    np.testing.assert_array_equal(a, b)
    other_seed = gumbel_top_k_routes(scores, 4, 32, 8, 1.0, route_rng(1, 3, "traj-a"))
    other_traj = gumbel_top_k_routes(scores, 4, 32, 8, 1.0, route_rng(0, 3, "traj-b"))
    assert not np.array_equal(a, other_seed) and not np.array_equal(a, other_traj)


def test_routes_have_k_distinct_experts_from_top_m():
    scores, _ = _scores(n=20)
    k, m = 3, 6
    routes = gumbel_top_k_routes(scores, k, 64, m, 1.0, np.random.default_rng(0))
    assert routes.shape == (20, 64, k)
    candidates = top_candidates(scores, m)
    for token in range(20):
        allowed = set(candidates[token].tolist())
        assert candidates[token].tolist() == np.argsort(-scores[token])[:m].tolist()
        for route in routes[token]:
            assert len(set(route.tolist())) == k
            assert set(route.tolist()) <= allowed
            assert list(route) == sorted(route)


def test_inclusion_frequency_rises_with_logit():
    _, logits = _scores(n=1, e=12, seed=4)
    scores = np.exp(logits) / np.exp(logits).sum()
    routes = gumbel_top_k_routes(scores, 2, 40000, 12, 1.0, np.random.default_rng(1))
    frequency = np.bincount(routes[0].ravel(), minlength=12) / 40000
    assert stats.spearmanr(logits[0], frequency).statistic > 0.95
    order = np.argsort(logits[0])
    top, bottom = order[-1], order[0]
    assert frequency[top] > frequency[bottom]
    # each route holds k = 2 of the experts, so inclusion frequencies sum to k
    assert frequency.sum() == pytest.approx(2.0)


def test_temperature_flattens_inclusion():
    scores, _ = _scores(n=1, e=10, seed=2)
    sharp = gumbel_top_k_routes(scores, 2, 20000, 10, 0.5, np.random.default_rng(0))
    flat = gumbel_top_k_routes(scores, 2, 20000, 10, 5.0, np.random.default_rng(0))

    def spread(routes):
        return np.bincount(routes[0].ravel(), minlength=10).std()

    assert spread(flat) < spread(sharp)


def test_duplicates_flagged_against_earlier_routes():
    routes = np.array([[0, 1], [2, 3], [0, 1], [2, 3], [1, 4]])
    assert flag_duplicates(routes).tolist() == [False, False, True, True, False]


def test_route_settings_errors():
    check_route_settings(k=2, num_experts=8, num_candidates=8, num_routes=4, temperature=1.0)
    with pytest.raises(RouteLensError, match="^`candidates` 1 is smaller than the model's top-k 2"):
        check_route_settings(k=2, num_experts=8, num_candidates=1, num_routes=4, temperature=1.0)
    with pytest.raises(RouteLensError, match="exceeds the model's 8 experts"):
        check_route_settings(k=2, num_experts=8, num_candidates=9, num_routes=4, temperature=1.0)
    with pytest.raises(RouteLensError, match="temperature"):
        check_route_settings(k=2, num_experts=8, num_candidates=4, num_routes=4, temperature=0.0)


def test_the_uniform_null_draws_every_k_subset_of_the_candidates_alike_whatever_the_scores():
    """Uniform null routes: k distinct experts of the top-M candidates, every candidate
    drawn with share k / M (chi-square, SciPy) however peaked the scores, every pair of
    candidates alike too; and their own stream leaves the Gumbel draws unchanged."""
    scores = np.zeros((1, 16))
    scores[0, :6] = [0.9, 0.05, 0.02, 0.01, 0.01, 0.01]    # a peaked router: the Gumbel sampler favours expert 0
    routes = uniform_candidate_routes(scores, 2, 30000, 6, np.random.default_rng(0))[0]
    assert routes.shape == (30000, 2) and (routes[:, 0] < routes[:, 1]).all() and routes.max() < 6
    counts = np.bincount(routes.ravel(), minlength=6)
    assert stats.chisquare(counts).pvalue > 1e-3
    pairs = np.bincount(routes[:, 0] * 6 + routes[:, 1], minlength=36)
    assert stats.chisquare(pairs[pairs > 0]).pvalue > 1e-3 and (pairs > 0).sum() == 15   # C(6, 2) subsets
    gumbel = gumbel_top_k_routes(scores, 2, 3000, 6, 1.0, np.random.default_rng(0))[0]
    assert np.bincount(gumbel.ravel(), minlength=6)[0] > 2900                      # not uniform: the contrast


def test_the_uniform_null_never_draws_an_expert_the_router_cannot_route_to():
    """Group-limited routers score experts outside their admitted groups 0: the null draws
    among the positive-score candidates only, uniformly."""
    scores = np.zeros((2, 16))
    scores[0, [3, 5, 9, 12]] = [0.4, 0.3, 0.2, 0.1]     # 4 admissible of 8 candidates
    scores[1, :8] = 0.125
    routes = uniform_candidate_routes(scores, 2, 6000, 8, np.random.default_rng(1))
    assert set(routes[0].ravel()) == {3, 5, 9, 12} and set(routes[1].ravel()) == set(range(8))
    assert stats.chisquare(np.bincount(routes[0].ravel(), minlength=16)[[3, 5, 9, 12]]).pvalue > 1e-3
