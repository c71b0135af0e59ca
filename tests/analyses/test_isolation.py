"""The expert-isolation study: statistics against SciPy/statsmodels, forcing against plain
forwards with the adapter override, prefix reuse and batching against one forward per
condition, and the `isolate` command end to end (run folder, resume, bad input)."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAMILIES, write_jsonl
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from routelens import stats
from routelens.analyses.isolation import analysis as isolation
from routelens.analyses.isolation.analysis import (
    SINGLE_FLOOR_STREAM,
    IsolationConfig,
    IsolationJob,
    analyse_item,
    analyse_items,
    floor_conditions,
    forced_conditions,
    item_groups,
)
from routelens.analyses.isolation.table import print_isolation_summary
from routelens.analyses.route_sampling import route_rng
from routelens.cli import main
from routelens.data.target_items import TargetItem
from routelens.engine.whole_sequence import WholeSequenceScorer
from routelens.errors import SettingError
from routelens.models.routing import RouteOverride, capture_routes, override_routes


# ---------------------------------------------------------------------------- statistics
def _step_down_rejections(p: np.ndarray, alpha: float) -> int:
    """BH applied step-down (stop at the first failure from the smallest p): the wrong
    procedure, kept here only to show the case where it and step-up disagree."""
    ranked = np.sort(p)
    for i, value in enumerate(ranked, start=1):
        if value > i / len(p) * alpha:
            return i - 1
    return len(p)


@pytest.mark.parametrize("seed", range(6))
def test_bh_step_up_equals_statsmodels_on_random_p_values_with_ties(seed):
    rng = np.random.default_rng(seed)
    p = np.concatenate([rng.uniform(0, 0.08, 30), rng.uniform(0, 1, 40)])
    p[rng.integers(0, 70, 15)] = p[rng.integers(0, 70, 15)]          # ties
    p = np.round(p, 3)                                                 # more ties
    for alpha in (0.01, 0.05, 0.1):
        reject, q_ref, _, _ = multipletests(p, alpha=alpha, method="fdr_bh")
        q = stats.bh_qvalues(p)
        np.testing.assert_allclose(q, q_ref, rtol=1e-12)
        assert np.array_equal(q <= alpha, reject)


def test_bh_step_up_rejects_where_step_down_rejects_nothing():
    p = np.array([0.011, 0.02, 0.03, 0.04, 0.05, 0.045, 0.035, 0.025])
    alpha = 0.05
    assert _step_down_rejections(p, alpha) == 0        # paper 2's procedure: nothing survives
    reject, _, _, _ = multipletests(p, alpha=alpha, method="fdr_bh")
    assert reject.all()
    assert np.array_equal(stats.bh_qvalues(p) <= alpha, reject)


def test_wilcoxon_spearman_fisher_and_bootstrap_equal_scipy():
    rng = np.random.default_rng(1)
    deltas = rng.normal(0.1, 1, 40)
    assert stats.wilcoxon_p(deltas) == pytest.approx(sps.wilcoxon(deltas).pvalue, rel=1e-12)
    assert stats.wilcoxon_p(np.zeros(5)) == 1.0
    x, y = rng.normal(size=16), rng.normal(size=16)
    r, p = stats.spearman_test(x, y)
    reference = sps.spearmanr(x, y)
    assert (r, p) == pytest.approx((reference.statistic, reference.pvalue), rel=1e-12)
    xs, ys = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
    xs[2, 3] = xs[2, 4]                                                  # a tie
    np.testing.assert_allclose(stats.spearman_rows(xs, ys), [sps.spearmanr(a, b).statistic for a, b in zip(xs, ys)],
                               rtol=1e-12)
    rs = np.array([0.3, -0.2, 1.0, 0.99999, np.nan])
    expected = np.tanh(np.mean(np.arctanh(np.clip(rs[:4], -0.9999, 0.9999))))
    assert stats.fisher_z_mean(rs) == pytest.approx(expected, rel=1e-12)
    low, high = stats.median_interval(deltas)
    interval = sps.quantile_test(deltas, q=0, p=0.5).confidence_interval(0.95)
    assert (low, high) == (interval.low, interval.high) and low < np.median(deltas) < high
    # resampling unit indices is resampling the data: equal to scipy.stats.bootstrap of the mean
    values = rng.normal(size=30)
    ours = stats.bootstrap_over_units(lambda idx: values[idx].mean(axis=-1), 30, seed=5, n_resamples=500)
    theirs = sps.bootstrap((values,), np.mean, n_resamples=500, method="percentile", batch=100,
                           rng=np.random.default_rng(5)).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), rel=1e-12)


# ---------------------------------------------------------------------------- forcing
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_padded_single_expert_route_equals_the_expert_alone(family, tiny_adapters):
    """(e, 1.0) is given to the router as k slots of e with weights 1, 0, ...: the same
    output up to float summation order (the grouped GEMM sees other shapes)."""
    adapter = tiny_adapters[family]
    layer = adapter.moe_layers[-1]
    experts_module = adapter.experts(layer)
    x = torch.randn(7, adapter.config.hidden_size)
    for expert in (0, adapter.num_experts - 1):
        alone = experts_module(x, torch.full((7, 1), expert), torch.ones(7, 1))
        padded_e, padded_w = forced_conditions(adapter.num_experts, 7, adapter.top_k)
        padded = experts_module(x, padded_e[expert], padded_w[expert])
        torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-7)


def _plain_forward(adapter, ids: torch.Tensor, layer: int, experts: torch.Tensor, weights: torch.Tensor,
                   positions) -> np.ndarray:
    """log p(token t + 1) at positions, one full forward with every token's route at `layer` overridden."""
    override = RouteOverride(torch.arange(len(ids)), experts, weights)
    with torch.no_grad(), override_routes(adapter, {layer: override}):
        logits = adapter.model(ids[None], use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), -1)[positions, ids[positions + 1]].double().numpy()


