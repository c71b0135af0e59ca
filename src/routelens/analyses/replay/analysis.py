"""The routing replay audit: an inference engine's routes against the model's own, and what
forcing them costs.

Input: trajectories and an `EngineRoutes` (per trajectory int [T, L, k]: the experts the
engine chose for token t at MoE layer l; -1 in every slot: not reported). Per trajectory
(the unit of the run, resumable):

- the natural run: one forward of the model as it is, every router recorded (its experts,
  and the selection scores it chose by: `adapter.selection_scores`);
- the audit, per (token, layer) the engine reported: `flipped` (the engine's expert set is
  not the natural run's), the Jaccard index of the two sets, and the router's `margin` (the
  k-th minus the (k+1)-th largest selection score of the natural run: how far the decision
  was from a tie); per token the number of layers that flip;
- the replayed run: one forward with the engine's routes forced at every reported (token,
  layer) at once, the weights of each forced route the model's own gating rule applied to
  the router logits of that forward (`adapter.weights_for`, as `Lens.force` without
  weights); per scored token the next-token log-prob against the natural run's and the
  full-distribution KL(natural || replayed).

What holds exactly: position t of the replayed run depends on the routes at positions <= t
only (causal attention), so a token with no flip at any layer at or before its position
(`flipped_at_or_before` False) scores as in the natural run to float rounding (not
bitwise: the expert kernels run other token batches); a flip at an earlier position
changes later positions through attention, so "not flipped here" is not "unchanged".

Run-time checks (run.json `checks`): the natural run's experts are the top k of the
selection scores the margin is read from (ties aside); the gating rule reproduces the
natural run's weights; every override fired once and every replayed route, as the experts
module received it, is the engine's.
"""

from __future__ import annotations

import copy
import hashlib
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from routelens.analyses.replay.config import ReplayConfig, parse_compare_to
from routelens.config import ALL_TOKENS, BINS
from routelens.data.engine_routes import ALIGNMENT, EngineRoutes
from routelens.data.trajectories import Trajectory
from routelens.distributed import UnitJob
from routelens.errors import RouteLensError, RuntimeCheckFailed
from routelens.models.adapter import MoEAdapter
from routelens.runs.loop import AnalysisRun, run_analysis
from routelens.stats import MIN_CLUSTERS, cluster_interval

ROUTES_SCHEMA = pa.schema([
    ("trajectory_id", pa.string()), ("problem_id", pa.string()), ("position", pa.int64()), ("layer", pa.int64()),
    ("scored", pa.bool_()), ("flipped", pa.bool_()), ("jaccard", pa.float64()), ("margin", pa.float64()),
    ("p_natural", pa.float64()), ("bin", pa.string()),
    ("natural_experts", pa.list_(pa.int64())), ("engine_experts", pa.list_(pa.int64())),
])
TOKENS_SCHEMA = pa.schema([
    ("trajectory_id", pa.string()), ("problem_id", pa.string()), ("position", pa.int64()), ("target_id", pa.int64()),
    ("p_natural", pa.float64()), ("bin", pa.string()), ("logprob_natural", pa.float64()),
    ("logprob_replayed", pa.float64()), ("logprob_diff", pa.float64()), ("kl", pa.float64()),
    ("layers_flipped", pa.int64()), ("layers_reported", pa.int64()), ("flipped_at_or_before", pa.bool_()),
    ("argmax_changed", pa.bool_()), ("logprob_engine", pa.float64()),
])
TIE = 1e-6   # a margin at most this is a tie: the natural run's choice there is the router's, whichever it takes
ORDER_SLACK = 1e-3   # the natural experts must be the top k of the selection scores to this (a bf16 router rounds)


# ---------------------------------------------------------------------------- where routes come from
def bin_of(p: np.ndarray, confident: float, fragile: float) -> np.ndarray:
    from routelens.analyses.counterfactual.analysis import bin_of as counterfactual_bin_of

    return np.asarray(counterfactual_bin_of(np.asarray(p, dtype=float), confident, fragile), dtype=object)


def routes_digest(routes: EngineRoutes) -> str:
    """sha256 of the route arrays (ids, shapes and values): what identifies them in run.json."""
    digest = hashlib.sha256()
    for trajectory_id in sorted(routes.experts):
        array = np.ascontiguousarray(routes.experts[trajectory_id], dtype=np.int64)
        digest.update(trajectory_id.encode() + b"\0" + str(array.shape).encode() + array.tobytes())
    return digest.hexdigest()


