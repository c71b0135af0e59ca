"""What a graft changed, measured on the task's items (`routelens graft --evaluate`).

For every item, with the recipient as it was and with the graft applied (in place, undone
after each item; the same process, the same items):

- natural: the target's mean log-prob under natural routing, recipient against grafted
  (paired per item): does the grafted model do better or worse as a whole?
- selection: per grafted slot (layer L, expert e), the share of the item's tokens whose
  top-k at L includes e: does the router now pick the grafted expert more or less?
- forced: expert e alone on every token at L (the isolation study's forced condition),
  the grafted expert against the slot's original one (paired per item): is the donor's
  expert better at this slot than the expert it replaced?

Per domain and over all items: means, paired differences with 95% bootstrap intervals
over items and Wilcoxon signed-rank p-values, Benjamini-Hochberg q-values over all the
tests of the run (SciPy through `routelens.stats`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa

from routelens import stats
from routelens.analyses.graft.grafting import GraftPair, graft_applied, tensor_sha256
from routelens.analyses.isolation.analysis import forced_conditions
from routelens.analyses.item_batching import batching_checks, groups_of, scored_in_groups
from routelens.data.target_items import TargetItem
from routelens.distributed import RaySettings, UnitJob
from routelens.engine.whole_sequence import WholeSequenceScorer
from routelens.errors import SettingError
from routelens.runs.loop import AnalysisRun, run_analysis

ITEMS_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("domain", pa.string()), ("pair", pa.string()), ("layer", pa.int64()),
    ("expert", pa.int64()), ("natural_recipient", pa.float64()), ("natural_grafted", pa.float64()),
    ("selected_recipient", pa.float64()), ("selected_grafted", pa.float64()),
    ("forced_original", pa.float64()), ("forced_grafted", pa.float64()),
])
ALL_ITEMS = "All"
DEFAULT_GROUP_ITEMS = 16   # items sharing one forward at most (GraftEvaluationConfig.group_items)


def _measure(scorer: WholeSequenceScorer, items: list[TargetItem], plan: list[GraftPair]) -> list[dict]:
    """Natural score, and per pair its selection share and forced-slot score, of each item for
    the model as it is: the items share one natural forward, and the pairs of a layer (every
    item's) share the scoring passes."""
    adapter = scorer.adapter
    layers = sorted({pair.layer for pair in plan})
    passes = scorer.natural_batch([item.input_ids for item in items], layers, [item.target_positions for item in items])
    out = [{"natural": float(np.mean(natural.logprobs))} for natural in passes]
    for layer in layers:
        pairs = [pair for pair in plan if pair.layer == layer]
        slots = [pair.expert for pair in pairs]
        experts, weights = [], []
        for item in items:
            forced_e, forced_w = forced_conditions(adapter.num_experts, len(item.input_ids), adapter.top_k_at(layer))
            experts.append(forced_e[slots])
            weights.append(forced_w[slots])
        scored = scorer.score_batch(passes, layer, experts, weights)                    # [P_layer, positions] per item
        for item, natural, forced, measured in zip(items, passes, scored, out):
            chosen = natural.routes[layer].experts.reshape(len(item.input_ids), -1)
            for pair, values in zip(pairs, forced):
                measured[pair.label] = (float((chosen == pair.expert).any(-1).float().mean()), float(np.mean(values)))
    return out


def plan_sha256(plan: list[GraftPair]) -> str:
    """One sha256 over the plan's pairs and the donor tensors they copy: an evaluation run
    resumes only with the very tensors it began with (the pair labels alone do not say
    which donor they came from)."""
    digest = hashlib.sha256()
    for pair in plan:
        digest.update(pair.label.encode())
        for name in sorted(pair.tensors):
            digest.update(f"{name}={tensor_sha256(pair.tensors[name])};".encode())
    return digest.hexdigest()


def evaluate_item(scorer: WholeSequenceScorer, item: TargetItem, plan: list[GraftPair]) -> pa.Table:
    """One item's rows: natural, selection and forced, recipient against grafted."""
    return evaluate_items(scorer, [item], plan)[0]


def evaluate_items(scorer: WholeSequenceScorer, items: list[TargetItem], plan: list[GraftPair]) -> list[pa.Table]:
    """`evaluate_item` for a group of items sharing forwards (the same numbers as one item at
    a time, to float rounding); the graft is applied once for the group and undone after."""
    before = _measure(scorer, items, plan)
    with graft_applied(scorer.adapter, plan):
        after = _measure(scorer, items, plan)
    return [pa.Table.from_pylist([
        {"item_id": item.id, "domain": item.domain, "pair": pair.label, "layer": pair.layer, "expert": pair.expert,
         "natural_recipient": old["natural"], "natural_grafted": new["natural"],
         "selected_recipient": old[pair.label][0], "selected_grafted": new[pair.label][0],
         "forced_original": old[pair.label][1], "forced_grafted": new[pair.label][1]} for pair in plan],
        schema=ITEMS_SCHEMA) for item, old, new in zip(items, before, after)]


def item_partition(scorer: WholeSequenceScorer, items: list[TargetItem], plan: list[GraftPair],
                   group_items: int) -> list[list[int]]:
    """All the run's items (indices) in the groups that share forwards, fixed before the run:
    an item's numbers depend on its group alone, so a resumed run (or one on Ray actors)
    scores every item in the group an uninterrupted run does, and equals it bit for bit."""
    most_pairs = max(sum(pair.layer == layer for pair in plan) for layer in {pair.layer for pair in plan})
    return groups_of([len(item.input_ids) for item in items], 1 + most_pairs, scorer, group_items)


def _paired(a: np.ndarray, b: np.ndarray, seed: int, resamples: int) -> dict:
    """b - a per item: the mean of each, and the paired test of the difference."""
    return {"before": float(a.mean()), "after": float(b.mean()), **stats.paired_test(b - a, seed=seed, n_resamples=resamples)}


def summarise(items: pd.DataFrame, plan: list[GraftPair], seed: int, resamples: int, alpha: float) -> dict:
    """Per domain (and All): the natural score recipient -> grafted, and per pair the selection
    share and the forced-slot score; q-values over every test of the summary."""
    groups = {domain: frame for domain, frame in items.groupby("domain", sort=True)}
    groups[ALL_ITEMS] = items
    blocks, tests = {}, []
    for domain, frame in groups.items():
        first_pair = frame[frame["pair"] == plan[0].label]
        block = {"natural": _paired(first_pair["natural_recipient"].to_numpy(), first_pair["natural_grafted"].to_numpy(),
                                    seed, resamples), "pairs": {}}
        tests.append(block["natural"])
        for pair in plan:
            at = frame[frame["pair"] == pair.label]
            block["pairs"][pair.label] = {
                "selection": _paired(at["selected_recipient"].to_numpy(), at["selected_grafted"].to_numpy(), seed, resamples),
                "forced": _paired(at["forced_original"].to_numpy(), at["forced_grafted"].to_numpy(), seed, resamples),
            }
            tests += list(block["pairs"][pair.label].values())
        blocks[domain] = block
    q_values = stats.bh_qvalues(np.array([test["p_value"] for test in tests]))
    for test, q in zip(tests, q_values):
        test["q_value"] = float(q)
        test["significant"] = bool(q <= alpha)
    return {"analysis": "graft-evaluation", "pairs": [pair.label for pair in plan], "alpha": alpha,
            "score": "mean target log-prob (nats)",
            "interval": f"95% percentile bootstrap over items, {resamples} resamples; Wilcoxon signed-rank p, "
                        "Benjamini-Hochberg q over every test of this summary",
            "definitions": {"natural": "natural routing, recipient (before) against grafted (after)",
                            "selection": "share of the item's tokens whose top-k includes the slot",
                            "forced": "the slot's expert alone on every token at its layer: original (before) "
                                      "against grafted (after)"},
            "domains": blocks}


def run_graft_evaluation(recipient, plan: list[GraftPair], items: list[TargetItem], out: str | None, data_info: dict,
                         seed: int = 0, bootstrap_resamples: int = 2000, alpha: float = 0.05,
                         overwrite: bool = False, show_progress: bool = True, ray: RaySettings | None = None,
                         group_items: int = DEFAULT_GROUP_ITEMS):
    """Evaluate the graft on `items` into the run folder `out` (resumable; in memory when
    None); with `ray`, on a pool of Ray actors that each load the recipient and apply the
    plan's donor tensors themselves. Items of similar length share forwards, at most
    `group_items` together (1: one at a time)."""
    if not items:
        raise SettingError("no items to evaluate the graft on; check `domains` and the item file", "domains")
    scorer = WholeSequenceScorer(recipient.adapter)
    partition = item_partition(scorer, items, plan, group_items)
    job = GraftEvaluationJob(items, plan, partition, group_items, scorer)
    run_config = {**recipient.identity(), "dtype": recipient.dtype, **data_info, "pairs": [p.label for p in plan],
                  "donor_tensors_sha256": plan_sha256(plan), "seed": seed}
    run = AnalysisRun(
        kind="graft-evaluation", run_config=run_config, tables=("items",), units=len(items),
        job=job, groups=job.groups,
        summarise=lambda folder: summarise(folder.read("items"), plan, seed, bootstrap_resamples, alpha),
        extra={"model": recipient.adapter.describe(), "device": recipient.device,
               "summary_settings": {"bootstrap_resamples": bootstrap_resamples, "alpha": alpha},
               "performance": {"group_items": group_items}},
        label="graft evaluation", timings=lambda todo, seconds: {"items_scored_this_session": len(todo)})
    return run_analysis(run, recipient, out, overwrite=overwrite, show_progress=show_progress, ray=ray)


class GraftEvaluationJob(UnitJob):
    """Items measured before and after the graft (units: item indices), on the recipient this
    process holds (the plan carries the donor's tensors). `partition`: the fixed groups of
    items that share forwards; a group is scored whole even where some of its units are
    done already (after a kill), so every item's numbers are those of an uninterrupted run."""

    def __init__(self, items: list[TargetItem], plan: list[GraftPair], partition: list[list[int]] | None = None,
                 group_items: int = DEFAULT_GROUP_ITEMS, scorer: WholeSequenceScorer | None = None):
        self.items, self.plan, self.group_items = items, plan, group_items
        self.partition = partition if partition is not None else [[index] for index in range(len(items))]
        self._scorer = scorer   # this process's scorer, already built; an actor builds its own

    def setup(self, loaded=None) -> None:
        self._scorer = getattr(self, "_scorer", None) or WholeSequenceScorer(self.load(loaded).adapter)

    def groups(self, todo: list[int]) -> list[list[int]]:
        """The undone units, by the group of the partition they belong to."""
        undone = set(todo)
        return [kept for kept in ([unit for unit in group if unit in undone] for group in self.partition) if kept]

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        group_of = {unit: at for at, group in enumerate(self.partition) for unit in group}
        whole = [self.partition[at] for at in dict.fromkeys(group_of[unit] for unit in units)]
        tables = scored_in_groups(self._scorer, self.items, whole, lambda group: evaluate_items(self._scorer, group, self.plan))
        return [{"items": tables[unit]} for unit in units]

    def checks(self) -> dict:
        largest, mean = self._scorer.deviation.largest
        return {"natural_route_max_abs_logprob_diff": largest, "natural_route_mean_abs_logprob_diff": mean,
                **batching_checks(self._scorer, "item", self.group_items)}