def _item(adapter, seed: int, length: int = 11, prompt: int = 4) -> TargetItem:
    ids = torch.randint(4, adapter.config.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return TargetItem(f"item{seed}", "d", ids[:prompt], ids[prompt:])


def _scored_item(adapter, item_seed: int, seed: int, rows_per_chunk: int) -> tuple:
    """A random item, its ids and scored positions, and its isolation table (2 floor seeds,
    every MoE layer) from the batched scorer."""
    item = _item(adapter, seed=item_seed)
    config = IsolationConfig(floor_seeds=2, seed=seed)
    table = analyse_item(adapter, WholeSequenceScorer(adapter, rows_per_chunk=rows_per_chunk), item, adapter.moe_layers,
                         config)[0].to_pandas()
    return item, torch.tensor(item.input_ids), np.asarray(item.target_positions), table


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_reuse_and_batching_equal_one_forward_per_condition(family, tiny_adapters):
    """Every row of an item (forced experts, floor routes, every MoE layer) equals a plain
    forward of the whole model with that condition's override, to 1e-5."""
    adapter = tiny_adapters[family]
    item, ids, positions, table = _scored_item(adapter, item_seed=3, seed=4, rows_per_chunk=3)
    with torch.no_grad(), capture_routes(adapter) as captured:
        logits = adapter.model(ids[None], use_cache=False).logits[0]
    natural = torch.log_softmax(logits.float(), -1)[positions, ids[positions + 1]].double().numpy()
    row = table[table["condition"] == "natural"].iloc[0]
    assert row["mean_logprob"] == pytest.approx(natural.mean(), abs=1e-5)
    forced_e, forced_w = forced_conditions(adapter.num_experts, len(ids), adapter.top_k)
    for layer in adapter.moe_layers:
        for expert in sorted({0, 1, adapter.num_experts - 1}):
            expected = _plain_forward(adapter, ids, layer, forced_e[expert], forced_w[expert], positions)
            got = table[(table["layer"] == layer) & (table["expert"] == expert)].iloc[0]
            assert got["mean_logprob"] == pytest.approx(expected.mean(), abs=1e-5)
            assert got["first_logprob"] == pytest.approx(expected[0], abs=1e-5)
        floor_e, floor_w = floor_conditions(adapter, captured[layer].logits, layer, item.id, 4, 2)
        for seed in range(2):
            expected = _plain_forward(adapter, ids, layer, floor_e[seed], floor_w[seed], positions)
            got = table[(table["layer"] == layer) & (table["floor_seed"] == seed)].iloc[0]
            assert got["mean_logprob"] == pytest.approx(expected.mean(), abs=1e-5)
    assert len(table) == 1 + len(adapter.moe_layers) * 2 * (adapter.num_experts + 2)   # and the equal-compute arms


def _forward_with_router_hook(adapter, ids: torch.Tensor, layer: int, choose, positions) -> tuple[np.ndarray, torch.Tensor]:
    """A second implementation of a one-expert condition, from its definition: one plain
    forward whose router at `layer` is replaced by a forward hook written here (not the
    package's override): `choose(natural weights [T, k])` -> (expert [T], weight [T]) on
    every token, the other k - 1 slots other experts at weight 0. log p(token t + 1) at
    positions, and the weights the hook put on the expert."""
    fired = []

    def hook(module, args, output):
        logits, weights, experts = adapter.route_of(output)   # a router with its own layout (Llama 4), mapped
        expert, weight = choose(weights.float())
        others = (expert[:, None] + torch.arange(experts.shape[1])) % adapter.num_experts   # slot 0: the expert
        forced = torch.zeros_like(weights)
        forced[:, 0] = weight.to(weights.dtype)
        fired.append(weight)
        return adapter.router_output(output, (logits, forced, others.to(experts.device, experts.dtype)))

    handle = adapter.routers[layer].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = adapter.model(ids[None], use_cache=False).logits[0]
    finally:
        handle.remove()
    assert len(fired) == 1                                         # the hook replaced the router once
    return torch.log_softmax(logits.float(), -1)[positions, ids[positions + 1]].double().numpy(), fired[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_equal_compute_arms_equal_plain_forwards_under_a_hand_written_router_hook(family, tiny_adapters):
    """forced_matched_mass e: expert e alone at the natural route's total gate weight per
    token; single_expert_floor s: one uniformly random expert per token (the same draw) at
    weight 1.0. Each table row equals a plain forward with a router hook that does just
    that, to 1e-5, at every MoE layer; the rows' gate mass is the hook's mean weight."""
    adapter = tiny_adapters[family]
    item, ids, positions, table = _scored_item(adapter, item_seed=5, seed=7, rows_per_chunk=5)
    length = len(ids)
    for layer in adapter.moe_layers:
        at = table[table["layer"] == layer]
        for expert in sorted({0, adapter.num_experts - 1}):
            expected, weight = _forward_with_router_hook(
                adapter, ids, layer, lambda natural, e=expert: (torch.full((length,), e), natural.sum(-1)), positions)
            got = at[(at["condition"] == "forced_matched_mass") & (at["expert"] == expert)].iloc[0]
            assert got["mean_logprob"] == pytest.approx(expected.mean(), abs=1e-5)
            assert got["first_logprob"] == pytest.approx(expected[0], abs=1e-5)
            assert got["gate_mass"] == pytest.approx(float(weight.mean()), abs=1e-6)
        for seed in range(2):
            draw = torch.from_numpy(route_rng(7, layer, item.id, SINGLE_FLOOR_STREAM, seed).integers(
                0, adapter.num_experts, size=length))
            expected, _ = _forward_with_router_hook(adapter, ids, layer, lambda natural, d=draw: (d, torch.ones(length)),
                                                    positions)
            got = at[(at["condition"] == "single_expert_floor") & (at["floor_seed"] == seed)].iloc[0]
            assert got["mean_logprob"] == pytest.approx(expected.mean(), abs=1e-5)
            assert got["gate_mass"] == 1.0 and pd.isna(got["expert"])
    assert (table[table["condition"] == "forced"]["gate_mass"] == 1.0).all()


def test_chunking_does_not_change_results_and_the_equal_compute_arms_leave_the_others_unchanged(tiny_adapters):
    adapter = tiny_adapters["qwen3_moe"]
    item = _item(adapter, seed=9, length=15)
    config = IsolationConfig(floor_seeds=3)
    one = analyse_item(adapter, WholeSequenceScorer(adapter, rows_per_chunk=1), item, [0, 2], config)[0].to_pandas()
    many = analyse_item(adapter, WholeSequenceScorer(adapter), item, [0, 2], config)[0].to_pandas()
    np.testing.assert_allclose(one["mean_logprob"], many["mean_logprob"], atol=1e-6)
    assert one.drop(columns=["mean_logprob", "first_logprob"]).equals(many.drop(columns=["mean_logprob", "first_logprob"]))
    # off: the table of runs made before the arms (no gate_mass column), the same rows otherwise
    without = analyse_item(adapter, WholeSequenceScorer(adapter), item, [0, 2],
                           IsolationConfig(floor_seeds=3, equal_compute=False))[0].to_pandas()
    assert "gate_mass" not in without
    shared = many[many["condition"].isin(["natural", "forced", "floor"])].drop(columns="gate_mass").reset_index(drop=True)
    np.testing.assert_allclose(without["mean_logprob"], shared["mean_logprob"], atol=1e-6)
    assert without.drop(columns=["mean_logprob", "first_logprob"]).equals(shared.drop(columns=["mean_logprob", "first_logprob"]))


@pytest.mark.quick
def test_bad_equal_compute_settings_are_one_line_setting_errors():
    with pytest.raises(SettingError, match="`floor_seeds` 0 leaves the equal-compute arms without their single-expert"):
        IsolationConfig(floor_seeds=0)
    assert IsolationConfig(floor_seeds=0, equal_compute=False).floor_seeds == 0
    with pytest.raises(SettingError, match="`equal_compute` must be True or False, got 'yes'"):
        IsolationConfig(equal_compute="yes")
    # runs made before the arms had none: their config is one with the arms off
    assert "equal_compute" not in IsolationConfig(equal_compute=False).identity()
    assert IsolationConfig().identity()["equal_compute"] is True


def _tables_equal(got: tuple, expected: tuple, atol: float = 1e-5) -> None:
    """An item's (isolation, routing) tables: the same rows, scores within atol."""
    for got_table, expected_table in zip(got, expected, strict=True):
        got_frame, expected_frame = got_table.to_pandas(), expected_table.to_pandas()
        scores = [c for c in ("mean_logprob", "first_logprob", "gate_mass", "router_share_sum") if c in got_frame]
        assert got_frame.drop(columns=scores).equals(expected_frame.drop(columns=scores))
        np.testing.assert_allclose(got_frame[scores].to_numpy(), expected_frame[scores].to_numpy(), atol=atol)


@pytest.mark.parametrize("family", FAMILIES)
def test_items_of_unequal_length_in_one_padded_group_equal_one_item_at_a_time(family, tiny_adapters):
    """A group shares one right-padded natural forward and its scoring passes (rows of
    several items in one chunk): every row of every item, routing counts included, equals
    the item scored alone, and the scorer checked the padding inert on this model."""
    adapter = tiny_adapters[family]
    items = [_item(adapter, seed=20 + i, length=length, prompt=3) for i, length in enumerate((9, 14, 11))]
    config = IsolationConfig(floor_seeds=2, seed=5)
    rows = 1 + isolation.conditions_per_layer(adapter.num_experts, config)   # an item's rows at a layer
    scorer = WholeSequenceScorer(adapter, rows_per_chunk=2 * rows - 1)                    # chunks straddle items
    grouped = analyse_items(adapter, scorer, items, adapter.moe_layers, config)
    assert scorer.padding.verdict is not None and "inert" in scorer.padding.verdict
    for item, got in zip(items, grouped):
        _tables_equal(got, analyse_item(adapter, WholeSequenceScorer(adapter), item, adapter.moe_layers, config))


def test_padding_that_reaches_real_positions_is_refused_and_the_job_scores_items_alone(tiny_adapters):
    """A model whose embedding output mixes in later positions (not causal): a padded row is
    not the item alone. The scorer says so (`PaddingNotInert`), and the isolation job scores
    the group one item at a time instead, with the reason in its checks."""
    from routelens.engine.checks import PaddingNotInert

    adapter = tiny_adapters["qwen3_moe"]
    items = [_item(adapter, seed=30 + i, length=length, prompt=3) for i, length in enumerate((8, 13))]
    config = IsolationConfig(floor_seeds=1, layers=[adapter.moe_layers[0]])
    leak = adapter.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: out + out.mean(dim=1, keepdim=True))        # every position sees the whole row
    try:
        with pytest.raises(PaddingNotInert, match="padding reaches real positions"):
            analyse_items(adapter, WholeSequenceScorer(adapter), items, config.layers, config)
        job = IsolationJob(items, config.layers, config)
        job.setup(SimpleNamespace(adapter=adapter))          # this process's model, as run_isolation gives it
        got = job.run([0, 1])
        alone = [analyse_item(adapter, WholeSequenceScorer(adapter), item, config.layers, config) for item in items]
    finally:
        leak.remove()
    for tables, expected in zip(got, alone):
        _tables_equal((tables["isolation"], tables["routing"]), expected, atol=1e-6)
    checks = job.checks()
    assert checks["item_batching_fallback"].startswith("one item at a time: ")
    assert "padding reaches real positions" in checks["item_batching_fallback"]


def test_item_groups_follow_length_and_fill_one_chunk():
    lengths = [30, 10, 12, 31, 11, 50]
    groups = item_groups(lengths, rows_per_item=10, rows_per_chunk=lambda length: 1200 // length, most=3)
    assert sorted(i for group in groups for i in group) == list(range(6))     # every item once
    flat = [i for group in groups for i in group]
    assert [lengths[i] for i in flat] == sorted(lengths)                        # by length
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert len(group) <= 3 and (len(group) == 1 or len(group) * 10 <= 1200 // longest)
    assert groups == [[1, 4, 2], [0, 3], [5]]
    assert item_groups(lengths, 10, lambda length: 10**6, most=1) == [[1], [4], [2], [0], [3], [5]]


def test_the_read_out_is_checked_against_the_models_own_logits(tiny_adapters, monkeypatch):
    """Log-probs are read off the final norm through the adapter's head; a head that is
    not the model's (here: shifted by 0.1 nats) is an error, not a number."""
    from routelens.engine import whole_sequence
    from routelens.engine.checks import RuntimeCheckFailed

    adapter = tiny_adapters["olmoe"]
    original = whole_sequence.target_log_probs
    monkeypatch.setattr(whole_sequence, "target_log_probs", lambda *args: original(*args) + 0.1)
    with pytest.raises(RuntimeCheckFailed, match="read-out check failed .*differs from the model's logits by up to 0.1"):
        WholeSequenceScorer(adapter).natural(torch.arange(3, 15), [adapter.moe_layers[0]], [4, 6])


def test_floor_routes_are_uniform_distinct_and_weighted_by_the_gating_rule(tiny_adapters):
    adapter = tiny_adapters["mixtral"]
    logits = torch.randn(4000, adapter.num_experts)
    experts, weights = floor_conditions(adapter, logits, 0, "x", seed=1, floor_seeds=2)
    assert experts.shape == (2, 4000, adapter.top_k)
    assert all(len(set(route.tolist())) == adapter.top_k for route in experts[0, :50])
    counts = np.bincount(experts[0].reshape(-1).numpy(), minlength=adapter.num_experts)
    expected = 4000 * adapter.top_k / adapter.num_experts
    assert sps.chisquare(counts).pvalue > 1e-3 and abs(counts.mean() - expected) < 1e-9
    torch.testing.assert_close(weights[1], adapter.weights_for(logits, experts[1]))
    again, _ = floor_conditions(adapter, logits, 0, "x", seed=1, floor_seeds=2)
    assert torch.equal(again, experts) and not torch.equal(experts[0], experts[1])


# ---------------------------------------------------------------------------- the command
DOMAIN_ITEMS = [{"id": f"{d}{i}", "domain": d, "prompt": f"Q:{i}{op}{i + 2}=A:", "target": f"{i}{op}{i + 2}#{i}"}
                for d, op in (("add", "+"), ("mul", "*")) for i in range(8)]


def _isolate_args(model, items, out, *extra):
    return ["isolate", "--model", model, "--items", items, "--layers", "all", "--floor-seeds", "2",
            "--bootstrap-resamples", "200", "--out", out, "--no-progress", *extra]


def test_isolate_command_tables_agree_with_scipy_and_statsmodels(saved_model, tmp_path, capsys):
    items = write_jsonl(tmp_path / "items.jsonl", DOMAIN_ITEMS)
    out = str(tmp_path / "iso")
    assert main(_isolate_args(saved_model, items, out)) == 0
    assert "helpful against the single-expert floor" in " ".join(capsys.readouterr().out.split())
    rows = pd.read_parquet(os.path.join(out, "isolation.parquet"))
    cells = pd.read_parquet(os.path.join(out, "cells.parquet"))
    calibration = pd.read_parquet(os.path.join(out, "calibration.parquet"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    run = json.load(open(os.path.join(out, "run.json")))
    num_experts, layers = 8, [0, 1, 2]
    assert run["status"] == "complete" and run["config"]["resolved_layers"] == layers
    assert run["config"]["floor_seeds"] == 2 and run["config"]["equal_compute"] is True
    assert run["summary_settings"]["alpha"] == 0.05
    assert summary["equal_compute"] is True and summary["floor_seeds"] == 2
    assert len(rows) == 16 * (1 + len(layers) * 2 * (num_experts + 2))
    assert rows[rows["condition"] == "natural"]["layer"].isna().all()
    assert rows[rows["condition"] == "forced"]["floor_seed"].isna().all()
    assert not rows.duplicated(["item_id", "layer", "condition", "expert", "floor_seed"]).any()
    assert len(cells) == 2 * len(layers) * num_experts and (cells["n"] == 8).all()
    assert summary["smallest_possible_p"] == pytest.approx(sps.wilcoxon(np.arange(1, 9)).pvalue)

    # every cell's statistics, recomputed from isolation.parquet with SciPy and statsmodels
    natural = rows[rows["condition"] == "natural"].set_index("item_id")["mean_logprob"]
    for _, cell in cells.sample(10, random_state=0).iterrows():
        forced = rows[(rows["condition"] == "forced") & (rows["layer"] == cell["layer"])
                      & (rows["expert"] == cell["expert"]) & (rows["domain"] == cell["domain"])].set_index("item_id")
        deltas = forced["mean_logprob"] - natural.reindex(forced.index)
        assert cell["p_value"] == pytest.approx(sps.wilcoxon(deltas).pvalue, rel=1e-9)
        assert cell["median_delta"] == pytest.approx(np.median(deltas), rel=1e-12)
        floor_mean = rows[(rows["condition"] == "floor") & (rows["layer"] == cell["layer"])].groupby("item_id")[
            "mean_logprob"].mean().reindex(forced.index)
        assert cell["p_value_vs_floor"] == pytest.approx(sps.wilcoxon(forced["mean_logprob"] - floor_mean).pvalue, rel=1e-9)
    reject, q, _, _ = multipletests(cells["p_value"], alpha=0.05, method="fdr_bh")
    np.testing.assert_allclose(cells["q_value"], q, rtol=1e-12)
    assert np.array_equal(cells["significant"], reject)
    assert summary["comparisons"]["forced_vs_natural"]["significant"] == int(reject.sum())
    _comparisons_by_hand(rows, cells, summary, alpha=0.05)

    # calibration: Spearman over experts per (domain, layer), Fisher-z mean over layers
    for domain in ("add", "mul"):
        at = cells[(cells["domain"] == domain)]
        per_layer = []
        for layer in layers:
            layer_cells = at[at["layer"] == layer]
            r = sps.spearmanr(layer_cells["natural_share"], layer_cells["mean_delta"]).statistic
            row = calibration[(calibration["domain"] == domain) & (calibration["share"] == "router_share")
                              & (calibration["layer"] == layer)].iloc[0]
            assert row["spearman"] == pytest.approx(r, rel=1e-9)
            per_layer.append(r)
        mean_row = calibration[(calibration["domain"] == domain) & (calibration["share"] == "router_share")
                               & calibration["layer"].isna()].iloc[0]
        expected = np.tanh(np.mean(np.arctanh(np.clip(per_layer, -0.9999, 0.9999))))
        assert mean_row["spearman"] == pytest.approx(expected, rel=1e-9)
        assert mean_row["ci_low"] <= mean_row["ci_high"]
        assert summary["calibration"][domain]["router_share"]["fisher_z_mean"] == pytest.approx(expected, rel=1e-9)
        # natural shares are shares: they sum to 1 over experts at each layer
        assert at.groupby("layer")["natural_share"].sum().to_numpy() == pytest.approx(1.0)
        assert at.groupby("layer")["selection_share"].sum().to_numpy() == pytest.approx(1.0)
    for row in summary["dominance"]:
        layer_cells = cells[(cells["domain"] == row["domain"]) & (cells["layer"] == row["layer"])]
        assert row["most_activated"] == int(layer_cells.loc[layer_cells["selection_share"].idxmax(), "expert"])
        assert row["vs_uniform"] == pytest.approx(layer_cells["selection_share"].max() * num_experts)

    # a different alpha re-summarises the same tables (no recomputation); another seed is another run
    assert main(_isolate_args(saved_model, items, out, "--alpha", "0.2")) == 0
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["alpha"] == 0.2
    _comparisons_by_hand(rows, pd.read_parquet(os.path.join(out, "cells.parquet")), summary, alpha=0.2)
    assert pd.read_parquet(os.path.join(out, "isolation.parquet")).equals(rows)
    assert json.load(open(os.path.join(out, "run.json")))["timings"]["items_scored_this_session"] == 0
    assert main(_isolate_args(saved_model, items, out, "--seed", "1")) == 2
    assert "differs in: seed" in capsys.readouterr().err


# what each comparison subtracts from what, written out again: (arm condition, baseline condition, cells suffix)
BY_HAND = {"forced_vs_natural": ("forced", "natural", ""),
           "forced_vs_floor": ("forced", "floor", "_vs_floor"),
           "forced_vs_single_expert_floor": ("forced", "single_expert_floor", "_vs_single_expert_floor"),
           "matched_mass_vs_natural": ("forced_matched_mass", "natural", "_matched_mass_vs_natural"),
           "matched_mass_vs_floor": ("forced_matched_mass", "floor", "_matched_mass_vs_floor")}


def _comparisons_by_hand(rows: pd.DataFrame, cells: pd.DataFrame, summary: dict, alpha: float) -> tuple[int, int]:
    """Every comparison of every cell recomputed from isolation.parquet with plain loops:
    per item, the arm's score minus the baseline's (a floor: the mean of its seeds);
    scipy's Wilcoxon and quantile-test interval; statsmodels' BH over the comparison's
    cells; harmful / helpful counts; the verdict column and the summary's counts. Returns
    the verdict's (harmful, helpful)."""
    score = {}   # (condition, item, layer, expert) -> its scores (one per floor seed); -1: no layer / no expert
    for _, r in rows.iterrows():
        key = (r["condition"], r["item_id"], -1 if pd.isna(r["layer"]) else int(r["layer"]),
               -1 if pd.isna(r["expert"]) else int(r["expert"]))
        score.setdefault(key, []).append(r["mean_logprob"])

    def value(condition, item, layer, expert):
        layer, expert = (-1, -1) if condition == "natural" else (layer, -1) if "floor" in condition else (layer, expert)
        return float(np.mean(score[(condition, item, layer, expert)]))

    items = {d: sorted(rows[rows["domain"] == d]["item_id"].unique()) for d in rows["domain"].unique()}
    for name, (arm, baseline, suffix) in BY_HAND.items():
        p_values, harmful, helpful = [], 0, 0
        for _, cell in cells.iterrows():
            deltas = np.array([value(arm, i, cell["layer"], cell["expert"]) - value(baseline, i, cell["layer"], cell["expert"])
                               for i in items[cell["domain"]]])
            p = sps.wilcoxon(deltas).pvalue if np.any(deltas != 0) else 1.0
            assert cell[f"p_value{suffix}"] == pytest.approx(p, rel=1e-9), (name, cell["layer"], cell["expert"])
            assert cell[f"median_delta{suffix}"] == pytest.approx(np.median(deltas), rel=1e-9, abs=1e-12)
            interval = sps.quantile_test(deltas, q=0, p=0.5).confidence_interval(0.95)
            assert [cell[f"ci_low{suffix}"], cell[f"ci_high{suffix}"]] == pytest.approx([interval.low, interval.high],
                                                                                       nan_ok=True)
            p_values.append(p)
        reject, q, _, _ = multipletests(p_values, alpha=alpha, method="fdr_bh")
        np.testing.assert_allclose(cells[f"q_value{suffix}"], q, rtol=1e-9)
        assert np.array_equal(cells[f"significant{suffix}"], reject)
        medians = cells[f"median_delta{suffix}"].to_numpy()
        harmful, helpful = int((reject & (medians < 0)).sum()), int((reject & (medians > 0)).sum())
        counts = summary["comparisons"][name]
        assert (counts["cells"], counts["significant"], counts["harmful"], counts["helpful"]) == (
            len(cells), int(reject.sum()), harmful, helpful), name
        if name == "forced_vs_single_expert_floor":   # the verdict's basis
            expected = np.where(reject & (medians < 0), "harmful", np.where(reject & (medians > 0), "helpful", "neither"))
            assert cells["verdict"].tolist() == expected.tolist()
            assert (summary["verdict"]["harmful"], summary["verdict"]["helpful"]) == (harmful, helpful)
            verdict = harmful, helpful
    for name, definition in summary["definitions"]["comparisons"].items():
        arm, baseline, _ = BY_HAND[name]
        assert definition["compares"] == f"{arm} - {baseline}" and "items" in definition["unit"]
        assert "Benjamini-Hochberg step-up over the" in definition["adjustment"]
    assert set(summary["definitions"]["comparisons"]) == set(BY_HAND)
    return verdict


def test_isolate_resumes_after_an_interruption_without_loss_or_duplicates(saved_model, tmp_path, monkeypatch):
    """Groups of 2 items; the second group is interrupted: the first group's items are kept,
    the resumed session scores the other 4 (in the same groups), and the tables equal an
    uninterrupted run's."""
    items = write_jsonl(tmp_path / "items.jsonl", DOMAIN_ITEMS[:6])
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    args = ("--layers", "0,-1", "--group-items", "2")
    assert main(_isolate_args(saved_model, items, whole, *args)) == 0
    real, calls = isolation.analyse_items, {"n": 0}

    def interrupted(*call_args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*call_args, **kwargs)

    monkeypatch.setattr(isolation, "analyse_items", interrupted)
    assert main(_isolate_args(saved_model, items, cut, *args)) == 130
    assert json.load(open(os.path.join(cut, "run.json")))["status"] == "running"
    assert not os.path.exists(os.path.join(cut, "cells.parquet"))
    monkeypatch.setattr(isolation, "analyse_items", real)
    assert main(_isolate_args(saved_model, items, cut, *args)) == 0
    assert json.load(open(os.path.join(cut, "run.json")))["timings"]["items_scored_this_session"] == 4
    for table in ("isolation", "cells"):
        pd.testing.assert_frame_equal(pd.read_parquet(os.path.join(cut, f"{table}.parquet")),
                                      pd.read_parquet(os.path.join(whole, f"{table}.parquet")), check_exact=True)


def _planted_tables(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Synthetic isolation and routing tables (2 domains x 12 items, layers 0 and 3, 4
    experts, 2 floor seeds) with planted effects: against the single-expert floor expert 0
    is worse (harmful) and expert 1 better (helpful) at layer 0; at matched mass expert 2
    matches natural routing."""
    rng = np.random.default_rng(seed)
    rows, routing = [], []
    for domain in ("a", "b"):
        for i in range(12):
            item = f"{domain}{i}"
            natural = rng.normal(-1, 0.1)
            rows.append({"item_id": item, "domain": domain, "layer": None, "condition": "natural", "expert": None,
                         "floor_seed": None, "mean_logprob": natural})
            for layer in (0, 3):
                single = natural - 0.8 + rng.normal(0, 0.05)
                for s in range(2):
                    rows.append({"item_id": item, "domain": domain, "layer": layer, "condition": "floor", "expert": None,
                                 "floor_seed": s, "mean_logprob": natural - 0.3 + rng.normal(0, 0.05)})
                    rows.append({"item_id": item, "domain": domain, "layer": layer, "condition": "single_expert_floor",
                                 "expert": None, "floor_seed": s, "mean_logprob": single + rng.normal(0, 0.02)})
                for e in range(4):
                    shift = {0: -0.5, 1: +0.5}.get(e, 0.0) if layer == 0 else 0.0
                    rows.append({"item_id": item, "domain": domain, "layer": layer, "condition": "forced", "expert": e,
                                 "floor_seed": None, "mean_logprob": single + shift + rng.normal(0, 0.05)})
                    rows.append({"item_id": item, "domain": domain, "layer": layer, "condition": "forced_matched_mass",
                                 "expert": e, "floor_seed": None,
                                 "mean_logprob": natural + (rng.normal(0, 0.05) if e == 2 else -0.4 + rng.normal(0, 0.1))})
                    routing.append({"item_id": item, "domain": domain, "layer": layer, "expert": e, "tokens": 10,
                                    "router_share_sum": 10 * (e + 1) / 10, "selected": 5 * (e + 1)})
    frame = pd.DataFrame(rows)
    frame["first_logprob"] = frame["mean_logprob"]
    frame["gate_mass"] = np.where(frame["condition"] == "natural", np.nan, 1.0)
    return frame, pd.DataFrame(routing)


@pytest.mark.quick
def test_the_summary_of_planted_effects_equals_the_comparisons_by_hand():
    """The summary's five comparisons on a table with known effects: every statistic equals
    the plain-loop recomputation, and the verdict finds the planted harmful and helpful cells."""
    rows, routing = _planted_tables()
    config = IsolationConfig(floor_seeds=2, bootstrap_resamples=50)
    summary, cells, _ = isolation.summarise(rows, routing, [0, 3], 4, 2, config)
    harmful, helpful = _comparisons_by_hand(rows, cells, summary, alpha=0.05)
    verdict = cells.set_index(["domain", "layer", "expert"])["verdict"]
    assert harmful == helpful == 2 and summary["verdict"]["by_domain"]["a"] == {"harmful": 1, "helpful": 1, "neither": 6}
    assert verdict[("a", 0, 0)] == verdict[("b", 0, 0)] == "harmful" and verdict[("a", 0, 1)] == "helpful"
    # against natural routing every forced expert is worse, the helpful one too: the unequal comparison
    assert summary["comparisons"]["forced_vs_natural"]["harmful"] == len(cells)
    matched = cells.set_index(["domain", "layer", "expert"])["significant_matched_mass_vs_natural"]
    assert not matched[("a", 0, 2)] and matched[("a", 0, 3)]
    layer = next(r for r in summary["layer_table"] if (r["domain"], r["layer"]) == ("a", 0))
    assert (layer["harmful_cells"], layer["helpful_cells"], layer["natural_gate_mass"]) == (1, 1, 1.0)


# what a run made before the equal-compute arms wrote (routelens at 8126931)
OLD_CELL_COLUMNS = ["domain", "layer", "expert", "n", "mean_delta", "median_delta", "ci_low", "ci_high", "p_value",
                    "q_value", "significant", "median_delta_vs_floor", "p_value_vs_floor", "q_value_vs_floor",
                    "significant_vs_floor", "natural_share", "selection_share"]
OLD_LAYER_KEYS = ["domain", "layer", "best_expert", "best_median_delta", "best_ci", "best_q_value", "significant_cells",
                  "significant_better", "floor_median_delta", "floor_p_value", "natural_mean_score"]
OLD_SUMMARY_KEYS = ["analysis", "score", "alpha", "layers", "num_experts", "items_per_domain", "smallest_possible_p",
                    "cells", "calibration", "dominance", "layer_table", "tests"]


def _make_old(out: str) -> dict:
    """Turn a run made with the equal-compute arms off into what routelens wrote before them:
    the old cells columns, the old layer-table keys, the old summary with its flat counts."""
    cells = pd.read_parquet(os.path.join(out, "cells.parquet"))
    cells[OLD_CELL_COLUMNS].to_parquet(os.path.join(out, "cells.parquet"), index=False)
    new = json.load(open(os.path.join(out, "summary.json")))
    natural, floor = new["comparisons"]["forced_vs_natural"], new["comparisons"]["forced_vs_floor"]
    old = {key: new[key] for key in OLD_SUMMARY_KEYS}
    old.update(significant_cells=natural["significant"], significant_better_than_natural=natural["helpful"],
               significant_vs_floor=floor["significant"], significant_better_than_floor=floor["helpful"],
               significant_by_domain=natural["significant_by_domain"],
               layer_table=[{key: row[key] for key in OLD_LAYER_KEYS} for row in new["layer_table"]])
    json.dump(old, open(os.path.join(out, "summary.json"), "w"))
    return old


def test_a_run_made_before_the_equal_compute_arms_reads_prints_reports_and_resummarises(saved_model, tmp_path, capsys):
    """Its tables (no equal-compute rows, no gate_mass), old cells columns and old summary:
    read_run, the printed tables and the report show the new columns as - and say why; the
    default command refuses to mix it with the arms (its config differs in equal_compute),
    and --no-equal-compute re-summarises it without rescoring."""
    import routelens as rl

    items = write_jsonl(tmp_path / "items.jsonl", DOMAIN_ITEMS[:4] + DOMAIN_ITEMS[8:12])
    out = str(tmp_path / "old")
    args = ("--layers", "0,-1")
    assert main(_isolate_args(saved_model, items, out, *args, "--no-equal-compute")) == 0
    rows = pd.read_parquet(os.path.join(out, "isolation.parquet"))
    assert set(rows["condition"]) == {"natural", "forced", "floor"} and "gate_mass" not in rows
    assert "equal_compute" not in json.load(open(os.path.join(out, "run.json")))["config"]
    old = _make_old(out)
    capsys.readouterr()

    result = rl.read_run(out)
    assert list(result.cells.columns) == OLD_CELL_COLUMNS and len(result.summary) == 2 * 2
    print_isolation_summary(result.summary_dict)
    printed = " ".join(capsys.readouterr().out.split())
    assert "no verdict at equal compute" in printed
    assert f"{old['significant_cells']} of {old['cells']} cells (domain x layer x expert) differ from natural" in printed
    assert "it was made before the equal-compute arms existed" in printed
    assert "forced vs single-expert floor (verdict) │ equal: 1 expert each │ equal: 1.0 each │ - │ - │ - │" in printed
    page_path = str(tmp_path / "old.html")
    assert main(["report", out, "--out", page_path]) == 0
    page = open(page_path, encoding="utf-8").read()
    assert "made before the equal-compute arms existed" in page and 'id="fig-iso_verdict_heatmap"' not in page
    assert 'id="fig-iso_delta_heatmap"' in page and 'id="iso-comparisons"' in page

    assert main(_isolate_args(saved_model, items, out, *args)) == 2
    assert "differs in: equal_compute" in capsys.readouterr().err
    assert main(_isolate_args(saved_model, items, out, *args, "--no-equal-compute")) == 0
    assert json.load(open(os.path.join(out, "run.json")))["timings"]["items_scored_this_session"] == 0
    assert "it was run with equal_compute off" in " ".join(capsys.readouterr().out.split())
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["verdict"] is None and summary["equal_compute"] is False
    assert summary["comparisons"]["forced_vs_single_expert_floor"] is None
    assert summary["comparisons"]["forced_vs_natural"]["significant"] == old["significant_cells"]
    assert pd.read_parquet(os.path.join(out, "isolation.parquet")).equals(rows)


@pytest.mark.parametrize("case, message", [
    ("malformed", "line 2: malformed JSON"),
    ("no_domain", "missing field 'domain'"),
    ("no_target", "missing field(s) 'target'"),
    ("unknown_domain", "domain(s) geo not in"),
    ("duplicate", "duplicate item id"),
    ("dense_layer", "layer 1 is a dense layer"),
    ("alpha", "--alpha must lie strictly between 0 and 1"),
    ("no_items", "give --items FILE"),
    ("too_many", "reserves 100 items per domain"),
])
def test_isolate_bad_input_one_line_exit_2(case, message, saved_model, tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", DOMAIN_ITEMS[:2])
    bad = {
        "malformed": [json.dumps(DOMAIN_ITEMS[0]), "{oops"],
        "no_domain": [{"id": "a", "prompt": "Q", "target": "1"}],
        "no_target": [{"id": "a", "domain": "d", "prompt": "Q"}],
        "duplicate": [DOMAIN_ITEMS[0], DOMAIN_ITEMS[0]],
    }
    out = str(tmp_path / "r")
    args = {
        "unknown_domain": _isolate_args(saved_model, good, out, "--domains", "geo"),
        "dense_layer": ["isolate", "--model", "tiny:qwen2_moe", "--items", good, "--layers", "1", "--out", out],
        "alpha": _isolate_args(saved_model, good, out, "--alpha", "2"),
        "no_items": ["isolate", "--model", saved_model, "--out", out],
        "too_many": ["isolate", "--model", "demo", "--per-domain", "101", "--out", out],
    }.get(case) or _isolate_args(saved_model, write_jsonl(tmp_path / "bad.jsonl", bad[case]), out)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not os.path.exists(os.path.join(out, "cells.parquet"))


@pytest.mark.quick
def test_cell_table_equals_the_cell_by_cell_statistics():
    """cell_table computes each comparison's statistics for all cells at once; every cell's
    median, interval and p equal `_cell_statistics` of that cell's deltas (SciPy one cell
    at a time), with ties and zero deltas among the cells and a comparison not run."""
    rng = np.random.default_rng(3)
    n, layers, experts = 12, [0, 2], 4
    forced = rng.normal(size=(n, 2, experts))
    forced[:, 1, 2] = np.round(forced[:, 1, 2], 0)                       # ties and zero deltas
    natural = np.round(rng.normal(size=n), 0)
    scores = {isolation.NATURAL: natural, isolation.FORCED: forced, isolation.FLOOR: rng.normal(size=(n, 2)),
              isolation.FORCED_MATCHED_MASS: None, isolation.SINGLE_EXPERT_FLOOR: rng.normal(size=(n, 2))}
    arrays = isolation.DomainArrays([f"i{i}" for i in range(n)], scores, dict.fromkeys(scores),
                                    rng.random((n, 2, experts)), rng.integers(0, 5, (n, 2, experts)).astype(float),
                                    np.full((n, 2), 10.0))
    cells = isolation.cell_table({"d": arrays}, layers, 2, 0.05)
    for comparison in isolation.COMPARISONS:
        deltas = arrays.versus(comparison)
        for _, cell in cells.iterrows():
            li = layers.index(cell["layer"])
            expected = isolation._cell_statistics(None if deltas is None else deltas[:, li, cell["expert"]],
                                                  comparison.suffix)
            assert all(np.array_equal(cell[name], value, equal_nan=True) for name, value in expected.items()), \
                (comparison.name, cell["layer"], cell["expert"])
    assert cells["p_value"].notna().all() and cells[f"p_value{isolation.BY_NAME['matched_mass_vs_natural'].suffix}"].isna().all()