def check_engine_routes(adapter: MoEAdapter, trajectories: list[Trajectory], routes: EngineRoutes
                        ) -> tuple[list[Trajectory], list[str]]:
    """The trajectories the routes cover (in the trajectories' order) and the ids of those they
    do not; every way the routes cannot belong to this model and these tokens is a one-line
    error: a trajectory id not among the trajectories, layers that are not the model's MoE
    layers, a k not the model's, expert ids out of range, duplicates in a route, a route with
    some slots -1 and some not, a token count that is not the trajectory's."""
    if not isinstance(routes, EngineRoutes):
        raise RouteLensError(f"`routes` must be an EngineRoutes (routelens.data.engine_routes), got "
                             f"{type(routes).__name__}")
    if not routes.experts:
        raise RouteLensError(f"the routes ({routes.source}) hold no trajectory")
    moe = adapter.moe_layers
    layers = list(routes.layers)
    wrong = [layer for layer in layers if layer not in moe]
    if wrong or len(set(layers)) != len(layers) or not layers:
        raise RouteLensError(f"the routes ({routes.source}) are given at layers {layers}; they must be distinct MoE layers "
                             f"of this model {moe}" + (f" ({wrong[0]} is not one)" if wrong else ""))
    ks = {layer: adapter.top_k_at(layer) for layer in layers}
    other_k = {layer: k for layer, k in ks.items() if k != routes.top_k}
    if other_k:
        layer = next(iter(other_k))
        raise RouteLensError(f"the routes ({routes.source}) have k={routes.top_k} experts per token, but layer {layer} of "
                             f"this model routes {other_k[layer]} per token")
    by_id = {t.id: t for t in trajectories}
    unknown = [tid for tid in routes.experts if tid not in by_id]
    if unknown:
        shown = ", ".join(repr(t) for t in list(by_id)[:5]) + (", ..." if len(by_id) > 5 else "")
        raise RouteLensError(f"the routes ({routes.source}) are for trajectory {unknown[0]!r}, which is not among the "
                             f"{len(by_id)} trajectories ({shown})")
    for tid, array in routes.experts.items():
        array = np.asarray(array)
        where = f"the routes ({routes.source}) of trajectory {tid!r}"
        if not np.issubdtype(array.dtype, np.integer):
            raise RouteLensError(f"{where} are {array.dtype}; expert ids are integers (-1: none)")
        if array.shape[0] != len(by_id[tid].input_ids):
            raise RouteLensError(f"{where} cover {array.shape[0]} tokens but the trajectory has {len(by_id[tid].input_ids)} "
                                 f"({ALIGNMENT}); align them to the trajectory's tokens")
        bad = (array < -1) | (array >= adapter.num_experts)
        if bad.any():
            t, li, slot = np.argwhere(bad)[0]
            raise RouteLensError(f"{where}: expert id {int(array[t, li, slot])} at position {t}, layer {layers[li]}; "
                                 f"this model has experts 0..{adapter.num_experts - 1} (-1: none)")
        missing = array < 0
        partial = missing.any(-1) & ~missing.all(-1)
        if partial.any():
            t, li = np.argwhere(partial)[0]
            raise RouteLensError(f"{where}: position {t}, layer {layers[li]} has experts {array[t, li].tolist()}, some "
                                 "-1 and some not; a route is k experts or none (-1 in every slot)")
        ordered = np.sort(array, axis=-1)
        duplicate = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any(-1)
        if duplicate.any():
            t, li = np.argwhere(duplicate)[0]
            raise RouteLensError(f"{where}: position {t}, layer {layers[li]} names an expert twice "
                                 f"({array[t, li].tolist()}); a route is k distinct experts")
    covered = [t for t in trajectories if t.id in routes.experts]
    return covered, [t.id for t in trajectories if t.id not in routes.experts]


class RouteSource:
    """Per trajectory, the routes to audit: int [T, L, k] at `layers`."""

    layers: list[int]
    top_k: int
    name: str

    def setup(self, adapter: MoEAdapter) -> None:
        pass

    def routes_of(self, index: int, trajectories: list[Trajectory]) -> np.ndarray:
        raise NotImplementedError

    def logprobs_of(self, index: int, trajectories: list[Trajectory]) -> np.ndarray | None:
        """The engine's own log p of token t + 1 at each position t (float [T - 1]), if it gave them."""
        return None

    def identity(self) -> dict:
        raise NotImplementedError

    def meta(self) -> dict:
        return {}


