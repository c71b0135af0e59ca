"""Per-layer expert isolation (Young 2026, "Learned Routers Don't Learn"), with floors at
unequal and at equal compute.

For every item (prompt + target) and every requested MoE layer l:

- natural: the model as it is (shared by all layers of the item);
- forced e, for every expert e: every token at layer l goes to expert e alone with
  weight 1.0, all other layers routing normally (expressed through the route override as
  k slots of e with weights 1, 0, ..., 0: a duplicated index with weight 0 is exact);
- floor s, for `floor_seeds` seeds: every token at layer l gets k distinct experts drawn
  uniformly at random, weighted by the model's own gating rule - what an arbitrary route
  of natural routing's compute does, the yardstick paper 2 lacked;

and, with `equal_compute` (the default; see `comparisons` for why):

- forced_matched_mass e: expert e alone on every token at layer l, its weight the natural
  route's total gate weight at that token (k slots of e with weights mass, 0, ..., 0);
- single_expert_floor s: one uniformly random expert per token at weight 1.0 (the forced
  expert's compute and scale), from its own random stream (the floor's draws unchanged).

Each condition is scored by the mean log-probability of the target tokens and by the
first target token's. Layers below l are computed once per item and all conditions of a
layer share one batched pass (`WholeSequenceScorer`).

Statistics per (domain, layer, expert) over items, on paired per-item deltas, for each of
the five comparisons of `comparisons.COMPARISONS` (forced - natural, forced - k-expert
floor, forced - single-expert floor, matched mass - natural, matched mass - k-expert
floor; a floor is the mean over its seeds): Wilcoxon signed-rank p, median with a
distribution-free 95% interval, Benjamini-Hochberg step-up q-values over all cells of the
comparison; each cell's verdict (harmful / helpful / neither) is judged against the
single-expert floor. Also calibration (Spearman between an expert's natural share and its
mean delta per layer, Fisher-z mean over layers with a bootstrap interval over items);
dominance (each expert's natural share against uniform, and whether the most-activated
expert is the best); and a layer table. All tests come from SciPy (`routelens.stats`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from routelens import stats
from routelens.analyses.isolation.comparisons import (
    ARMS,
    BY_NAME,
    COMPARISONS,
    FLOOR,
    FORCED,
    FORCED_MATCHED_MASS,
    NATURAL,
    SINGLE_EXPERT_FLOOR,
    VERDICT,
    finite,
)
from routelens.analyses.isolation.config import IsolationConfig
from routelens.analyses.route_sampling import route_rng, uniform_routes
from routelens.config import SCORES
from routelens.data.target_items import TargetItem
from routelens.distributed import RaySettings, UnitJob, check_ray_can_load
from routelens.engine.checks import PaddingNotInert
from routelens.engine.whole_sequence import WholeSequenceScorer
from routelens.errors import SettingError
from routelens.models.adapter import MoEAdapter
from routelens.runs.loop import AnalysisRun, run_analysis

SHARES = {"router_share": "mean router probability", "selection_share": "top-k selection frequency / k"}

ISOLATION_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("domain", pa.string()), ("layer", pa.int64()), ("condition", pa.string()),
    ("expert", pa.int64()), ("floor_seed", pa.int64()), ("mean_logprob", pa.float64()),
    ("first_logprob", pa.float64()),
])
# runs with the equal-compute arms also record each condition's mean gate mass per token
# (total weight of its route; natural: null); without them the table is as it always was,
# so a run folder made before the arms resumes with parts of one schema
GATE_MASS = pa.field("gate_mass", pa.float64())


def isolation_schema(config: IsolationConfig) -> pa.Schema:
    return ISOLATION_SCHEMA.append(GATE_MASS) if config.equal_compute else ISOLATION_SCHEMA


ROUTING_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("domain", pa.string()), ("layer", pa.int64()), ("expert", pa.int64()),
    ("tokens", pa.int64()), ("router_share_sum", pa.float64()), ("selected", pa.int64()),
])


# ---------------------------------------------------------------------------- conditions
SINGLE_FLOOR_STREAM = 1   # route_rng stream of the single-expert floor (the k-expert floor's draws stay as they were)


def forced_conditions(num_experts: int, length: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e alone at weight 1.0 on every token, for every e: experts/weights [E, T, k]
    (k slots of e, weights 1, 0, ..., 0, since the router must return k per token)."""
    experts = torch.arange(num_experts)[:, None, None].expand(num_experts, length, k).clone()
    weights = torch.zeros(num_experts, length, k)
    weights[..., 0] = 1.0
    return experts, weights


