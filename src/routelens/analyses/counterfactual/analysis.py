"""Counterfactual routing analysis (Yoon et al. 2026, "When Are Experts Misrouted?").

For every scored token of a trajectory and every requested MoE layer: the standard route
(route 0: the experts and weights the router itself produced) and S alternatives of the
same k, sampled by Gumbel-top-k from the router's top-M candidates and weighted by the
model's own gating rule, and N uniform null routes (k of the same candidates drawn
uniformly, weighted alike: the yardstick of "does the router beat chance"). Every route is
scored by log p(next token) with the route forced on that token at that layer (all else
routing normally). Per token we keep p of the standard route, the route-averaged p, the
best and worst alternative, win / tie / loss shares (an alternative with the standard
expert set is the standard route, never better), the standard route against the uniform
null, and the alignment (Spearman between the routes' router score and their
log-probability, raw and with gate mass partialled out). Tokens are binned by
route-averaged p (or the standard route's) into Confident / Ambiguous / Fragile, and
summarised per layer x bin with bootstrap intervals resampling problems (trajectories
when they carry no problem id), BH q-values and a Bonferroni-adjusted gain interval.

Tables (long format, see `ROUTE_COLUMNS` / `TOKEN_COLUMNS`) are written per trajectory to
a resumable run folder.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from routelens import stats
from routelens.analyses.counterfactual.config import CounterfactualConfig
from routelens.analyses.route_sampling import (
    NULL_STREAM,
    PRECISION_AUDIT_STREAM,
    check_route_settings,
    flag_duplicates,
    gumbel_top_k_routes,
    route_rng,
    uniform_candidate_routes,
)
from routelens.config import ALL_TOKENS, BINS
from routelens.data.trajectories import Trajectory
from routelens.distributed import RaySettings, UnitJob, check_ray_can_load
from routelens.engine.batching import pad_right, sequence_routes
from routelens.engine.checks import GatingCheck, PaddingNotInert, check_gating_rule
from routelens.engine.items import ScoreItem
from routelens.engine.readout import final_norm_states
from routelens.errors import RouteLensError, SettingError
from routelens.models.adapter import MoEAdapter
from routelens.models.routing import RouterOutput, capture_routes
from routelens.runs.loop import AnalysisRun, run_analysis

ROUTES_SCHEMA = pa.schema([
    ("trajectory_id", pa.string()), ("position", pa.int64()), ("layer", pa.int64()),
    ("route", pa.int64()), ("experts", pa.list_(pa.int64())), ("weights", pa.list_(pa.float64())),
    ("router_score", pa.float64()), ("duplicate", pa.bool_()), ("target_id", pa.int64()),
    ("logprob", pa.float64()),
    # the precision audit (low-precision models, a sample of tokens; null elsewhere): the route's
    # score in the model's higher-precision shadow, and whether a router above the layer chose
    # another expert set there than in the model's dtype
    ("shadow_logprob", pa.float64()), ("upper_route_flip", pa.bool_()),
])
TOKENS_SCHEMA = pa.schema([
    ("trajectory_id", pa.string()), ("position", pa.int64()), ("layer", pa.int64()),
    ("target_id", pa.int64()), ("verified", pa.bool_()), ("p_standard", pa.float64()),
    ("p_route_mean", pa.float64()), ("p_best_alt", pa.float64()), ("p_worst_alt", pa.float64()),
    ("gain", pa.float64()), ("win_rate", pa.float64()), ("tie_rate", pa.float64()), ("sampler_draw_gain", pa.float64()),
    ("standard_percentile", pa.float64()), ("gain_by_routes", pa.list_(pa.float64())), ("alignment", pa.float64()),
    ("n_duplicates", pa.int64()), ("bin", pa.string()), ("problem_id", pa.string()),
    ("alignment_mass_partial", pa.float64()), ("p_uniform_mean", pa.float64()),
    ("standard_minus_uniform", pa.float64()), ("best_minus_uniform_best", pa.float64()),
    # the standard route's score missed the calibrated max tolerance against the natural forward
    # (a low-precision tail the run continued past); the audited routes whose upper routes flip
    ("precision_flag", pa.bool_()), ("upper_route_flips", pa.int64()), ("shadow_max_abs_error", pa.float64()),
    ("standard_route_flip", pa.bool_()),
])
# joint runs (--joint-layers): one route per listed layer, forced together
JOINT_ROUTES_SCHEMA = pa.schema([
    ("trajectory_id", pa.string()), ("position", pa.int64()), ("layers", pa.list_(pa.int64())),
    ("route", pa.int64()), ("experts", pa.list_(pa.list_(pa.int64()))), ("weights", pa.list_(pa.list_(pa.float64()))),
    ("router_score", pa.float64()), ("duplicate", pa.bool_()), ("target_id", pa.int64()), ("logprob", pa.float64()),
])
JOINT_TOKENS_SCHEMA = pa.schema(
    [("layers", pa.list_(pa.int64())) if f.name == "layer" else f for f in TOKENS_SCHEMA]
    + [("sum_single_gain", pa.float64()), ("max_single_gain", pa.float64()), ("interaction", pa.float64())])


def bin_of(p_route_mean: float | np.ndarray, confident: float, fragile: float) -> str | np.ndarray:
    """Confident / Ambiguous / Fragile by the route-averaged p (of one token, or an array)."""
    out = np.where(p_route_mean >= confident, "Confident", np.where(p_route_mean < fragile, "Fragile", "Ambiguous"))
    return str(out) if out.ndim == 0 else out


@dataclass
class LayerRoutes:
    """Every route of every scored token of one trajectory at one layer.

    positions [P]; experts [P, R, k] sorted ids; weights [P, R, k] exactly as applied;
    router_score [P, R]; duplicate [P, R]. Route 0 is the standard route.
    """

    positions: np.ndarray
    experts: np.ndarray
    weights: np.ndarray
    router_score: np.ndarray
    duplicate: np.ndarray

    def part(self, routes: slice) -> LayerRoutes:
        """These tokens' routes `routes` only (route 0 and the sampled alternatives, or the
        uniform null routes), the duplicate flags as computed over all of them."""
        return LayerRoutes(self.positions, self.experts[:, routes], self.weights[:, routes],
                           self.router_score[:, routes], self.duplicate[:, routes])


def group_natural_routes(adapter: MoEAdapter, engine, trajectories: list[Trajectory],
                         layers: list[int]) -> list[dict[int, RouterOutput]]:
    """Each trajectory's router outputs at `layers` (rows: its positions), from one natural
    forward of the group, right-padded as the engines batch it. The fast engine makes that
    pass itself and keeps what scoring the group needs: one natural forward per group."""
    input_ids = [torch.tensor(t.input_ids) for t in trajectories]
    with final_norm_states(adapter) as final:   # the padded rows' read-out, for the padding check
        captured = engine.natural_routes(input_ids, layers)
        if captured is None:   # an engine without a shared pass, or one the fast engine cannot make here
            with torch.no_grad(), capture_routes(adapter, layers) as captured:
                adapter.model(pad_right(input_ids).to(adapter.device), use_cache=False, logits_to_keep=1)
    if engine.padding.due([len(ids) for ids in input_ids]):
        engine.padding.check(final["states"], input_ids, [t.scored_positions for t in trajectories])
    length = max(ids.shape[0] for ids in input_ids)
    return [sequence_routes(captured, b, length, ids.shape[0]) for b, ids in enumerate(input_ids)]


def build_routes(adapter: MoEAdapter, trajectory: Trajectory, layers: list[int],
                 config: CounterfactualConfig, captured: dict[int, RouterOutput] | None = None,
                 check_gating: bool = True) -> dict[int, LayerRoutes]:
    """The standard route (read off the model's own forward: `captured`, or a forward run
    here) and S sampled alternatives per scored token and layer. The adapter's gating rule
    must reproduce the router's own weights on its own choice, since it weights the
    alternatives: checked here on every row (`check_gating`), or by the caller (a run
    checks its groups' rows through its `GatingCheck`)."""
    num_candidates = config.candidates_for(adapter.num_experts)
    if captured is None:
        input_ids = torch.tensor([trajectory.input_ids], device=adapter.device)
        with torch.no_grad(), capture_routes(adapter, layers) as captured:
            adapter.model(input_ids, use_cache=False, logits_to_keep=1)
    positions = np.asarray(trajectory.scored_positions)
    index = torch.as_tensor(positions, device=adapter.device)
    result = {}
    for layer in layers:
        k, out = adapter.top_k_at(layer), captured[layer]
        if check_gating:
            check_gating_rule(adapter, layer, out.logits, out.experts, out.weights)
        index = index.to(out.logits.device)
        logits = out.logits[index].float()                                   # [P, E]
        order = out.experts[index].argsort(dim=-1)
        std_experts = out.experts[index].gather(-1, order)                   # [P, k] sorted
        std_weights = out.weights[index].gather(-1, order)                   # as applied
        scores = adapter.selection_scores(logits, layer)                     # [P, E]
        alternatives = gumbel_top_k_routes(
            scores.double().cpu().numpy(), k, config.routes, num_candidates, config.gumbel_temperature,
            route_rng(config.seed, layer, trajectory.id),
        )                                                                    # [P, S, k]
        if config.null_routes:   # the uniform null: k distinct candidates drawn uniformly, its own stream
            null = uniform_candidate_routes(scores.double().cpu().numpy(), k, config.null_routes, num_candidates,
                                            route_rng(config.seed, layer, trajectory.id, NULL_STREAM))
            alternatives = np.concatenate([alternatives, null], axis=1)          # [P, S + N, k]
        alt_experts = torch.as_tensor(alternatives, device=adapter.device)
        num_positions, num_routes = alt_experts.shape[:2]
        alt_weights = adapter.weights_for(
            logits.repeat_interleave(num_routes, dim=0), alt_experts.reshape(-1, k)
        ).reshape(num_positions, num_routes, k)
        if config.alternative_weights == "matched-mass":   # each alternative carries the standard route's gate mass
            mass = std_weights.float().sum(-1)[:, None, None]
            alt_weights = alt_weights * mass / alt_weights.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        alt_weights = alt_weights.to(out.weights.dtype)                      # dtype the model applies
        experts = torch.cat([std_experts[:, None], alt_experts], dim=1)       # [P, R, k]
        weights = torch.cat([std_weights[:, None], alt_weights], dim=1)
        router_score = scores.gather(-1, experts.reshape(num_positions, -1)).reshape(experts.shape).sum(-1)
        experts_np = experts.cpu().numpy()
        result[layer] = LayerRoutes(
            positions=positions,
            experts=experts_np,
            weights=weights,
            router_score=router_score.double().cpu().numpy(),
            duplicate=np.stack([_duplicates(routes, config.routes) for routes in experts_np]),
        )
    return result


def _duplicates(routes: np.ndarray, num_sampled: int) -> np.ndarray:
    """[R, ...] routes of a token (route 0 standard, then S sampled, then the uniform null)
    -> bool [R]: the same expert set as an earlier route of its own sampler or the standard."""
    flat = routes.reshape(routes.shape[0], -1)
    null_flags = flag_duplicates(np.concatenate([flat[:1], flat[1 + num_sampled:]]))[1:] if len(flat) > 1 + num_sampled else []
    return np.concatenate([flag_duplicates(flat[:1 + num_sampled]), null_flags]).astype(bool)


def token_metrics_rows(logprob: np.ndarray, router_score: np.ndarray, experts: np.ndarray,
                       config: CounterfactualConfig, mass: np.ndarray | None = None,
                       precision: float = float(np.finfo(np.float32).eps)) -> dict[str, np.ndarray]:
    """Per-token quantities of P tokens at once from the logprobs [P, R], router scores
    [P, R], expert sets [P, R, ...] and gate masses [P, R] (the sum of a route's weights)
    of their routes: route 0 standard, routes 1..S the sampled alternatives, any after them
    the uniform null. One array per column, [P] (gain_by_routes [P, len(route_counts(S))]).

    An alternative wins when its p exceeds the standard route's by more than
    `win_tolerance`, and ties when within it; one that drew the standard expert set *is*
    the standard route and always ties (float rounding between two computations of one
    route must not decide the win rate of peaked routers). `sampler_draw_gain` is the gain
    a route drawn from the router's own sampler would show against the best other draw
    (leave-one-out): gain minus it is the S = 1 gain plus (p_max - p_2nd) / S, a comparison
    with the sampler, not with chance. `standard_percentile` is the share of alternatives
    below the standard route (ties half). The uniform null's columns compare the standard
    route with routes of k candidates drawn uniformly (NaN without null routes).
    """
    num_sampled = config.routes
    null_logprob, null_experts = logprob[:, 1 + num_sampled:], experts[:, 1 + num_sampled:]
    logprob, router_score, experts = logprob[:, :1 + num_sampled], router_score[:, :1 + num_sampled], experts[:, :1 + num_sampled]
    p = np.exp(logprob)
    flat = experts.reshape(*experts.shape[:2], -1)
    same_set = (flat[:, :, None] == flat[:, None, :]).all(axis=-1)                       # [P, R, R]
    same_as_standard = same_set[:, 0, 1:]                                                # [P, S]
    standard, alternatives = p[:, 0], p[:, 1:]
    difference = np.where(same_as_standard, 0.0, alternatives - standard[:, None])
    p_route_mean = p.mean(axis=1)
    best_of = expected_best_of(alternatives, route_counts(alternatives.shape[1]))
    same_score = same_set_same_score(logprob, same_set)
    return {
        "p_standard": standard,
        "p_route_mean": p_route_mean,
        "p_best_alt": alternatives.max(axis=1),
        "p_worst_alt": alternatives.min(axis=1),
        "gain": alternatives.max(axis=1) - standard,
        "win_rate": np.mean(difference > config.win_tolerance, axis=1),
        "tie_rate": np.mean(np.abs(difference) <= config.win_tolerance, axis=1),
        "sampler_draw_gain": sampler_draw_gain(alternatives),
        "standard_percentile": np.mean((difference < 0) + 0.5 * (difference == 0), axis=1),
        "gain_by_routes": np.stack(list(best_of.values()), axis=-1) - standard[:, None],
        "alignment": stats.spearman_rows(router_score, same_score),
        "alignment_mass_partial": (np.full(len(p), np.nan) if mass is None else
                                   partial_alignment(router_score, same_score, mass[:, :1 + num_sampled], precision)),
        "bin": bin_of(standard if config.bins == "standard" else p_route_mean, config.confident, config.fragile),
        **uniform_null_columns(standard, np.where(same_as_standard, standard[:, None], alternatives),
                               np.exp(null_logprob), flat[:, 0],
                               null_experts.reshape(*null_experts.shape[:2], flat.shape[-1])),
    }


def uniform_null_columns(standard: np.ndarray, alternatives: np.ndarray, null: np.ndarray, standard_set: np.ndarray,
                         null_sets: np.ndarray) -> dict[str, np.ndarray]:
    """The router against chance, per token: p_standard [P], the sampled alternatives' p
    [P, S], the uniform null routes' p [P, N] and expert sets [P, N, ...] (a route of
    either sampler that drew the standard set takes the standard route's p: one route,
    one score).

    - `p_uniform_mean`: E[p] of a route of k candidates drawn uniformly (mean over the N);
    - `standard_minus_uniform`: p_standard - p_uniform_mean (> 0: the router's own route
      beats an equal-compute route at random);
    - `best_minus_uniform_best`: E[max p of m sampled alternatives] - E[max p of m uniform
      routes], m = min(S, N) (> 0: the router's sampler finds better routes than blind
      search of the same size)."""
    if null.shape[1] == 0:
        missing = np.full(len(standard), np.nan)
        return {"p_uniform_mean": missing, "standard_minus_uniform": missing, "best_minus_uniform_best": missing}
    is_standard = (null_sets == standard_set[:, None]).all(axis=-1)
    null = np.where(is_standard, standard[:, None], null)
    m = min(alternatives.shape[1], null.shape[1])
    return {"p_uniform_mean": null.mean(axis=1), "standard_minus_uniform": standard - null.mean(axis=1),
            "best_minus_uniform_best": expected_best_of(alternatives, [m])[m] - expected_best_of(null, [m])[m]}


PARTIAL_UNDEFINED = 0.999   # router score and gate mass rank the routes alike: nothing is left to partial out
MASS_ROUNDING = 8           # masses within this many units of the weights' float precision are equal


def partial_alignment(router_score: np.ndarray, logprob: np.ndarray, mass: np.ndarray,
                      precision: float = float(np.finfo(np.float32).eps)) -> np.ndarray:
    """Spearman correlation of router score and log p with the routes' gate mass partialled
    out, per token (rows of [P, R]): the Pearson correlation of the residuals of the ranks
    of score and log p after a least-squares fit on the ranks of the mass.

    `precision` is the machine epsilon of the dtype the weights were applied in: masses
    that differ by less than MASS_ROUNDING of it (relative) are equal, so rounding of
    bf16 weights is not partialled out as if it were a difference. Where the mass is
    constant to that precision (normalised top-k weights, matched-mass alternatives) the
    result is the plain Spearman; it is NaN where the router score determines the mass
    (an affine fit of mass on score leaves no more than rounding, or they rank the routes
    alike: OLMoE with norm_topk_prob=false, whose router score is the gate mass; there
    matched-mass alternatives ask the question), or where a side is constant."""
    from scipy.stats import rankdata

    mass, router_score = np.asarray(mass, dtype=float), np.asarray(router_score, dtype=float)
    tolerance = MASS_ROUNDING * precision * np.abs(mass).max(axis=1)
    constant = np.ptp(mass, axis=1) <= tolerance
    ranks = [rankdata(v, axis=-1) for v in (router_score, np.asarray(logprob, dtype=float), mass)]
    score, outcome, gate = [r - r.mean(axis=1, keepdims=True) for r in ranks]
    gate = np.where(constant[:, None], 0.0, gate)

    def residual(values: np.ndarray, on: np.ndarray, skip: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = np.where(skip, 0.0, (values * on).sum(axis=1) / (on * on).sum(axis=1))
        return values - slope[:, None] * on

    out = stats.pearson_rows(residual(score, gate, constant), residual(outcome, gate, constant))
    score_centred = router_score - router_score.mean(axis=1, keepdims=True)
    mass_left = residual(mass - mass.mean(axis=1, keepdims=True), score_centred,
                         np.ptp(router_score, axis=1) == 0)                     # the mass beyond an affine map of the score
    determined = np.sqrt((mass_left ** 2).mean(axis=1)) <= tolerance
    collinear = determined | (np.abs(stats.spearman_rows(router_score, mass)) >= PARTIAL_UNDEFINED)
    return np.where(collinear & ~constant, np.nan, out)


def same_set_same_score(logprob: np.ndarray, same_set: np.ndarray) -> np.ndarray:
    """[P, R] log-probs where routes of one expert set (`same_set` [P, R, R]: routes r and r'
    hold the same experts) all take the first one's: they are one route, and float noise
    between its computations must not rank them."""
    return np.take_along_axis(logprob, same_set.argmax(axis=2), axis=1)


def sampler_draw_gain(alternatives: np.ndarray) -> float | np.ndarray:
    """Mean over alternatives a of (max over the other alternatives of p) - p_a: the gain a
    route drawn from the sampler would show against the best other draw (NaN with one
    alternative); along the last axis of [..., S]."""
    alternatives = np.asarray(alternatives, dtype=float)
    if alternatives.shape[-1] < 2:
        out = np.full(alternatives.shape[:-1], np.nan)
    else:
        order = np.sort(alternatives, axis=-1)
        best, second = order[..., -1:], order[..., -2:-1]
        others_best = np.where(alternatives == best, second, best)   # leave-one-out max (a tie at the top: second == best)
        out = np.mean(others_best - alternatives, axis=-1)
    return float(out) if out.ndim == 0 else out


def expected_best_of(alternatives: np.ndarray, sizes: list[int]) -> dict[int, float | np.ndarray]:
    """E[max p over m alternatives drawn without replacement from the S scored], for each m
    (along the last axis of [..., S]): exact order statistics (sorted x_(i) weighted by
    C(i-1, m-1) / C(S, m)), no resampling."""
    ordered = np.sort(np.asarray(alternatives, dtype=float), axis=-1)
    sizes = tuple(m for m in sizes if m <= ordered.shape[-1])
    best = ordered @ _best_of_weights(ordered.shape[-1], sizes).T                         # [..., len(sizes)]
    return {m: (float(best[..., i]) if best.ndim == 1 else best[..., i]) for i, m in enumerate(sizes)}


@functools.lru_cache(maxsize=64)
def _best_of_weights(count: int, sizes: tuple[int, ...]) -> np.ndarray:
    """[len(sizes), count]: C(i-1, m-1) / C(count, m), the same for every token of a run."""
    from scipy.special import comb

    ranks = np.arange(1, count + 1)
    return np.stack([comb(ranks - 1, m - 1) / comb(count, m) for m in sizes])


def route_counts(num_routes: int) -> list[int]:
    """1, 2, 4, ... up to S, and S itself."""
    sizes = [1 << i for i in range(num_routes.bit_length()) if (1 << i) <= num_routes]
    return sizes + ([num_routes] if sizes[-1] != num_routes else [])


def _list_column(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """[N, k] array -> a list<value_type> column of N lists of length k."""
    n, k = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                    pa.array(values.ravel(), type=value_type))


def routes_table(trajectory: Trajectory, layer: int, routes: LayerRoutes, logprobs: np.ndarray,
                 first_route: int = 0, audit: dict | None = None) -> pa.Table:
    """One row per (position, route) of one layer, in position then route order (routes
    numbered from `first_route`: 0 with the standard route, 1 for the uniform null's table);
    `audit` ("shadow_logprob", "upper_route_flip" [P, R], NaN where not audited) from
    `precision_audit`."""
    num_positions, num_routes, k = routes.experts.shape
    audited = None if audit is None else ~np.isnan(audit["shadow_logprob"]).ravel()
    positions = np.repeat(routes.positions, num_routes)
    targets = np.asarray(trajectory.input_ids)[positions + 1]
    return pa.Table.from_arrays([
        pa.array([trajectory.id] * positions.size, type=pa.string()),
        pa.array(positions, type=pa.int64()),
        pa.array(np.full(positions.size, layer), type=pa.int64()),
        pa.array(np.tile(np.arange(first_route, first_route + num_routes), num_positions), type=pa.int64()),
        _list_column(routes.experts.reshape(-1, k).astype(np.int64), pa.int64()),
        _list_column(routes.weights.double().cpu().numpy().reshape(-1, k), pa.float64()),
        pa.array(routes.router_score.ravel(), type=pa.float64()),
        pa.array(routes.duplicate.ravel(), type=pa.bool_()),
        pa.array(targets, type=pa.int64()),
        pa.array(np.asarray(logprobs, dtype=np.float64).ravel(), type=pa.float64()),
        pa.nulls(positions.size, pa.float64()) if audit is None else
        pa.array(audit["shadow_logprob"].ravel(), type=pa.float64(), mask=~audited),
        pa.nulls(positions.size, pa.bool_()) if audit is None else
        pa.array(audit["upper_route_flip"].ravel() == 1, type=pa.bool_(), mask=~audited),
    ], schema=ROUTES_SCHEMA)


def joint_routes(routes: dict[int, LayerRoutes], joint: list[int], num_sampled: int) -> LayerRoutes:
    """One trajectory's joint routes: route r is route r of every listed layer (sampled
    independently per layer, route 0 standard everywhere), experts/weights [P, R, J, k];
    its router score is the sum of the layers' scores."""
    parts = [routes[layer] for layer in joint]
    experts = np.stack([part.experts for part in parts], axis=2)
    return LayerRoutes(positions=parts[0].positions, experts=experts,
                       weights=torch.stack([part.weights for part in parts], dim=2),
                       router_score=np.sum([part.router_score for part in parts], axis=0),
                       duplicate=np.stack([_duplicates(token, num_sampled) for token in experts]))


def _nested_list_column(values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    """[N, J, k] array -> a list<list<value_type>> column: N lists of J lists of length k."""
    n, j, k = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * j + 1, j, dtype=np.int32)),
                                    _list_column(values.reshape(n * j, k), value_type))