class GivenRoutes(RouteSource):
    """Routes read from an engine (an `EngineRoutes`)."""

    def __init__(self, routes: EngineRoutes):
        self.routes, self.layers, self.top_k, self.name = routes, list(routes.layers), routes.top_k, routes.source

    def routes_of(self, index: int, trajectories: list[Trajectory]) -> np.ndarray:
        return np.asarray(self.routes.experts[trajectories[index].id], dtype=np.int64)

    def logprobs_of(self, index: int, trajectories: list[Trajectory]) -> np.ndarray | None:
        given = self.routes.logprobs.get(trajectories[index].id)
        return None if given is None else np.asarray(given, dtype=np.float64)

    def identity(self) -> dict:
        return {"source": self.routes.source, "layers": self.layers, "top_k": self.top_k,
                "alignment": self.routes.alignment, "sha256": routes_digest(self.routes)}

    def meta(self) -> dict:
        return dict(self.routes.meta)


class SecondRun(RouteSource):
    """Routes of a second Hugging Face run of the same model (`compare_to`): a copy in another
    dtype, the same weights under another experts implementation, or the same tokens as row 0
    of a right-padded batch of `batch` with the trajectories that follow it (cyclically)."""

    def __init__(self, spec: str, adapter: MoEAdapter):
        self.spec = spec
        self.kind, self.value = parse_compare_to(spec)
        self.layers, self.name = list(adapter.moe_layers), f"hf:{self.kind}={self.value}"
        self.top_k = adapter.one_top_k(self.layers, "`compare_to` (routes of every MoE layer in one array)")
        self._other = None

    def setup(self, adapter: MoEAdapter) -> None:
        self._adapter = adapter
        if self.kind == "dtype":
            from routelens.models.loading import DTYPES
            from routelens.models.registry import adapter_for

            # the parameters in that dtype, the buffers as they are (RoPE's inv_freq stays float32): the model
            # from_pretrained(dtype=...) loads, route for route
            model = copy.deepcopy(adapter.model)
            for parameter in model.parameters():
                parameter.data = parameter.data.to(DTYPES[self.value])
            model.config.dtype = DTYPES[self.value]
            self._other = adapter_for(model.eval())

    def routes_of(self, index: int, trajectories: list[Trajectory]) -> np.ndarray:
        from routelens.models.routing import capture_routes

        adapter = self._other or self._adapter
        ids = trajectories[index].input_ids
        rows = [ids]
        if self.kind == "batch":
            rows += [trajectories[(index + n) % len(trajectories)].input_ids for n in range(1, self.value)]
        width = max(len(row) for row in rows)
        pad = adapter.config.pad_token_id if isinstance(adapter.config.pad_token_id, int) else 0
        batch = torch.tensor([row + [pad] * (width - len(row)) for row in rows], device=adapter.device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=adapter.device)
        switched = None
        if self.kind == "experts-implementation":
            switched = getattr(adapter.model.config, "_experts_implementation", None)
            adapter.model.set_experts_implementation(self.value)
        try:
            with capture_routes(adapter, self.layers) as captured:
                adapter.model(batch, attention_mask=mask, use_cache=False)
        finally:
            if switched is not None:
                adapter.model.set_experts_implementation(switched)
        return np.stack([captured[layer].experts.reshape(len(rows), width, -1)[0, :len(ids)].cpu().numpy()
                         for layer in self.layers], axis=1).astype(np.int64)

    def identity(self) -> dict:
        return {"source": self.name, "compare_to": self.spec, "layers": self.layers, "top_k": self.top_k,
                "alignment": ALIGNMENT}

    def meta(self) -> dict:
        return {"what": "a second Hugging Face run of the same model, audited as an engine's routes"}


def compare_routes(adapter: MoEAdapter, trajectories: list[Trajectory], spec: str) -> EngineRoutes:
    """The routes of a second Hugging Face run (`compare_to` spec) of every trajectory, as an
    `EngineRoutes` (source "hf:dtype=bfloat16", ...)."""
    source = SecondRun(spec, adapter)
    source.setup(adapter)
    with torch.no_grad():
        experts = {t.id: source.routes_of(i, trajectories) for i, t in enumerate(trajectories)}
    return EngineRoutes(experts, source.layers, source.top_k, source.name, meta=source.meta())


