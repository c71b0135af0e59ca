"""Semantic routing and graft evaluation score items in groups through the whole-sequence
scorer's shared passes (one right-padded natural forward, shared scoring passes): every
per-item number equals one item at a time (fp32, <= 1e-5) on items of unequal length (the
padding is exercised and checked inert), the graft is undone after each group, a graft
group is scored whole after a kill (so a resumed run equals an uninterrupted one), and the
group size is a setting recorded in run.json."""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAMILIES

import routelens as rl
from routelens.analyses.graft.evaluation import GraftEvaluationJob, evaluate_item, evaluate_items, item_partition
from routelens.analyses.graft.grafting import parse_expert_map, plan_graft
from routelens.analyses.item_batching import scored_in_groups
from routelens.analyses.semantic_routing.analysis import analyse_item, analyse_items, fingerprints, split_items
from routelens.analyses.semantic_routing.config import SemanticRouteConfig
from routelens.data.target_items import TargetItem
from routelens.engine.whole_sequence import WholeSequenceScorer
from routelens.errors import SettingError

TOLERANCE = 1e-5   # fp32: the same sums in other batch shapes


@pytest.fixture(scope="module")
def demo():
    lens = rl.load("demo")
    return lens, rl.arithmetic_items(lens, per_domain=4)


def _same_scores(one: pd.DataFrame, grouped: pd.DataFrame, exact: list[str], close: list[str]) -> None:
    """The same rows, in the same order, with the `exact` columns equal and the `close` ones
    within TOLERANCE (and not all trivially equal: other batch shapes round differently)."""
    assert len(one) == len(grouped) > 0
    pd.testing.assert_frame_equal(one[exact], grouped[exact])
    for column in close:
        np.testing.assert_allclose(grouped[column].to_numpy(float), one[column].to_numpy(float), rtol=0, atol=TOLERANCE)


def _scores_of(results: list[dict], table: str) -> pd.DataFrame:
    return pd.concat([result[table].to_pandas() for result in results], ignore_index=True)


@pytest.mark.parametrize("kind", ["selection", "input"])
def test_semantic_items_in_a_group_equal_one_at_a_time(demo, kind):
    """Every arm of every layer set (a joint one too), the prompt's predicted domain and the
    token classification: a padded group of items of unequal length against each alone."""
    lens, items = demo
    adapter = lens.adapter
    config = SemanticRouteConfig(layer_sets=[[3], [0, 3]], kind=kind, floor_seeds=2, accuracy=False)
    calibration, evaluation = split_items(items, 0.5, seed=0)
    assert len({len(item.input_ids) for item in evaluation}) > 2   # unequal lengths: padding is exercised
    prints = fingerprints(adapter, calibration, [0, 3], kind)
    alone = WholeSequenceScorer(adapter)
    one = [analyse_item(adapter, alone, item, prints, config.layer_sets, config) for item in evaluation]
    scorer = WholeSequenceScorer(adapter)
    grouped = scored_in_groups(scorer, evaluation, [list(range(len(evaluation)))],
                               lambda members: analyse_items(adapter, scorer, members, prints, config.layer_sets, config))
    assert scorer.padding.verdict.startswith("right padding checked inert")
    assert scorer.padding.failure is None
    scores = ["item_id", "domain", "layer_set", "arm", "floor_seed", "predicted"]
    _same_scores(_scores_of(one, "scores"), _scores_of(grouped, "scores"), scores, ["mean_logprob", "first_logprob"])
    _same_scores(_scores_of(one, "classification"), _scores_of(grouped, "classification"),
                 ["item_id", "domain", "layer", "predicted"], ["token_accuracy"])
    arms = set(_scores_of(grouped, "scores")["arm"])
    assert arms == {"natural", "semantic", "semantic_token", "oracle", "floor"}


@pytest.mark.parametrize("family", FAMILIES)
def test_semantic_groups_equal_one_at_a_time_on_every_family(tiny_adapters, family):
    """Each served type, MoE-input fingerprints (read off the padded forward's MoE blocks):
    items of three lengths in one group against each alone."""
    adapter = tiny_adapters[family]
    generator = torch.Generator().manual_seed(1)
    items = [TargetItem(f"{d}{i}", d, torch.randint(3, 60, (4 + 3 * i,), generator=generator).tolist(),
                        torch.randint(3, 60, (3,), generator=generator).tolist())
             for d in ("a", "b") for i in range(3)]
    layer = adapter.moe_layers[-1]
    config = SemanticRouteConfig(layer_sets=[[layer]], kind="input", floor_seeds=1, accuracy=False)
    prints = fingerprints(adapter, [items[0], items[3]], [layer], "input")
    evaluation = [items[1], items[2], items[4], items[5]]
    one = [analyse_item(adapter, WholeSequenceScorer(adapter), item, prints, config.layer_sets, config)
           for item in evaluation]
    scorer = WholeSequenceScorer(adapter)
    grouped = scored_in_groups(scorer, evaluation, [[0, 1, 2, 3]],
                               lambda members: analyse_items(adapter, scorer, members, prints, config.layer_sets, config))
    _same_scores(_scores_of(one, "scores"), _scores_of(grouped, "scores"),
                 ["item_id", "layer_set", "arm", "floor_seed", "predicted"], ["mean_logprob", "first_logprob"])
    _same_scores(_scores_of(one, "classification"), _scores_of(grouped, "classification"),
                 ["item_id", "layer", "predicted"], ["token_accuracy"])