def joint_tables(trajectory: Trajectory, joint: list[int], routes: LayerRoutes, logprobs: np.ndarray,
                 single: dict[int, np.ndarray], config: CounterfactualConfig,
                 flags: np.ndarray | None = None) -> dict[str, pa.Table]:
    """The joint routes (and joint uniform null routes) and tokens tables of one trajectory.
    Beside each token's metrics: the sum and the largest of its single-layer gains at the
    listed layers (same tokens, same routes), and the mean interaction over the sampled
    alternatives r of (p_joint(r) - p_std) - sum_l (p_l(r) - p_std): 0 when the layers'
    effects add up."""
    sampled = slice(0, 1 + config.routes)
    tables = {"joint_routes": joint_routes_table(trajectory, joint, routes.part(sampled), logprobs[:, sampled])}
    if config.null_routes:
        tables["joint_null_routes"] = joint_routes_table(trajectory, joint, routes.part(slice(1 + config.routes, None)),
                                                         logprobs[:, 1 + config.routes:], first_route=1)
    p_joint = np.exp(logprobs[:, sampled])                                                # [P, 1 + S]
    p_single = np.exp(np.stack([single[layer][:, sampled] for layer in joint], axis=1))   # [P, J, 1 + S]
    single_gains = p_single[..., 1:].max(axis=-1) - p_single[..., 0]                      # [P, J]
    interaction = (p_joint[:, 1:] - p_joint[:, :1]) - (p_single[..., 1:] - p_single[..., :1]).sum(axis=1)
    tables["joint_tokens"] = tokens_table(
        trajectory, [list(joint)] * len(routes.positions), routes, logprobs, config, JOINT_TOKENS_SCHEMA,
        {"sum_single_gain": single_gains.sum(axis=1), "max_single_gain": single_gains.max(axis=1),
         "interaction": interaction.mean(axis=1), **({"precision_flag": flags} if flags is not None else {})})
    return tables