# ---------------------------------------------------------------------------- one trajectory
def margins(adapter: MoEAdapter, logits: torch.Tensor, layer: int, experts: torch.Tensor
            ) -> tuple[np.ndarray, np.ndarray]:
    """The router's margin per token at `layer` (k-th minus (k+1)-th largest selection score,
    the score it chooses by) and, per token, whether the natural experts are the top k of
    those scores (ties within `TIE` aside)."""
    scores = adapter.selection_scores(logits.float(), layer).double()
    k = experts.shape[-1]
    ordered = scores.sort(dim=-1, descending=True).values
    margin = (ordered[:, k - 1] - ordered[:, k]) if scores.shape[-1] > k else ordered[:, k - 1]
    chosen = scores.gather(-1, experts.long())
    kth = ordered[:, k - 1:k]
    agrees = (chosen >= kth - ORDER_SLACK * kth.abs().clamp_min(1.0)).all(-1) | (margin <= TIE)
    return margin.cpu().numpy(), agrees.cpu().numpy()


def natural_and_replayed(adapter: MoEAdapter, ids: list[int], layers: list[int], engine: np.ndarray):
    """The natural run (logits [T, V], captured routes per layer) and the replayed run
    (logits [T, V], the routes its experts received per layer), the engine's routes forced
    at every reported (token, layer); and the check record."""
    from routelens.models.routing import RouteOverride, _router_hooks, _unpack, capture_routes

    device = adapter.device
    batch = torch.tensor([ids], device=device)
    with capture_routes(adapter, layers) as natural:
        natural_logits = adapter.model(batch, use_cache=False).logits[0].float()
    overrides, fired = {}, dict.fromkeys(layers, 0)
    for li, layer in enumerate(layers):
        rows = np.flatnonzero((engine[:, li] >= 0).all(-1))
        if rows.size:
            overrides[layer] = (torch.as_tensor(rows, device=device), torch.as_tensor(engine[rows, li], device=device))

    def force(module, args, output, layer):
        rows, experts = overrides[layer]
        logits = _unpack(output, layer, adapter)[0]
        weights = adapter.weights_for(logits[rows].float(), experts)
        fired[layer] += 1
        return RouteOverride(rows, experts, weights).apply(output, layer, adapter)

    with _router_hooks(adapter, {layer: (lambda m, a, o, layer=layer: force(m, a, o, layer)) for layer in overrides}):
        with capture_routes(adapter, list(overrides)) as replayed:   # registered after: sees the forced routes
            replayed_logits = adapter.model(batch, use_cache=False).logits[0].float()
    not_fired = [layer for layer in overrides if fired[layer] != 1]
    if not_fired:
        raise RuntimeCheckFailed(f"the replay override at layer {not_fired[0]} fired {fired[not_fired[0]]} times in one "
                                 "forward, expected once: the router was bypassed; refusing to report natural routes as "
                                 "replayed ones")
    for layer, (rows, experts) in overrides.items():
        received = replayed[layer].experts[rows]
        if not torch.equal(received.long().cpu(), experts.long().cpu()):
            raise RuntimeCheckFailed(f"the replayed run's routes at layer {layer} are not the engine's (the experts module "
                                     "received others); refusing to report them as replayed")
    return natural_logits, natural, replayed_logits, {layer: int(rows.numel()) for layer, (rows, _) in overrides.items()}