def matched_mass_conditions(num_experts: int, natural_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e alone on every token, weighted by the natural route's total gate weight at
    that token, for every e: natural_weights [T, k] (what the router applied) -> experts/
    weights [E, T, k] (k slots of e, weights mass, 0, ..., 0)."""
    length, k = natural_weights.shape
    experts, weights = forced_conditions(num_experts, length, k)
    weights[..., 0] = natural_weights.float().sum(-1).cpu()
    return experts, weights


def floor_conditions(adapter: MoEAdapter, logits: torch.Tensor, layer: int, item_id: str, seed: int,
                     floor_seeds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random k-expert routes weighted by the gating rule, one condition per floor
    seed: logits [T, E] -> experts/weights [F, T, k]."""
    experts, weights = [], []
    for floor_seed in range(floor_seeds):
        routes = torch.from_numpy(uniform_routes(logits.shape[0], adapter.num_experts, adapter.top_k_at(layer),
                                                 route_rng(seed, layer, item_id, floor_seed)))
        experts.append(routes)
        weights.append(adapter.weights_for(logits.cpu(), routes).float())
    if not experts:
        k = adapter.top_k_at(layer)
        return torch.zeros(0, logits.shape[0], k, dtype=torch.long), torch.zeros(0, logits.shape[0], k)
    return torch.stack(experts), torch.stack(weights)


def single_floor_conditions(num_experts: int, length: int, k: int, layer: int, item_id: str, seed: int,
                            floor_seeds: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One uniformly random expert per token at weight 1.0 (the forced expert's compute and
    scale), one condition per floor seed: experts/weights [F, T, k] (k slots of the expert,
    weights 1, 0, ..., 0). Drawn from its own stream of `route_rng`."""
    experts = torch.zeros(floor_seeds, length, k, dtype=torch.long)
    for floor_seed in range(floor_seeds):
        rng = route_rng(seed, layer, item_id, SINGLE_FLOOR_STREAM, floor_seed)
        experts[floor_seed] = torch.from_numpy(rng.integers(0, num_experts, size=length))[:, None]
    weights = torch.zeros(floor_seeds, length, k)
    weights[..., 0] = 1.0
    return experts, weights


def conditions_per_layer(num_experts: int, config: IsolationConfig) -> int:
    """Scored rows of an item at one layer: forced experts and floor seeds, twice with the
    equal-compute arms."""
    return (num_experts + config.floor_seeds) * (2 if config.equal_compute else 1)


def layer_conditions(adapter: MoEAdapter, item: TargetItem, natural, layer: int, config: IsolationConfig
                     ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, int | None, int | None]]]:
    """Every condition of an item at `layer`: experts/weights [C, T, k] and each row's
    (condition, expert, floor seed)."""
    length, k, count = len(item.input_ids), adapter.top_k_at(layer), adapter.num_experts
    route = natural.routes[layer]
    arms = [(FORCED, forced_conditions(count, length, k)),
            (FLOOR, floor_conditions(adapter, route.logits, layer, item.id, config.seed, config.floor_seeds))]
    if config.equal_compute:
        arms += [(FORCED_MATCHED_MASS, matched_mass_conditions(count, route.weights)),
                 (SINGLE_EXPERT_FLOOR, single_floor_conditions(count, length, k, layer, item.id, config.seed,
                                                               config.floor_seeds))]
    labels = [(name, at, None) if name in (FORCED, FORCED_MATCHED_MASS) else (name, None, at)
              for name, (experts, _) in arms for at in range(experts.shape[0])]
    return torch.cat([e for _, (e, _) in arms]), torch.cat([w for _, (_, w) in arms]), labels


# ---------------------------------------------------------------------------- items
def analyse_item(adapter: MoEAdapter, scorer: WholeSequenceScorer, item: TargetItem, layers: list[int],
                 config: IsolationConfig) -> tuple[pa.Table, pa.Table]:
    """The isolation rows (natural and every condition) and natural routing counts of one item."""
    return analyse_items(adapter, scorer, [item], layers, config)[0]


def analyse_items(adapter: MoEAdapter, scorer: WholeSequenceScorer, items: list[TargetItem], layers: list[int],
                  config: IsolationConfig) -> list[tuple[pa.Table, pa.Table]]:
    """`analyse_item` for a group of items in one natural forward and shared scoring passes
    (right-padded; the same rows as one item at a time, to float rounding)."""
    passes = scorer.natural_batch([item.input_ids for item in items], layers,
                                  [item.target_positions for item in items])
    rows = [[_row(item, None, NATURAL, None, None, natural.logprobs)] for item, natural in zip(items, passes)]
    routing: list[list[dict]] = [[] for _ in items]
    for layer in layers:
        conditions = [layer_conditions(adapter, item, natural, layer, config) for item, natural in zip(items, passes)]
        scored = scorer.score_batch(passes, layer, [e for e, _, _ in conditions], [w for _, w, _ in conditions])
        for at, (item, natural, logprobs, (_, weights, labels)) in enumerate(zip(items, passes, scored, conditions)):
            masses = weights.sum(-1).mean(-1).double().numpy()                  # [C] mean gate mass per token
            rows[at] += [_row(item, layer, name, expert, floor_seed, values, mass)
                         for (name, expert, floor_seed), values, mass in zip(labels, logprobs, masses)]
            routing[at] += _routing_rows(adapter, item, layer, natural.routes[layer])
    schema = isolation_schema(config)
    return [(pa.Table.from_pylist(item_rows, schema=schema), pa.Table.from_pylist(item_routing, schema=ROUTING_SCHEMA))
            for item_rows, item_routing in zip(rows, routing)]


def _routing_rows(adapter: MoEAdapter, item: TargetItem, layer: int, route) -> list[dict]:
    """An item's natural routing at `layer`: router share sums and selections per expert."""
    logits = route.logits.reshape(len(item.input_ids), -1)
    shares = adapter.selection_distribution(logits, layer).cpu().numpy().sum(0)
    selected = np.bincount(route.experts.reshape(-1).cpu().numpy(), minlength=adapter.num_experts)
    return [{"item_id": item.id, "domain": item.domain, "layer": layer, "expert": e, "tokens": len(item.input_ids),
             "router_share_sum": float(shares[e]), "selected": int(selected[e])} for e in range(adapter.num_experts)]


def item_groups(lengths: list[int], rows_per_item: int, rows_per_chunk, most: int = 64) -> list[list[int]]:
    """Indices of items grouped for shared passes: in order of length (little padding), as
    many as fill one scoring chunk at the group's padded length (`rows_per_chunk(length)`
    rows; `rows_per_item` per item and layer), at most `most` (one natural forward each)."""
    groups: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        group = groups[-1] if groups else None
        if group and len(group) < most and (len(group) + 1) * rows_per_item <= rows_per_chunk(lengths[index]):
            group.append(index)
        else:
            groups.append([index])
    return groups


def _row(item: TargetItem, layer, condition: str, expert, floor_seed, logprobs: np.ndarray, gate_mass=None) -> dict:
    return {"item_id": item.id, "domain": item.domain, "layer": layer, "condition": condition, "expert": expert,
            "floor_seed": floor_seed, "mean_logprob": float(np.mean(logprobs)), "first_logprob": float(logprobs[0]),
            "gate_mass": None if gate_mass is None else float(gate_mass)}


# ---------------------------------------------------------------------------- statistics
@dataclass
class DomainArrays:
    """One domain's items as arrays: `scores` per condition (natural [n]; forced and
    forced_matched_mass [n, L, E]; floor and single_expert_floor [n, L], the mean over floor
    seeds; None where the run has no such rows), `gate_mass` per condition [n, L] (mean
    total weight per token; None where not recorded), router share sums [n, L, E],
    selections [n, L, E], tokens [n, L]."""

    items: list[str]
    scores: dict[str, np.ndarray | None]
    gate_mass: dict[str, np.ndarray | None]
    share_sums: np.ndarray
    selected: np.ndarray
    tokens: np.ndarray

    @property
    def natural(self) -> np.ndarray:
        return self.scores[NATURAL]

    @property
    def deltas(self) -> np.ndarray:
        """forced - natural [n, L, E] (calibration and dominance read these)."""
        return self.versus(BY_NAME["forced_vs_natural"])

    def versus(self, comparison) -> np.ndarray | None:
        """The paired per-item deltas arm - baseline [n, L, E], None where either is absent."""
        arm, baseline = self.scores[comparison.arm], self.scores[comparison.baseline]
        if arm is None or baseline is None:
            return None
        cube = lambda values: values.reshape(values.shape + (1,) * (3 - values.ndim))   # noqa: E731  [n] / [n, L] -> broadcast
        return np.broadcast_to(cube(arm) - cube(baseline), (len(self.items),) + self.share_sums.shape[1:])


def domain_arrays(isolation: pd.DataFrame, routing: pd.DataFrame, domain: str, layers: list[int],
                  num_experts: int, score: str) -> DomainArrays:
    frame = isolation[isolation["domain"] == domain]
    items = list(dict.fromkeys(frame["item_id"]))
    columns = pd.MultiIndex.from_product([layers, range(num_experts)], names=["layer", "expert"])

    def per_expert(rows: pd.DataFrame, value: str) -> np.ndarray:                 # [n, L, E]
        table = rows.pivot_table(index="item_id", columns=["layer", "expert"], values=value, aggfunc="sum")
        return table.reindex(index=items, columns=columns).to_numpy(dtype=float).reshape(len(items), len(layers), num_experts)

    def per_layer(rows: pd.DataFrame, value: str) -> np.ndarray:                  # [n, L], mean over floor seeds
        return (rows.groupby(["item_id", "layer"])[value].mean().unstack("layer")
                .reindex(index=items, columns=layers).to_numpy(dtype=float))

    scores: dict[str, np.ndarray | None] = {
        NATURAL: frame[frame["condition"] == NATURAL].set_index("item_id")[score].reindex(items).to_numpy(dtype=float)}
    masses: dict[str, np.ndarray | None] = {NATURAL: None}
    for condition in (FORCED, FLOOR, FORCED_MATCHED_MASS, SINGLE_EXPERT_FLOOR):
        rows = frame[frame["condition"] == condition]
        if rows.empty:
            scores[condition] = masses[condition] = None
            continue
        scores[condition] = per_expert(rows, score) if condition in (FORCED, FORCED_MATCHED_MASS) else per_layer(rows, score)
        masses[condition] = per_layer(rows, "gate_mass") if "gate_mass" in rows else None
    at = routing[routing["domain"] == domain]
    tokens = at.groupby(["item_id", "layer"])["tokens"].first().unstack("layer").reindex(index=items, columns=layers)
    return DomainArrays(items, scores, masses, per_expert(at, "router_share_sum"), per_expert(at, "selected"),
                        tokens.to_numpy(dtype=float))


def _shares(arrays: DomainArrays, top_k, index=slice(None)) -> dict[str, np.ndarray]:
    """Natural shares per (layer, expert) over the items at `index` (token-weighted); a
    selection share is of the layer's own k slots per token (`top_k`: one k, or one per layer)."""
    tokens = arrays.tokens[index].sum(axis=-2)[..., None]
    return {"router_share": arrays.share_sums[index].sum(axis=-3) / tokens,
            "selection_share": arrays.selected[index].sum(axis=-3) / (tokens * np.reshape(top_k, (-1, 1)))}


STATISTICS = ("median_delta", "ci_low", "ci_high", "p_value", "q_value", "significant")


def _cell_statistics(deltas: np.ndarray | None, suffix: str) -> dict:
    """One cell's paired test of one comparison: median, its distribution-free 95% interval,
    the two-sided Wilcoxon p (NaN throughout where the comparison was not run)."""
    if deltas is None:
        return {f"{name}{suffix}": np.nan for name in STATISTICS[:4]}
    low, high = stats.median_interval(deltas)
    return {f"median_delta{suffix}": float(np.median(deltas)), f"ci_low{suffix}": low, f"ci_high{suffix}": high,
            f"p_value{suffix}": stats.wilcoxon_p(deltas)}


def _cells_statistics(deltas: np.ndarray | None, suffix: str) -> dict[str, np.ndarray]:
    """`_cell_statistics` of every cell at once: deltas [n, L, E] -> each statistic [L, E]
    (the same numbers, through `stats.median_interval_rows` and `stats.wilcoxon_p_rows`);
    NaN throughout where the comparison was not run (deltas None)."""
    if deltas is None:
        return {f"{name}{suffix}": np.array(np.nan) for name in STATISTICS[:4]}
    n, layers, experts = deltas.shape
    rows = np.ascontiguousarray(np.moveaxis(deltas, 0, -1)).reshape(layers * experts, n)   # [L * E, n]
    low, high = stats.median_interval_rows(rows)
    medians = np.array([np.median(row) for row in rows]) if n else np.full(len(rows), np.nan)
    return {name: np.reshape(values, (layers, experts)) for name, values in
            ((f"median_delta{suffix}", medians), (f"ci_low{suffix}", low), (f"ci_high{suffix}", high),
             (f"p_value{suffix}", stats.wilcoxon_p_rows(rows)))}


def verdicts(significant: np.ndarray, median: np.ndarray) -> np.ndarray:
    """harmful (significant, median below 0), helpful (significant, above 0) or neither."""
    return np.where(significant & (median < 0), "harmful", np.where(significant & (median > 0), "helpful", "neither"))


def cell_table(per_domain: dict[str, DomainArrays], layers: list[int], top_k, alpha: float) -> pd.DataFrame:
    """One row per (domain, layer, expert): every comparison's statistics (columns named
    by its suffix), BH step-up q-values over all cells of each comparison, and the verdict."""
    rows = []
    for domain, arrays in per_domain.items():
        shares = _shares(arrays, top_k)
        versus = {c.name: arrays.versus(c) for c in COMPARISONS}
        # every cell's statistics of a comparison in one call per statistic (as `_cell_statistics`, cell by cell)
        tested = {c.name: _cells_statistics(versus[c.name], c.suffix) for c in COMPARISONS}
        for li, layer in enumerate(layers):
            for expert in range(arrays.share_sums.shape[2]):
                deltas = versus["forced_vs_natural"][:, li, expert]
                row = {"domain": domain, "layer": layer, "expert": expert, "n": int(deltas.size),
                       "mean_delta": float(deltas.mean())}
                for c in COMPARISONS:
                    row.update({name: float(values if values.ndim == 0 else values[li, expert])
                                for name, values in tested[c.name].items()})
                row.update(natural_share=float(shares["router_share"][li, expert]),
                           selection_share=float(shares["selection_share"][li, expert]))
                rows.append(row)
    cells = pd.DataFrame(rows)
    for c in COMPARISONS:
        p = cells[f"p_value{c.suffix}"].to_numpy(dtype=float)
        q = np.full(p.shape, np.nan)
        defined = ~np.isnan(p)
        q[defined] = stats.bh_qvalues(p[defined])
        cells[f"q_value{c.suffix}"] = q
        cells[f"significant{c.suffix}"] = q <= alpha
    basis = BY_NAME[VERDICT].suffix
    cells["verdict"] = np.where(cells[f"p_value{basis}"].isna(), None,
                                verdicts(cells[f"significant{basis}"].to_numpy(), cells[f"median_delta{basis}"].to_numpy()))
    order = ["domain", "layer", "expert", "n", "mean_delta",
             *(f"{name}{c.suffix}" for c in COMPARISONS for name in STATISTICS), "verdict", "natural_share",
             "selection_share"]
    return cells[order]


def comparison_counts(cells: pd.DataFrame, domains: list[str]) -> dict[str, dict | None]:
    """summary.json's `comparisons`: per comparison, its cells, and how many are significant,
    harmful and helpful (overall and per domain); None where the run has no such comparison."""
    out = {}
    for c in COMPARISONS:
        if cells[f"p_value{c.suffix}"].isna().all():
            out[c.name] = None
            continue
        kinds = pd.Series(verdicts(cells[f"significant{c.suffix}"].to_numpy(),
                                   cells[f"median_delta{c.suffix}"].to_numpy()), index=cells.index)
        count = lambda mask: int(mask.sum())   # noqa: E731
        out[c.name] = {
            "arm": c.arm, "baseline": c.baseline, "cells": int(cells[f"p_value{c.suffix}"].notna().sum()),
            "significant": count(cells[f"significant{c.suffix}"]), "harmful": count(kinds == "harmful"),
            "helpful": count(kinds == "helpful"), "verdict_basis": c.name == VERDICT,
            "significant_by_domain": {d: count(cells[f"significant{c.suffix}"] & (cells["domain"] == d)) for d in domains},
            "harmful_by_domain": {d: count((kinds == "harmful") & (cells["domain"] == d)) for d in domains},
            "helpful_by_domain": {d: count((kinds == "helpful") & (cells["domain"] == d)) for d in domains},
        }
    return out


def verdict_counts(cells: pd.DataFrame, domains: list[str]) -> dict | None:
    """summary.json's `verdict`: how many cells are harmful, helpful or neither against the
    single-expert floor, overall and per domain; None where the run has no such floor."""
    if cells["verdict"].isna().all():
        return None
    count = lambda frame: {kind: int((frame["verdict"] == kind).sum()) for kind in ("harmful", "helpful", "neither")}   # noqa: E731
    return {"comparison": VERDICT, **count(cells), "by_domain": {d: count(cells[cells["domain"] == d]) for d in domains}}


def definitions(config: IsolationConfig, cells: int) -> dict:
    """summary.json's `definitions`: the arms, and what each comparison compares with what,
    over which unit, after which adjustment."""
    unit = "items: one paired delta per item (arm - baseline, each item's own scores), n = the domain's items"
    adjustment = f"Benjamini-Hochberg step-up over the {cells} cells of this comparison (domains x layers x experts)"
    return {
        "arms": {name: ARMS[name] for name in (NATURAL, FORCED, FLOOR) + (
            (FORCED_MATCHED_MASS, SINGLE_EXPERT_FLOOR) if config.equal_compute else ())},
        "comparisons": {c.name: {"compares": f"{c.arm} - {c.baseline}", "compute": c.compute, "scale": c.scale,
                                 "unit": unit, "test": "two-sided Wilcoxon signed-rank (SciPy, zero deltas dropped); "
                                                       "median with a distribution-free 95% interval",
                                 "adjustment": adjustment}
                        for c in COMPARISONS if config.equal_compute or not _equal_compute_only(c)},
        "significant": f"q <= alpha ({config.alpha}) in that comparison",
        "harmful": "significant, median delta below 0 (the arm scores worse than the baseline)",
        "helpful": "significant, median delta above 0",
        "verdict": (f"each cell's harmful / helpful / neither, judged on {VERDICT}: the only comparison of equal "
                    "compute and equal scale" if config.equal_compute else
                    "none: the run has no single-expert floor (equal_compute off)"),
        "calibration": "Spearman over a layer's experts ranks their mean deltas against natural routing; a baseline "
                       "shared by a layer's experts (either floor) shifts every expert alike and leaves it unchanged",
    }


def _equal_compute_only(comparison) -> bool:
    return comparison.arm == FORCED_MATCHED_MASS or comparison.baseline == SINGLE_EXPERT_FLOOR


def calibration(per_domain: dict[str, DomainArrays], layers: list[int], top_k, seed: int,
                resamples: int) -> pd.DataFrame:
    """Per domain and share measure: Spearman(share, mean delta) over experts per layer, and
    the Fisher-z mean over layers (layer null) with a percentile bootstrap interval over items."""
    rows = []
    for domain, arrays in per_domain.items():
        mean_delta = arrays.deltas.mean(axis=0)                                        # [L, E]
        shares = _shares(arrays, top_k)
        for measure in SHARES:
            per_layer = []
            for li, layer in enumerate(layers):
                r, p = stats.spearman_test(shares[measure][li], mean_delta[li])
                per_layer.append(r)
                rows.append({"domain": domain, "share": measure, "layer": layer, "spearman": r, "p_value": p,
                             "ci_low": np.nan, "ci_high": np.nan, "n_experts": mean_delta.shape[1],
                             "n_items": len(arrays.items)})

            def statistic(index: np.ndarray, measure=measure, arrays=arrays) -> np.ndarray:
                r = stats.spearman_rows(_shares(arrays, top_k, index)[measure], arrays.deltas[index].mean(axis=1))
                z = stats.fisher_z(r)
                with np.errstate(invalid="ignore"):
                    return np.tanh(np.nanmean(np.where(np.isfinite(z), z, np.nan), axis=-1))

            low, high = stats.bootstrap_over_units(statistic, len(arrays.items), seed=seed, n_resamples=resamples)
            rows.append({"domain": domain, "share": measure, "layer": None,
                         "spearman": stats.fisher_z_mean(np.array(per_layer)), "p_value": np.nan,
                         "ci_low": low, "ci_high": high, "n_experts": mean_delta.shape[1],
                         "n_items": len(arrays.items)})
    frame = pd.DataFrame(rows)
    frame["layer"] = frame["layer"].astype("Int64")
    return frame


def layer_and_dominance(per_domain: dict[str, DomainArrays], cells: pd.DataFrame, layers: list[int],
                        num_experts: int) -> tuple[list[dict], list[dict]]:
    """The layer table (best expert per layer against natural routing, at weight 1.0 and at
    the natural gate mass; the floors; the verdict's counts; the gate masses) and the
    dominance table (the most-activated expert against uniform, and whether it is the best)."""
    layer_rows, dominance_rows = [], []
    matched = BY_NAME["matched_mass_vs_natural"].suffix
    for domain, arrays in per_domain.items():
        for li, layer in enumerate(layers):
            at = cells[(cells["domain"] == domain) & (cells["layer"] == layer)].set_index("expert")
            best = int(at["median_delta"].idxmax())
            most = int(at["selection_share"].idxmax())
            has_matched = not at[f"median_delta{matched}"].isna().all()
            best_matched = int(at[f"median_delta{matched}"].idxmax()) if has_matched else None
            verdict = at["verdict"]
            layer_rows.append({
                "domain": domain, "layer": layer, "best_expert": best,
                "best_median_delta": float(at.loc[best, "median_delta"]),
                "best_ci": [finite(at.loc[best, "ci_low"]), finite(at.loc[best, "ci_high"])],
                "best_q_value": finite(at.loc[best, "q_value"]),
                "significant_cells": int(at["significant"].sum()),
                "significant_better": int((at["significant"] & (at["median_delta"] > 0)).sum()),
                **_floor_delta(arrays, FLOOR, li, "floor"),
                **_floor_delta(arrays, SINGLE_EXPERT_FLOOR, li, "single_floor"),
                "harmful_cells": int((verdict == "harmful").sum()) if verdict.notna().any() else None,
                "helpful_cells": int((verdict == "helpful").sum()) if verdict.notna().any() else None,
                "best_matched_expert": best_matched,
                "best_matched_median_delta": finite(at.loc[best_matched, f"median_delta{matched}"]) if has_matched else None,
                "best_matched_ci": ([finite(at.loc[best_matched, f"ci_low{matched}"]),
                                     finite(at.loc[best_matched, f"ci_high{matched}"])] if has_matched else [None, None]),
                "natural_gate_mass": _mean_mass(arrays, FORCED_MATCHED_MASS, li),
                "floor_gate_mass": _mean_mass(arrays, FLOOR, li),
                "natural_mean_score": float(np.mean(arrays.natural)),
            })
            ranks = at["median_delta"].rank(ascending=False, method="min")
            dominance_rows.append({
                "domain": domain, "layer": layer, "most_activated": most,
                "selection_share": float(at.loc[most, "selection_share"]),
                "vs_uniform": float(at.loc[most, "selection_share"] * num_experts),
                "router_share": float(at.loc[most, "natural_share"]),
                "best_expert": best, "most_activated_is_best": most == best,
                "rank_of_most_activated": int(ranks.loc[most]),
            })
    return layer_rows, dominance_rows


def _floor_delta(arrays: DomainArrays, condition: str, li: int, name: str) -> dict:
    """A floor's median delta against natural routing at layer index li, with its Wilcoxon p."""
    scores = arrays.scores[condition]
    if scores is None or np.isnan(scores[:, li]).all():
        return {f"{name}_median_delta": None, f"{name}_p_value": None}
    delta = scores[:, li] - arrays.natural
    return {f"{name}_median_delta": float(np.median(delta)), f"{name}_p_value": stats.wilcoxon_p(delta)}


def _mean_mass(arrays: DomainArrays, condition: str, li: int) -> float | None:
    """A condition's gate mass per token at layer index li, averaged over items (the items'
    means); None where not recorded."""
    masses = arrays.gate_mass[condition]
    return None if masses is None else finite(float(np.nanmean(masses[:, li])))



def summarise(isolation: pd.DataFrame, routing: pd.DataFrame, layers: list[int], num_experts: int, top_k,
              config: IsolationConfig) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """summary.json, cells.parquet and calibration.parquet from the per-item tables."""
    score = SCORES[config.score]
    domains = list(dict.fromkeys(isolation["domain"]))
    per_domain = {d: domain_arrays(isolation, routing, d, layers, num_experts, score) for d in domains}
    cells = cell_table(per_domain, layers, top_k, config.alpha)
    calib = calibration(per_domain, layers, top_k, config.seed, config.bootstrap_resamples)
    layer_rows, dominance_rows = layer_and_dominance(per_domain, cells, layers, num_experts)
    fisher = calib[calib["layer"].isna()]
    comparisons = comparison_counts(cells, domains)
    summary = {
        "analysis": "isolation",
        "score": score,
        "alpha": config.alpha,
        "layers": layers,
        "num_experts": num_experts,
        "floor_seeds": config.floor_seeds,
        "equal_compute": config.equal_compute,
        "conditions": [c for c in (NATURAL, FORCED, FLOOR, FORCED_MATCHED_MASS, SINGLE_EXPERT_FLOOR)
                       if c in set(isolation["condition"])],
        "items_per_domain": {d: len(a.items) for d, a in per_domain.items()},
        # the exact two-sided signed-rank test cannot go below 2 / 2^n: with few items no cell can pass
        "smallest_possible_p": float(2 * 0.5 ** min(len(a.items) for a in per_domain.values())),
        "cells": int(len(cells)),
        "verdict": verdict_counts(cells, domains),
        "comparisons": comparisons,
        "calibration": {d: {m: {"fisher_z_mean": finite(row["spearman"]), "ci": [finite(row["ci_low"]), finite(row["ci_high"])],
                                "per_layer": [finite(v) for v in calib[(calib["domain"] == d) & (calib["share"] == m)
                                                                         & calib["layer"].notna()]["spearman"]]}
                            for m, row in ((r["share"], r) for _, r in fisher[fisher["domain"] == d].iterrows())}
                        for d in domains},
        "dominance": dominance_rows,
        "layer_table": layer_rows,
        "definitions": definitions(config, len(cells)),
        "tests": {"cells": "two-sided Wilcoxon signed-rank on paired per-item deltas (SciPy)",
                  "median_ci": "95% distribution-free interval of the median (scipy.stats.quantile_test)",
                  "fdr": "Benjamini-Hochberg step-up over all cells of each comparison "
                         "(scipy.stats.false_discovery_control)",
                  "calibration": f"Spearman per layer over experts; Fisher-z mean over layers (clip 0.9999); "
                                 f"95% percentile bootstrap over items, {config.bootstrap_resamples} resamples",
                  "floor": f"{config.floor_seeds} uniformly random k-expert routes per token, gating-rule weights",
                  **({"single_expert_floor": f"{config.floor_seeds} uniformly random single experts per token, "
                                             "weight 1.0"} if config.equal_compute else {})},
    }
    return summary, cells, calib


# ---------------------------------------------------------------------------- the run
class IsolationJob(UnitJob):
    """The isolation study of groups of items (units: item indices)."""

    def __init__(self, items: list[TargetItem], layers: list[int], config: IsolationConfig, scorer=None):
        self.items, self.layers, self.config = items, layers, config
        self._scorer = scorer   # this process's scorer, already built; an actor builds its own

    def setup(self, loaded=None) -> None:
        self._adapter = self.load(loaded).adapter
        self._scorer = getattr(self, "_scorer", None) or WholeSequenceScorer(self._adapter, memory_budget=self.config.memory_budget)

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        items = [self.items[index] for index in units]
        results = None
        if not self._scorer.padding.failure:
            try:
                results = analyse_items(self._adapter, self._scorer, items, self.layers, self.config)
            except PaddingNotInert:   # exact either way: score this model's items one at a time
                pass
        if results is None:
            results = [analyse_item(self._adapter, self._scorer, item, self.layers, self.config) for item in items]
        return [{"isolation": isolation, "routing": routing} for isolation, routing in results]

    def groups(self, units: list[int], workers: int = 1) -> list[list[int]]:
        """The units (item indices) in groups that share passes (`item_groups`), small
        enough that each of `workers` actors gets one."""
        rows_per_item = 1 + conditions_per_layer(self._adapter.num_experts, self.config)
        lengths = [len(self.items[index].input_ids) for index in units]
        most = max(1, min(self.config.group_items, -(-len(units) // workers)))
        return [[units[at] for at in group]
                for group in item_groups(lengths, rows_per_item, self._scorer.rows_per_chunk, most)]

    def checks(self) -> dict:
        largest, mean = self._scorer.deviation.largest
        return {"gating_rule": "reproduced the router's weights on every item",
                "natural_route_max_abs_logprob_diff": largest, "natural_route_mean_abs_logprob_diff": mean,
                **{key.replace("standard_route", "natural_route"): value
                   for key, value in self._scorer.deviation.record().items()},
                **self._scorer.padding.record("item", f"groups of up to {self.config.group_items} items")}


def run_isolation(loaded, items: list[TargetItem], config: IsolationConfig, out: str | None, data_info: dict,
                  overwrite: bool = False, show_progress: bool = True, ray: RaySettings | None = None):
    """Run the study into the run folder `out` (resuming a cut-off run of the same config),
    or in memory when `out` is None; write cells, calibration and the summary, and return
    the completed run (`RunFolder` or `MemoryRun`). With `ray`, items are scored by a pool
    of Ray actors (`routelens.distributed`), into the same parts."""
    config.check()
    check_ray_can_load(loaded, ray)
    adapter = loaded.adapter
    layers = adapter.resolve_layers(config.layers) if config.layers else adapter.moe_layers
    top_k = [adapter.top_k_at(layer) for layer in layers]   # selection shares are of each layer's own k slots
    if not items:
        raise SettingError("no items to score; check `domains` and the item file", "domains")
    scorer = WholeSequenceScorer(adapter, memory_budget=config.memory_budget)
    run_config = {**loaded.identity(), "dtype": loaded.dtype, **data_info, **config.identity(), "resolved_layers": layers}
    job = IsolationJob(items, layers, config, scorer)
    job.setup(loaded)

    def summarise_run(folder) -> dict:
        summary, cells, calib = summarise(folder.read("isolation"), folder.read("routing"),
                                          layers, adapter.num_experts, top_k, config)
        folder.write_table("cells", cells)
        folder.write_table("calibration", calib)
        return summary

    run = AnalysisRun(
        kind="isolation", run_config=run_config, tables=("isolation", "routing"), units=len(items), job=job,
        summarise=summarise_run, groups=lambda todo: job.groups(todo, ray.workers if ray else 1),
        extra={"model": adapter.describe(), "device": loaded.device, "summary_settings": config.summary_settings(),
               "performance": {k: getattr(config, k) for k in config.PERFORMANCE}},
        label="isolation", progress_unit="items", timings=lambda todo, seconds: {"items_scored_this_session": len(todo)},
        memory_budget=config.memory_budget)
    return run_analysis(run, loaded, out, overwrite=overwrite, show_progress=show_progress, ray=ray)