def joint_routes_table(trajectory: Trajectory, joint: list[int], routes: LayerRoutes, logprobs: np.ndarray,
                       first_route: int = 0) -> pa.Table:
    """One row per (position, joint route), routes numbered from `first_route`."""
    num_positions, num_routes, num_layers, k = routes.experts.shape
    positions = np.repeat(routes.positions, num_routes)
    return pa.Table.from_arrays([
        pa.array([trajectory.id] * positions.size, type=pa.string()),
        pa.array(positions, type=pa.int64()),
        pa.array([list(joint)] * positions.size, type=pa.list_(pa.int64())),
        pa.array(np.tile(np.arange(first_route, first_route + num_routes), num_positions), type=pa.int64()),
        _nested_list_column(routes.experts.reshape(-1, num_layers, k).astype(np.int64), pa.int64()),
        _nested_list_column(routes.weights.double().cpu().numpy().reshape(-1, num_layers, k), pa.float64()),
        pa.array(routes.router_score.ravel(), type=pa.float64()),
        pa.array(routes.duplicate.ravel(), type=pa.bool_()),
        pa.array(np.asarray(trajectory.input_ids)[positions + 1], type=pa.int64()),
        pa.array(np.asarray(logprobs, dtype=np.float64).ravel(), type=pa.float64()),
    ], schema=JOINT_ROUTES_SCHEMA)