def analyse_trajectory(adapter: MoEAdapter, trajectory: Trajectory, layers: list[int], engine: np.ndarray,
                       config: ReplayConfig, record: dict, engine_logprobs: np.ndarray | None = None
                       ) -> dict[str, pa.Table]:
    """The routes and tokens tables of one trajectory (`engine`: int [T, L, k];
    `engine_logprobs`: the engine's own log p of token t + 1 at t, [T - 1], or None)."""
    ids = list(trajectory.input_ids)
    length = len(ids)
    natural_logits, natural, replayed_logits, forced = natural_and_replayed(adapter, ids, layers, engine)
    natural_lp = torch.log_softmax(natural_logits.double(), -1)
    replayed_lp = torch.log_softmax(replayed_logits.double(), -1)
    targets = torch.tensor(ids[1:] + [0], device=natural_lp.device)
    p_next = natural_lp.gather(-1, targets[:, None])[:, 0].exp().cpu().numpy()
    p_next[-1] = np.nan                                              # the last token has no next token
    bins = bin_of(np.nan_to_num(p_next, nan=0.0), config.confident, config.fragile)
    bins[-1] = None
    scored = np.zeros(length, dtype=bool)
    scored[list(trajectory.scored_positions)] = True

    flipped = np.zeros((length, len(layers)), dtype=bool)
    reported = (engine >= 0).all(-1)                                  # [T, L]
    rows = []
    for li, layer in enumerate(layers):
        route = natural[layer]
        experts = route.experts.reshape(length, -1)
        margin, agrees = margins(adapter, route.logits.reshape(length, -1), layer, experts)
        if not agrees.all():
            t = int(np.flatnonzero(~agrees)[0])
            raise RuntimeCheckFailed(f"trajectory {trajectory.id!r}, position {t}, layer {layer}: the natural route "
                                     f"{sorted(experts[t].tolist())} is not the top k of the selection scores the margin "
                                     "is read from: the family's gating rule does not describe this router")
        weights = adapter.weights_for(route.logits.reshape(length, -1).float(), experts)
        diff = float((weights - route.weights.reshape(length, -1).float()).abs().max())
        record["gating_rule_max_abs_weight_diff"] = max(record["gating_rule_max_abs_weight_diff"], diff)
        natural_sets = np.sort(experts.cpu().numpy(), -1)
        engine_sets = np.sort(engine[:, li], -1)
        for t in np.flatnonzero(reported[:, li]):
            a, b = set(natural_sets[t].tolist()), set(engine_sets[t].tolist())
            flipped[t, li] = a != b
            rows.append({"trajectory_id": trajectory.id, "problem_id": trajectory.problem_id, "position": int(t),
                         "layer": layer, "scored": bool(scored[t]), "flipped": bool(a != b),
                         "jaccard": len(a & b) / len(a | b), "margin": float(margin[t]),
                         "p_natural": None if t == length - 1 else float(p_next[t]), "bin": bins[t],
                         "natural_experts": natural_sets[t].tolist(), "engine_experts": engine_sets[t].tolist()})
    record["forced_routes"] += sum(forced.values())
    any_flip = flipped.any(-1)
    before = np.cumsum(any_flip) > 0                                  # a flip at some layer at or before t
    positions = np.flatnonzero(scored)
    t_idx = torch.as_tensor(positions, device=natural_lp.device)
    target = targets[t_idx][:, None]
    lp_nat = natural_lp[t_idx].gather(-1, target)[:, 0].cpu().numpy()
    lp_rep = replayed_lp[t_idx].gather(-1, target)[:, 0].cpu().numpy()
    kl = (natural_lp[t_idx].exp() * (natural_lp[t_idx] - replayed_lp[t_idx])).sum(-1).clamp_min(0).cpu().numpy()
    argmax = (natural_lp[t_idx].argmax(-1) != replayed_lp[t_idx].argmax(-1)).cpu().numpy()
    tokens = {"trajectory_id": [trajectory.id] * len(positions), "problem_id": [trajectory.problem_id] * len(positions),
              "position": positions.tolist(), "target_id": [ids[t + 1] for t in positions],
              "p_natural": p_next[positions].tolist(), "bin": list(bins[positions]), "logprob_natural": lp_nat.tolist(),
              "logprob_replayed": lp_rep.tolist(), "logprob_diff": (lp_rep - lp_nat).tolist(), "kl": kl.tolist(),
              "layers_flipped": flipped[positions].sum(-1).tolist(), "layers_reported": reported[positions].sum(-1).tolist(),
              "flipped_at_or_before": before[positions].tolist(), "argmax_changed": argmax.tolist(),
              "logprob_engine": [None] * len(positions) if engine_logprobs is None else
              engine_logprobs_at(engine_logprobs, positions, length, trajectory.id).tolist()}
    return {"routes": pa.Table.from_pylist(rows, schema=ROUTES_SCHEMA),
            "tokens": pa.Table.from_pydict(tokens, schema=TOKENS_SCHEMA)}


def engine_logprobs_at(logprobs: np.ndarray, positions: np.ndarray, length: int, trajectory_id: str) -> np.ndarray:
    """The engine's log p of the next token at `positions` (from its [T - 1] array)."""
    if logprobs.shape != (length - 1,) or not np.isfinite(logprobs).all():
        raise RouteLensError(f"the engine's log-probs of trajectory {trajectory_id!r} have shape {logprobs.shape}; "
                             f"expected {length - 1} finite numbers (log p of token t + 1 at each position t)")
    return logprobs[positions]


class ReplayJob(UnitJob):
    """The replay audit of trajectories (units: trajectory indices, one at a time)."""

    def __init__(self, trajectories: list[Trajectory], source: RouteSource, config: ReplayConfig):
        self.trajectories, self.source, self.config = trajectories, source, config
        self.record = {"gating_rule_max_abs_weight_diff": 0.0, "forced_routes": 0}

    def setup(self, loaded=None) -> None:
        self._adapter = self.load(loaded).adapter
        self.source.setup(self._adapter)

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        out = []
        for unit in units:
            engine = self.source.routes_of(unit, self.trajectories)
            out.append(analyse_trajectory(self._adapter, self.trajectories[unit], self.source.layers, engine,
                                          self.config, self.record, self.source.logprobs_of(unit, self.trajectories)))
        return out

    def checks(self) -> dict:
        return {"natural_routes_are_selection_topk": "on every (token, layer) (ties aside)",
                "gating_rule_max_abs_weight_diff": self.record["gating_rule_max_abs_weight_diff"],
                "replayed_routes": "every override fired once per forward and the experts module received the "
                                   "engine's route at every forced (token, layer)",
                "forced_routes_this_session": self.record["forced_routes"]}


