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
import torch

from routelens import stats
from routelens.analyses.graft.grafting import GraftPair, graft_applied, tensor_sha256
from routelens.analyses.isolation.analysis import forced_conditions
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


def _measure(scorer: WholeSequenceScorer, item: TargetItem, plan: list[GraftPair]) -> dict:
    """Natural score, selection share and forced-slot score of each pair, for the model as it is."""
    adapter = scorer.adapter
    layers = sorted({pair.layer for pair in plan})
    natural = scorer.natural(torch.tensor(item.input_ids), layers, np.asarray(item.target_positions))
    out = {"natural": float(np.mean(natural.logprobs))}
    for pair in plan:
        experts, weights = forced_conditions(adapter.num_experts, len(item.input_ids), adapter.top_k_at(pair.layer))
        chosen = natural.routes[pair.layer].experts.reshape(len(item.input_ids), -1)
        forced = scorer.score(natural, pair.layer, experts[pair.expert: pair.expert + 1], weights[pair.expert: pair.expert + 1])
        out[pair.label] = (float((chosen == pair.expert).any(-1).float().mean()), float(np.mean(forced[0])))
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
    before = _measure(scorer, item, plan)
    with graft_applied(scorer.adapter, plan):
        after = _measure(scorer, item, plan)
    rows = [{"item_id": item.id, "domain": item.domain, "pair": pair.label, "layer": pair.layer, "expert": pair.expert,
             "natural_recipient": before["natural"], "natural_grafted": after["natural"],
             "selected_recipient": before[pair.label][0], "selected_grafted": after[pair.label][0],
             "forced_original": before[pair.label][1], "forced_grafted": after[pair.label][1]} for pair in plan]
    return pa.Table.from_pylist(rows, schema=ITEMS_SCHEMA)


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
                         overwrite: bool = False, show_progress: bool = True, ray: RaySettings | None = None):
    """Evaluate the graft on `items` into the run folder `out` (resumable; in memory when
    None); with `ray`, on a pool of Ray actors that each load the recipient and apply the
    plan's donor tensors themselves."""
    if not items:
        raise SettingError("no items to evaluate the graft on; check `domains` and the item file", "domains")
    run_config = {**recipient.identity(), "dtype": recipient.dtype, **data_info, "pairs": [p.label for p in plan],
                  "donor_tensors_sha256": plan_sha256(plan), "seed": seed}
    run = AnalysisRun(
        kind="graft-evaluation", run_config=run_config, tables=("items",), units=len(items),
        job=GraftEvaluationJob(items, plan),
        summarise=lambda folder: summarise(folder.read("items"), plan, seed, bootstrap_resamples, alpha),
        extra={"model": recipient.adapter.describe(), "device": recipient.device,
               "summary_settings": {"bootstrap_resamples": bootstrap_resamples, "alpha": alpha}},
        label="graft evaluation", timings=lambda todo, seconds: {"items_scored_this_session": len(todo)})
    return run_analysis(run, recipient, out, overwrite=overwrite, show_progress=show_progress, ray=ray)


class GraftEvaluationJob(UnitJob):
    """Each item measured before and after the graft (units: item indices), on the recipient
    this process holds (the plan carries the donor's tensors)."""

    def __init__(self, items: list[TargetItem], plan: list[GraftPair]):
        self.items, self.plan = items, plan

    def setup(self, loaded=None) -> None:
        self._scorer = WholeSequenceScorer(self.load(loaded).adapter)

    def run(self, units: list[int]) -> list[dict[str, pa.Table]]:
        return [{"items": evaluate_item(self._scorer, self.items[i], self.plan)} for i in units]