def tokens_table(trajectory: Trajectory, layer, routes: LayerRoutes, logprobs: np.ndarray, config: CounterfactualConfig,
                 schema: pa.Schema = TOKENS_SCHEMA, extra: dict | None = None) -> pa.Table:
    """One row per scored token of one layer (`layer`: an int, or a column of layer lists for
    joint routes) with its metrics (`token_metrics_rows`, from all its routes: standard,
    sampled, uniform null) and `extra` columns."""
    mass = routes.weights.double().cpu().numpy().reshape(*routes.weights.shape[:2], -1).sum(axis=-1)   # [P, R]
    metrics = token_metrics_rows(logprobs, routes.router_score, routes.experts, config, mass,
                                 float(torch.finfo(routes.weights.dtype).eps))
    positions = np.asarray(routes.positions)
    columns = {"trajectory_id": [trajectory.id] * positions.size, "position": positions,
               schema.names[2]: np.full(positions.size, layer) if isinstance(layer, int) else layer,
               "target_id": np.asarray(trajectory.input_ids)[positions + 1],
               "verified": [trajectory.verified] * positions.size, "problem_id": [trajectory.problem_id] * positions.size,
               "n_duplicates": routes.duplicate[:, :1 + config.routes].sum(axis=1), **metrics, **(extra or {})}
    columns["gain_by_routes"] = _list_column(metrics["gain_by_routes"], pa.float64())
    columns.setdefault("precision_flag", np.zeros(positions.size, dtype=bool))
    columns.setdefault("upper_route_flips", pa.nulls(positions.size, pa.int64()))
    columns.setdefault("shadow_max_abs_error", pa.nulls(positions.size, pa.float64()))
    columns.setdefault("standard_route_flip", pa.nulls(positions.size, pa.bool_()))
    return pa.Table.from_arrays([pa.array(columns[field.name], type=field.type) if not isinstance(columns[field.name], pa.Array)
                                 else columns[field.name] for field in schema], schema=schema)


def precision_audit(adapter: MoEAdapter, trajectory: Trajectory, layer: int, routes: LayerRoutes,
                    config: CounterfactualConfig) -> dict | None:
    """Re-score `config.precision_audit_tokens` tokens of one trajectory (drawn with the seed)
    under every sampled route in the model's dtype and in its higher-precision shadow
    (`routelens.engine.precision.audit_routes`): "shadow_logprob" and "upper_route_flip"
    [P, R], NaN for the tokens not drawn. None on a model with no lower precision to audit."""
    from routelens.engine.checks import LOW_PRECISION, model_dtype
    from routelens.engine.precision import ShadowUnavailable, audit_routes

    if model_dtype(adapter) not in LOW_PRECISION or not len(routes.positions):
        return None
    rng = route_rng(config.seed, layer, trajectory.id, PRECISION_AUDIT_STREAM)
    drawn = rng.choice(len(routes.positions), size=min(config.precision_audit_tokens, len(routes.positions)),
                       replace=False)
    shadow = np.full(routes.experts.shape[:2], np.nan)
    flip = np.full(routes.experts.shape[:2], np.nan)
    standard_flip = np.full(routes.experts.shape[0], np.nan)
    ids = torch.tensor(trajectory.input_ids)
    for p in sorted(drawn):
        try:
            audit = audit_routes(adapter, ids, int(routes.positions[p]), layer, torch.as_tensor(routes.experts[p]),
                                 routes.weights[p], config.route_batch_size)
        except ShadowUnavailable:
            return None
        shadow[p], flip[p], standard_flip[p] = audit["shadow_logprob"], audit["flip"], audit["standard_flip"]
    return {"shadow_logprob": shadow, "upper_route_flip": flip, "standard_route_flip": standard_flip}


