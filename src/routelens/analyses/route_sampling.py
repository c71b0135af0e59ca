"""Alternative routes of equal compute, sampled by Gumbel-top-k.

For each token, the M experts with the highest selection score are the candidates; S
routes of exactly k distinct candidates are drawn without replacement with probability
proportional to score^(1/temperature) (Gumbel-top-k: add Gumbel(0, 1) noise to
log(score) / temperature and keep the k largest keys). Candidates are ranked with a fixed
tie-break (lower expert id first). Returned expert ids are sorted ascending.
"""

from __future__ import annotations

import hashlib

import numpy as np

from routelens.errors import SettingError

NULL_STREAM = 11   # route_rng stream of the uniform null routes: the Gumbel routes' draws stay as they were
PRECISION_AUDIT_STREAM = 13   # route_rng stream of the tokens the precision audit re-scores


def route_rng(seed: int, layer: int, unit_id: str, *streams: int) -> np.random.Generator:
    """The generator for one (trajectory or item, layer[, stream...]): independent of
    processing order, so resumed and uninterrupted runs draw identical routes."""
    digest = int.from_bytes(hashlib.sha256(unit_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, layer, digest, *streams])


def uniform_routes(num_tokens: int, num_experts: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """[N, k] routes of k distinct experts drawn uniformly at random per token, sorted ids."""
    return np.sort(np.argsort(rng.random((num_tokens, num_experts)), axis=-1)[:, :k], axis=-1)


def check_route_settings(k: int, num_experts: int, num_candidates: int, num_routes: int,
                         temperature: float) -> None:
    if num_candidates < k:
        raise SettingError(
            f"`candidates` {num_candidates} is smaller than the model's top-k {k}; "
            f"a route needs k distinct experts, so use `candidates` >= {k}"
        , "candidates")
    if num_candidates == k:
        raise SettingError(
            f"`candidates` {num_candidates} equals the model's top-k {k}: the only route of k distinct candidate experts "
            f"is the standard one, so every alternative would be the standard route; use `candidates` > {k}"
            + ("" if num_experts > k else f" (this model has only {num_experts} experts: there is no alternative)")
        , "candidates")
    if num_candidates > num_experts:
        raise SettingError(
            f"`candidates` {num_candidates} exceeds the model's {num_experts} experts; use `candidates` <= {num_experts}"
        , "candidates")
    if num_routes < 1:
        raise SettingError(f"`routes` must be at least 1, got {num_routes}", "routes")
    if not temperature > 0:
        raise SettingError(f"`gumbel_temperature` must be positive, got {temperature}", "gumbel_temperature")


def top_candidates(scores: np.ndarray, num_candidates: int) -> np.ndarray:
    """[N, E] -> [N, M] expert ids by descending score, ties to the lower id."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :num_candidates]


def gumbel_top_k_routes(scores: np.ndarray, k: int, num_routes: int, num_candidates: int,
                        temperature: float, rng: np.random.Generator) -> np.ndarray:
    """scores [N, E] (non-negative) -> experts [N, S, k], each route k distinct sorted ids."""
    candidates = top_candidates(scores, num_candidates)                         # [N, M]
    with np.errstate(divide="ignore"):
        log_scores = np.log(np.take_along_axis(scores, candidates, axis=-1)) / temperature
    log_scores = np.maximum(log_scores, -1e30)       # a zero score stays drawable last, not NaN
    keys = log_scores[:, None, :] + rng.gumbel(size=(scores.shape[0], num_routes, num_candidates))
    picked = np.argsort(-keys, axis=-1, kind="stable")[..., :k]                  # [N, S, k]
    experts = np.take_along_axis(candidates[:, None, :].repeat(num_routes, axis=1), picked, axis=-1)
    return np.sort(experts, axis=-1)


def uniform_candidate_routes(scores: np.ndarray, k: int, num_routes: int, num_candidates: int,
                             rng: np.random.Generator) -> np.ndarray:
    """scores [N, E] -> experts [N, S, k]: each route k distinct experts drawn uniformly from
    the token's admissible top-M candidates (every k-subset equally likely; the router's
    preference among them ignored): the null of "does the router beat an equal-compute
    route at random". Admissible: a positive selection score, as every route of the Gumbel
    sampler has (a group-limited router scores experts outside its admitted groups 0, and
    no route of its may use them); at least the k best candidates either way."""
    candidates = top_candidates(scores, num_candidates)                          # [N, M], best first
    admissible = np.maximum((np.take_along_axis(scores, candidates, axis=-1) > 0).sum(axis=-1), k)   # [N]
    keys = rng.random((scores.shape[0], num_routes, num_candidates))
    keys = np.where(np.arange(num_candidates) < admissible[:, None, None], keys, 2.0)   # inadmissible: never drawn
    picked = np.argsort(keys, axis=-1, kind="stable")[..., :k]                          # [N, S, k] uniform k-subsets
    experts = np.take_along_axis(candidates[:, None, :].repeat(num_routes, axis=1), picked, axis=-1)
    return np.sort(experts, axis=-1)


def flag_duplicates(routes: np.ndarray) -> np.ndarray:
    """routes [R, k] sorted, route 0 standard -> bool [R]: same expert set as an earlier route."""
    seen, flags = set(), np.zeros(routes.shape[0], dtype=bool)
    for index, route in enumerate(map(tuple, routes)):
        flags[index] = route in seen
        seen.add(route)
    return flags