# ---------------------------------------------------------------------------- the summary
def with_clusters(frame: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    from routelens.analyses.counterfactual.analysis import with_clusters as counterfactual_clusters

    return counterfactual_clusters(frame)


def _finite(value) -> float | None:
    value = float(value)
    return value if np.isfinite(value) else None


def margin_edges(margin: np.ndarray, bins: int) -> np.ndarray:
    """Quantile edges of the margins (distinct; fewer bins where margins tie)."""
    return np.unique(np.quantile(margin, np.linspace(0, 1, bins + 1)))


def monotone_verdict(rates: list[float], intervals: list[list]) -> str:
    """"decreasing": the flip rate falls (never rises) from each margin bin to the next;
    "decreasing within intervals": it does not, but a non-increasing curve passes through
    every bin's interval (for all i < j: low_j <= high_i); "not monotone" otherwise."""
    if all(b <= a for a, b in zip(rates, rates[1:])):
        return "decreasing"
    highs = [np.inf if ci[1] is None else ci[1] for ci in intervals]
    lows = [-np.inf if ci[0] is None else ci[0] for ci in intervals]
    if all(lows[j] <= min(highs[: j + 1]) for j in range(len(rates))):
        return "decreasing within intervals"
    return "not monotone"


def summarise(routes: pd.DataFrame, tokens: pd.DataFrame, layers: list[int], config: ReplayConfig,
              source: dict) -> dict:
    seed, resamples, level = config.seed, config.bootstrap_resamples, config.confidence
    scored = routes[routes["scored"]]
    scored, unit = with_clusters(scored)
    tokens, _ = with_clusters(tokens)

    def ci(frame: pd.DataFrame, column: str | pd.Series) -> list:
        values = frame[column] if isinstance(column, str) else column
        return cluster_interval(frame["cluster"], values.astype(float), seed, resamples, confidence=level)

    def rate(frame: pd.DataFrame) -> dict:
        return {"decisions": int(len(frame)), "flips": int(frame["flipped"].sum()),
                "flip_rate": _finite(frame["flipped"].mean()) if len(frame) else None,
                "flip_rate_ci": ci(frame, "flipped") if len(frame) else [None, None],
                "clusters": int(frame["cluster"].nunique())}

    per_layer = {str(layer): {**rate(at), "jaccard": _finite(at["jaccard"].mean()) if len(at) else None,
                              "jaccard_ci": ci(at, "jaccard") if len(at) else [None, None]}
                 for layer, at in ((layer, scored[scored["layer"] == layer]) for layer in layers)}
    any_flip = tokens["layers_flipped"] > 0
    overall = {**rate(scored), "jaccard": _finite(scored["jaccard"].mean()),
               "tokens": int(len(tokens)), "tokens_with_a_flip": int(any_flip.sum()),
               "tokens_with_a_flip_share": _finite(any_flip.mean()), "tokens_with_a_flip_ci": ci(tokens, any_flip),
               "layers_flipped_mean": _finite(tokens["layers_flipped"].mean()),
               "layers_flipped_ci": ci(tokens, "layers_flipped"),
               "layers_flipped_histogram": {str(n): int(c) for n, c in
                                            sorted(tokens["layers_flipped"].value_counts().items())}}
    prompt = routes[~routes["scored"]]
    overall["unscored_decisions"] = int(len(prompt))
    overall["unscored_flip_rate"] = _finite(prompt["flipped"].mean()) if len(prompt) else None

    edges = margin_edges(scored["margin"].to_numpy(), config.margin_bins)
    which = np.clip(np.searchsorted(edges[1:-1], scored["margin"].to_numpy(), side="right"), 0, max(len(edges) - 2, 0))
    curve = []
    for b in range(max(len(edges) - 1, 1)):
        at = scored[which == b]
        curve.append({"bin": b, "margin_low": _finite(edges[b]), "margin_high": _finite(edges[min(b + 1, len(edges) - 1)]),
                      "margin_median": _finite(at["margin"].median()) if len(at) else None, **rate(at),
                      "share_of_flips": _finite(at["flipped"].sum() / max(scored["flipped"].sum(), 1))})
    filled = [c for c in curve if c["decisions"]]
    verdict = monotone_verdict([c["flip_rate"] for c in filled], [c["flip_rate_ci"] for c in filled])
    flipped_margin = scored.loc[scored["flipped"], "margin"]
    by_bin = {name: rate(scored[scored["bin"] == name]) for name in BINS}

    def consequence(frame: pd.DataFrame) -> dict:
        if not len(frame):
            return {"tokens": 0}
        return {"tokens": int(len(frame)), "clusters": int(frame["cluster"].nunique()),
                "logprob_diff": _finite(frame["logprob_diff"].mean()), "logprob_diff_ci": ci(frame, "logprob_diff"),
                "abs_logprob_diff": _finite(frame["logprob_diff"].abs().mean()),
                "abs_logprob_diff_ci": ci(frame, frame["logprob_diff"].abs()),
                "kl": _finite(frame["kl"].mean()), "kl_ci": ci(frame, "kl"), "kl_max": _finite(frame["kl"].max()),
                "argmax_changed": _finite(frame["argmax_changed"].mean()),
                "argmax_changed_ci": ci(frame, "argmax_changed"),
                "max_abs_logprob_diff": _finite(frame["logprob_diff"].abs().max())}

    engine = tokens[tokens["logprob_engine"].notna()] if "logprob_engine" in tokens else tokens.iloc[:0]

    def gap(frame: pd.DataFrame) -> dict:   # the engine's own log p against the model's, natural and replayed
        natural = frame["logprob_engine"] - frame["logprob_natural"]
        replayed = frame["logprob_engine"] - frame["logprob_replayed"]
        to_natural, to_replayed = _finite(natural.abs().mean()), _finite(replayed.abs().mean())
        return {"tokens": int(len(frame)), "engine_minus_natural": _finite(natural.mean()),
                "engine_minus_natural_ci": ci(frame, natural),
                "abs_engine_minus_natural": to_natural, "abs_engine_minus_natural_ci": ci(frame, natural.abs()),
                "abs_engine_minus_replayed": to_replayed, "abs_engine_minus_replayed_ci": ci(frame, replayed.abs()),
                "share_of_gap_closed_by_replay": _finite(1 - to_replayed / to_natural) if to_natural else None}

    engine_gap = None if not len(engine) else {ALL_TOKENS: gap(engine), "flipped": gap(engine[any_flip[engine.index]]),
                                               "not_flipped": gap(engine[~any_flip[engine.index]])}
    cost = {ALL_TOKENS: consequence(tokens), "flipped": consequence(tokens[any_flip]),
            "not_flipped": consequence(tokens[~any_flip]),
            "clean_prefix": consequence(tokens[~tokens["flipped_at_or_before"]]),
            **{f"bin:{name}": consequence(tokens[tokens["bin"] == name]) for name in BINS}}
    return {
        "analysis": "replay",
        "route_source": source,
        "layers": layers,
        "cluster_unit": unit,
        "few_clusters": bool(scored["cluster"].nunique() < MIN_CLUSTERS),
        "trajectories": int(tokens["trajectory_id"].nunique()),
        "overall": overall,
        "per_layer": per_layer,
        "margin_curve": curve,
        "margin_curve_verdict": verdict,
        "flipped_margin_median": _finite(flipped_margin.median()) if len(flipped_margin) else None,
        "unflipped_margin_median": _finite(scored.loc[~scored["flipped"], "margin"].median())
        if (~scored["flipped"]).any() else None,
        "by_bin": by_bin,
        "consequence": cost,
        **({"engine_logprobs": engine_gap} if engine_gap else {}),
        "definitions": definitions(config, unit),
    }


def definitions(config: ReplayConfig, unit: str) -> dict:
    interval = (f"{config.confidence:.0%} percentile cluster bootstrap ({config.bootstrap_resamples} resamples, seed "
                f"{config.seed}) over {unit}: a {unit[:-1]}'s rows resampled together; the statistic is the mean over "
                "rows of the resample (a ratio estimator); no multiplicity adjustment")
    return {
        "flip_rate": "share of the scored (token, layer) decisions the engine reported whose expert set differs from "
                     "the natural run's (engine vs the model's own routes, the same tokens); " + interval,
        "jaccard": "|engine set & natural set| / |engine set | natural set| per decision, mean; " + interval,
        "layers_flipped": "per scored token, the reported MoE layers whose set flips; mean and the share of tokens with "
                          "at least one; " + interval,
        "margin": "per decision of the natural run: the k-th minus the (k+1)-th largest selection score "
                  "(adapter.selection_scores: the score the router chooses by), 0 at a tie",
        "margin_curve": f"flip rate per quantile bin of the margin ({config.margin_bins} bins over all scored decisions, "
                        "fewer where margins tie); " + interval + "; verdict: decreasing (point estimates never rise), "
                        "decreasing within intervals (a non-increasing curve passes through every interval), or not "
                        "monotone; share_of_flips: the bin's share of all flips (1/bins where flips ignore the margin)",
        "by_bin": f"flip rate by the natural run's p of the next token: Confident >= {config.confident}, Fragile < "
                  f"{config.fragile}, Ambiguous between (counterfactual's `bins standard` rule); " + interval,
        "logprob_diff": "per scored token: log p(next token) with the engine's routes forced at every reported (token, "
                        "layer) at once (weights: the gating rule on that run's own router logits) minus log p under "
                        "natural routes, nats; mean; " + interval,
        "kl": "per scored token: KL(natural || replayed) of the full next-token distributions, nats; mean; " + interval,
        "argmax_changed": "share of scored tokens whose most probable next token differs between the two runs",
        "engine_logprobs": "where the engine gave its own log p of the next token (llama.cpp run by routelens): per "
                           "scored token the engine's minus the model's under natural routes (the train-inference gap "
                           "a trainer sees) and under the engine's routes replayed; share_of_gap_closed_by_replay = 1 - "
                           "mean |engine - replayed| / mean |engine - natural| (the part of the gap routing explains; "
                           "the rest is the engine's other numerics: quantized weights, kernels); " + interval,
        "groups": "flipped: tokens with a flip at some layer at their own position; clean_prefix: tokens with no flip at "
                  "any layer at or before their position (equal to the natural run to float rounding: causal "
                  "attention); a flip at an earlier position moves later tokens, so not_flipped is not unchanged",
    }


# ---------------------------------------------------------------------------- the run
def run_replay(loaded, trajectories: list[Trajectory], source: RouteSource, config: ReplayConfig, out: str | None,
               data_info: dict, overwrite: bool = False, show_progress: bool = True, export=None):
    """The audit into the run folder `out` (resumed after a kill), in memory when None.
    `export` (an `ExportTarget`, checked by `check_export`): where the engine's routes are
    written for training once every trajectory is audited, before the run is marked complete
    (a run refused or cut off writes none; resumed, it writes it then), recorded in run.json
    (`export`; listed among the run's files where it lies inside the run folder)."""
    from routelens.data.engine_routes_io import export_bytes, write_export

    adapter = loaded.adapter
    left_out: list[str] = []
    if isinstance(source, GivenRoutes):
        trajectories, left_out = check_engine_routes(adapter, trajectories, source.routes)
    elif export is not None:
        raise RouteLensError("`export` writes an engine's routes for training; with `compare_to` there is no engine: "
                             "give `routes`")
    if not trajectories:
        raise RouteLensError("no trajectory to audit; give at least one")
    run_config = {**loaded.identity(), "dtype": loaded.dtype, **data_info, **config.identity(),
                  "route_source": source.identity(), "audited_trajectories": len(trajectories)}
    job = ReplayJob(trajectories, source, config)
    job.setup(loaded)
    recorded = None if export is None else {"path": os.path.abspath(export.path), "in_run_folder": export.name,
                                            "trajectories": len(source.routes.experts)}

    def summarise_run(folder) -> dict:
        if export is not None:
            data = export_bytes(source.routes, loaded.spec)
            write_export(export, data, "replay", folder)
            folder.state["export"] = {**recorded, "sha256": hashlib.sha256(data).hexdigest()}   # saved on completion
        summary = summarise(folder.read("routes"), folder.read("tokens"), source.layers, config, source.identity())
        summary["trajectories_without_routes"] = len(left_out)
        return summary

    run = AnalysisRun(
        kind="replay", run_config=run_config, tables=("routes", "tokens"), units=len(trajectories), job=job,
        summarise=summarise_run,
        extra={"model": adapter.describe(), "device": loaded.device, "summary_settings": config.summary_settings(),
               "route_source_meta": source.meta(), "trajectories_without_routes": left_out[:100],
               "export": recorded},
        label="replay", progress_unit="trajectories",
        timings=lambda todo, seconds: {"trajectories_this_session": len(todo)})
    return run_analysis(run, loaded, out, overwrite=overwrite, show_progress=show_progress)