def token_audit_columns(flags: np.ndarray, audit: dict | None, logprobs: np.ndarray) -> dict:
    """The tokens table's precision columns: the standard-route check's flag, and per
    audited token how many of its sampled routes flip a router above the layer and the
    largest |score - shadow score| over them (nats; the engine's score, `logprobs` [P, R])."""
    if audit is None:
        return {"precision_flag": np.asarray(flags, dtype=bool), "upper_route_flips": pa.nulls(len(flags), pa.int64()),
                "shadow_max_abs_error": pa.nulls(len(flags), pa.float64()),
                "standard_route_flip": pa.nulls(len(flags), pa.bool_())}
    flips, shadow = audit["upper_route_flip"], audit["shadow_logprob"]
    audited = ~np.isnan(shadow).all(axis=1)
    error = np.abs(np.asarray(logprobs)[:, :shadow.shape[1]] - np.nan_to_num(shadow)).max(axis=1)
    return {"precision_flag": np.asarray(flags, dtype=bool),
            "upper_route_flips": pa.array(np.nan_to_num(flips).sum(axis=1).astype(np.int64), type=pa.int64(),
                                          mask=~audited),
            "shadow_max_abs_error": pa.array(error, type=pa.float64(), mask=~audited),
            "standard_route_flip": pa.array(audit["standard_route_flip"] == 1, type=pa.bool_(), mask=~audited)}


def analyse_trajectories(adapter: MoEAdapter, engine, trajectories: list[Trajectory], layers: list[int],
                         config: CounterfactualConfig, joint: list[int] | None = None,
                         audited: frozenset[int] = frozenset(), gating: GatingCheck | None = None
                         ) -> list[dict[str, pa.Table]]:
    """Sample and score every route of a group of trajectories (scored together by the
    engine, layer by layer, then the joint routes at the `joint` layers when given); return
    each trajectory's tables: routes and tokens (and joint_routes, joint_tokens). Where
    right padding is not inert on this model (`PaddingCheck`), one trajectory at a time.
    The trajectories whose index in the group is in `audited` have tokens re-scored in the
    model's higher-precision shadow (`precision_audit`; low-precision models only). The
    gating rule is checked on the group's rows together through `gating` (a run's
    `GatingCheck`, whose row budget bounds its cost; None: every row)."""
    gating = gating or GatingCheck(adapter, rows=None)
    if len(trajectories) > 1 and engine.padding.failure:
        return [analyse_trajectories(adapter, engine, [t], layers, config, joint,
                                     frozenset({0}) if i in audited else frozenset(), gating)[0]
                for i, t in enumerate(trajectories)]
    try:
        natural = group_natural_routes(adapter, engine, trajectories, layers)
    except PaddingNotInert as reason:   # exact either way: from here on, one trajectory at a time
        warnings.warn(f"{reason}; scoring one trajectory at a time", stacklevel=2)
        return analyse_trajectories(adapter, engine, trajectories, layers, config, joint, audited, gating)
    for layer in layers:   # the group's rows together: the check's rows spread over its trajectories
        gating.check(layer, *(torch.cat([getattr(captured[layer], field) for captured in natural])
                              for field in ("logits", "experts", "weights")))
    routes = [build_routes(adapter, trajectory, layers, config, captured, check_gating=False)
              for trajectory, captured in zip(trajectories, natural)]
    results = []
    scored, flags = {}, {}
    for layer in layers:
        items = [ScoreItem(torch.tensor(t.input_ids), r[layer].positions, torch.as_tensor(r[layer].experts),
                           r[layer].weights) for t, r in zip(trajectories, routes)]
        scored[layer] = engine.score_batch(layer, items)
        flags[layer] = engine.token_flags(items)
    if joint:
        joint_sets = [joint_routes(r, joint, config.routes) for r in routes]
        joint_items = [ScoreItem(torch.tensor(t.input_ids), j.positions, torch.as_tensor(j.experts), j.weights)
                       for t, j in zip(trajectories, joint_sets)]
        joint_scored = engine.score_batch(joint, joint_items)
        joint_flags = engine.token_flags(joint_items)
    sampled, null = slice(0, 1 + config.routes), slice(1 + config.routes, None)
    audits = {(i, layer): precision_audit(adapter, trajectory, layer, routes[i][layer].part(sampled), config)
              for i, trajectory in enumerate(trajectories) if i in audited for layer in layers}
    for i, trajectory in enumerate(trajectories):
        tables = {"routes": pa.concat_tables([routes_table(trajectory, layer, routes[i][layer].part(sampled),
                                                           scored[layer][i][:, sampled], audit=audits.get((i, layer)))
                                              for layer in layers]),
                  "tokens": pa.concat_tables([tokens_table(trajectory, layer, routes[i][layer], scored[layer][i], config,
                                                           extra=token_audit_columns(flags[layer][i],
                                                                                     audits.get((i, layer)),
                                                                                     scored[layer][i]))
                                              for layer in layers])}
        if config.null_routes:
            tables["null_routes"] = pa.concat_tables([routes_table(trajectory, layer, routes[i][layer].part(null),
                                                                   scored[layer][i][:, null], first_route=1)
                                                      for layer in layers])
        if joint:
            tables.update(joint_tables(trajectory, joint, joint_sets[i], joint_scored[i],
                                       {layer: scored[layer][i] for layer in joint}, config, joint_flags[i]))
        results.append(tables)
    return results


def trajectory_groups(todo: list[int], trajectories: list[Trajectory], max_tokens: int,
                      max_group: int) -> list[list[int]]:
    """Consecutive undone trajectories batched together up to a token budget."""
    groups, current, tokens = [], [], 0
    for index in todo:
        length = len(trajectories[index].input_ids)
        if current and (tokens + length > max_tokens or len(current) >= max_group):
            groups.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += length
    return groups + ([current] if current else [])