@pytest.fixture(scope="module")
def plan(demo):
    """Two slots at layer 3 (they share scoring passes) and one at layer 0."""
    lens, _ = demo
    return plan_graft(lens.loaded, rl.load("demo").loaded, parse_expert_map("3:5=3:9,3:1=3:2,0:4=0:7"))


def test_graft_items_in_a_group_equal_one_at_a_time_and_the_graft_is_undone(demo, plan):
    lens, items = demo
    weights = {name: tensor.clone() for name, tensor in lens.model.state_dict().items()}
    one = [evaluate_item(WholeSequenceScorer(lens.adapter), item, plan).to_pandas() for item in items[:8]]
    scorer = WholeSequenceScorer(lens.adapter)
    assert len({len(item.input_ids) for item in items[:8]}) > 2
    grouped = [table.to_pandas() for table in scored_in_groups(scorer, items[:8], [list(range(8))],
                                                               lambda members: evaluate_items(scorer, members, plan))]
    assert scorer.padding.verdict.startswith("right padding checked inert")
    one, grouped = pd.concat(one, ignore_index=True), pd.concat(grouped, ignore_index=True)
    _same_scores(one, grouped, ["item_id", "domain", "pair", "layer", "expert"],
                 ["natural_recipient", "natural_grafted", "selected_recipient", "selected_grafted", "forced_original",
                  "forced_grafted"])
    assert (grouped["forced_grafted"] != grouped["forced_original"]).all()   # the grafted slot holds another expert
    assert all(torch.equal(weights[name], tensor) for name, tensor in lens.model.state_dict().items())


def test_a_graft_group_is_scored_whole_when_some_of_its_units_are_done(demo, plan):
    """After a kill a group's undone units are handed back alone; the job scores the whole
    group again, so they get the numbers of the uninterrupted run, bit for bit."""
    lens, items = demo
    scorer = WholeSequenceScorer(lens.adapter)
    partition = item_partition(scorer, items, plan, group_items=5)
    assert sorted(unit for group in partition for unit in group) == list(range(len(items)))
    assert max(len(group) for group in partition) == 5 and len(partition) == 4
    job = GraftEvaluationJob(items, plan, partition, 5, scorer)
    job.setup(lens.loaded)
    group = partition[0]
    done = set(group[:2]) | set(partition[1])
    todo = [unit for unit in range(len(items)) if unit not in done]
    assert job.groups(todo) == [group[2:]] + [g for g in partition[2:]]
    whole = job.run(group)
    rest = job.run(group[2:])
    for unit, tables in zip(group[2:], rest):
        assert tables["items"].equals(whole[group.index(unit)]["items"])


def test_group_size_is_a_setting_recorded_in_run_json(demo, tmp_path):
    lens, _ = demo
    with pytest.raises(SettingError, match=r"^`group_items` must be an integer >= 1, got 0"):
        SemanticRouteConfig(group_items=0)
    semantic = rl.semantic_route(lens, "arithmetic", str(tmp_path / "semantic"), per_domain=2, layer_sets=[[3]],
                                 floor_seeds=1, accuracy=False, bootstrap_resamples=50, group_items=3,
                                 show_progress=False)
    state = json.load(open(os.path.join(semantic.path, "run.json")))
    assert state["performance"] == {"memory_budget": 2 * 2**30, "group_items": 3}
    assert state["checks"]["item_batching"].startswith("right padding checked inert")
    assert "group_items" not in state["config"]   # speed only: a run resumes under another value
    result = rl.graft("demo", "demo", "3:5=3:9", str(tmp_path / "graft"), evaluate=True, per_domain=2,
                      bootstrap_resamples=50, group_items=4)
    state = json.load(open(os.path.join(result.evaluation.path, "run.json")))
    assert state["performance"] == {"group_items": 4}
    assert state["checks"]["item_batching"].startswith("right padding checked inert")
    assert len(result.evaluation.items) == 8