def summarise_group(frame: pd.DataFrame, config: CounterfactualConfig, cells: int = 1) -> dict:
    """Token count, the gain and the router against the uniform null, win / tie / loss
    rates and their sign test, the standard route's percentile and Fisher-z mean alignment
    (raw and with gate mass partialled out), each with a bootstrap interval at
    `config.confidence` resampling the clusters of `frame["cluster"]` (problems, or
    trajectories; marked `few_clusters` below stats.MIN_CLUSTERS), the gain's interval
    adjusted for the `cells` of its table (Bonferroni: at 1 - (1 - confidence) / cells)
    and whether it survives (excludes 0), and the mean gain as a function of S."""
    seed, resamples = config.seed, config.bootstrap_resamples
    loss = (1.0 - frame["win_rate"] - frame["tie_rate"]).clip(lower=0.0)   # share of alternatives below std - tolerance

    def mean_or_none(value: float) -> float | None:
        return None if np.isnan(value) else float(value)

    def interval(value: pd.Series, transform=None, confidence: float = config.confidence) -> list[float | None]:
        return stats.cluster_interval(frame["cluster"], value, seed, resamples, transform, confidence)

    def with_ci(name: str, value: pd.Series) -> dict:
        return {name: mean_or_none(value.mean()), f"{name}_ci": interval(value)}

    def alignment(name: str) -> dict:
        z = pd.Series(stats.fisher_z(frame[name].to_numpy()), index=frame.index)
        return {name: mean_or_none(stats.fisher_z_mean(frame[name].to_numpy())),
                f"{name}_ci": interval(z, transform=np.tanh), f"{name}_defined": int(frame[name].notna().sum())}

    level = 1 - (1 - config.confidence) / max(cells, 1)   # Bonferroni over the table's cells
    adjusted, uniform_adjusted = interval(frame["gain"], confidence=level), interval(frame["standard_minus_uniform"],
                                                                                     confidence=level)
    clusters = int(frame["cluster"].nunique())
    return {
        "tokens": int(len(frame)),
        "trajectories": int(frame["trajectory_id"].nunique()),
        "clusters": clusters,
        "p_standard": mean_or_none(frame["p_standard"].mean()),
        "p_best_alt": mean_or_none(frame["p_best_alt"].mean()),
        **with_ci("gain", frame["gain"]),
        "gain_ci_adjusted": adjusted,
        "gain_survives_adjustment": None if None in adjusted else bool(adjusted[0] > 0 or adjusted[1] < 0),
        "p_uniform_mean": mean_or_none(frame["p_uniform_mean"].mean()),
        **with_ci("standard_minus_uniform", frame["standard_minus_uniform"]),
        "standard_minus_uniform_ci_adjusted": uniform_adjusted,
        "standard_minus_uniform_survives_adjustment": None if None in uniform_adjusted else
        bool(uniform_adjusted[0] > 0 or uniform_adjusted[1] < 0),
        **with_ci("best_minus_uniform_best", frame["best_minus_uniform_best"]),
        **with_ci("sampler_draw_gain", frame["sampler_draw_gain"]),
        **with_ci("win_rate", frame["win_rate"]),
        **with_ci("tie_rate", frame["tie_rate"]),
        **with_ci("loss_rate", loss),
        "win_loss_sign_test": win_loss_sign_test(frame["cluster"], frame["win_rate"] - loss),
        **with_ci("standard_percentile", frame["standard_percentile"]),
        **alignment("alignment"),
        **alignment("alignment_mass_partial"),
        "few_clusters": clusters < stats.MIN_CLUSTERS,
        "gain_by_routes": _gain_by_routes(frame, config.routes),
    }


def win_loss_sign_test(clusters: pd.Series, win_minus_loss: pd.Series) -> dict:
    """Do alternatives beat the standard route more often than they lose to it? An exact
    two-sided sign test over clusters (problems or trajectories: the independent unit): per
    cluster, the mean over its tokens of (win share - loss share), ties (shares within the
    tolerance) left out by construction; clusters at exactly 0 are dropped
    (`scipy.stats.binomtest`)."""
    from scipy.stats import binomtest

    per_cluster = win_minus_loss.groupby(clusters.to_numpy()).mean()
    above, below = int((per_cluster > 0).sum()), int((per_cluster < 0).sum())
    p = float(binomtest(above, above + below, 0.5).pvalue) if above + below else None
    return {"clusters_alternatives_ahead": above, "clusters_standard_ahead": below,
            "clusters_even": int((per_cluster == 0).sum()), "p_value": p}


def add_q_values(groups: list[dict]) -> None:
    """Benjamini-Hochberg q-values of the sign tests of a table's cells, added beside each
    cell's p-value (cells without a test get none)."""
    tested = [group["win_loss_sign_test"] for group in groups if group["win_loss_sign_test"]["p_value"] is not None]
    q_values = stats.bh_qvalues(np.array([test["p_value"] for test in tested]))
    for test, q in zip(tested, q_values):
        test["q_value"] = float(q)


def _gain_by_routes(frame: pd.DataFrame, num_routes: int) -> dict[str, float]:
    """Mean expected gain of the best of m alternatives, m = 1, 2, 4, ..., S (from the same rows)."""
    if frame.empty:
        return {}
    curves = np.array(frame["gain_by_routes"].tolist(), dtype=float)   # [tokens, len(route_counts(S))]
    return {str(m): float(curves[:, i].mean()) for i, m in enumerate(route_counts(num_routes))}


def with_clusters(tokens: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The tokens with a `cluster` column, the unit the intervals and tests resample: the
    problem when every trajectory carries a problem id (trajectories of one problem are not
    independent), the trajectory otherwise; and the unit's name."""
    if "problem_id" in tokens.columns and len(tokens) and tokens["problem_id"].notna().all():
        return tokens.assign(cluster=tokens["problem_id"].astype(str)), "problems"
    return tokens.assign(cluster=tokens["trajectory_id"]), "trajectories"


def bin_changes(tokens: pd.DataFrame, config: CounterfactualConfig) -> dict:
    """How many tokens the other binning rule (route-averaged p against the standard
    route's p) puts in another bin: per bin of this run's rule, and in all."""
    other = "route-mean" if config.bins == "standard" else "standard"
    p = tokens["p_route_mean"] if other == "route-mean" else tokens["p_standard"]
    moved = tokens["bin"].to_numpy() != bin_of(p.to_numpy(), config.confident, config.fragile)
    return {"other_rule": other, "tokens": int(moved.sum()),
            "by_bin": {name: int(moved[(tokens["bin"] == name).to_numpy()].sum()) for name in BINS}}


def summarise(tokens: pd.DataFrame, layers: list[int], config: CounterfactualConfig) -> dict:
    """summary.json: per layer x bin (and all tokens of the layer)."""
    tokens, unit = with_clusters(tokens)
    frames = {}
    for layer in layers:
        at_layer = tokens[tokens["layer"] == layer]
        frames[str(layer)] = {name: at_layer[at_layer["bin"] == name] for name in BINS} | {ALL_TOKENS: at_layer}
    cells = sum(not frame.empty for groups in frames.values() for frame in groups.values())   # the table's cells
    per_layer = {layer: {name: summarise_group(frame, config, cells) for name, frame in groups.items()}
                 for layer, groups in frames.items()}
    add_q_values([group for groups in per_layer.values() for group in groups.values()])
    binned = "p_route_mean" if config.bins == "route-mean" else "p_standard"
    return {
        "analysis": "counterfactual",
        "bins": {"Confident": f"{binned} >= {config.confident}",
                 "Ambiguous": f"{config.fragile} <= {binned} < {config.confident}",
                 "Fragile": f"{binned} < {config.fragile}"},
        "bin_rule": config.bins,
        "bin_changes": {layer: bin_changes(tokens[tokens["layer"] == int(layer)], config) for layer in per_layer},
        "cluster_unit": unit,
        "interval": f"{config.confidence:.0%} percentile bootstrap over {unit}, {config.bootstrap_resamples} "
                    f"resamples; few_clusters marks intervals over fewer than {stats.MIN_CLUSTERS} {unit}",
        "confidence": config.confidence,
        "cells": cells,
        "alternative_weights": config.alternative_weights,
        "null_routes": config.null_routes,
        "win_tolerance": config.win_tolerance,
        "definitions": {
            "clusters": f"the independent units the intervals and the sign test resample: {unit}"
                        + (" (problem_id of the trajectories)" if unit == "problems" else
                           " (the trajectories carry no problem_id)"),
            "gain": "mean over tokens of p(best of the S sampled alternatives) - p_standard: what a search over S "
                    "routes of the router's sampler finds; >= 0 by construction when S is large",
            "standard_minus_uniform": "mean over tokens of p_standard - E[p of a uniform null route] (k candidates "
                                      "drawn uniformly, N per token, weighted like the alternatives): above 0, the "
                                      "router's own route beats an equal-compute route at random",
            "best_minus_uniform_best": "mean over tokens of E[max p of m sampled alternatives] - E[max p of m uniform "
                                       "null routes], m = min(S, N): above 0, the router's sampler finds better routes "
                                       "than a blind search of the same size",
            "sampler_draw_gain": "mean over alternatives a of (best other alternative's p - p_a), leave-one-out: the "
                                 "gain a draw of the router's own sampler shows; gain - this = the S = 1 gain + "
                                 "(p_max - p_2nd) / S, a comparison with the sampler, not with chance",
            "win_rate": f"share of alternatives with p_alt - p_standard > {config.win_tolerance}",
            "tie_rate": f"share of alternatives within {config.win_tolerance} of p_standard (the standard set included)",
            "loss_rate": f"share of alternatives with p_standard - p_alt > {config.win_tolerance} (1 - win - tie)",
            "win_loss_sign_test": f"exact two-sided sign test over {unit} of their tokens' mean (win share - loss "
                                  "share): do alternatives beat the standard route more often than they lose to it, "
                                  "ties aside; p_value unadjusted, q_value Benjamini-Hochberg over the table's cells",
            "gain_ci_adjusted": "the gain's interval at 1 - (1 - confidence) / cells (Bonferroni over the table's "
                                "cells); gain_survives_adjustment: it excludes 0 (standard_minus_uniform_ci_adjusted "
                                "and standard_minus_uniform_survives_adjustment: the same for the uniform null)",
            "standard_percentile": "secondary: share of alternatives below the standard route, ties counted as half "
                                   "(so a cell of ties reads 0.5); read win, tie and loss rates first",
            "alignment": "Fisher-z mean over tokens of Spearman(router score, log p) over the standard route and the S "
                         "alternatives; raw: a route with more gate mass has a larger output, so this mixes the "
                         "router's preference with scale",
            "alignment_mass_partial": "the same with the routes' gate mass partialled out (rank residuals); undefined "
                                      "where the router score ranks routes as the gate mass does (OLMoE's softmax "
                                      "without top-k normalisation: there, run --alternative-weights matched-mass)",
            "gain_by_routes": "mean expected p(best of m alternatives) - p_standard, m drawn from the S scored",
            "bin_changes": "tokens the other binning rule puts in another bin",
        },
        "layers": per_layer,
    }


def joint_verdict(interaction_ci: list) -> str | None:
    """How the listed layers' effects on a route combine, from the interval (over
    trajectories) of the mean per-route interaction (p_joint(r) - p_std) - sum_l (p_l(r) -
    p_std): additive (the interval holds 0), super-additive (above 0: forced together, the
    layers change p by more than the sum of their single-layer changes) or cancelling
    (below 0: by less; their changes partly cancel or saturate)."""
    if None in interaction_ci:
        return None
    if interaction_ci[0] <= 0 <= interaction_ci[1]:
        return "additive"
    return "super-additive" if interaction_ci[0] > 0 else "cancelling"


def summarise_joint(tokens: pd.DataFrame, joint: list[int], config: CounterfactualConfig) -> dict:
    """summary.json's `joint` block: per bin of the joint routes (binned by the run's rule), the usual
    metrics of the joint routes and how the joint gain compares with the single-layer
    gains of the same tokens, each paired difference with its interval over the clusters
    (problems, or trajectories)."""
    seed, resamples, confidence = config.seed, config.bootstrap_resamples, config.confidence
    tokens, unit = with_clusters(tokens)
    groups = {name: tokens[tokens["bin"] == name] for name in BINS}
    groups[ALL_TOKENS] = tokens
    cells = sum(not frame.empty for frame in groups.values())
    out = {}
    for name, frame in groups.items():
        group = summarise_group(frame, config, cells)
        for column in ("sum_single_gain", "max_single_gain", "interaction"):
            group[column] = None if frame.empty else float(frame[column].mean())
            group[f"{column}_ci"] = stats.cluster_interval(frame["cluster"], frame[column], seed, resamples,
                                                           confidence=confidence)
        for label, other in (("joint_minus_sum", "sum_single_gain"), ("joint_minus_best_single", "max_single_gain")):
            difference = frame["gain"] - frame[other]
            group[label] = None if frame.empty else float(difference.mean())
            group[f"{label}_ci"] = stats.cluster_interval(frame["cluster"], difference, seed, resamples,
                                                          confidence=confidence)
        # the verdict is a claim per bin: read off the interval adjusted over the bins (Bonferroni)
        group["interaction_ci_adjusted"] = stats.cluster_interval(
            frame["cluster"], frame["interaction"], seed, resamples, confidence=1 - (1 - confidence) / max(cells, 1))
        group["verdict"] = joint_verdict(group["interaction_ci_adjusted"])
        out[name] = group
    add_q_values(list(out.values()))
    return {"layers": list(joint), "bins": out, "cluster_unit": unit,
            "definitions": {
                "joint route": "route r forced at every listed layer at once (route r of each layer, sampled "
                               "independently per layer, weights by the gating rule on the natural router logits)",
                "sum_single_gain": "sum over the listed layers of the token's single-layer gain",
                "max_single_gain": "the token's largest single-layer gain",
                "interaction": "mean over alternatives r of (p_joint(r) - p_std) - sum_l (p_l(r) - p_std): the same "
                               "route's joint change minus the sum of its single-layer changes (0 when they add up)",
                "verdict": "from the interaction's interval over the clusters adjusted over the bins "
                           "(interaction_ci_adjusted: at 1 - (1 - confidence) / cells, Bonferroni): additive (holds "
                           "0: no interaction detected, not a proof of additivity), super-additive (above 0) or "
                           "cancelling (below 0: the layers' changes partly cancel or saturate)",
                "joint_minus_sum": "best-of-S joint gain - sum of the per-layer best-of-S gains: biased below 0 (the "
                                   "best of a sum is at most the sum of the bests), so not a test of additivity",
                "joint_minus_best_single": "best-of-S joint gain - the largest per-layer best-of-S gain",
            }}


def keep_step_ok_tokens(trajectories: list[Trajectory], only_step_ok: bool | None) -> tuple[list[Trajectory], dict]:
    """With step checks on (None: when every trajectory carries them), score only the tokens
    of right intermediate steps: a "verified" trajectory can hold a wrong step, and a route
    that makes a wrong digit likelier must not count as better. Trajectories left without a
    token to score are dropped. Returns them and what the summary reports."""
    from dataclasses import replace

    checked = all(t.step_ok is not None for t in trajectories)
    if only_step_ok and not checked:
        missing = next(t.id for t in trajectories if t.step_ok is None)
        raise SettingError(f"`only_step_ok` needs step checks on every trajectory; {missing!r} has no 'step_ok' "
                           "(the arithmetic task's trajectories carry them; other tasks: only_step_ok=False, "
                           "--no-only-step-ok)", "only_step_ok")
    active = checked if only_step_ok is None else only_step_ok
    total = sum(len(t.scored_positions) for t in trajectories)
    if not active:
        return trajectories, {"only_step_ok": False, "steps_checked": checked, "tokens_scored": total,
                              "tokens_excluded": 0, "trajectories_excluded": 0}
    kept = [replace(t, only_positions=t.step_ok_positions()) for t in trajectories]
    kept = [t for t in kept if t.only_positions]
    if not kept:
        raise RouteLensError("no token lies in a right step; nothing to score (pass --no-only-step-ok to score them all)")
    scored = sum(len(t.scored_positions) for t in kept)
    return kept, {"only_step_ok": True, "steps_checked": True, "tokens_scored": scored,
                  "tokens_excluded": total - scored, "trajectories_excluded": len(trajectories) - len(kept)}


def precision_summary(tokens: pd.DataFrame, config: CounterfactualConfig, dtype: str) -> dict:
    """What low precision did to the scores, from the tokens table: the tokens the standard-
    route check flagged, and the precision audit's share of sampled-route scores that rest on
    a router above the layer choosing other experts than the float32 shadow does, per layer."""
    def per_layer(frame: pd.DataFrame) -> dict:
        audited = frame[frame["upper_route_flips"].notna()]
        scores = len(audited) * (1 + config.routes)
        flipped = int(audited["upper_route_flips"].sum())
        return {"tokens": len(frame), "flagged_tokens": int(frame["precision_flag"].sum()),
                "audited_tokens": len(audited), "audited_scores": scores, "scores_with_upper_route_flip": flipped,
                "share_with_upper_route_flip": flipped / scores if scores else None,
                "tokens_with_standard_route_flip": int(audited["standard_route_flip"].astype(bool).sum())
                if "standard_route_flip" in audited else None,
                "shadow_max_abs_error": float(audited["shadow_max_abs_error"].max()) if len(audited) else None}

    if "precision_flag" not in tokens:
        return {}
    trajectories = tokens.loc[tokens["upper_route_flips"].notna(), "trajectory_id"].nunique()
    audited = trajectories > 0
    return {"dtype": dtype,
            "audit": (f"float32 shadow: {trajectories} trajectories (the first up to {config.precision_audit}), "
                      f"{config.precision_audit_tokens} token(s) each per layer drawn with the seed, every sampled "
                      "route") if audited else
                     "none (" + ("the model computes in float32" if dtype in ("float32", "float64") else
                                 "precision_audit 0 or no shadow") + ")",
            "definitions": {
                "flagged_tokens": "tokens whose standard-route score missed the calibrated max tolerance against the "
                                  "natural forward while the mean held (a low-precision tail the run continued past); "
                                  "tokens table: precision_flag",
                "scores_with_upper_route_flip": "audited (token, sampled route) scores, duplicates of a route "
                                                "included, for which a router above the layer picks another expert "
                                                "set for the token in the model's dtype than in the float32 shadow "
                                                "(plain forwards of the prefix); routes table: upper_route_flip. It "
                                                "does not say whether the token's gain or bin changes",
                "tokens_with_standard_route_flip": "audited tokens whose standard route at the layer (the baseline of "
                                                   "every gain) is another expert set in the model's dtype than in the "
                                                   "float32 shadow; tokens table: standard_route_flip",
                "shadow_max_abs_error": "largest |score - float32 shadow score| over the audited scores, nats"},
            "layers": {str(layer): per_layer(tokens[tokens["layer"] == layer]) for layer in sorted(tokens["layer"].unique())}}


def run_counterfactual(loaded, trajectories: list[Trajectory], config: CounterfactualConfig, out: str | None,
                       data_info: dict, overwrite: bool = False, show_progress: bool = True,
                       ray: RaySettings | None = None):
    """Run the analysis into the run folder `out` (resuming a cut-off run of the same
    config), or in memory when `out` is None; return the completed run (`RunFolder` or
    `MemoryRun`: its `summary` and `read(table)`). With `ray`, the trajectory groups are
    scored by a pool of Ray actors (`routelens.distributed`), into the same parts."""
    from routelens.engine import make_engine

    check_ray_can_load(loaded, ray)
    adapter = loaded.adapter
    layers = adapter.resolve_layers(config.layers)
    joint = sorted(layers) if config.joint_layers else None
    if joint is not None and len(joint) < 2:
        raise SettingError(f"`joint_layers` {config.joint_layers} name {len(joint)} distinct layer of this model; "
                           f"list two or more of its MoE layers {adapter.moe_layers}", "joint_layers")
    if joint is not None:
        adapter.one_top_k(joint, "`joint_layers` (routes forced at several layers at once)")
    check_route_settings(max(adapter.top_k_at(layer) for layer in layers), adapter.num_experts,
                         config.candidates_for(adapter.num_experts), config.routes, config.gumbel_temperature)
    if not trajectories:
        raise RouteLensError("no trajectory to score; give at least one")
    trajectories, step_check = keep_step_ok_tokens(trajectories, config.only_step_ok)
    engine = make_engine(config.engine, adapter, route_batch_size=config.route_batch_size,
                         memory_budget=config.memory_budget, max_fallback_time=config.max_fallback_time,
                         check_rows=config.check_rows)
    run_config = {**loaded.identity(), "engine_used": engine.name, "dtype": loaded.dtype, **data_info, **config.to_dict(),
                  "resolved_layers": layers, "resolved_candidates": config.candidates_for(adapter.num_experts),
                  "resolved_only_step_ok": step_check["only_step_ok"], **({"resolved_joint_layers": joint} if joint else {})}
    tables = (("routes", "tokens") + (("null_routes",) if config.null_routes else ())
              + (("joint_routes", "joint_tokens") if joint else ()) + (("joint_null_routes",) if joint and config.null_routes else ()))
    passes = len(layers) + (1 if joint else 0)   # scored (token, layer) pairs per token; the joint routes count once

    def summarise_run(folder) -> dict:
        tokens = folder.read("tokens")
        summary = summarise(tokens, layers, config)
        summary["precision"] = precision_summary(tokens, config, loaded.dtype)
        summary["step_check"] = step_check
        if joint:
            summary["joint"] = summarise_joint(folder.read("joint_tokens"), joint, config)
        return summary

    def tokens_of(unit: int) -> int:
        return len(trajectories[unit].scored_positions) * passes

    run = AnalysisRun(
        kind="counterfactual", run_config=run_config, tables=tables, units=len(trajectories),
        job=CounterfactualJob(trajectories, layers, config, joint, engine=engine), summarise=summarise_run,
        groups=lambda todo: trajectory_groups(todo, trajectories, config.group_tokens, max_group=engine.max_group),
        extra={"model": adapter.describe(), "device": loaded.device, "performance": config.performance()},
        label="counterfactual", progress_unit="tokens", unit_weight=tokens_of,
        done_weight=lambda unit: sum(unit[name].num_rows for name in ("tokens", "joint_tokens") if name in unit),
        timings=lambda todo, seconds: {"tokens_scored_this_session": sum(tokens_of(i) for i in todo)},
        summary_checks=lambda summary: {"low_precision": summary["precision"]} if summary.get("precision") else {},
        memory_budget=config.memory_budget)
    return run_analysis(run, loaded, out, overwrite=overwrite, show_progress=show_progress, ray=ray)


class CounterfactualJob(UnitJob):
    """The counterfactual analysis of groups of trajectories (units: trajectory indices)."""

    def __init__(self, trajectories: list[Trajectory], layers: list[int], config: CounterfactualConfig,
                 joint: list[int] | None, engine=None):
        self.trajectories, self.layers, self.config, self.joint = trajectories, layers, config, joint
        self._engine = engine   # this process's engine, already built; an actor builds its own

    def setup(self, loaded=None) -> None:
        from routelens.engine import make_engine

        self._adapter = self.load(loaded).adapter
        self._engine = getattr(self, "_engine", None) or make_engine(
            self.config.engine, self._adapter, route_batch_size=self.config.route_batch_size,
            memory_budget=self.config.memory_budget, max_fallback_time=self.config.max_fallback_time,
            check_rows=self.config.check_rows)
        self._gating = GatingCheck(self._adapter, self.config.check_rows)   # this process's rows: a fixed budget

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        audited = frozenset(i for i, unit in enumerate(units) if unit < self.config.precision_audit)
        return analyse_trajectories(self._adapter, self._engine, [self.trajectories[i] for i in units],
                                    self.layers, self.config, self.joint, audited, self._gating)

    def checks(self) -> dict:
        return engine_checks(self._engine, self._gating)


def engine_checks(engine, gating: GatingCheck | None = None) -> dict:
    """What run.json records of the run-time checks: the gating rule's (rows per layer and
    how they were chosen), the fast engine's block-algebra check's, the largest
    standard-route deviation from the natural forward (nats) and whether the fast engine
    fell back, and why."""
    block = getattr(engine, "block_check", None)
    return {**(gating.record() if gating is not None else {}), **(block.record() if block is not None else {}),
            **engine.check_record(),
            **engine.padding.record("trajectory", "one trajectory at a time" if engine.max_group == 1
                                    else f"groups of up to {engine.max_group} trajectories")}
